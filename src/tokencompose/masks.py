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


def attention_sizes(image_size: Size, factors: Iterable[int] = (8, 16, 32, 64)) -> list[Size]:
    """Attention map sizes of an SD-style UNet for an image size (VAE /8, then /1, /2, /4, /8)."""
    h, w = image_size
    return [(h // f, w // f) for f in factors]
