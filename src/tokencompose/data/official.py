"""Source A, the paper's format: ``metadata.jsonl`` + image folder + mask PNGs.

Masks come as gray, RGB or RGBA PNGs (matplotlib's ``imsave`` writes RGBA): take the first channel,
scale by its maximum, binarise at one half. A null mask path means "no mask": that phrase is skipped.
:func:`validate` checks a whole folder without loading anything into the training loop.
"""

from __future__ import annotations

import contextlib
import os
import stat
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from tokencompose.atomic import atomic_writer
from tokencompose.data import records as R

# Largest image (or mask) we decode: 8192^2 pixels (a 64-MPixel RGB image is 192 MiB decoded). Below
# PIL's own guard (~89 MPixel warns, twice that raises), so a decompression bomb is a counted drop.
MAX_IMAGE_PIXELS = 8192 * 8192


class NotRegularFile(OSError):
    """The path is a FIFO, device, socket or folder: opening it for reading could block forever."""


class ImageTooLarge(ValueError):
    """The file's header claims more than :data:`MAX_IMAGE_PIXELS` pixels."""


@contextlib.contextmanager
def open_image(path: str | Path) -> Iterator[Image.Image]:
    """``Image.open`` after the checks that keep one bad file from hanging or exhausting a run.

    Raises ``FileNotFoundError``, :class:`NotRegularFile` (checked with ``stat`` before opening),
    :class:`ImageTooLarge` (from the header, before decoding) or ``OSError`` (not an image).
    """
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotRegularFile(f"{path} is not a regular file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is lower
            im = Image.open(path)
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(f"{path}: {err}") from None
    with im:
        width, height = im.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ImageTooLarge(f"{path} is {width}x{height} pixels, more than {MAX_IMAGE_PIXELS} (8192^2)")
        yield im


def image_drop_reason(err: Exception, mask: bool = False) -> str:
    """The drop reason for an exception raised while reading an image (or a mask)."""
    if isinstance(err, FileNotFoundError):
        return R.MISSING_MASK if mask else R.MISSING_IMAGE
    if isinstance(err, NotRegularFile):
        return R.MASK_NOT_A_FILE if mask else R.IMAGE_NOT_A_FILE
    if isinstance(err, ImageTooLarge):
        return R.MASK_TOO_LARGE if mask else R.IMAGE_TOO_LARGE
    return R.UNREADABLE_MASK if mask else R.UNREADABLE_IMAGE


def same_aspect(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether sizes ``(W, H)`` ``a`` and ``b`` have the same aspect ratio, up to a pixel of rounding."""
    return abs(a[0] * b[1] - a[1] * b[0]) <= max(*a, *b)


def load_mask(path: str | Path) -> np.ndarray:
    """Mask file -> bool ``[H, W]``; raises ``OSError`` (missing/unreadable/not a file) or ``ValueError``
    (not 2-D, too large; see :func:`open_image`)."""
    with open_image(path) as im:
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


def save_mask(path: str | Path, mask: np.ndarray, durable: bool = False) -> None:
    """Bool ``[H, W]`` -> 8-bit gray PNG (0 / 255).

    ``durable``: written atomically and fsynced (:func:`tokencompose.atomic.atomic_writer`), for outputs
    whose later files vouch for it (a grounded row's part file); renders redone as a whole skip the fsync.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")
    if not durable:
        image.save(path)
        return
    with atomic_writer(path, "wb") as f:
        image.save(f, format="PNG")


def validate(jsonl: str | Path, root: str | Path | None = None, tokenizer=None, max_rows: int | None = None) -> Counter:
    """Check a Source-A folder: every line parses, images and masks exist and open, phrases are in captions.

    Returns counts by reason (the same reason strings as training uses) plus ``rows`` and ``phrases``;
    see :func:`defects` for the ones that mean a broken input.
    """
    # lazy: tokens imports torch; official (so shapes, coco and the numpy-only scoring core) stays torch-free
    from tokencompose.tokens import phrase_token_positions

    errors: list[tuple[int, str]] = []
    records = R.read_jsonl(jsonl, root=root, errors=errors)
    counts: Counter = Counter({R.MALFORMED_LINE: len(errors)} if errors else {})
    for rec in records[:max_rows] if max_rows else records:
        counts["rows"] += 1
        try:
            with open_image(rec.image) as im:
                size = im.size
        except (OSError, ValueError) as err:
            counts[image_drop_reason(err)] += 1
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
            except (OSError, ValueError) as err:
                counts[image_drop_reason(err, mask=True)] += 1
                continue
            if (m.shape[1], m.shape[0]) != size:
                if not same_aspect((m.shape[1], m.shape[0]), size):
                    counts[R.MASK_ASPECT_MISMATCH] += 1
                    continue
                counts[R.MASK_RESIZED] += 1
            if ph.box is not None and not R.valid_box(ph.box):
                counts[R.BAD_BOX] += 1  # the phrase stays: training takes its box from the mask
            usable += 1
        if usable == 0:
            counts[R.NO_USABLE_PHRASE] += 1
    return counts


def defects(counts: Counter) -> dict[str, int]:
    """The counts of :func:`validate` that are broken inputs (records or masks/boxes training drops)."""
    skip = R.INFORMATIONAL | {"rows", "phrases"}
    return {k: v for k, v in sorted(counts.items()) if v and k not in skip}
