"""Images as the trainer sees them: resize the shorter side to ``S``, center-crop (the paper's transform).

:func:`crop_geometry` is the geometry alone (masks and boxes follow it); :func:`load_image` applies it
to an image file and returns the float tensor the VAE encodes. Used by the dataset, the latent cache
and the figures, so all three see the same pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tokencompose.data.official import open_image


def crop_geometry(width: int, height: int, size: int) -> tuple[int, int, int, int, float, float]:
    """Resize-shorter-side + center-crop as torchvision: ``(new_w, new_h, left, top, sx, sy)``."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return new_w, new_h, left, top, new_w / width, new_h / height


def load_image(path: str | Path, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Image file -> (float ``[3, S, S]`` in [-1, 1] after resize-shorter-side + center crop, original (W, H)).

    Raises ``OSError`` / ``ValueError`` for a file that cannot be used (see
    :func:`~tokencompose.data.official.open_image`).
    """
    with open_image(path) as im:
        image = im.convert("RGB")
    width, height = image.size
    new_w, new_h, left, top, _, _ = crop_geometry(width, height, size)
    image = image.resize((new_w, new_h), Image.BILINEAR).crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
    return pixels, (width, height)
