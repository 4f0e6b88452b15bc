"""Phrase masks at attention resolutions.

The paper's rule: resize the image-resolution binary mask to each attention map's size with
bilinear interpolation **without antialias** (align_corners=False), then binarise with ``> 0``.
So any pixel whose bilinear footprint touches the object counts: masks grow slightly at low
resolution. Done once per sample in the data pipeline, not every step.

Shapes: ``P`` phrases, ``N = h*w`` positions of one attention resolution.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

Size = tuple[int, int]


def resize_masks(masks: torch.Tensor, size: Size) -> torch.Tensor:
    """Binary masks ``[..., H, W]`` (any dtype, nonzero = object) -> bool ``[..., h, w]``."""
    if masks.ndim < 2:
        raise ValueError(f"masks must have at least 2 dims [..., H, W], got shape {tuple(masks.shape)}")
    lead = masks.shape[:-2]
    x = masks.reshape(-1, 1, *masks.shape[-2:]).float()
    if x.shape[0] == 0:
        return torch.zeros(*lead, *size, dtype=torch.bool, device=masks.device)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=False)
    return (x > 0).reshape(*lead, *size)


def masks_at_resolutions(masks: torch.Tensor, sizes: Iterable[Size]) -> dict[Size, torch.Tensor]:
    """Binary masks ``[..., H, W]`` -> ``{(h, w): bool [..., h*w]}`` for every attention size."""
    out = {}
    for size in sizes:
        size = (int(size[0]), int(size[1]))
        out[size] = resize_masks(masks, size).flatten(-2)
    return out


def attention_sizes(image_size: Size, vae_scale_factor: int = 8, levels: int = 4) -> list[Size]:
    """Attention map sizes of a UNet for an image size: the latent (image / VAE factor) halved per level.

    SD 1.x/2.x: VAE /8 and 4 levels, so 512 px -> 64, 32, 16, 8. ``levels`` is the UNet's number of
    blocks (``len(unet.config.block_out_channels)``).
    """
    h, w = image_size
    return [(h // (vae_scale_factor * 2**i), w // (vae_scale_factor * 2**i)) for i in range(levels)]
