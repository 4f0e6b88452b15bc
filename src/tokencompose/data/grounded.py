"""Grounded masks for any image–caption set: phrases -> detector boxes -> segmenter masks (the paper's Grounded-SAM).

The paper (TokenCompose, its ``preprocess_data/gen_mask.py``) ran Grounding DINO Swin-T OGC once per image on
all of its noun phrases joined into one text, kept every box whose best token score exceeded the box
threshold (0.25), named each kept box by its tokens above the text threshold (0.25), prompted SAM-HQ ViT-H
with every kept box (one mask per box, ``multimask_output=False``) and took, per phrase, the union of the
masks of the boxes named by it; a phrase that named no box got ``null``. Rebuilt here with transformers
classes (:mod:`tokencompose.evaluation.detectors`, :mod:`tokencompose.data.segmenters`):

- **query**: one detector text per image holding all of its distinct phrases (compared case-insensitively,
  as Grounding DINO's uncased tokenizer sees them); phrases with no letter or digit are not queried (null);
- **kept box** (:func:`assign_boxes`): a box is kept when its best score over the phrases' tokens exceeds
  both thresholds, and it goes to the phrase holding that best token. The paper decoded the tokens above the
  text threshold into a string and matched that string back to a phrase by substring rules, which can name a
  box after two phrases at once ("cat dog") and then pick either; the argmax gives the same phrase whenever
  one phrase's tokens win, and one phrase always. The paper's best score also ran over the separator dots
  and special tokens; ours only over phrase tokens (a box whose best token is a "." names no phrase);
- **mask**: the union of the segmenter's masks of the phrase's boxes; its box the union of those boxes
  (clipped to the image), its score the best one, ``detections`` their number. An empty union is ``null``.

Everything here is per batch and pure of I/O; :mod:`tokencompose.data.grounded_run` reads rows, shards,
resumes and writes the paper's format.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from tokencompose.data.records import Box
from tokencompose.data.segmenters import PAPER_SEGMENTER
from tokencompose.sharding import ShardSettings

PAPER_BOX_THRESHOLD = 0.25  # preprocess_data/run_pipeline.sh: --box_threshold 0.25 --text_threshold 0.25
PAPER_TEXT_THRESHOLD = 0.25
PAPER_GROUNDING_DETECTOR = "IDEA-Research/grounding-dino-tiny"  # Swin-T trained on O365, GoldG, Cap4M (OGC)


@dataclass
class GroundedSettings:
    """``tokencompose prepare grounded``: phrase masks for an image–caption set, in the paper's format."""

    data: str = ""
    """Rows ``{"file_name", "text"}`` (jsonl), optionally with ``attn_list`` whose phrases are used exactly;
    ``paper``: the paper's training list (4,526 COCO train2017 rows, shipped)."""
    images: str | None = None
    """Folder the rows' ``file_name`` are relative to (default: the jsonl's folder)."""
    out: str = ""
    """Output folder: ``metadata.jsonl``, ``seg/<image>/mask_<image>_<phrase>.png``, ``provenance.jsonl``, QA."""
    detector: str = PAPER_GROUNDING_DETECTOR
    """Hub id or folder of a transformers open-vocabulary detector (Grounding DINO, MM-Grounding-DINO,
    OWLv2, OWL-ViT), or ``shapes`` (the shapes world's exact detector)."""
    detector_revision: str | None = None
    """Hub revision of the detector (default: the newest; the resolved commit is recorded per image)."""
    segmenter: str = PAPER_SEGMENTER
    """Hub id or folder of SAM, SAM-HQ or SAM 2 (transformers), or ``box`` (the box itself, filled)."""
    segmenter_revision: str | None = None
    """Hub revision of the segmenter."""
    box_threshold: float = PAPER_BOX_THRESHOLD
    """A box is kept when its best phrase-token score exceeds this (the paper: 0.25)."""
    text_threshold: float = PAPER_TEXT_THRESHOLD
    """... and exceeds this (the paper: 0.25; with both equal, only the box threshold matters)."""
    phrases: Literal["auto", "given", "spacy"] = "auto"
    """auto: a row's ``attn_list`` phrases when it has the key, else spaCy noun phrases; given / spacy: only that."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N | mps (under ``accelerate launch``: each process's own)."""
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    """Weights and activations of both models (the paper: fp32; fp16 / bf16 roughly halve the time on GPU)."""
    limit: int | None = None
    """Only the first N rows."""
    run: ShardSettings = field(default_factory=lambda: ShardSettings(batch_size=8))
    """Images per model call and the shard of this process (default: accelerate's)."""
    qa: bool = True
    """Write ``qa.json``, ``qa.png`` and ``contact_sheet.png`` when the output is complete."""


@dataclass(frozen=True)
class PhraseGrounding:
    """What one phrase got: its mask (bool ``[H, W]``) and box, or None when nothing was kept."""

    mask: np.ndarray | None
    box: Box | None
    score: float | None
    detections: int


NOTHING = PhraseGrounding(None, None, None, 0)


def query_key(phrase: str) -> str | None:
    """The detector query of a phrase (case-folded, trimmed), or None when it has no letter or digit."""
    key = " ".join(phrase.split()).casefold()
    return key if any(ch.isalnum() for ch in key) else None


def assign_boxes(
    logits: torch.Tensor, box_threshold: float, text_threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kept boxes of one image: ``logits [Q, C]`` (box x query) -> (box indices ``[K]``, query ``[K]``, score ``[K]``).

    A box is kept when the sigmoid of its best logit exceeds both thresholds; it goes to that query (argmax
    on logits, as transformers' detectors label boxes). Scores are sigmoid probabilities.
    """
    if logits.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, torch.zeros(0)
    top, label = logits.float().max(dim=-1)
    score = torch.sigmoid(top)
    keep = (score > box_threshold) & (score > text_threshold)
    return keep.nonzero().flatten(), label[keep], score[keep]


def clip_box(box: Sequence[float], width: int, height: int) -> Box | None:
    """``(x0, y0, x1, y1)`` clipped to the image, or None when nothing of it is left."""
    x0, y0 = min(max(float(box[0]), 0.0), width), min(max(float(box[1]), 0.0), height)
    x1, y1 = min(max(float(box[2]), 0.0), width), min(max(float(box[3]), 0.0), height)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def ground_images(
    detector: Any,
    segmenter: Any,
    images: Sequence[Any],
    phrases: Sequence[Sequence[str]],
    box_threshold: float = PAPER_BOX_THRESHOLD,
    text_threshold: float = PAPER_TEXT_THRESHOLD,
) -> list[list[PhraseGrounding]]:
    """A batch of PIL images and their phrases -> per image, per phrase, a :class:`PhraseGrounding`.

    ``detector`` has ``candidates(images, queries)`` (:mod:`tokencompose.evaluation.detectors`),
    ``segmenter`` has ``segment(images, boxes)`` (:mod:`tokencompose.data.segmenters`).
    """
    queries: list[list[str]] = []
    for ps in phrases:
        seen: dict[str, None] = {}
        for p in ps:
            key = query_key(p)
            if key is not None:
                seen.setdefault(key, None)
        queries.append(list(seen))
    found = detector.candidates(images, queries)
    kept_boxes: list[list[Box]] = []
    kept_query: list[list[int]] = []
    kept_score: list[list[float]] = []
    for img, (logits, boxes) in zip(images, found, strict=True):
        idx, label, score = assign_boxes(logits, box_threshold, text_threshold)
        bs, qs, ss = [], [], []
        for i, q, s in zip(idx.tolist(), label.tolist(), score.tolist(), strict=True):
            box = clip_box(boxes[i].tolist(), *img.size)
            if box is not None:
                bs.append(box)
                qs.append(q)
                ss.append(s)
        kept_boxes.append(bs)
        kept_query.append(qs)
        kept_score.append(ss)
    masks = segmenter.segment(images, kept_boxes)
    results = []
    for ps, qlist, bs, qs, ss, ms in zip(phrases, queries, kept_boxes, kept_query, kept_score, masks, strict=True):
        per_query = [_union(ms, bs, ss, [k for k, q in enumerate(qs) if q == c]) for c in range(len(qlist))]
        column = {q: c for c, q in enumerate(qlist)}
        results.append([per_query[column[k]] if (k := query_key(p)) is not None else NOTHING for p in ps])
    return results


def _union(masks: np.ndarray, boxes: list[Box], scores: list[float], picks: list[int]) -> PhraseGrounding:
    """One phrase's boxes ``picks`` -> the union of their masks and boxes (None when the union is empty)."""
    if not picks:
        return NOTHING
    mask = np.any(masks[picks], axis=0)
    if not mask.any():
        return PhraseGrounding(None, None, None, len(picks))
    sel = [boxes[k] for k in picks]
    box = (min(b[0] for b in sel), min(b[1] for b in sel), max(b[2] for b in sel), max(b[3] for b in sel))
    return PhraseGrounding(mask, box, max(scores[k] for k in picks), len(picks))
