"""Flux.1: a transformer of double-stream (MMDiT) and single-stream blocks over [text ; image], rectified flow.

Conditioning (Black Forest Labs' reference code, as diffusers' ``FluxPipeline.encode_prompt``):

- text sequence ``[B, 512, 4096]``: the T5-XXL encoder's last hidden state (no start token; ``</s>`` after
  the caption). Text column ``k`` is T5 token ``k``: phrases map into this index space by character offsets.
- ``pooled_projections`` ``[B, 768]``: CLIP-L's pooled output (CLIP enters only as this vector).
- ``guidance`` ``[B]``: the distilled guidance strength of FLUX.1-dev (models with ``guidance_embeds``).
- positions: ``img_ids`` ``[N, 3]`` = (0, row, col) of each 2x2 latent patch, ``txt_ids`` zeros ``[512, 3]``
  (RoPE over the three axes inside attention).

Latents ``[B, 16, h, w]`` are packed into ``N = (h / 2)(w / 2)`` tokens of ``16 * 4`` channels before the
transformer and unpacked after it. Training: rectified flow with the scheduler's dynamic shift (the image
token count sets ``mu``), timestep input ``sigma`` in [0, 1]. Default supervised blocks: double-stream
blocks 15-18, the ones ConceptAttention found to carry the most semantic attention in FLUX.1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from tokencompose.families.base import SpanFinder, cast
from tokencompose.families.flow import FlowFamily
from tokencompose.models import Components, clip_tokenizer, hf_dtype, tiny_clip_config, tiny_t5_encoder

T5_LENGTH = 512  # FluxPipeline's max_sequence_length for FLUX.1-dev (256 for schnell)
TRAIN_GUIDANCE = 3.5  # distilled guidance fed while training (FluxPipeline's default; diffusers' LoRA scripts)
NATIVE_SIZE = 1024  # FluxPipeline's default_sample_size 128 x VAE factor 8


MIN_DIFFUSERS = (0, 31)  # 2-d img_ids / txt_ids (earlier releases batch them and concatenate on dim 1)


def supported() -> bool:
    """Whether the installed diffusers runs Flux the way this family calls it."""
    import diffusers
    from packaging.version import Version

    return Version(diffusers.__version__).release >= MIN_DIFFUSERS


def require_diffusers() -> None:
    if not supported():
        import diffusers

        from tokencompose.errors import UserError

        need = ".".join(map(str, MIN_DIFFUSERS))
        raise UserError(f"the flux family needs diffusers >= {need} (installed: {diffusers.__version__})")


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, (h/2)(w/2), 4C]``: 2x2 patches in row-major order (``FluxPipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack` for a latent of ``h x w``."""
    b, _, c4 = tokens.shape
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device: Any = None) -> torch.Tensor:
    """``[(h/2)(w/2), 3]`` positions (0, row, col) of the packed patches."""
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float().to(device)


class Flux(FlowFamily):
    name: ClassVar[str] = "flux"
    pipeline_classes: ClassVar[tuple[str, ...]] = ("FluxPipeline",)
    text_parts: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    default_layers: ClassVar[tuple[str, ...]] = tuple(f"transformer_blocks.{i}" for i in (15, 16, 17, 18))
    probe_layers: ClassVar[tuple[str, ...]] = ("joint", "single")
    denoiser_folder: ClassVar[str] = "transformer"
    denoiser_class: ClassVar[str] = "FluxTransformer2DModel"

    def load_text(self, src: str, kw: Mapping[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

        require_diffusers()
        t5_tokenizer = AutoTokenizer.from_pretrained(src, subfolder="tokenizer_2", **kw)
        t5_tokenizer.model_max_length = T5_LENGTH
        return {
            "tokenizer": CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw),
            "tokenizer_2": t5_tokenizer,
            "text_encoder": CLIPTextModel.from_pretrained(src, subfolder="text_encoder", **hf_dtype(dtype), **kw),
            "text_encoder_2": T5EncoderModel.from_pretrained(src, subfolder="text_encoder_2", **hf_dtype(dtype), **kw),
        }

    def native_size(self, denoiser: Any, vae_factor: int) -> int:
        return NATIVE_SIZE

    def sampling_latents(self, noise: torch.Tensor) -> torch.Tensor:
        return pack(noise)  # FluxPipeline takes packed latents

    def index_tokenizer(self, comps: Any) -> Any:
        return comps.tokenizer_2  # the T5 positions are the text columns

    def tokenizers(self, comps: Any) -> dict[str, Any]:
        return {"input_ids": comps.tokenizer, "input_ids_2": comps.tokenizer_2}

    def span_finder(self, comps: Any, text_spans: str = "t5") -> SpanFinder:
        return SpanFinder([(comps.tokenizer_2, 0, "offsets")])

    @torch.no_grad()
    def encode(
        self, comps: Any, batch: Mapping[str, Any], image_size: tuple[int, int], dtype: torch.dtype | None = None
    ) -> dict[str, Any]:
        device = comps.text_encoder.device
        pooled = comps.text_encoder(batch["input_ids"].to(device)).pooler_output  # [B, 768]
        context = comps.text_encoder_2(batch["input_ids_2"].to(device))[0]  # [B, 512, 4096]
        cond: dict[str, Any] = {
            "encoder_hidden_states": context,
            "pooled_projections": pooled,
            "txt_ids": torch.zeros(context.shape[1], 3, device=device),
        }
        if comps.unet.config.guidance_embeds:
            cond["guidance"] = torch.full((context.shape[0],), TRAIN_GUIDANCE, device=device)
        return cast(cond, dtype)

    def predict(self, model: Any, noisy: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any]) -> torch.Tensor:
        h, w = noisy.shape[-2:]
        out = model(
            hidden_states=pack(noisy), timestep=t / 1000, img_ids=image_ids(h, w, noisy.device), **cond
        ).sample  # the transformer's timestep is sigma in [0, 1]
        return unpack(out, h, w)

    def pipeline(self, comps: Any, scheduler: Any, safety_checker: Any = None, extractor: Any = None) -> Any:
        if safety_checker is not None:
            from tokencompose.errors import UserError

            raise UserError("Flux has no safety checker: drop --safety-checker")
        return self.pipeline_class()(
            scheduler=scheduler, vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
            text_encoder_2=comps.text_encoder_2, tokenizer_2=comps.tokenizer_2, transformer=comps.unet,
        )  # fmt: skip

    def model_index(self, comps: Any) -> dict[str, Any]:
        return {**super().model_index(comps), "feature_extractor": [None, None], "image_encoder": [None, None]}

    def tiny(self, seed: int = 0, image_size: int = 64, prediction_type: str = "epsilon") -> Components:
        """Flux's classes at toy widths: 19 double-stream blocks (15-18 are the default) and 2 single-stream
        ones, guidance embedding (as FLUX.1-dev), CLIP-L and a 2-layer T5, a 16-channel VAE.
        ``prediction_type`` is ignored: the target is the flow."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel

        from tokencompose.t5_tokenizer import tiny_t5_tokenizer

        del prediction_type
        require_diffusers()
        torch.manual_seed(seed)
        clip_width, t5_width = 32, 32
        clip = CLIPTextModel(tiny_clip_config(clip_width, layers=2))
        t5_tokenizer = tiny_t5_tokenizer(model_max_length=T5_LENGTH)
        t5 = tiny_t5_encoder(len(t5_tokenizer), t5_width, 64)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=2,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=t5_width,
            pooled_projection_dim=clip_width, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
        )  # fmt: skip
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
            latent_channels=16, norm_num_groups=4, sample_size=image_size, scaling_factor=0.3611,
            shift_factor=0.1159,
        )  # fmt: skip
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096,
        )  # fmt: skip
        return Components(
            unet=transformer, vae=vae, text_encoder=clip, tokenizer=clip_tokenizer(), scheduler=scheduler,
            text_encoder_2=t5, tokenizer_2=t5_tokenizer, family="flux",
        )  # fmt: skip
