"""One training step: latents, noise, text conditioning, UNet forward (under capture), per-sample losses.

``L = L_denoise + lambda * L_token + gamma * L_pixel + sum_k w_k * L_k`` per sample (``[B]`` float32),
averaged over the batch. The extra terms ``L_k`` (e.g. the ROI alignment loss, later) plug in as
:class:`LossTerm` modules with their own weight; a term whose weight is 0 is never built or run.

Shapes: ``B`` batch, ``P`` phrases, ``T`` tokens per phrase, ``H`` heads, ``N = h*w``, ``L`` text length.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokencompose.families import family_of
from tokencompose.losses import denoise_loss, grounding_losses
from tokencompose.models import scale_latents


@dataclass(frozen=True)
class LossWeights:
    """lambda (token) and gamma (pixel); 0 removes a term and the capture it needs."""

    token: float = 0.0
    pixel: float = 0.0

    @property
    def grounding(self) -> bool:
        return self.token > 0 or self.pixel > 0


class NoiseSource:
    """Timesteps, posterior samples and noise for a micro-batch, from one seeded generator.

    Every process holds the same generator and draws values for the **global** micro-batch
    (``W * B`` samples), keeping its own slice: sample ``j`` of the global batch gets the same noise
    whether it is trained by 1 or by 8 processes. The extra draws are ``W``x a few latent-sized
    tensors per step, negligible next to a UNet forward.
    """

    def __init__(self, seed: int, device: torch.device, num_processes: int = 1, process_index: int = 0) -> None:
        self.device = torch.device(device)
        try:
            self.generator = torch.Generator(device=self.device)
        except RuntimeError:  # a backend without device generators: draw on the CPU
            self.device = torch.device("cpu")
            self.generator = torch.Generator()
        self.generator.manual_seed(int(seed))
        self.world, self.rank = int(num_processes), int(process_index)

    def _slice(self, x: torch.Tensor, b: int) -> torch.Tensor:
        return x[self.rank * b : (self.rank + 1) * b]

    def timesteps(self, b: int, num_train_timesteps: int, device: torch.device) -> torch.Tensor:
        """Uniform integer timesteps in ``[0, num_train_timesteps)``: ``[B]`` long."""
        t = torch.randint(0, num_train_timesteps, (self.world * b,), generator=self.generator, device=self.device)
        return self._slice(t, b).to(device)

    def randn(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Standard normal ``[B, ...]`` float32."""
        x = torch.randn((self.world * shape[0], *shape[1:]), generator=self.generator, device=self.device)
        return self._slice(x, shape[0]).to(device)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"].to(torch.uint8).cpu())


class Conditioner:
    """A batch -> the denoiser's conditioning, by the model's family (frozen text encoders, no gradient).

    SD 1.x / 2.x: ``encoder_hidden_states`` ``[B, L, D]``; SDXL adds ``added_cond_kwargs`` (pooled text
    embedding, size/crop time ids from the batch's ``original_size`` / ``crop_top_left``). The family also
    gives the training target (:meth:`tokencompose.families.base.Family.target`).
    """

    def __init__(self, comps: Any, image_size: int) -> None:
        self.comps = comps
        self.family = family_of(comps)
        self.image_size = (int(image_size), int(image_size))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.family.encode(self.comps, batch, self.image_size)

    def target(self, scheduler: Any, latents: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.family.target(scheduler, latents, eps, t)


@dataclass
class StepContext:
    """What an extra loss term may read after the UNet forward."""

    batch: dict[str, Any]
    latents: torch.Tensor  # [B, 4, h, w] clean, scaled
    noisy: torch.Tensor  # [B, 4, h, w]
    timesteps: torch.Tensor  # [B]
    cond: dict[str, Any]  # UNet keyword arguments (encoder_hidden_states [B, L, D], added_cond_kwargs, ...)
    model_pred: torch.Tensor  # [B, 4, h, w]
    maps: dict[tuple[int, int], list[torch.Tensor]] | None  # captured [B, H, N, L] by size, or None


class LossTerm(torch.nn.Module):
    """An extra objective term with its own weight (the hook for the ROI alignment loss).

    Subclasses set ``name`` and ``weight`` and return from :meth:`forward` per-sample values ``[B]``, or
    a scalar when the term is defined over the whole (global) batch, as a contrastive loss is. Optional
    hooks: :meth:`capture` installs what the term needs on the UNet (e.g. a feature hook) for the whole
    run; :meth:`param_groups` gives its optimizer groups (trained with the UNet, same learning rate);
    :meth:`after_step` runs after every applied optimizer step (e.g. clamp a temperature); :meth:`save`
    writes its weights into each checkpoint folder. Resume needs nothing extra: Accelerate saves the
    module's state with the training state.
    """

    name: str = "extra"
    weight: float = 1.0

    def capture(self, unet: torch.nn.Module) -> AbstractContextManager[Any]:
        return nullcontext()

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": weight_decay}] if params else []

    def after_step(self) -> None:
        return None

    def save(self, folder: Path) -> None:
        return None

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """Detached scalars of the last forward to log beside the term (e.g. a learned temperature)."""
        return {}

    def forward(self, ctx: StepContext) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class StepOutput:
    """``loss``: scalar to backpropagate (batch mean of ``terms['total']``); ``terms``/``parts``: detached ``[B]``."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


def batch_latents(vae: Any, batch: dict[str, Any], noise: NoiseSource, device: torch.device) -> torch.Tensor:
    """``z = (mean + std * eps) * scaling_factor`` from the VAE posterior (cached or encoded): ``[B, 4, h, w]``."""
    if "latent_mean" in batch:
        mean, std = batch["latent_mean"].to(device).float(), batch["latent_std"].to(device).float()
    else:
        with torch.no_grad():
            dist = vae.encode(batch["pixel_values"].to(device, vae.dtype)).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
    return scale_latents(vae, mean + std * noise.randn(tuple(mean.shape), device))


def _size_key(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def training_step(
    unet: torch.nn.Module,
    vae: Any,
    conditioner: Conditioner,
    scheduler: Any,
    batch: dict[str, Any],
    weights: LossWeights,
    noise: NoiseSource,
    capture: Any = None,
    extra_terms: tuple[LossTerm, ...] = (),
) -> StepOutput:
    """One forward pass and the per-sample objective.

    ``unet`` may be wrapped (DDP); ``capture`` is an entered :class:`~tokencompose.attention.AttentionCapture`
    on the unwrapped UNet, required when ``weights.grounding`` and otherwise ignored.
    """
    device = batch["input_ids"].device
    latents = batch_latents(vae, batch, noise, device)
    b = latents.shape[0]
    noisy, t, eps = conditioner.family.noise_latents(scheduler, latents, noise)
    cond = conditioner(batch)
    token_index = batch["token_index"]
    if capture is not None and "token_columns" in batch:  # loss.capture_columns: keep [B, H, N, K] maps only
        capture.columns = batch["token_columns"]
        token_index = batch["token_index_in_columns"]
    pred = conditioner.family.predict(unet, noisy, t, cond)

    per = {"denoise": denoise_loss(pred, conditioner.target(scheduler, latents, eps, t))}
    parts: dict[str, torch.Tensor] = {}
    maps = None
    if weights.grounding:
        if capture is None:
            raise ValueError("grounding loss weights are > 0 but no AttentionCapture is active")
        maps = capture.by_size()
        g = grounding_losses(
            maps, token_index, batch["token_valid"], batch["masks"], weights.token > 0, weights.pixel > 0
        )
        if weights.token > 0:
            per["token"] = g.token
            parts.update({f"token_{_size_key(s)}": v.detach() for s, v in g.token_parts.items()})
        if weights.pixel > 0:
            per["pixel"] = g.pixel
            parts.update({f"pixel_{_size_key(s)}": v.detach() for s, v in g.pixel_parts.items()})
    total = per["denoise"] + weights.token * per.get("token", 0.0) + weights.pixel * per.get("pixel", 0.0)
    if extra_terms:
        ctx = StepContext(batch, latents, noisy, t, cond, pred, maps)
        for term in extra_terms:
            spec = getattr(term, "module", term)  # the term itself, also when wrapped by DDP
            value = term(ctx).float()
            per[spec.name] = value.expand(b) if value.ndim == 0 else value  # a batch-level term: same for all
            total = total + spec.weight * per[spec.name]
            for key, v in spec.diagnostics().items():
                parts[f"{spec.name}_{key}"] = v.detach().float().reshape(-1).expand(b)
    if capture is not None:
        capture.clear()  # the graph keeps what the loss needs; drop the store's references
    per["total"] = total
    return StepOutput(loss=total.mean(), terms={k: v.detach() for k, v in per.items()}, parts=parts)
