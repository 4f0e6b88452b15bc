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


def save_lora(unet: Any, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``pytorch_lora_weights.safetensors`` (diffusers format) and ``lora_state.safetensors`` (peft)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    peft_sd = get_peft_model_state_dict(unet, state_dict=state_dict)
    peft_sd = {k: v.detach().cpu().contiguous() for k, v in peft_sd.items()}
    save_file(peft_sd, str(path / LORA_STATE))
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(path), unet_lora_layers=convert_state_dict_to_diffusers(peft_sd), safe_serialization=True
    )


def load_lora_state(unet: Any, path: str | Path) -> None:
    """Restore adapter weights written by :func:`save_lora` into a UNet that already has the adapters."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(unet, load_file(str(Path(path) / LORA_STATE)))
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"LoRA checkpoint {path} does not match the adapters: unexpected keys {unexpected[:5]}")
