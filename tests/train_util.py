"""Shared set-up of the training tests: a tiny base model folder, a tiny shapes dataset, a fast config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# The CI machine has 2 cores shared with other jobs: with 2 intra-op threads a tiny UNet step is 10x
# slower there than with 1 (threads spin waiting for each other). Subprocesses get the same setting.
THREADS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def single_thread() -> None:
    torch.set_num_threads(1)


def make_base(root: Path) -> Path:
    """Tiny random-init SD-shaped model saved in diffusers layout (trained from like a real checkpoint)."""
    from tokencompose.models import tiny_components

    path = root / "base"
    if not path.exists():
        tiny_components(seed=0).save(path)
    return path


def make_data(root: Path, num: int = 8) -> Path:
    """A shapes-world dataset of ``num`` 64-px images; returns its metadata.jsonl."""
    from tokencompose.data.shapes import make_shapes_dataset

    return Path(make_shapes_dataset(root / f"data{num}", num=num, seed=0, size=64))


def config_dict(base: Path, data: Path, run_dir: Path) -> dict[str, Any]:
    """A few fast steps: batch 2, 64 px, log every step, no progress bar, no checkpoint samples."""
    return {
        "run_dir": str(run_dir),
        "model": {"path": str(base)},
        "data": {"path": str(data), "image_size": 64, "num_workers": 0},
        "loss": {"token_weight": 1e-3, "pixel_weight": 5e-5, "layers": ["mid", "up"]},
        "optim": {"lr": 1e-4, "warmup_steps": 0},
        "train": {"batch_size": 2, "grad_accum": 1, "max_steps": 3, "seed": 0},
        "log": {"every": 1, "progress": False, "tensorboard": True, "curves": True, "samples": 0},
        "checkpoint": {"every": 2, "keep_last": 2},
    }


def load_unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
