"""Checkpoints: atomic writes, keep-last-N, exact resume.

A checkpoint ``RUN_DIR/checkpoints/step-00001000/`` holds

- the trained weights in diffusers format: ``unet/`` (full fine-tuning; a stock pipeline loads it as
  its UNet) or ``pytorch_lora_weights.safetensors`` (``pipeline.load_lora_weights``), plus
  ``unet_ema/`` with EMA;
- the optimizer and grad scaler from ``Accelerator.save_state`` (read back with the ``weights_only``
  unpickler), and the run's position as safetensors/JSON (:mod:`tokencompose.train.resume`): the
  :class:`TrainState` counters, per-process RNG states (python, numpy, torch, CUDA, the noise
  generator) and the EMA -- no pickle of ours, so a run folder cannot run code on resume;
- ``trainer_state.json``, a readable summary, written last.

The weights are written once: a save hook drops the UNet from Accelerate's own model file and a load
hook restores it from ``unet/`` (or the LoRA file), bit for bit.

Everything is written to ``.tmp-step-...``, fsynced, and renamed when complete (then the parent folder
is fsynced), so a folder named ``step-N`` is always whole, also after a power loss; a killed or failed
save leaves only a temporary folder, removed at once or at the next start. Resume takes the newest
checkpoint that reads back; an unreadable newer one is set aside with a warning.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from tokencompose.atomic import fsync_path, fsync_tree  # noqa: F401  (re-exported)
from tokencompose.errors import UserError
from tokencompose.train import resume
from tokencompose.train.lora import load_lora_state, save_lora

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"


class TrainState:
    """Counters that, with the RNG states (see :mod:`tokencompose.train.resume`), pin the exact position of a run."""

    def __init__(self, noise: Any, batch_size: int, grad_accum: int, num_processes: int) -> None:
        self.noise = noise
        self.step = 0  # optimizer steps done, skipped (non-finite) ones included
        self.micro = 0  # micro-batches this process consumed since step 0
        self.nan_skips = 0
        self.layout = {"batch_size": batch_size, "grad_accum": grad_accum, "num_processes": num_processes}

    def counters(self) -> dict[str, Any]:
        """JSON-able counters and batch layout (the noise generator is saved with the RNG states)."""
        return {"step": self.step, "micro": self.micro, "nan_skips": self.nan_skips, "layout": dict(self.layout)}

    def load_counters(self, state: dict[str, Any]) -> None:
        if state["layout"] != self.layout:
            # The data position and the noise stream depend on the batch layout: resuming with another
            # one cannot be exact. Refuse rather than silently train on a different sample order.
            raise UserError(
                f"cannot resume: the checkpoint was written with {state['layout']}, this run uses {self.layout}; "
                "use the same train.batch_size, train.grad_accum and process count, or another run_dir"
            )
        self.step, self.micro, self.nan_skips = int(state["step"]), int(state["micro"]), int(state["nan_skips"])


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


class NonFiniteLossError(RuntimeError):
    """A non-finite loss or gradient under ``nan_policy: stop`` (or too many skipped steps)."""


def export_weights(
    accelerator: Any, unet: Any, ema: Any, lora: bool, folder: Path, terms: Sequence[Any], family: Any
) -> None:
    """Diffusers-format weights into ``folder`` (called on every process; the main one writes).

    ``family`` (:mod:`tokencompose.families`) says how the stock pipeline of that architecture reads a LoRA.
    """
    from safetensors.torch import save_file

    model = accelerator.unwrap_model(unet)
    state = accelerator.get_state_dict(unet)  # gathers sharded (FSDP / ZeRO-3) weights; collective
    if not accelerator.is_main_process:
        return
    if not all_finite(list(state.values())):
        raise NonFiniteLossError("refusing to write a checkpoint: the UNet weights contain NaN or inf")
    if lora:
        save_lora(model, folder, family, state_dict=state)
    else:
        (folder / "unet").mkdir(parents=True, exist_ok=True)
        model.save_config(folder / "unet")
        weights = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(weights, str(folder / "unet" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    if ema is not None:
        ema.save_pretrained(model, folder / "unet_ema")
    for term in terms:
        term.save(folder)


def restore_weights(model: Any, lora: bool, folder: Path) -> None:
    """Load what :func:`export_weights` wrote back into the (unwrapped) UNet, bit for bit."""
    from safetensors.torch import load_file

    if lora:
        load_lora_state(model, folder)
    else:
        model.load_state_dict(load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors")))


def _disk_full(err: BaseException, folder: Path) -> bool:
    """Whether a failed write was the disk filling up (torch.save reports it as a RuntimeError)."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    try:
        return "write failed" in str(err) and shutil.disk_usage(folder).free < 64 * 2**20
    except OSError:
        return False


class Checkpointer:
    """Save and restore full training state; weights exported once in diffusers format.

    ``export(folder)`` is called on every process (it may gather sharded weights) and writes the
    diffusers-format weights on the main process; ``restore(folder)`` loads them back into the model.
    Accelerate saves the optimizer and grad scaler (and sharded states); the run's position (counters,
    RNG states, EMA) is written by :mod:`tokencompose.train.resume` as safetensors and JSON.
    """

    def __init__(
        self,
        accelerator: Any,
        folder: str | Path,
        keep_last: int,
        model: torch.nn.Module,
        export: Callable[[Path], None],
        restore: Callable[[Path], None],
        state: TrainState,
        ema: Any = None,
    ) -> None:
        self.accelerator = accelerator
        self.folder = Path(folder)
        self.keep_last = int(keep_last)
        self.model = model
        self.export = export
        self.restore = restore
        self.state = state
        self.ema = ema
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
        """Write checkpoint ``step`` atomically and durably, prune old ones; returns its folder.

        A failed save (e.g. a full disk) removes its temporary folder, so the newest complete
        checkpoint stays the previous one; a full disk is re-raised as an ``OSError(ENOSPC)``.
        """
        acc = self.accelerator
        final = self.folder / f"step-{step:08d}"
        tmp = self.folder / f".tmp-step-{step:08d}"
        try:
            self._write(tmp, step, info)
            if acc.is_main_process:
                self._publish(tmp, final)
        except Exception as err:
            full = _disk_full(err, self.folder)
            shutil.rmtree(tmp, ignore_errors=True)
            if full and not isinstance(err, OSError):
                raise OSError(errno.ENOSPC, f"No space left on device while writing checkpoint {final}") from err
            raise
        acc.wait_for_everyone()
        return final

    def _write(self, tmp: Path, step: int, info: dict[str, Any]) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        self.export(tmp)
        acc.save_state(str(tmp))  # optimizer, grad scaler; UNet dropped by the save hook
        # Accelerate's RNG file is a pickle: replaced by our own (never read back).
        (tmp / f"random_states_{acc.process_index}.pkl").unlink(missing_ok=True)
        resume.save_rng(tmp, acc.process_index, self.state.noise)
        acc.wait_for_everyone()
        if acc.is_main_process:
            resume.save_train_state(tmp, self.state)
            if self.ema is not None:
                resume.save_ema(tmp, self.ema)
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, **info}, indent=2))  # last: marks it whole

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rename the finished folder into place; fsync before (contents) and after (the rename)."""
        fsync_tree(tmp)
        if final.exists():  # same step saved before (e.g. a rerun after the end): replace it
            old = self.folder / f".tmp-old-{final.name}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_path(self.folder)
        self._prune()

    def _prune(self) -> None:
        found = list_checkpoints(self.folder)
        for _, path in found[: max(0, len(found) - self.keep_last)]:
            shutil.rmtree(path, ignore_errors=True)

    def load(self, path: str | Path) -> None:
        """Restore the full training state from checkpoint ``path`` (raises when any part is unreadable)."""
        path = Path(path)
        acc = self.accelerator
        with resume.weights_only_loads():  # no file of a run folder may run code when read
            resume.load_train_state(path, self.state)  # first: refuses another batch layout early
            acc.load_state(str(path))
            resume.load_rng(path, acc.process_index, self.state.noise)
            if self.ema is not None:
                resume.load_ema(path, self.ema)

    def resume(self) -> Path | None:
        """Load the newest checkpoint that reads back whole; returns it, or None for a fresh run.

        An unreadable newer checkpoint (truncated file, foreign pickle, missing part) is reported
        with a warning and renamed ``step-N.unreadable`` (kept for inspection, out of the way of
        pruning), and the previous complete one is used. Every process takes the same decision.
        """
        failed: list[str] = []
        for _, path in reversed(list_checkpoints(self.folder)):
            error = self._try_load(path)
            if error is None:
                return path
            log.warning("checkpoint %s cannot be read (%s); falling back to the previous one", path, error)
            failed.append(f"{path.name}: {error}")
            if self.accelerator.is_main_process:
                aside = path.with_name(f"{path.name}.unreadable")
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(path, aside)
            self.accelerator.wait_for_everyone()
        if failed:
            raise UserError(
                f"no checkpoint in {self.folder} can be read ({'; '.join(failed)}); they were renamed "
                "*.unreadable: rerun to start from step 0, or use a new run_dir"
            )
        return None

    def _try_load(self, path: Path) -> str | None:
        """Load ``path``; the error text if it (on any process) could not be read, else None."""
        error = None
        try:
            self.load(path)
        except UserError:
            raise
        except Exception as err:  # truncated, foreign or missing files raise many types
            error = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        acc = self.accelerator
        if acc.num_processes > 1:
            flag = torch.tensor(float(error is not None), device=acc.device)
            if float(acc.reduce(flag, reduction="sum")) > 0 and error is None:
                error = "unreadable on another process"
        return error
