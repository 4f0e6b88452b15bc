"""Source A, the paper's format: ``metadata.jsonl`` + image folder + mask PNGs.

Masks come as gray, RGB or RGBA PNGs (matplotlib's ``imsave`` writes RGBA): take the first channel,
scale by its maximum, binarise at one half. A null mask path means "no mask": that phrase is skipped.
:func:`validate` checks a whole folder without loading anything into the training loop.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from tokencompose.data import records as R


def load_mask(path: str | Path) -> np.ndarray:
    """Mask file -> bool ``[H, W]``; raises ``OSError`` (missing/unreadable) or ``ValueError`` (not 2-D)."""
    with Image.open(path) as im:
        if im.mode == "P":  # palette indices are not intensities
            im = im.convert("RGB")
        arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"mask {path} has shape {arr.shape}, expected [H, W] or [H, W, C]")
    arr = arr.astype(np.float32)
    peak = float(arr.max()) if arr.size else 0.0
    if peak <= 0:
        return np.zeros(arr.shape, dtype=bool)
    return arr / peak > 0.5


def save_mask(path: str | Path, mask: np.ndarray) -> None:
    """Bool ``[H, W]`` -> 8-bit gray PNG (0 / 255)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(path)


def validate(jsonl: str | Path, root: str | Path | None = None, tokenizer=None, max_rows: int | None = None) -> Counter:
    """Check a Source-A folder: every line parses, images and masks exist and open, phrases are in captions.

    Returns counts by reason (the same reason strings as training uses) plus ``rows`` and ``phrases``.
    """
    from tokencompose.tokens import phrase_token_positions

    errors: list[tuple[int, str]] = []
    records = R.read_jsonl(jsonl, root=root, errors=errors)
    counts: Counter = Counter({R.MALFORMED_LINE: len(errors)} if errors else {})
    for rec in records[:max_rows] if max_rows else records:
        counts["rows"] += 1
        try:
            with Image.open(rec.image) as im:
                size = im.size
        except FileNotFoundError:
            counts[R.MISSING_IMAGE] += 1
            continue
        except OSError:
            counts[R.UNREADABLE_IMAGE] += 1
            continue
        usable, seen = 0, set()
        for ph in rec.phrases:
            counts["phrases"] += 1
            key = ph.text.strip().lower()
            if key in seen:
                counts[R.DUPLICATE_PHRASE] += 1
                continue
            seen.add(key)
            if tokenizer is not None and phrase_token_positions(tokenizer, rec.caption, ph.text) is None:
                counts[R.PHRASE_NOT_IN_CAPTION] += 1
                continue
            if ph.mask is None:
                counts[R.NULL_MASK] += 1
                continue
            try:
                m = load_mask(ph.mask)
            except FileNotFoundError:
                counts[R.MISSING_MASK] += 1
                continue
            except (OSError, ValueError):
                counts[R.UNREADABLE_MASK] += 1
                continue
            if (m.shape[1], m.shape[0]) != size:
                counts[R.MASK_RESIZED] += 1
            usable += 1
        if usable == 0:
            counts[R.NO_USABLE_PHRASE] += 1
    return counts
