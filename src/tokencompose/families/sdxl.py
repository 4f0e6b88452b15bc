"""SDXL: two CLIP text encoders, a pooled text embedding and size/crop micro-conditioning.

Conditioning (Podell et al. 2023, sec. 2.1-2.2), as diffusers' ``StableDiffusionXLPipeline.encode_prompt``:

- context ``c = [h1 ; h2]`` ``[B, 77, 768 + 1280]``: the **penultimate** hidden states of CLIP ViT-L
  (encoder 1) and OpenCLIP ViT-bigG (encoder 2), concatenated on channels. The two tokenizers share
  CLIP's BPE and pad differently (end-of-text vs ``"!"``, id 0). Stock tokenizer 2 also reads every
  ``"!"`` *in* a caption as that pad token (diffusers#4153; OpenCLIP itself does not): the ids differ at
  a ``"!"``, and positions shift after ``"!!"`` or ``"?!"`` (one BPE token for tokenizer 1, two for 2).
  Without ``"!"`` both encoders see one 77-position index space. Phrase spans come from tokenizer 1
  (the maps' columns); encoder 2 gets what the stock pipeline feeds it at inference, and a phrase the
  two tokenizers place differently is dropped by the dataset (``phrase_span_differs_between_tokenizers``).
- ``text_embeds`` ``[B, 1280]``: encoder 2's projected pooled output;
- ``time_ids`` ``[B, 6]``: (original height, width, crop top, left, target height, width), taken from
  the data pipeline's real resize and crop (sec. 2.2 "size- and crop-conditioning").

Default supervised layers: mid block and every up-block transformer (CoMat's choice for SDXL: mid_16,
up_16, up_32 at 512 px); ``tokencompose probe layers`` measures the alternatives on a base model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from tokencompose.errors import UserError
from tokencompose.families.base import Family, SpanFinder, cast, clip_pair_states
from tokencompose.models import Components, clip_tokenizer, hf_dtype, tiny_clip_config

TIME_EMBED_DIM = 8  # tiny model: width of each of the 6 time-id embeddings (256 in SDXL)


def add_time_ids(
    original_size: torch.Tensor | None, crop_top_left: torch.Tensor | None, target: tuple[int, int], b: int
) -> torch.Tensor:
    """SDXL micro-conditioning ``[B, 6]`` float32: ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``.

    ``original_size`` / ``crop_top_left``: ``[B, 2]`` (height, width) / (top, left) in pixels; None: the
    target size and no crop (an image generated, or given, at the size it is denoised at).
    """
    tgt = torch.tensor(target, dtype=torch.float32).expand(b, 2)
    orig = tgt if original_size is None else original_size.float().cpu()
    crop = torch.zeros(b, 2) if crop_top_left is None else crop_top_left.float().cpu()
    return torch.cat([orig, crop, tgt], dim=1)


class SDXL(Family):
    name: ClassVar[str] = "sdxl"
    pipeline_classes: ClassVar[tuple[str, ...]] = ("StableDiffusionXLPipeline",)
    text_parts: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    default_layers: ClassVar[tuple[str, ...]] = ("mid", "up")

    def load_text(self, src: str, kw: Mapping[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        return {
            "tokenizer": CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw),
            "tokenizer_2": CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2", **kw),
            "text_encoder": CLIPTextModel.from_pretrained(src, subfolder="text_encoder", **hf_dtype(dtype), **kw),
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
                src, subfolder="text_encoder_2", **hf_dtype(dtype), **kw
            ),
        }

    def tokenizers(self, comps: Any) -> dict[str, Any]:
        return {"input_ids": comps.tokenizer, "input_ids_2": comps.tokenizer_2}

    def span_finder(self, comps: Any, text_spans: str = "clip") -> SpanFinder:
        # Encoder 2 reads the same 77 positions: its tokenizer must place the phrase where tokenizer 1 does.
        return SpanFinder([(comps.tokenizer, 0, "ids")], agree=[comps.tokenizer_2])

    @torch.no_grad()
    def encode(
        self, comps: Any, batch: Mapping[str, Any], image_size: tuple[int, int], dtype: torch.dtype | None = None
    ) -> dict[str, Any]:
        device = comps.text_encoder.device
        context, _, out2 = clip_pair_states(comps, batch)  # [B, 77, D1 + D2]
        b = context.shape[0]
        time_ids = add_time_ids(batch.get("original_size"), batch.get("crop_top_left"), tuple(image_size), b)
        added = {"text_embeds": out2.text_embeds, "time_ids": time_ids.to(device, out2.text_embeds.dtype)}
        return cast({"encoder_hidden_states": context, "added_cond_kwargs": added}, dtype)

    def pipeline(self, comps: Any, scheduler: Any, safety_checker: Any = None, extractor: Any = None) -> Any:
        if safety_checker is not None:
            raise UserError("SDXL has no safety checker: drop --safety-checker")
        return self.pipeline_class()(
            vae=comps.vae,
            text_encoder=comps.text_encoder,
            text_encoder_2=comps.text_encoder_2,
            tokenizer=comps.tokenizer,
            tokenizer_2=comps.tokenizer_2,
            unet=comps.unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,  # the watermark would change the pixels the detectors score
        )

    def model_index(self, comps: Any) -> dict[str, Any]:
        return {
            **super().model_index(comps),
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "force_zeros_for_empty_prompt": True,
        }

    def tiny(self, seed: int = 0, image_size: int = 64, prediction_type: str = "epsilon") -> Components:
        """SDXL's classes at toy widths: down (plain, cross-attn, cross-attn x2 transformer layers), mid, up
        mirrored; two CLIP encoders (the second with projection) and the real CLIP BPE in both tokenizers."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        torch.manual_seed(seed)
        hidden1, hidden2 = 32, 32

        unet = UNet2DConditionModel(
            sample_size=image_size // 8,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(16, 32, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 2, 4),
            use_linear_projection=True,
            cross_attention_dim=hidden1 + hidden2,
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + hidden2,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
            latent_channels=4, norm_num_groups=4, sample_size=image_size, scaling_factor=0.13025, force_upcast=True,
        )  # fmt: skip
        scheduler = DDPMScheduler(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            prediction_type=prediction_type, clip_sample=False, steps_offset=1,
        )  # fmt: skip
        return Components(
            unet=unet,
            vae=vae,
            text_encoder=CLIPTextModel(tiny_clip_config(hidden1)),
            tokenizer=clip_tokenizer(),
            scheduler=scheduler,
            text_encoder_2=CLIPTextModelWithProjection(tiny_clip_config(hidden2)),
            tokenizer_2=clip_tokenizer(pad_token="!"),
            family="sdxl",
        )
