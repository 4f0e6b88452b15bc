"""Splitting work over processes: one disjoint shard per process, under ``accelerate launch`` or by hand.

Commands that write one file per item (generation, detection, grounded masks) split the items by index
(``index % count == shard``), so shards never write the same file and any of them can be re-run alone.
Under ``accelerate launch`` (``WORLD_SIZE`` > 1) and no explicit shard, each process takes its own
(``process_index`` of ``num_processes``) on its own device; otherwise ``--shard/--num-shards`` pick one by
hand (several machines sharing a folder).

Scoring that returns one row per item (Inception features, BLIP / CLIP answers) goes through
:func:`shard_map`: each launched process scores its items into a part file, process 0 merges them in item order.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from tokencompose.errors import UserError

T = TypeVar("T")


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


PART_SUFFIXES = (".npy", ".json")  # an array part, a list part


def _write_part(stem: str, rows: Any) -> None:
    """One process's rows: a numpy array as ``.npy``, a list as ``.json`` (atomic: a crash leaves no half file)."""
    import io

    from tokencompose.atomic import atomic_write_bytes, atomic_write_text

    if isinstance(rows, np.ndarray):
        buf = io.BytesIO()
        np.save(buf, rows)
        atomic_write_bytes(Path(stem + ".npy"), buf.getvalue())
    else:
        atomic_write_text(Path(stem + ".json"), json.dumps(list(rows)))


def _read_part(stem: str) -> Any:
    if Path(stem + ".npy").is_file():
        return np.load(stem + ".npy")
    if Path(stem + ".json").is_file():
        return json.loads(Path(stem + ".json").read_text())
    raise RuntimeError(f"part file {stem}.npy / .json of a launched process is missing after the barrier")


def interleave(parts: Sequence[Any], total: int) -> Any:
    """Rows of ``parts[k]`` (items ``k, k + count, ...``) back in item order: a ``[total, ...]`` array or a list.

    The inverse of ``items[k::count]`` per part; a part of an empty shard may be an empty list.
    """
    count = len(parts)
    if any(len(p) != len(range(k, total, count)) for k, p in enumerate(parts)):
        raise RuntimeError(f"parts of {[len(p) for p in parts]} rows do not split {total} items over {count}")
    arrays = [p for p in parts if isinstance(p, np.ndarray) and len(p)]
    out: Any = np.empty((total, *arrays[0].shape[1:]), dtype=arrays[0].dtype) if arrays else [None] * total
    for k, part in enumerate(parts):
        if len(part):
            out[k::count] = part
    return out


def shard_map(shard: Shard, items: Sequence[T], work: Callable[[list[T]], Any], parts: Path, name: str) -> Any:
    """``work(items)`` split over the processes of a launch; process 0 returns every row in item order.

    ``work`` maps a list of items to one row per item: a list (JSON-serialisable rows) or a numpy array.
    Under ``accelerate launch`` each process runs it on its items (``index % count == shard``), writes them
    to ``parts/<name>-<shard>-of-<count>.npy|json`` and waits for the others; process 0 reads the parts, merges them
    and deletes them; the other processes return None. Outside a launch (one process, or shards picked by
    hand, which cannot wait for one another) this process does every item.
    """
    items = list(items)
    if shard.state is None or shard.count == 1:
        return work(items)
    mine = items[shard.index :: shard.count]
    rows = work(mine) if mine else []
    if len(rows) != len(mine):
        raise RuntimeError(f"{name}: {len(rows)} rows for {len(mine)} items")
    parts.mkdir(parents=True, exist_ok=True)
    stem = lambda k: str(parts / f"{name}-{k}-of-{shard.count}")  # noqa: E731
    _write_part(stem(shard.index), rows)
    shard.wait()
    if not shard.main:
        return None
    merged = interleave([_read_part(stem(k)) for k in range(shard.count)], len(items))
    for k in range(shard.count):
        for suffix in PART_SUFFIXES:
            Path(stem(k) + suffix).unlink(missing_ok=True)
    return merged
