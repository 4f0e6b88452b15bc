"""Training metrics: device-side running sums, one host sync per log row, the metrics.jsonl writer."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from tokencompose.atomic import atomic_write_text


class RunningSums:
    """Sums of per-sample values ``[B]`` kept on the device between log rows (no host sync per step)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.samples = 0  # local samples since the last row (a host-side count)
        self.steps = 0
        self.grad_norm: torch.Tensor | None = None

    def add(self, values: dict[str, torch.Tensor], batch_size: int) -> None:
        for k, v in values.items():
            s = v.detach().float().sum()
            self.sums[k] = self.sums[k] + s if k in self.sums else s
        self.samples += batch_size

    def add_grad_norm(self, norm: torch.Tensor | None) -> None:
        if norm is None:
            return
        norm = norm.detach().float()
        self.grad_norm = norm if self.grad_norm is None else self.grad_norm + norm
        self.steps += 1

    def reduce(self, accelerator: Any) -> dict[str, float]:
        """Means over every sample of every process since the last call; the one host sync; then reset."""
        names = sorted(self.sums)
        device = accelerator.device
        local = [self.sums[k].to(device) for k in names]
        local.append(torch.tensor(float(self.samples), device=device))
        packed = torch.stack(local)
        if accelerator.num_processes > 1:
            packed = accelerator.reduce(packed, reduction="sum")
        values = packed.tolist()
        count = max(values[-1], 1.0)
        out = {f"loss/{k}": v / count for k, v in zip(names, values[:-1], strict=True)}
        if self.grad_norm is not None and self.steps:
            # Gradients are already all-reduced, so every process holds the same global norm.
            out["grad_norm"] = float(self.grad_norm) / self.steps
        self.reset()
        return out


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: allocator peak on CUDA, driver allocation on MPS, max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)  # bytes on macOS, KiB on Linux


class MetricsWriter:
    """Append rows to ``metrics.jsonl`` (main process only; the trackers get them through :mod:`.tracking`)."""

    def __init__(self, run_dir: str | Path, resume_step: int = 0) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self._truncate_after(resume_step)

    def _truncate_after(self, step: int) -> None:
        """Keep only rows up to ``step`` (a killed run may have logged past its last checkpoint)."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a row cut by the kill
        atomic_write_text(self.path, "".join(f"{line}\n" for line in keep))  # a crash keeps the old rows

    def write(self, step: int, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **row}) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
