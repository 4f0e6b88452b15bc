"""Token-supervised dataset and collate: the batch contract the trainer reads.

Memory stays flat as the dataset grows: a jsonl source is held as an array of byte offsets (8 bytes a
row); rows, images and masks are read on demand, in DataLoader workers when there are any.
Per sample: resize the shorter side to ``S`` and center-crop (the paper's transform), identically for
image and masks, optional horizontal flip, masks brought to every attention size with the core's rule
once here (not every step), boxes moved into the crop. Whatever is dropped is named in
``sample["dropped"]`` so counts survive worker processes (see :class:`~tokencompose.data.records.DropCounter`).

Batch (``B`` samples, ``P`` phrases, ``T`` tokens per phrase, ``N = h*w``): see :func:`collate`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from tokencompose.data import records as R
from tokencompose.data.images import crop_geometry, load_image
from tokencompose.data.latents import LatentCache
from tokencompose.data.official import image_drop_reason, load_mask, same_aspect
from tokencompose.data.records import JsonlIndex
from tokencompose.errors import UserError
from tokencompose.families.base import SpanFinder
from tokencompose.masks import Size, attention_sizes, masks_at_resolutions
from tokencompose.phrase_ids import phrase_text_ids
from tokencompose.tokens import pad_token_positions

log = logging.getLogger(__name__)


class TokenDataset(torch.utils.data.Dataset):
    """Records (list or Source-A jsonl path) -> samples for :func:`collate`.

    Args:
        records_or_jsonl_path: a list of :class:`Record` or the path of a Source-A jsonl file.
        tokenizer: the text encoder's tokenizer (CLIP: ``model_max_length`` 77).
        image_size: ``S``, side of the square training crop.
        attention_sizes: ``[(h, w)]`` mask sizes; default: SD's four attention sizes for ``S``.
        latent_cache: a :class:`~tokencompose.data.latents.LatentCache` or its folder; when given,
            samples carry ``latent_mean``/``latent_std`` instead of ``pixel_values``.
        flip: random horizontal flip (off by default, as the paper; incompatible with a latent cache).
        root: folder that relative paths in the jsonl are relative to (default: the file's folder).
        text_inputs: ``{batch key: tokenizer}``, every text-encoder input the model needs (SDXL:
            ``input_ids`` and ``input_ids_2``); default ``{"input_ids": tokenizer}``. Phrase spans always
            come from ``spans``.
        spans: phrase -> positions in the maps' text columns, or the drop reason (the model family's
            :meth:`~tokencompose.families.base.Family.span_finder`); default: ``tokenizer``'s CLIP rule.
        caption_dropout: probability that a sample comes with the empty caption and no phrases (drawn from the
            per-sample RNG after the flip, so it is resumable; nothing is drawn at 0).
    """

    def __init__(
        self,
        records_or_jsonl_path: Sequence[R.Record] | str | Path,
        tokenizer: Any,
        image_size: int,
        attention_sizes: Sequence[Size] | None = None,
        latent_cache: Any = None,
        flip: bool = False,
        root: str | Path | None = None,
        text_inputs: dict[str, Any] | None = None,
        spans: SpanFinder | None = None,
        caption_dropout: float = 0.0,
    ) -> None:
        if isinstance(records_or_jsonl_path, str | Path):
            self.source: Any = JsonlIndex(records_or_jsonl_path, root)
            self._index_drops = Counter({R.MALFORMED_LINE: len(self.source.errors)} if self.source.errors else {})
        else:
            self.source = list(records_or_jsonl_path)
            self._index_drops = Counter()
        self.tokenizer = tokenizer
        self.text_inputs = dict(text_inputs) if text_inputs else {"input_ids": tokenizer}
        self.spans = spans or SpanFinder([(tokenizer, 0, "ids")])
        self.max_length = int(getattr(tokenizer, "model_max_length", 77))
        self.image_size = int(image_size)
        self.attention_sizes = [tuple(s) for s in (attention_sizes or _default_sizes(self.image_size))]
        self.flip = bool(flip)
        self.caption_dropout = float(caption_dropout)
        if latent_cache is not None:
            if not isinstance(latent_cache, LatentCache):
                latent_cache = LatentCache(latent_cache)
            if flip:
                raise ValueError("flip=True cannot be used with a latent cache: the cache holds unflipped latents")
            latent_cache.check(image_size=self.image_size, num_records=len(self.source), records=self.source)
        self.latent_cache = latent_cache
        self._unusable: set[int] = set()  # records whose image failed in this process (skipped as substitutes)

    def __len__(self) -> int:
        return len(self.source)

    def record(self, i: int) -> R.Record:
        return self.source[i]

    def drop_counts(self) -> dict[str, int]:
        """Index-time drops (malformed lines), counted once per epoch; per-sample drops travel in batches."""
        return dict(self._index_drops)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Sample ``i``; when its image is unusable, the next usable record in its place.

        Only record ``i``'s own drops are reported: a substitute's drops are counted when it is
        loaded as itself, so every drop is counted once per epoch. A run of unusable records is
        skipped whatever its length; only a dataset with no usable record at all is an error.
        """
        dropped: list[str] = []
        n = len(self)
        for k in range(n):
            j = (i + k) % n
            if k and j in self._unusable:
                continue
            sample = self._load(j, dropped if k == 0 else [])
            if sample is not None:
                sample["dropped"] = dropped
                return sample
            self._unusable.add(j)
        raise UserError(
            f"none of the {n} records of {self._source_name()} has a usable image (see the warnings above); "
            "check the image paths of the training list"
        )

    def _source_name(self) -> str:
        return getattr(self.source, "path", "the record list")

    # -- one sample --------------------------------------------------------------------------------
    def _load(self, i: int, dropped: list[str]) -> dict[str, Any] | None:
        """Sample ``i``, or None when its image (or latent) is unusable (reason appended to ``dropped``)."""
        rec = self.record(i)
        s = self.image_size
        sample: dict[str, Any] = {"index": i, "caption": rec.caption}
        if self.latent_cache is not None:
            got = self.latent_cache.get(i)
            if got is None:
                R.note_drop(
                    dropped, R.MISSING_LATENT, "no cached latent for record %d (%s): another record used", i, rec.image
                )
                return None
            sample["latent_mean"], sample["latent_std"], (width, height) = got
            geom = crop_geometry(width, height, s)
        else:
            try:
                pixels, (width, height) = load_image(rec.image, s)
            except (OSError, ValueError) as err:
                reason = image_drop_reason(err)
                R.note_drop(dropped, reason, "%s: %s (%s): another record used", reason, rec.image, err)
                return None
            geom = crop_geometry(width, height, s)
            sample["pixel_values"] = pixels
        flip = self.flip and bool(torch.rand(()) < 0.5)
        if flip and "pixel_values" in sample:
            sample["pixel_values"] = sample["pixel_values"].flip(-1)
        # Classifier-free guidance's unconditional branch: an empty caption has no phrases to supervise.
        uncond = self.caption_dropout > 0 and bool(torch.rand(()) < self.caption_dropout)
        caption = "" if uncond else rec.caption
        sample["caption"] = caption

        positions, masks, boxes, box_valid, texts = [], [], [], [], []
        seen: set[str] = set()
        for ph in () if uncond else rec.phrases:
            key = ph.text.strip().lower()
            if key in seen:
                dropped.append(R.DUPLICATE_PHRASE)
                continue
            seen.add(key)
            if ph.mask is None:
                dropped.append(R.NULL_MASK)
                continue
            pos, reason = self.spans(caption, ph.text)
            if pos is None:
                R.note_drop(dropped, reason, "dropping phrase %r of %s: %s", ph.text, rec.image, reason)
                continue
            mask = self._load_mask(ph.mask, (width, height), geom, dropped)
            if mask is None:
                continue
            if flip:
                mask = mask[:, ::-1]
            given = ph.box
            if given is not None and not R.valid_box(given):
                # NaN/inf or empty boxes crash roi_align; the mask still gives the object's box.
                R.note_drop(
                    dropped,
                    R.BAD_BOX,
                    "bad box %s of phrase %r of %s: box taken from its mask",
                    given,
                    ph.text,
                    rec.image,
                )
                given = None
            box = _crop_box(given, geom, s, flip) if given is not None else R.mask_box(mask)
            positions.append(pos)
            masks.append(np.ascontiguousarray(mask))
            boxes.append(box if box is not None else (0.0, 0.0, 0.0, 0.0))
            box_valid.append(box is not None)
            texts.append(ph.text)
        if not positions and not uncond:
            dropped.append(R.NO_USABLE_PHRASE)
        stacked = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, s, s, dtype=torch.bool)
        sample["masks"] = masks_at_resolutions(stacked, self.attention_sizes)
        sample["positions"] = positions
        sample["boxes"] = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        sample["box_valid"] = torch.tensor(box_valid, dtype=torch.bool)
        sample["phrases"] = texts
        for key, tok in self.text_inputs.items():
            n = int(getattr(tok, "model_max_length", self.max_length))
            ids = tok(caption, padding="max_length", max_length=n, truncation=True)["input_ids"]
            sample[key] = torch.tensor(ids, dtype=torch.long)
        # SDXL's micro-conditioning reads the real resize and crop (Podell et al. 2023, sec. 2.2).
        new_w, _, left, top, _, _ = geom
        if flip:  # the crop's left edge as seen in the flipped image
            left = new_w - left - s
        sample["original_size"] = torch.tensor([height, width], dtype=torch.long)
        sample["crop_top_left"] = torch.tensor([top, left], dtype=torch.long)
        return sample

    def _load_mask(self, path: str, image_size: tuple[int, int], geom: tuple, dropped: list[str]) -> np.ndarray | None:
        """Mask file -> bool ``[S, S]`` in the crop, or None (reason appended)."""
        try:
            mask = load_mask(path)
        except (OSError, ValueError) as err:
            reason = image_drop_reason(err, mask=True)
            R.note_drop(dropped, reason, "%s: %s (%s): phrase dropped", reason, path, err)
            return None
        im = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")
        if im.size != image_size:
            if not same_aspect(im.size, image_size):
                # Stretching it would put the object somewhere else: it is not this image's mask.
                R.note_drop(
                    dropped,
                    R.MASK_ASPECT_MISMATCH,
                    "mask %s is %dx%d, its image %dx%d: phrase dropped",
                    path,
                    *im.size,
                    *image_size,
                )
                return None
            # A mask at another scale (a downsampled copy) is resized onto its image, then cropped with it.
            R.note_drop(
                dropped,
                R.MASK_RESIZED,
                "mask %s is %dx%d, its image %dx%d: resized to the image",
                path,
                *im.size,
                *image_size,
            )
            im = im.resize(image_size, Image.NEAREST)
        new_w, new_h, left, top, _, _ = geom
        s = self.image_size
        im = im.resize((new_w, new_h), Image.BILINEAR).crop((left, top, left + s, top + s))
        out = np.asarray(im) >= 128
        if not out.any():
            # An object cropped away would teach "attend nowhere": drop rather than supervise wrongly.
            dropped.append(R.EMPTY_MASK)
            return None
        return out


def _default_sizes(image_size: int) -> list[Size]:
    """SD's attention sizes for ``S`` (``S/8 .. S/64``), without the empty ones of very small test images."""
    return [s for s in attention_sizes((image_size, image_size)) if s[0] > 0 and s[1] > 0]


def _crop_box(box: R.Box, geom: tuple, size: int, flip: bool) -> R.Box | None:
    """Box in original pixels -> box in the (flipped) crop, clipped; None when nothing is left."""
    _, _, left, top, sx, sy = geom
    x0, y0 = min(max(box[0] * sx - left, 0.0), size), min(max(box[1] * sy - top, 0.0), size)
    x1, y1 = min(max(box[2] * sx - left, 0.0), size), min(max(box[3] * sy - top, 0.0), size)
    if x1 <= x0 or y1 <= y0:
        return None
    if flip:
        x0, x1 = size - x1, size - x0
    return (x0, y0, x1, y1)


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Samples -> batch (``P``, ``T`` padded to the batch max, ``P >= 1``).

    Keys: ``pixel_values`` float ``[B, 3, S, S]`` in [-1, 1] or ``latent_mean``/``latent_std`` float
    ``[B, 4, S/8, S/8]``; ``input_ids`` long ``[B, 77]`` (and ``input_ids_2``... when the model has more
    text encoders); ``original_size`` / ``crop_top_left`` long ``[B, 2]`` (height, width) of the image file and
    (top, left) of the crop after the resize; ``token_index`` long / ``token_valid`` bool
    ``[B, P, T]``; ``masks`` ``{(h, w): bool [B, P, h*w]}``; ``boxes`` float ``[B, P, 4]`` and
    ``box_valid`` bool ``[B, P]``; ``captions``; ``phrases`` (kept, aligned with ``P``); ``phrase_ids`` long
    ``[B, P]``, a stable hash of each phrase's normalised text (padding 0), so the ROI loss compares texts
    on the device, across processes, without strings; ``index`` long ``[B]``; ``dropped`` list of reason
    strings for the whole batch.
    """
    b = len(samples)
    token_index, token_valid = pad_token_positions([s["positions"] for s in samples])
    p = token_index.shape[1]
    batch: dict[str, Any] = {}
    for key in ("pixel_values", "latent_mean", "latent_std"):
        if key in samples[0]:
            batch[key] = torch.stack([s[key] for s in samples]).float()
    for key in [k for k in samples[0] if k.startswith("input_ids")] + ["original_size", "crop_top_left"]:
        if key in samples[0]:
            batch[key] = torch.stack([s[key] for s in samples])
    batch["token_index"], batch["token_valid"] = token_index, token_valid
    masks: dict[Size, torch.Tensor] = {}
    for size, first in samples[0]["masks"].items():
        out = torch.zeros(b, p, first.shape[-1], dtype=torch.bool)
        for i, s in enumerate(samples):
            m = s["masks"][size]
            out[i, : m.shape[0]] = m
        masks[size] = out
    batch["masks"] = masks
    boxes = torch.zeros(b, p, 4, dtype=torch.float32)
    box_valid = torch.zeros(b, p, dtype=torch.bool)
    for i, s in enumerate(samples):
        k = s["boxes"].shape[0]
        boxes[i, :k], box_valid[i, :k] = s["boxes"], s["box_valid"]
    batch["boxes"], batch["box_valid"] = boxes, box_valid
    batch["captions"] = [s["caption"] for s in samples]
    batch["phrases"] = [list(s["phrases"]) for s in samples]
    batch["phrase_ids"] = phrase_text_ids(batch["phrases"], p)
    batch["index"] = torch.tensor([s["index"] for s in samples], dtype=torch.long)
    batch["dropped"] = [r for s in samples for r in s.get("dropped", [])]
    return batch
