"""Checkpoints: atomic writes, keep-last-N, exact resume.

A checkpoint ``RUN_DIR/checkpoints/step-00001000/`` holds

- the trained weights in diffusers format: ``unet/`` (full fine-tuning; a stock pipeline loads it as
  its UNet) or ``pytorch_lora_weights.safetensors`` (``pipeline.load_lora_weights``), plus
  ``unet_ema/`` with EMA;
- the rest of the training state from ``Accelerator.save_state``: optimizer, grad scaler, per-process
  RNG states (python, numpy, torch, CUDA), and the registered objects (:class:`TrainState` with the
  step, the data position and the noise generator; the EMA);
- ``trainer_state.json``, a readable summary.

The weights are written once: a save hook drops the UNet from Accelerate's own model file and a load
hook restores it from ``unet/`` (or the LoRA file), bit for bit.

Everything is written to ``.tmp-step-...`` and renamed when complete, so a folder named ``step-N``
is always whole; a killed save leaves only a temporary folder, removed at the next start.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"


class TrainState:
    """Counters that, with the RNG states Accelerate saves, pin the exact position of a run."""

    def __init__(self, noise: Any, batch_size: int, grad_accum: int, num_processes: int) -> None:
        self.noise = noise
        self.step = 0  # optimizer steps done, skipped (non-finite) ones included
        self.micro = 0  # micro-batches this process consumed since step 0
        self.nan_skips = 0
        self.layout = {"batch_size": batch_size, "grad_accum": grad_accum, "num_processes": num_processes}

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "micro": self.micro,
            "nan_skips": self.nan_skips,
            "layout": dict(self.layout),
            "noise": self.noise.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["layout"] != self.layout:
            # The data position and the noise stream depend on the batch layout: resuming with another
            # one cannot be exact. Refuse rather than silently train on a different sample order.
            raise ValueError(
                f"cannot resume: the checkpoint was written with {state['layout']}, this run uses {self.layout}"
            )
        self.step, self.micro, self.nan_skips = int(state["step"]), int(state["micro"]), int(state["nan_skips"])
        self.noise.load_state_dict(state["noise"])


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints ``[(step, path)]``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(folder: str | Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def all_finite(params: list[torch.Tensor]) -> bool:
    """True when every value is finite (one host sync; used only before writing weights)."""
    if not params:
        return True
    flags = torch.stack([torch.isfinite(p.detach()).all() for p in params])
    return bool(flags.all())


class Checkpointer:
    """Save and restore full training state with Accelerate; weights exported once in diffusers format.

    ``export(folder)`` is called on every process (it may gather sharded weights) and writes the
    diffusers-format weights on the main process; ``restore(folder)`` loads them back into the model.
    """

    def __init__(
        self,
        accelerator: Any,
        folder: str | Path,
        keep_last: int,
        model: torch.nn.Module,
        export: Callable[[Path], None],
        restore: Callable[[Path], None],
    ) -> None:
        self.accelerator = accelerator
        self.folder = Path(folder)
        self.keep_last = int(keep_last)
        self.model = model
        self.export = export
        self.restore = restore
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)

    def _model_index(self, models: list[Any]) -> int | None:
        for i, m in enumerate(models):
            if self.accelerator.unwrap_model(m) is self.model:
                return i
        return None

    def _save_hook(self, models: list[Any], weights: list[Any], output_dir: str) -> None:
        # Only in the unsharded case does Accelerate hand us the weights (FSDP/DeepSpeed save their own).
        i = self._model_index(models)
        if weights and i is not None:
            weights.pop(i)

    def _load_hook(self, models: list[Any], input_dir: str) -> None:
        i = self._model_index(models)
        if i is not None:
            models.pop(i)
            self.restore(Path(input_dir))

    def clean_partial(self) -> None:
        """Remove temporary folders left by a save that was killed."""
        if self.accelerator.is_main_process and self.folder.is_dir():
            for p in self.folder.glob(".tmp-*"):
                shutil.rmtree(p, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def save(self, step: int, info: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` atomically and prune old ones; returns its folder."""
        acc = self.accelerator
        final = self.folder / f"step-{step:08d}"
        tmp = self.folder / f".tmp-step-{step:08d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        self.export(tmp)
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, **info}, indent=2))
            if final.exists():  # same step saved before (e.g. a rerun after the end): replace it
                old = self.folder / f".tmp-old-{step:08d}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            self._prune()
        acc.wait_for_everyone()
        return final

    def _prune(self) -> None:
        found = list_checkpoints(self.folder)
        for _, path in found[: max(0, len(found) - self.keep_last)]:
            shutil.rmtree(path, ignore_errors=True)

    def load(self, path: str | Path) -> None:
        self.accelerator.load_state(str(path))
