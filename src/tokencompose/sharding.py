"""Splitting work over processes: one disjoint shard per process, under ``accelerate launch`` or by hand.

Commands that write one file per item (generation, detection, grounded masks) split the items by index
(``index % count == shard``), so shards never write the same file and any of them can be re-run alone.
Under ``accelerate launch`` (``WORLD_SIZE`` > 1) and no explicit shard, each process takes its own
(``process_index`` of ``num_processes``) on its own device; otherwise ``--shard/--num-shards`` pick one by
hand (several machines sharing a folder).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch

from tokencompose.errors import UserError


@dataclasses.dataclass
class ShardSettings:
    """How the work is split: under ``accelerate launch`` one disjoint shard per process by default."""

    batch_size: int = 8
    """Images per model call."""
    shard: int | None = None
    """This process's shard (default: accelerate's process index, else 0)."""
    num_shards: int | None = None
    """Number of shards (default: accelerate's number of processes, else 1)."""


@dataclasses.dataclass
class Shard:
    """Where this process runs and which part of the work is its own."""

    device: torch.device
    index: int
    count: int
    state: Any = None  # accelerate's PartialState under ``accelerate launch``

    def wait(self) -> None:
        """Barrier across the processes of an ``accelerate launch`` (a no-op otherwise)."""
        if self.state is not None:
            self.state.wait_for_everyone()

    @property
    def main(self) -> bool:
        """Whether this process writes what all shards share (the merged outputs)."""
        return self.state is None or self.state.is_main_process

    def owns(self, index: int) -> bool:
        """Whether item ``index`` belongs to this shard."""
        return index % self.count == self.index


def force_cpu() -> bool:
    """Whether Accelerate must be told ``cpu=True``: asked for, or several processes and no GPU.

    Accelerate only sets up multi-process CPU work (gloo) when told it runs on the CPU; a
    ``torchrun --nproc_per_node 2`` on a machine without GPUs would otherwise start 2 independent runs.
    """
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def resolve_shard(device: str, run: ShardSettings) -> Shard:
    """Under ``accelerate launch`` (and no explicit shard): one shard per process on its device."""
    from tokencompose.loading import resolve_device  # lazy: loading imports diffusers

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and run.shard is None:
        from accelerate import PartialState

        state = PartialState(cpu=force_cpu())
        return Shard(state.device, state.process_index, state.num_processes, state)
    count = run.num_shards or 1
    index = run.shard or 0
    if count < 1 or not 0 <= index < count:
        raise UserError(f"shard {index} does not exist among {count} shards (0..{count - 1})")
    return Shard(resolve_device(device), index, count)


def progress_bar(desc: str, unit: str) -> Callable[[int, int], None]:
    """An ``on_batch(done, total)`` callback that draws a tqdm bar (created at the first call, closed at the end)."""
    from tqdm.auto import tqdm

    bar: list[Any] = []

    def on_batch(done: int, total: int) -> None:
        if not bar:
            bar.append(tqdm(total=total, desc=desc, unit=unit, disable=None))  # None: no bar off a terminal
        bar[0].update(done - bar[0].n)
        if done >= total:
            bar[0].close()

    return on_batch
