"""Architecture of the shapes-world base model (diffusers / transformers classes, small widths).

64-px images -> AutoencoderKL with SD's /8 stride -> 4x8x8 latents; the UNet has cross-attention at
8x8, 4x4 and 2x2 (and the mid block at 2x2), so TokenCompose supervises several resolutions as on
SD (where they are 64, 32, 16 and 8 at 512 px). Sized so that fine-tuning runs on a laptop CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokencompose.models import CLIP_MAX_LENGTH


@dataclass
class ShapesArch:
    """Widths of the base model's parts."""

    image_size: int = 64
    """Training and sampling resolution in pixels."""
    vae_channels: tuple[int, ...] = (8, 16, 32, 32)
    """AutoencoderKL block widths; the stride is 2 ** (len - 1)."""
    latent_channels: int = 4
    """Channels of the latent (SD's 4)."""
    unet_channels: tuple[int, ...] = (32, 64, 64)
    """UNet block widths; every block has cross-attention."""
    unet_layers_per_block: int = 1
    """ResNet + transformer layers per UNet block."""
    heads: int = 4
    """Attention heads of every UNet transformer."""
    text_hidden: int = 64
    """Width of the CLIP text encoder."""
    text_layers: int = 2
    """Transformer layers of the text encoder."""
    text_heads: int = 4
    """Attention heads of the text encoder."""
    extra: dict = field(default_factory=dict)
    """Extra ``UNet2DConditionModel`` config keys (for experiments)."""

    @property
    def vae_stride(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_stride


def build_vae(arch: ShapesArch):
    from diffusers import AutoencoderKL

    n = len(arch.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(arch.vae_channels),
        layers_per_block=1,
        latent_channels=arch.latent_channels,
        norm_num_groups=8,
        sample_size=arch.image_size,
    )


def build_text_encoder(arch: ShapesArch):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=arch.text_hidden,
            intermediate_size=arch.text_hidden * 4,
            num_attention_heads=arch.text_heads,
            num_hidden_layers=arch.text_layers,
            max_position_embeddings=CLIP_MAX_LENGTH,
            projection_dim=arch.text_hidden,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )


def build_unet(arch: ShapesArch):
    from diffusers import UNet2DConditionModel

    n = len(arch.unet_channels)
    return UNet2DConditionModel(
        sample_size=arch.latent_size,
        in_channels=arch.latent_channels,
        out_channels=arch.latent_channels,
        layers_per_block=arch.unet_layers_per_block,
        block_out_channels=tuple(arch.unet_channels),
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=arch.text_hidden,
        attention_head_dim=arch.heads,  # diffusers' SD configs store the head count here
        norm_num_groups=8,
    )


def build_scheduler():
    """SD's training noise schedule (1000 steps, scaled-linear betas, epsilon prediction)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
