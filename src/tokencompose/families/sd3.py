"""SD3 / SD3.5: a joint-attention transformer (MMDiT) over [image tokens ; text tokens], rectified flow.

Conditioning (Esser et al. 2024, sec. 4 and fig. 2; diffusers' ``StableDiffusion3Pipeline.encode_prompt``):

- text sequence ``c`` ``[B, 77 + 256, D_t5]``: the penultimate hidden states of CLIP-L and CLIP-G joined on
  channels (``[B, 77, 768 + 1280]``, zero-padded to T5's width 4096), then the T5-XXL encoder's last hidden
  state ``[B, 256, 4096]``. Text column ``j < 77`` is CLIP position ``j`` (one index space for both CLIPs,
  start token at 0, as SDXL); column ``77 + k`` is T5 token ``k`` (no start token).
- ``pooled_projections`` ``[B, 768 + 1280]``: both CLIPs' projected pooled outputs.

The supervised map of a block is its image-query -> text-key attention (:mod:`tokencompose.joint_attention`).
A phrase supervises its CLIP span, its T5 span, or both (``loss.text_spans``). Default supervised block:
``transformer_blocks.9``, the block Seg4Diff found semantically strongest in SD3-M (and trains LoRA r=16 on
with a mask loss); ``tokencompose probe layers`` measures every block. SD3.5 has the same classes and loads
through this family (its extra options -- dual attention, qk norm -- are in its transformer config).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from tokencompose.families.base import SpanFinder, cast, clip_pair_states
from tokencompose.families.flow import FlowFamily
from tokencompose.models import CLIP_MAX_LENGTH, Components, clip_tokenizer, hf_dtype, tiny_clip_config, tiny_t5_encoder

T5_LENGTH = 256  # StableDiffusion3Pipeline's default max_sequence_length


class SD3(FlowFamily):
    name: ClassVar[str] = "sd3"
    pipeline_classes: ClassVar[tuple[str, ...]] = ("StableDiffusion3Pipeline",)
    text_parts: ClassVar[tuple[str, ...]] = (
        "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3",
    )  # fmt: skip
    default_layers: ClassVar[tuple[str, ...]] = ("transformer_blocks.9",)
    probe_layers: ClassVar[tuple[str, ...]] = ("joint",)
    denoiser_folder: ClassVar[str] = "transformer"
    denoiser_class: ClassVar[str] = "SD3Transformer2DModel"

    def load_text(self, src: str, kw: Mapping[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

        t5_tokenizer = AutoTokenizer.from_pretrained(src, subfolder="tokenizer_3", **kw)
        t5_tokenizer.model_max_length = T5_LENGTH
        return {
            "tokenizer": CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw),
            "tokenizer_2": CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2", **kw),
            "tokenizer_3": t5_tokenizer,
            "text_encoder": CLIPTextModelWithProjection.from_pretrained(
                src, subfolder="text_encoder", **hf_dtype(dtype), **kw
            ),
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
                src, subfolder="text_encoder_2", **hf_dtype(dtype), **kw
            ),
            "text_encoder_3": T5EncoderModel.from_pretrained(src, subfolder="text_encoder_3", **hf_dtype(dtype), **kw),
        }

    def tokenizers(self, comps: Any) -> dict[str, Any]:
        return {"input_ids": comps.tokenizer, "input_ids_2": comps.tokenizer_2, "input_ids_3": comps.tokenizer_3}

    def span_finder(self, comps: Any, text_spans: str = "clip") -> SpanFinder:
        clip = (comps.tokenizer, 0, "ids")
        t5 = (comps.tokenizer_3, CLIP_MAX_LENGTH, "offsets")
        parts = {"clip": [clip], "t5": [t5], "both": [clip, t5]}[text_spans]
        return SpanFinder(parts, agree=[comps.tokenizer_2] if text_spans != "t5" else [])

    @torch.no_grad()
    def encode(
        self, comps: Any, batch: Mapping[str, Any], image_size: tuple[int, int], dtype: torch.dtype | None = None
    ) -> dict[str, Any]:
        clip, out1, out2 = clip_pair_states(comps, batch)  # [B, 77, D1 + D2]
        t5 = comps.text_encoder_3(batch["input_ids_3"].to(comps.text_encoder.device))[0]  # [B, 256, D_t5]
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # zeros up to T5's width
        context = torch.cat([clip, t5.to(clip.dtype)], dim=-2)  # [B, 77 + 256, D_t5]
        pooled = torch.cat([out1.text_embeds, out2.text_embeds], dim=-1)
        return cast({"encoder_hidden_states": context, "pooled_projections": pooled}, dtype)

    def predict(self, model: Any, noisy: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any]) -> torch.Tensor:
        return model(hidden_states=noisy, timestep=t, **cond).sample

    def pipeline(self, comps: Any, scheduler: Any, safety_checker: Any = None, extractor: Any = None) -> Any:
        if safety_checker is not None:
            from tokencompose.errors import UserError

            raise UserError("SD3 has no safety checker: drop --safety-checker")
        return self.pipeline_class()(
            transformer=comps.unet, scheduler=scheduler, vae=comps.vae,
            text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
            text_encoder_2=comps.text_encoder_2, tokenizer_2=comps.tokenizer_2,
            text_encoder_3=comps.text_encoder_3, tokenizer_3=comps.tokenizer_3,
        )  # fmt: skip

    def model_index(self, comps: Any) -> dict[str, Any]:
        return {**super().model_index(comps), "feature_extractor": [None, None], "image_encoder": [None, None]}

    def tiny(self, seed: int = 0, image_size: int = 64, prediction_type: str = "epsilon") -> Components:
        """SD3's classes at toy widths: 12 joint blocks (block 9, the default, is an ordinary one), two CLIP
        encoders with projection, a 2-layer T5 encoder wider than the CLIPs together (so the CLIP states are
        zero-padded as in SD3), a 16-channel VAE. ``prediction_type`` is ignored: the target is the flow."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection

        from tokencompose.t5_tokenizer import tiny_t5_tokenizer

        del prediction_type
        torch.manual_seed(seed)
        clip_width, t5_width = 32, 96

        def clip() -> CLIPTextModelWithProjection:
            return CLIPTextModelWithProjection(tiny_clip_config(clip_width))

        t5_tokenizer = tiny_t5_tokenizer(model_max_length=T5_LENGTH)
        t5 = tiny_t5_encoder(len(t5_tokenizer), t5_width, 128)
        transformer = SD3Transformer2DModel(
            sample_size=image_size // 8, patch_size=self.patch_size, in_channels=16, out_channels=16,
            num_layers=12, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=t5_width,
            caption_projection_dim=16, pooled_projection_dim=2 * clip_width, pos_embed_max_size=32,
        )  # fmt: skip
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
            latent_channels=16, norm_num_groups=4, sample_size=image_size, scaling_factor=1.5305,
            shift_factor=0.0609,
        )  # fmt: skip
        return Components(
            unet=transformer,
            vae=vae,
            text_encoder=clip(),
            tokenizer=clip_tokenizer(),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            text_encoder_2=clip(),
            tokenizer_2=clip_tokenizer(pad_token="!"),
            text_encoder_3=t5,
            tokenizer_3=t5_tokenizer,
            family="sd3",
        )
