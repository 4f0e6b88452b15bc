"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, its last hidden state as the cross-attention context.

Conditioning (Rombach et al. 2022, sec. 3.3): ``c = CLIP(y)`` ``[B, 77, D]`` (D = 768 for SD 1.x, 1024 for
2.x), the keys and values of every ``attn2``. The token index space is CLIP's 77 positions (start token
at 0). Default supervised layers: the mid block and every up-block transformer, the paper's 10 layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from tokencompose.families.base import Family, cast
from tokencompose.models import hf_dtype, tiny_components


class SD(Family):
    name: ClassVar[str] = "sd"
    pipeline_classes: ClassVar[tuple[str, ...]] = ("StableDiffusionPipeline",)
    text_parts: ClassVar[tuple[str, ...]] = ("text_encoder", "tokenizer")
    default_layers: ClassVar[tuple[str, ...]] = ("mid", "up")

    def load_text(self, src: str, kw: Mapping[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        from transformers import CLIPTextModel, CLIPTokenizer

        return {
            "tokenizer": CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw),
            "text_encoder": CLIPTextModel.from_pretrained(src, subfolder="text_encoder", **hf_dtype(dtype), **kw),
        }

    def tiny(self, seed: int = 0, image_size: int = 64, prediction_type: str = "epsilon") -> Any:
        return tiny_components(seed=seed, image_size=image_size, prediction_type=prediction_type)

    @torch.no_grad()
    def encode(
        self, comps: Any, batch: Mapping[str, Any], image_size: tuple[int, int], dtype: torch.dtype | None = None
    ) -> dict[str, Any]:
        ids = batch["input_ids"].to(comps.text_encoder.device)
        return cast({"encoder_hidden_states": comps.text_encoder(ids)[0]}, dtype)  # [B, 77, D]

    def pipeline(self, comps: Any, scheduler: Any, safety_checker: Any = None, extractor: Any = None) -> Any:
        return self.pipeline_class()(
            vae=comps.vae,
            text_encoder=comps.text_encoder,
            tokenizer=comps.tokenizer,
            unet=comps.unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=extractor,
            requires_safety_checker=False,
        )

    def model_index(self, comps: Any) -> dict[str, Any]:
        return {
            **super().model_index(comps),
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
        }
