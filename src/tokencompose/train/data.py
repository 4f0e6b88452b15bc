"""Deterministic, sharded, resumable feeding of training batches.

Data order is a pure function of ``(seed, epoch)``: epoch ``e`` uses the permutation drawn from a
generator seeded with ``seed + e``. Global batch ``g`` of an epoch is the slice
``perm[g*B*W : (g+1)*B*W]``; process ``r`` of ``W`` takes its ``B`` consecutive items. So:

- the global batch does not depend on the number of processes (``B*W`` fixed = same samples);
- resuming at micro-batch ``k`` means starting epoch ``k // batches_per_epoch`` at its batch
  ``k % batches_per_epoch``, without loading the skipped samples;
- per-sample randomness (the dataset's random flip) is seeded from ``(seed, epoch, index)`` by
  :class:`SeededSamples`, so it is the same with 0 or 8 workers, before or after a resume.

Incomplete global batches at the end of an epoch are dropped, so every per-process batch has
exactly ``B`` samples and averaging per-sample losses locally, then across processes (DDP), is the
mean over the global batch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokencompose.data import records as R
from tokencompose.data.outputs import atomic_write_text

log = logging.getLogger(__name__)


class SeededSamples(torch.utils.data.Dataset):
    """Wrap a map-style dataset; key ``epoch * n + i`` -> ``dataset[i]`` with torch RNG seeded by (seed, epoch, i)."""

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int) -> Any:
        epoch, i = divmod(int(key), len(self.dataset))
        sample_seed = int(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1, dtype=np.uint64)[0]) >> 1
        # fork_rng restores the caller's RNG afterwards: the training process's own stream is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            return self.dataset[i]


class EpochBatchSampler:
    """Batch sampler yielding this process's keys (``epoch * n + i``) of each global batch of an epoch.

    ``set_position(epoch, start)`` selects the epoch and its first global batch; iterate once per epoch.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, shuffle: bool = True, num_replicas: int = 1, rank: int = 0
    ) -> None:
        self.n, self.batch_size, self.seed, self.shuffle = int(n), int(batch_size), int(seed), bool(shuffle)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.global_batch = self.batch_size * self.num_replicas
        self.batches_per_epoch = self.n // self.global_batch
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"the dataset has {self.n} samples, fewer than one global batch "
                f"({self.batch_size} per process x {self.num_replicas} processes)"
            )
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start

    def __iter__(self) -> Iterator[list[int]]:
        perm = self.permutation(self.epoch).tolist()
        offset = self.epoch * self.n
        for g in range(self.start, self.batches_per_epoch):
            first = g * self.global_batch + self.rank * self.batch_size
            yield [offset + i for i in perm[first : first + self.batch_size]]


def build_loader(
    dataset: Any,
    collate_fn: Any,
    batch_size: int,
    seed: int,
    shuffle: bool,
    num_workers: int,
    num_replicas: int = 1,
    rank: int = 0,
    pin_memory: bool = False,
) -> tuple[torch.utils.data.DataLoader, EpochBatchSampler]:
    """DataLoader over :class:`SeededSamples` with an :class:`EpochBatchSampler` (returned for positioning)."""
    sampler = EpochBatchSampler(len(dataset), batch_size, seed, shuffle, num_replicas, rank)
    loader = torch.utils.data.DataLoader(
        SeededSamples(dataset, seed),
        batch_sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,  # the sampler runs in this process, so repositioning still works
        pin_memory=pin_memory,
        # An explicit generator: creating an iterator must not draw from the global torch RNG.
        generator=torch.Generator().manual_seed(int(seed)),
    )
    return loader, sampler


def batch_stream(
    loader: torch.utils.data.DataLoader, sampler: EpochBatchSampler, start_micro: int = 0
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Endless ``(epoch, batch)`` from micro-batch ``start_micro`` (counted from the start of training)."""
    epoch, start = divmod(int(start_micro), sampler.batches_per_epoch)
    while True:
        sampler.set_position(epoch, start)
        for batch in loader:
            yield epoch, batch
        epoch, start = epoch + 1, 0


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to ``device``; other values pass through."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


DROP_METRIC = "data/dropped/"  # metric name prefix: ``data/dropped/<reason>``


def drop_metrics(drops: R.DropCounter, accelerator: Any) -> dict[str, int]:
    """Drops of the run so far by reason, summed over processes: ``{"data/dropped/<reason>": n}`` (nonzero only).

    Collective under several processes (every process must call it at the same step). Index-time
    drops (malformed lines) are counted once, not once per process or epoch. Counts restart at a resume.
    """
    local = torch.tensor([drops.samples[r] for r in R.ALL_REASONS], dtype=torch.long, device=accelerator.device)
    if accelerator.num_processes > 1:
        local = accelerator.reduce(local, reduction="sum")
    initial = drops.initial
    counts = {r: int(v) + initial.get(r, 0) for r, v in zip(R.ALL_REASONS, local.tolist(), strict=True)}
    return {DROP_METRIC + r: v for r, v in counts.items() if v}


def report_drops(drops: R.DropCounter, epoch: int, totals: dict[str, int], run_dir: str | Path) -> None:
    """End of training: log the last (possibly partial) epoch's drops and the run's, and write ``data_drops.json``."""
    drops.report(log, prefix=f"epoch {epoch} data drops (up to the last step)")
    by_reason = {k.removeprefix(DROP_METRIC): v for k, v in sorted(totals.items())}
    body = ", ".join(f"{k}={v}" for k, v in by_reason.items()) or "none"
    if set(by_reason) - R.INFORMATIONAL:
        log.warning("data drops over the run: %s (see data_drops.json)", body)
    else:
        log.info("data drops over the run: %s", body)
    atomic_write_text(Path(run_dir) / "data_drops.json", json.dumps(by_reason, indent=2) + "\n")
