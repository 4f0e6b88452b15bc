"""Rectified-flow training shared by the transformer families (SD3 / SD3.5, Flux).

Forward process (Esser et al. 2024, "Scaling Rectified Flow Transformers", eq. 1 and sec. 2):
``z_t = (1 - t) x0 + t eps`` for ``t = sigma`` in [0, 1]; the model predicts the velocity of that straight
path, ``v = eps - x0`` (eq. 2-3, the ``flow`` target of diffusers' ``FlowMatchEulerDiscreteScheduler``).

Timestep sampling: ``u ~ logit-normal(0, 1)`` (sec. 3.1, eq. 19), then the schedule's shift toward noise
(sec. 5.3.2, eq. 23): ``sigma = s u / (1 + (s - 1) u)`` with the scheduler's ``shift`` (3.0 for SD3), or,
where the scheduler shifts dynamically by image size (Flux), ``sigma = e^mu / (e^mu + 1/u - 1)`` with ``mu``
interpolated linearly in the image token count between ``base_shift`` at ``base_image_seq_len`` and
``max_shift`` at ``max_image_seq_len`` (what ``FluxPipeline`` uses at inference). The model's ``timestep``
input is ``sigma * num_train_timesteps`` for SD3 (the family rescales it when its model wants [0, 1]).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tokencompose.families.base import Family


def shifted_sigma(u: torch.Tensor, config: Any, image_seq_len: int) -> torch.Tensor:
    """``u`` in (0, 1) -> sigma after the schedule's shift (static, or dynamic in the image token count)."""
    if getattr(config, "use_dynamic_shifting", False):
        lo, hi = config.base_image_seq_len, config.max_image_seq_len
        slope = (config.max_shift - config.base_shift) / (hi - lo)
        mu = config.base_shift + slope * (image_seq_len - lo)
        return math.exp(mu) / (math.exp(mu) + (1 / u - 1))
    s = float(getattr(config, "shift", 1.0))
    return s * u / (1 + (s - 1) * u)


class FlowFamily(Family):
    """A family trained with the rectified-flow objective (noise, velocity target)."""

    noise_scheduler_class = "FlowMatchEulerDiscreteScheduler"
    sampler = "default"  # the model's own flow-matching Euler scheduler: the DDPM-family samplers do not apply
    figure_sampler = "default"
    patch_size: int = 2
    """Side of a latent patch: one image token covers ``patch_size**2`` latent positions."""

    def use_fused_attention(self, model: Any) -> None:
        """The joint-attention processors diffusers installs already run SDPA; their own kind must stay."""

    def lora_layers(self, peft_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """peft's own names (``lora_A`` / ``lora_B``), as diffusers' SD3 / Flux LoRA scripts save them. The
        transformer loaders read those as they are; diffusers' UNet names (``to_q.lora.down``, what the base
        converts ``to_q`` / ``to_k`` / ``to_v`` / ``to_out.0`` to) in a file that also holds peft names
        (``add_k_proj.lora_A``) are not recognised: those adapters would be left out of the loaded model."""
        return dict(peft_state)

    def map_sizes(self, comps: Any, image: tuple[int, int]) -> list[tuple[int, int]]:
        """One resolution: the patch grid, ``(H / (f p), W / (f p))`` for VAE factor f and patch p."""
        step = comps.vae_scale_factor * self.patch_size
        return [(image[0] // step, image[1] // step)]

    def noise_latents(
        self, scheduler: Any, latents: torch.Tensor, noise: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z_t, timestep, eps)``: sigma drawn first (one normal per sample), then eps."""
        b, device = latents.shape[0], latents.device
        u = torch.sigmoid(noise.randn((b,), device))  # logit-normal(0, 1)
        seq = (latents.shape[-2] // self.patch_size) * (latents.shape[-1] // self.patch_size)
        sigma = shifted_sigma(u, scheduler.config, seq).clamp(1e-5, 1.0)
        eps = noise.randn(tuple(latents.shape), device)
        s = sigma.view(b, *([1] * (latents.ndim - 1)))
        noisy = (1 - s) * latents + s * eps
        return noisy, sigma * scheduler.config.num_train_timesteps, eps

    def noisy_at(
        self, scheduler: Any, latents: torch.Tensor, eps: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Timestep ``t`` of ``T`` is ``sigma = t / T`` (no shift: a fixed noise level is asked for)."""
        sigma = t.float() / scheduler.config.num_train_timesteps
        s = sigma.view(-1, *([1] * (latents.ndim - 1)))
        return (1 - s) * latents + s * eps, sigma * scheduler.config.num_train_timesteps

    def target(self, scheduler: Any, latents: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return eps - latents  # velocity of the straight path from data to noise
