"""Run a model and collect what the figures show: generated images, attention over steps or noise levels.

Three entry points, all deterministic for given seeds:

- :func:`generate_with_attention`: text -> image with the diffusers pipeline, capturing cross-attention
  after every denoising step whose timestep lies in a range (the conditional half of the CFG batch);
- :func:`image_attention`: an existing image + caption (any family's conditioning), noised to fixed
  noise levels with a fixed seed, one UNet forward each (what the mask comparisons use, so every
  model sees the same noisy latents);
- :func:`seed_images`: plain generation for grids, one image per seed (the MultiGen folder writer is
  :func:`tokencompose.evaluation.generation.generate_images`).

Shapes: ``B`` batch, ``L`` text tokens; per-resolution maps are ``{(h, w): [B, L, h, w]}``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokencompose.attention import AttentionCapture
from tokencompose.families import family_of
from tokencompose.loading import default_image_size, make_scheduler, pipeline_from_components, scheduler_config
from tokencompose.models import scale_latents
from tokencompose.visualize.aggregate import Size, TimestepAccumulator

log = logging.getLogger(__name__)


def parse_model_spec(spec: str) -> tuple[str, str]:
    """``"LABEL=PATH"`` or ``"PATH"`` -> ``(label, path)``; the label defaults to the folder name."""
    if "=" in spec and not Path(spec).exists():
        label, path = spec.split("=", 1)
        return label, path
    p = Path(spec)
    return (p.name or str(p)), spec


def sampling_pipeline(comps: Any, scheduler: str = "auto") -> Any:
    """The one pipeline builder over loaded parts; ``auto``: the family's deterministic figure sampler."""
    name = family_of(comps).figure_sampler if scheduler == "auto" else scheduler
    return pipeline_from_components(comps, make_scheduler(scheduler_config(comps.scheduler), name))


def _generators(seeds: Sequence[int], device: torch.device | str) -> list[torch.Generator]:
    # Generators on the CPU make the initial noise identical on every device.
    del device
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def generate_with_attention(
    comps: Any,
    prompt: str,
    seed: int = 0,
    steps: int = 50,
    guidance: float = 7.5,
    size: int | None = None,
    layers: Sequence[str] | None = None,
    sizes: Sequence[Size] | None = None,
    t_range: tuple[float, float] | None = None,
    device: torch.device | str = "cpu",
    scheduler: str = "auto",
    normalize: str = "text",
) -> tuple[np.ndarray, dict[Size, torch.Tensor], list[int]]:
    """Generate one image and average its cross-attention over the steps with timestep in ``t_range``.

    Returns ``(image uint8 [S, S, 3], {(h, w): [1, L, h, w]}, timesteps used)``. ``t_range`` is
    inclusive, in the scheduler's timestep units (0..1000 for SD); None keeps every step. ``layers``: None =
    the family's supervised default; ``normalize``: the joint-attention maps' normalisation (SD3 / Flux).
    """
    size = size or default_image_size(comps)
    pipe = sampling_pipeline(comps, scheduler).to(device)
    cfg = guidance > 1.0  # diffusers runs the [uncond; cond] batch only then
    acc = TimestepAccumulator(sizes)
    used: list[int] = []
    layers = layers or family_of(comps).default_layers
    with AttentionCapture(comps.unet, layers=layers, keep_cond_only=cfg, normalize=normalize) as cap:

        def on_step(_pipe: Any, _i: int, t: Any, kwargs: dict) -> dict:
            t = int(t)
            if t_range is None or t_range[0] <= t <= t_range[1]:
                acc.add(cap.by_size())
                used.append(t)
            return kwargs

        out = pipe(
            prompt,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=_generators([seed], device),
            callback_on_step_end=on_step,
            output_type="np",
        )
    return _uint8(out.images[0]), acc.mean(), used


@torch.no_grad()
def seed_images(
    comps: Any,
    prompt: str,
    seeds: Sequence[int],
    steps: int = 50,
    guidance: float = 7.5,
    size: int | None = None,
    device: torch.device | str = "cpu",
    scheduler: str = "auto",
    pipe: Any = None,
) -> list[np.ndarray]:
    """One image per seed for ``prompt``: uint8 ``[S, S, 3]`` each, identical for a seed across runs."""
    size = size or default_image_size(comps)
    pipe = pipe or sampling_pipeline(comps, scheduler).to(device)
    out = pipe(
        prompt,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=guidance,
        num_images_per_prompt=len(seeds),
        generator=_generators(seeds, device),
        output_type="np",
    )
    return [_uint8(im) for im in out.images]


def _uint8(image: np.ndarray) -> np.ndarray:
    """A pipeline's float image in [0, 1] -> uint8 ``[S, S, 3]``."""
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


@torch.no_grad()
def image_attention(
    comps: Any,
    pixel_values: torch.Tensor,
    captions: Sequence[str],
    noise_levels: Sequence[int] = (400,),
    seed: int = 0,
    layers: Sequence[str] | None = None,
    sizes: Sequence[Size] | None = None,
    device: torch.device | str = "cpu",
    geometry: Mapping[str, torch.Tensor] | None = None,
    normalize: str = "text",
) -> dict[Size, torch.Tensor]:
    """Attention of a model on real images: ``pixel_values [B, 3, S, S]`` in [-1, 1], one caption each.

    Latents are the VAE posterior means, noised with ``randn(seed)`` at each noise level (same noise
    for every model, so models are compared on identical inputs). ``geometry``: the batch's
    ``original_size`` / ``crop_top_left`` ``[B, 2]`` for families that condition on them (SDXL); default
    an uncropped image at ``S``. Returns ``{(h, w): [B, L, h, w]}`` averaged over the noise levels.
    """
    unet, vae = comps.unet.to(device), comps.vae.to(device)
    for encoder in comps.text_encoders:
        encoder.to(device)
    family = family_of(comps)
    dtype = next(unet.parameters()).dtype
    px = pixel_values.to(device, vae.dtype)
    latents = scale_latents(vae, vae.encode(px).latent_dist.mean)
    gen = torch.Generator("cpu").manual_seed(int(seed))
    noise = torch.randn(latents.shape, generator=gen, dtype=torch.float32).to(device, latents.dtype)
    text = {**family.tokenize(comps, list(captions)), **(geometry or {})}
    cond = family.encode(comps, text, tuple(px.shape[-2:]), dtype)
    acc = TimestepAccumulator(sizes)
    with AttentionCapture(unet, layers=layers or family.default_layers, normalize=normalize) as cap:
        for level in noise_levels:
            t = torch.full((latents.shape[0],), int(level), device=device, dtype=torch.long)
            noisy, t_model = family.noisy_at(comps.scheduler, latents, noise, t)
            family.predict(unet, noisy.to(dtype), t_model, cond)
            acc.add(cap.by_size())
    return acc.mean()


def to_uint8_image(pixel_values: torch.Tensor) -> np.ndarray:
    """``[3, S, S]`` in [-1, 1] -> uint8 ``[S, S, 3]``."""
    x = ((pixel_values.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return x.permute(1, 2, 0).to(torch.uint8).numpy()
