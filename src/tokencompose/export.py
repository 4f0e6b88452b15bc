"""Export a trained model as a diffusers pipeline folder that stock ``DiffusionPipeline`` loads.

``export_pipeline`` takes a base model and one of our training checkpoints (full UNet, its EMA, or a
LoRA) and writes a complete diffusers folder: every part in float32 (so ``from_pretrained`` with no dtype
gives one precision throughout), the base's own sampling scheduler, the text encoder in the key layout
that transformers 4 and 5 both read. A LoRA is fused into the UNet, or -- with ``keep_lora`` -- written
beside an untouched copy of the base (``pipe.load_lora_weights(DIR)`` then applies it). The folder is
built under a temporary name and renamed into place, so a crash never leaves a half-exported model.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from tokencompose.errors import UserError
from tokencompose.loading import (
    ModelSettings,
    base_scheduler_config,
    load_model,
    make_scheduler,
    resolve_checkpoint,
)
from tokencompose.train.lora import LORA_WEIGHTS


@dataclass
class ExportSettings:
    """What ``tokencompose export`` writes."""

    model: str = ""
    """Base model: diffusers-layout folder or hub id."""
    checkpoint: str | None = None
    """A training checkpoint of ours (``step-N/``); None exports the base itself."""
    out: str = ""
    """Output folder; must not exist yet (or be empty)."""
    ema: bool = False
    """Export the checkpoint's EMA UNet (``unet_ema/``)."""
    keep_lora: bool = False
    """For a LoRA checkpoint: keep the adapter as ``pytorch_lora_weights.safetensors`` beside the base."""
    family: str = "auto"
    """Architecture of the base: ``auto`` (its ``model_index.json``) | ``sd`` | ``sdxl``."""


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"export folder {out} already exists and is not empty: choose a new --out or delete it")


def export_pipeline(settings: ExportSettings) -> Path:
    """Write the pipeline folder named by ``settings.out`` and return its path."""
    out = Path(settings.out)
    _check_out(out)
    lora = None
    if settings.checkpoint is not None:
        _, lora = resolve_checkpoint(settings.checkpoint, ema=settings.ema)
    if settings.keep_lora and lora is None:
        raise UserError(f"--keep-lora: checkpoint {settings.checkpoint} is not a LoRA checkpoint")
    checkpoint = None if settings.keep_lora else settings.checkpoint  # the base stays untouched with keep_lora
    loaded = load_model(
        ModelSettings(
            model=settings.model,
            checkpoint=checkpoint,
            ema=settings.ema,
            device="cpu",
            dtype="fp32",
            family=settings.family,
        )  # fmt: skip
    )
    # The base's own sampler (not the training noise scheduler that load_model returns).
    comps = dataclasses.replace(loaded, scheduler=make_scheduler(base_scheduler_config(settings.model), "default"))
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)  # our own leftover from an interrupted export
    comps.save(tmp)
    if settings.keep_lora and lora is not None:
        shutil.copyfile(Path(lora) / LORA_WEIGHTS, tmp / LORA_WEIGHTS)
    (tmp / "tokencompose_export.json").write_text(json.dumps(dataclasses.asdict(settings), indent=2))
    if out.exists():
        out.rmdir()  # empty (checked above)
    tmp.rename(out)
    return out
