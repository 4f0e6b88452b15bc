"""Exponential moving average of the trainable UNet weights.

``shadow <- shadow + (1 - d_k) * (param - shadow)`` after every optimizer step, with the usual warm-up
``d_k = min(decay, (1 + k) / (10 + k))`` so early averages are not dominated by the initial weights.
Shadows are float32 whatever the training precision; ``state_dict``/``load_state_dict`` make the EMA
part of the resumable training state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class EMA:
    """EMA of the named parameters of a module (all of them that require grad)."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        self.shadow = [params[n].detach().float().clone() for n in self.names]
        self.num_updates = 0

    def current_decay(self) -> float:
        k = self.num_updates
        return min(self.decay, (1 + k) / (10 + k))

    @torch.no_grad()
    def step(self, module: torch.nn.Module) -> None:
        params = dict(module.named_parameters())
        current = [params[n].detach().float() for n in self.names]
        torch._foreach_lerp_(self.shadow, current, 1.0 - self.current_decay())
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        """Load the averaged weights into ``module`` (the one the EMA was built on)."""
        params = dict(module.named_parameters())
        for n, s in zip(self.names, self.shadow, strict=True):
            params[n].copy_(s)

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "shadow": {n: s.cpu() for n, s in zip(self.names, self.shadow, strict=True)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.num_updates = float(state["decay"]), int(state["num_updates"])
        for i, n in enumerate(self.names):
            self.shadow[i].copy_(state["shadow"][n])

    def save_pretrained(self, unet: Any, path: str | Path) -> None:
        """Write the averaged UNet in diffusers format (config of ``unet`` + the shadow weights)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        unet.save_config(path)
        weights = {k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}
        for n, s in zip(self.names, self.shadow, strict=True):
            weights[n] = s.to(weights[n].dtype).cpu().contiguous()
        save_file(weights, str(path / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
