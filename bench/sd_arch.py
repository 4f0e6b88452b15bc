"""The Stable Diffusion 1.4 / 2.1 / XL, SD3-medium and FLUX.1-dev architectures with random weights, for
benchmarks that need no download.

Throughput and memory depend on the architecture and the tensor sizes, not on the weights, so a
random-init model of the real shapes measures what the real checkpoint would (its images are noise).
"""

from __future__ import annotations

from typing import Any

# UNet2DConditionModel arguments of SD 1.4 (860M parameters, 512 px) and SD 2.1 (865M, 768 px).
SD14: dict[str, Any] = dict(
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SD21: dict[str, Any] = dict(
    SD14, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True
)
# SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json; 2.57B parameters, 1024 px). Written
# from the published config, not downloaded; every other argument is diffusers' default, as in that file.
# attention_head_dim holds the number of heads (head width 64); the mid block has the last level's 10
# transformer layers. Cross-attention layers: down 2*1 + 2*10, mid 10, up 3*10 + 3*2 (70; mid + up: 46).
# Context: CLIP ViT-L and OpenCLIP bigG penultimate states, 768 + 1280 = 2048 wide; added conditioning:
# the pooled bigG embedding (1280) and 6 time ids embedded at 256 each (1280 + 6 * 256 = 2816).
SDXL: dict[str, Any] = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# Joint-attention transformers (rectified flow), written from the published transformer/config.json files,
# not downloaded; every other argument is diffusers' default. Parameter counts checked on the meta device.
# SD3-medium (stabilityai/stable-diffusion-3-medium-diffusers; 2,028,328,000 parameters, 1024 px): 24 joint
# blocks of width 24 * 64 = 1536 over [image tokens (2x2 latent patches) ; 77 CLIP + 256 T5 text tokens];
# the last block is context_pre_only. Context: CLIP-L + CLIP-G penultimate states zero-padded to T5-XXL's
# 4096, then T5's; pooled: both CLIPs' projected pooled outputs, 768 + 1280 = 2048.
SD3: dict[str, Any] = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
)
# FLUX.1-dev (black-forest-labs/FLUX.1-dev; 11,901,408,320 parameters, 1024 px): 19 double-stream blocks and
# 38 single-stream ones of width 24 * 128 = 3072 over [512 T5 tokens ; image tokens]; latents packed into
# 2x2 patches of 16 * 4 = 64 channels (patch_size 1 on the packed tokens); pooled: CLIP-L's 768; distilled
# guidance embedded (guidance_embeds); 3-axis RoPE over (0, row, col) ids.
FLUX: dict[str, Any] = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
ARCHS: dict[str, dict[str, Any]] = {"sd14": SD14, "sd21": SD21, "sdxl": SDXL, "sd3": SD3, "flux": FLUX}
FAMILIES: dict[str, str] = {
    "sd14": "sd",
    "sd21": "sd",
    "sdxl": "sdxl",
    "sd3": "sd3",
    "flux": "flux",
}  # tokencompose.families
CLASSES: dict[str, str] = {
    "sd3": "SD3Transformer2DModel",
    "flux": "FluxTransformer2DModel",
}  # else UNet2DConditionModel
NATIVE_PX: dict[str, int] = {"sd14": 512, "sd21": 768, "sdxl": 1024, "sd3": 1024, "flux": 1024}
TEXT_LEN: dict[str, int] = {"sd3": 77 + 256, "flux": 512}  # text tokens of the joint sequence (UNets: 77 CLIP)


def sd14_components(seed: int = 0):
    """SD 1.4-architecture UNet, VAE, CLIP text encoder (ViT-L/14 text tower), tokenizer and scheduler."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tokencompose.models import Components, clip_tokenizer

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12))
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    return Components(UNet2DConditionModel(**SD14), vae, text, clip_tokenizer(), sched)
