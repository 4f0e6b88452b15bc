"""A pretraining stage's saved state: written atomically, read without running code, with the RNG streams.

Each stage of :mod:`tokencompose.pretrain.recipe` saves its step, weights, optimiser (and EMA) state and the
RNG streams every ``checkpoint_every`` steps; re-running resumes from it (the scenes are re-rendered from
``(seed, index)``, so nothing else needs saving).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from tokencompose.atomic import atomic_writer
from tokencompose.errors import UserError


def save_state(state: dict, path: Path) -> None:
    """``torch.save`` to a temporary sibling, fsynced and renamed onto ``path`` (a kill leaves the old file)."""
    with atomic_writer(path, "wb") as f:
        torch.save(state, f)


def load_state(path: Path) -> dict | None:
    """The stage's saved state, read with the ``weights_only`` unpickler (a planted file cannot run code)."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(
            f"{path} holds objects other than tensors and plain values (written by an older tokencompose, "
            "or not by tokencompose); it is not loaded: delete it to restart that stage"
        ) from err


def rng_state() -> dict:
    """The global torch, numpy (and, when in use, CUDA) RNG states, as values ``torch.load`` with
    ``weights_only=True`` reads back."""
    # numpy's state as plain values (not an ndarray): loadable with weights_only=True.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # the GPU's noise draws resume too
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved (CUDA's only on a machine with as many GPUs)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
