"""LoRA adapters on the UNet through peft, saved so a stock pipeline's ``load_lora_weights`` reads them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' file name, read by load_lora_weights
LORA_STATE = "lora_state.safetensors"  # peft-format adapter weights, for exact resume


def add_lora(unet: Any, rank: int, alpha: float | None, target_modules: list[str], dropout: float = 0.0) -> None:
    """Freeze the UNet and add trainable LoRA adapters (scale ``alpha / rank``) to ``target_modules``."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=list(target_modules),
    )
    unet.add_adapter(config)
    if not any(p.requires_grad for p in unet.parameters()):
        raise ValueError(f"train.lora.target_modules {target_modules} matched no UNet module")


def lora_scales(unet: Any) -> dict[str, float]:
    """peft's scaling of each adapted module, ``{module name: alpha / rank}`` (``alpha / sqrt(rank)`` with rsLoRA).

    Read from the live adapter layers, so rank/alpha patterns are honoured exactly as peft applies them.
    """
    scales: dict[str, float] = {}
    for name, module in unet.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and "default" in scaling and hasattr(module, "lora_B"):
            scales[name] = float(scaling["default"])
    return scales


def fold_lora_scale(peft_sd: dict[str, torch.Tensor], scales: dict[str, float]) -> dict[str, torch.Tensor]:
    """Adapter weights with each module's ``alpha / rank`` multiplied into its ``lora_B`` (up) matrix.

    peft computes ``W x + scale · B (A x)``. diffusers' ``load_lora_weights`` learns ``alpha`` only from
    metadata that older diffusers neither write nor read, and otherwise uses ``alpha = rank`` (scale 1).
    With ``scale`` folded into ``B`` the exported file means the same model under every diffusers version
    and every loader; the peft-format resume state keeps the raw weights.
    """
    out = {}
    for key, value in peft_sd.items():
        module = key.rsplit(".lora_B.", 1)[0] if ".lora_B." in key else None
        scale = scales.get(module, 1.0) if module is not None else 1.0
        if module is not None and module not in scales:
            raise ValueError(f"no LoRA scaling known for {module!r} (adapter and weights disagree)")
        out[key] = value * scale if scale != 1.0 else value
    return out


def save_lora(unet: Any, path: str | Path, family: Any, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``pytorch_lora_weights.safetensors`` (what the family's stock loader reads: diffusers' key names for a
    UNet, peft's for an SD3 / Flux transformer; :meth:`~tokencompose.families.base.Family.lora_layers`) and
    ``lora_state.safetensors`` (peft).

    ``family`` (:mod:`tokencompose.families`) names the denoiser's key prefix (``unet.`` / ``transformer.``).
    The diffusers file has ``alpha / rank`` folded into its up matrices (:func:`fold_lora_scale`), so stock
    ``pipe.load_lora_weights`` reproduces the trained model whatever ``train.lora.alpha`` was.
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    peft_sd = get_peft_model_state_dict(unet, state_dict=state_dict)
    peft_sd = {k: v.detach().cpu().contiguous() for k, v in peft_sd.items()}
    save_file(peft_sd, str(path / LORA_STATE))
    family.save_lora(path, family.lora_layers(fold_lora_scale(peft_sd, lora_scales(unet))))


def load_lora_state(unet: Any, path: str | Path) -> None:
    """Restore adapter weights written by :func:`save_lora` into a UNet that already has the adapters."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(unet, load_file(str(Path(path) / LORA_STATE)))
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"LoRA checkpoint {path} does not match the adapters: unexpected keys {unexpected[:5]}")
