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


def free_port() -> int:
    """A TCP port nobody listens on now (for a torchrun rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeLaunchState:
    """Stands in for accelerate's ``PartialState`` when a test plays a launch's processes one after another."""

    def __init__(self, main: bool) -> None:
        self.is_main_process = main

    def wait_for_everyone(self) -> None:  # the order of play is the barrier: the others first, process 0 last
        pass


def play_launch(monkeypatch: Any, count: int, run: Any) -> list[Any]:
    """``run()`` as each process of a ``count``-process launch would, in one process: 1, ..., count - 1, then 0.

    ``tokencompose.sharding.resolve_shard`` returns that process's shard (on the CPU); returns every
    process's return value, in process order.
    """
    from tokencompose import sharding

    out: dict[int, Any] = {}
    for index in [*range(1, count), 0]:
        shard = sharding.Shard(torch.device("cpu"), index, count, FakeLaunchState(index == 0))
        monkeypatch.setattr(sharding, "resolve_shard", lambda device, run, s=shard: s)
        out[index] = run()
    return [out[k] for k in range(count)]


def torchrun_cli(args: list[str], cwd: Path | None = None, timeout: int = 300) -> None:
    """``tokencompose <args>`` under ``torchrun --nproc_per_node 2`` on the CPU; asserts it exits 0."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "tokencompose.cli", *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, **THREADS_ENV}, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def make_base(root: Path, family: str = "sd") -> Path:
    """Tiny random-init model of ``family`` (sd | sdxl) saved in diffusers layout (trained from like a real one)."""
    from tokencompose.families import get_family

    path = root / ("base" if family == "sd" else f"base_{family}")
    if not path.exists():
        get_family(family).tiny(seed=0).save(path)
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


def unet_output(unet: Any, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """The UNet's prediction for seeded random latents, timesteps and text states (float32), to compare models."""
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g)
    text = torch.randn(batch, 77, c.cross_attention_dim, generator=g)
    t = torch.linspace(10, 500, batch).long()
    with torch.no_grad():
        return unet(x.to(unet.dtype), t, text.to(unet.dtype)).sample.float()


def nonzero_lora_up(unet: Any, fill: float | None = None, seed: int = 0, std: float = 0.05) -> None:
    """peft starts every ``lora_B`` (up) matrix at zero, so a new adapter changes nothing: give them values.

    ``fill``: one constant everywhere; else a seeded Gaussian with ``std``.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.full_like(p, fill) if fill is not None else torch.randn(p.shape, generator=g) * std)


class RecordingBars:
    """Stands in for ``tqdm.auto.tqdm``: records each bar's keyword arguments and draws it into a buffer.

    ``install(monkeypatch)``; after the run, ``bars`` holds ``(kwargs, bar)`` per bar the code opened.
    """

    def __init__(self) -> None:
        self.bars: list[tuple[dict[str, Any], Any]] = []

    def install(self, monkeypatch: Any) -> None:
        import io

        import tqdm.auto

        bars = self.bars

        class Recording(tqdm.auto.tqdm):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                # drawn (into a buffer) so that it counts; the arguments are what the code asked for
                super().__init__(*args, **{**kwargs, "disable": False, "file": io.StringIO()})
                bars.append((kwargs, self))

        monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
