"""Training: one step (``step``), the Accelerate loop (``loop``), checkpoints, EMA, LoRA, metrics, curves.

Entry point: :func:`train` (``tokencompose train CONFIG [key=value ...]`` on the command line).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokencompose.train.loop import NonFiniteLossError, TrainResult, train

__all__ = ["train", "TrainResult", "NonFiniteLossError"]


def __getattr__(name: str) -> Any:
    # Lazy: importing the package (e.g. for the CLI's --help) must not import torch/accelerate.
    if name in __all__:
        from tokencompose.train import loop

        return getattr(loop, name)
    raise AttributeError(name)
