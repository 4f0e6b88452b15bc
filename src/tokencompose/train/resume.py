"""Resume state that cannot run code, the run-folder checks and its lock.

Accelerate pickles the training state it is given (``custom_checkpoint_*.pkl``) and unpickles it with
``weights_only=False``, and its RNG file is a pickle too: a copied or downloaded run folder could then
run code on resume. So the state that pins a run's position is written here as safetensors (tensors:
the torch, CUDA and noise generator states, the EMA shadows) and JSON (counters, the python and numpy
RNG states), and whatever Accelerate still reads back (optimizer, grad scaler) is read with torch's
``weights_only`` unpickler, forced on (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``) for the whole load.

Files per checkpoint: ``train_state.json`` (step, data position, skips, batch layout; main process),
``rng_state_{i}.safetensors`` / ``rng_state_{i}.json`` (process ``i``), ``ema_state.safetensors``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokencompose.errors import UserError

log = logging.getLogger(__name__)

TRAIN_STATE = "train_state.json"
EMA_STATE = "ema_state.safetensors"
LOCK_FILE = ".train.lock"


def _rng_files(folder: Path, index: int) -> tuple[Path, Path]:
    return folder / f"rng_state_{index}.safetensors", folder / f"rng_state_{index}.json"


def save_rng(folder: Path, index: int, noise: Any) -> None:
    """This process's RNG states (python, numpy, torch, CUDA/MPS, the noise generator) into ``folder``."""
    from safetensors.torch import save_file

    tensors = {"torch": torch.get_rng_state(), "noise": noise.generator.get_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda_{k}": s for k, s in enumerate(torch.cuda.get_rng_state_all())})
    elif torch.backends.mps.is_available():
        tensors["mps"] = torch.mps.get_rng_state()
    tensor_file, json_file = _rng_files(folder, index)
    save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(tensor_file))
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
    json_file.write_text(json.dumps(state))


def load_rng(folder: Path, index: int, noise: Any) -> None:
    """Restore what :func:`save_rng` wrote (raises when a file is missing or unreadable)."""
    from safetensors.torch import load_file

    tensor_file, json_file = _rng_files(folder, index)
    tensors = load_file(str(tensor_file))
    state = json.loads(json_file.read_text())
    version, mt, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    random.setstate((version, tuple(mt), gauss))
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    noise.load_state_dict({"generator": tensors["noise"]})
    cuda = sorted((k for k in tensors if k.startswith("cuda_")), key=lambda k: int(k[5:]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    if "mps" in tensors and torch.backends.mps.is_available():
        torch.mps.set_rng_state(tensors["mps"])


def save_ema(folder: Path, ema: Any) -> None:
    """EMA shadows as safetensors, decay and update count in its metadata (main process)."""
    from safetensors.torch import save_file

    state = ema.state_dict()
    meta = {"decay": repr(state["decay"]), "num_updates": str(state["num_updates"])}
    save_file({k: v.contiguous() for k, v in state["shadow"].items()}, str(folder / EMA_STATE), metadata=meta)


def load_ema(folder: Path, ema: Any) -> None:
    from safetensors import safe_open

    with safe_open(str(folder / EMA_STATE), framework="pt") as f:
        meta = f.metadata()
        shadow = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    ema.load_state_dict({"decay": float(meta["decay"]), "num_updates": int(meta["num_updates"]), "shadow": shadow})


def save_train_state(folder: Path, state: Any) -> None:
    """The run's counters and batch layout (main process; identical on every process)."""
    (folder / TRAIN_STATE).write_text(json.dumps(state.counters(), indent=2))


def load_train_state(folder: Path, state: Any) -> None:
    path = folder / TRAIN_STATE
    if not path.is_file():
        # Written by a version that pickled its state through Accelerate: not read (it could run code).
        raise FileNotFoundError(f"{path} is missing (a checkpoint of an older tokencompose, or not one of ours)")
    state.load_counters(json.loads(path.read_text()))


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside uses the ``weights_only`` unpickler, even one that asks for ``False``.

    Accelerate's loaders pass ``weights_only=False`` for some files (version-dependent); torch (>= 2.4)
    overrides any call site with this variable. Tensors, dicts, lists and numbers load as before.
    """
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    old = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def check_run_dir(run_dir: Path) -> None:
    """Refuse a ``run_dir`` that is a file or cannot be written, before anything is loaded."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run_dir {run_dir} is a file, not a folder: choose another run_dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(
            f"run_dir {run_dir} cannot be written ({err.strerror or err}): choose a writable folder"
        ) from err


class RunLock:
    """Exclusive lock on a run folder for one training process (``flock`` on ``run_dir/.train.lock``).

    Two trainers on one folder would interleave their logs and checkpoints. The lock is released by
    the OS when the process dies (also on kill -9), so a killed run never leaves a stale lock.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # Windows: no flock; run without the guard
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(
                f"run folder {self.path.parent} is in use by another training process (pid {holder}); "
                "wait for it to finish or choose another run_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None
