"""``tokencompose evaluate masks``: how good a grounded dataset's phrase masks are where ground truth exists.

The data is a ``metadata.jsonl`` in the paper's format (Grounded-SAM's masks and boxes per phrase); the
reference is one of

- a COCO instances JSON (``instances_train2017.json``): a row is matched to the COCO image of the same file
  name (basename), a phrase to a category by ``prepare coco``'s word rule
  (:func:`tokencompose.data.coco.lookup_category` on the phrase's words, head noun last). The reference mask is
  the union of that category's instance masks in the image (pycocotools ``annToMask``, crowd regions included),
  the reference box the union of their boxes -- exactly what ``prepare coco`` writes. A phrase naming no
  category is *unmatched*; one naming a category with no instance in the image is *absent* (not scored; how
  many of those still got a grounded mask is counted);
- another ``metadata.jsonl`` with masks (e.g. ``prepare shapes``'s rendered masks): rows matched by resolved
  image path, phrases by exact text; the category is the phrase text, the reference box the row's box (else
  the mask's box).

Per phrase with a reference: the mask IoU and the box IoU of the grounded mask / box against the reference.
A null grounded mask (or an empty or unreadable one) scores 0 and counts as a *miss*; a null box scores 0. A
grounded mask of another size than the reference is resized (nearest) to the reference's size and its box
scaled by the same factors (boxes are in the pixels of the image their mask belongs to). Results per
category (phrases, mean mask IoU, mean box IoU, misses) and overall (mean over phrases and over categories)
go to ``OUT/results.json`` and ``OUT/results.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokencompose.atomic import atomic_write_text, write_json_atomic
from tokencompose.console import number
from tokencompose.data.records import Box, Phrase, Record, read_jsonl
from tokencompose.errors import UserError

log = logging.getLogger(__name__)

KIND = "mask_quality"


@dataclass
class MaskQualitySettings:
    """``tokencompose evaluate masks``: grounded phrase masks against ground truth (mask IoU, box IoU)."""

    data: str = ""
    """The grounded dataset to check: a metadata.jsonl with phrase masks and boxes (the paper's format)."""
    reference: str = ""
    """Ground truth: a COCO instances JSON (``instances_train2017.json``) or another metadata.jsonl with masks."""
    out: str = ""
    """Output folder (``results.json``, ``results.md``)."""
    limit: int | None = None
    """Only the first N rows of ``data``."""


def mask_iou(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """Intersection over union of two bool masks of one shape; 0 when either is None or both are empty."""
    if a is None or b is None:
        return 0.0
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"masks of different shapes: {a.shape} and {b.shape}")
    union = int(np.count_nonzero(a | b))
    return int(np.count_nonzero(a & b)) / union if union else 0.0


def box_iou(a: Sequence[float] | None, b: Sequence[float] | None) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes; 0 when either is None or the union is empty."""
    if a is None or b is None:
        return 0.0
    ax0, ay0, ax1, ay1 = (float(v) for v in a)
    bx0, by0, bx1, by1 = (float(v) for v in b)
    iw = max(0.0, min(ax1, bx1) - max(ax0, bx0))
    ih = max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = max(0.0, ax1 - ax0) * max(0.0, ay1 - ay0) + max(0.0, bx1 - bx0) * max(0.0, by1 - by0) - inter
    return inter / union if union > 0 else 0.0


def phrase_words(text: str) -> list[str]:
    """A phrase's lower-case words (letters and digits; hyphens and punctuation split), head noun last."""
    return re.findall(r"[a-z0-9]+", text.lower())


@dataclass
class Target:
    """The ground truth of one phrase: its category, mask (bool ``[H, W]``) and box."""

    category: str
    mask: np.ndarray
    box: Box | None


# A row's reference: phrase -> Target, or a counter key saying why there is none.
RowReference = Callable[[Phrase], "Target | str"]


class CocoReference:
    """Ground truth from a COCO instances JSON (pycocotools), with ``prepare coco``'s noun -> category rule."""

    kind = "coco"

    def __init__(self, dataset: dict[str, Any]) -> None:
        try:
            from pycocotools.coco import COCO
        except ImportError as err:
            raise UserError(
                "a COCO reference needs pycocotools: pip install 'tokencompose[coco]' (or pycocotools)"
            ) from err
        from tokencompose.data.coco import name_table

        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints its progress
            self.coco = COCO()
            self.coco.dataset = dataset
            self.coco.createIndex()
        self.by_file: dict[str, dict] = {}
        for info in self.coco.loadImgs(self.coco.getImgIds()):
            self.by_file.setdefault(os.path.basename(info["file_name"]), info)
        cats = {c["id"]: c["name"] for c in self.coco.loadCats(self.coco.getCatIds())}
        self.cat_ids = {name: cid for cid, name in cats.items()}
        self.table = name_table(list(cats.values()))

    def for_row(self, record: Record) -> RowReference | None:
        from tokencompose.data.coco import lookup_category

        info = self.by_file.get(os.path.basename(record.image))
        if info is None:
            return None
        anns_by_cat: dict[int, list[dict]] = defaultdict(list)
        for ann in self.coco.loadAnns(self.coco.getAnnIds(imgIds=info["id"], iscrowd=None)):
            anns_by_cat[ann["category_id"]].append(ann)
        cache: dict[str, Target] = {}

        def lookup(phrase: Phrase) -> Target | str:
            found = lookup_category(phrase_words(phrase.text), self.table)
            if found is None:
                return "unmatched_phrases"
            name = found[1]
            anns = anns_by_cat.get(self.cat_ids[name])
            if not anns:
                return "absent_category"
            if name not in cache:  # as prepare coco: union of the instance masks (crowd too) and boxes
                mask = np.zeros((info["height"], info["width"]), dtype=bool)
                for ann in anns:
                    mask |= self.coco.annToMask(ann).astype(bool)
                xs = [a["bbox"][0] for a in anns] + [a["bbox"][0] + a["bbox"][2] for a in anns]
                ys = [a["bbox"][1] for a in anns] + [a["bbox"][1] + a["bbox"][3] for a in anns]
                box = (float(min(xs)), float(min(ys)), float(max(xs)), float(max(ys)))
                cache[name] = Target(name, mask, box)
            return cache[name]

        return lookup


class JsonlReference:
    """Ground truth from another metadata.jsonl with masks: rows by resolved image path, phrases by exact text."""

    kind = "metadata"

    def __init__(self, path: Path) -> None:
        errors: list[tuple[int, str]] = []
        self.rows: dict[str, Record] = {}
        for rec in read_jsonl(path, errors=errors):
            self.rows.setdefault(str(Path(rec.image).resolve()), rec)
        self.malformed = len(errors)

    def for_row(self, record: Record) -> RowReference | None:
        from tokencompose.data.official import load_mask
        from tokencompose.data.records import mask_box

        ref = self.rows.get(str(Path(record.image).resolve()))
        if ref is None:
            return None
        phrases: dict[str, Phrase] = {}
        for p in ref.phrases:
            phrases.setdefault(p.text, p)

        def lookup(phrase: Phrase) -> Target | str:
            p = phrases.get(phrase.text)
            if p is None:
                return "unmatched_phrases"
            if p.mask is None:
                return "reference_without_mask"
            try:
                mask = load_mask(p.mask)
            except (OSError, ValueError) as err:
                log.warning("reference mask %s unreadable (%s): phrase skipped", p.mask, err)
                return "unreadable_reference_mask"
            return Target(p.text, mask, p.box if p.box is not None else mask_box(mask))

        return lookup


def load_reference(path: Path) -> CocoReference | JsonlReference:
    """A COCO instances JSON or a metadata.jsonl, by content; anything else is a :class:`UserError`."""
    if not path.is_file():
        raise UserError(f"reference {path} does not exist (give a COCO instances JSON or a metadata.jsonl with masks)")
    if path.suffix == ".jsonl":
        return JsonlReference(path)
    try:
        with open(path, encoding="utf-8") as f:
            dataset = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(
            f"reference {path} is not JSON ({err}): give a COCO instances JSON or a metadata.jsonl (.jsonl)"
        ) from err
    if not (isinstance(dataset, dict) and {"images", "annotations", "categories"} <= set(dataset)):
        raise UserError(f"reference {path} is no COCO instances JSON (it needs images, annotations and categories)")
    return CocoReference(dataset)


def _grounded_mask(phrase: Phrase, counts: Counter) -> np.ndarray | None:
    from tokencompose.data.official import load_mask

    if phrase.mask is None:
        return None
    try:
        return load_mask(phrase.mask)
    except (OSError, ValueError) as err:
        log.warning("grounded mask %s unreadable (%s): counted as a miss", phrase.mask, err)
        counts["unreadable_grounded_masks"] += 1
        return None


def _resize_nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    im = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    return np.asarray(im.resize((shape[1], shape[0]), Image.NEAREST)) > 127


def score_phrase(phrase: Phrase, target: Target, counts: Counter) -> tuple[float, float, bool]:
    """``(mask IoU, box IoU, miss)`` of a grounded phrase against its reference (resizing counted in ``counts``)."""
    mask = _grounded_mask(phrase, counts)
    box = phrase.box
    if mask is not None and mask.shape != target.mask.shape:
        (h, w), (rh, rw) = mask.shape, target.mask.shape
        mask = _resize_nearest(mask, target.mask.shape)
        if box is not None:
            box = (box[0] * rw / w, box[1] * rh / h, box[2] * rw / w, box[3] * rh / h)
        counts["resized_masks"] += 1
    miss = mask is None or not mask.any()
    return mask_iou(mask, target.mask), box_iou(box, target.box), miss


def _mean(values: Sequence[float]) -> float | None:
    return round(float(np.mean(values)), 6) if len(values) else None


def summarize(scores: dict[str, list[tuple[float, float, bool]]]) -> dict[str, Any]:
    """Per-phrase ``(mask IoU, box IoU, miss)`` by category -> per-category and overall means."""
    categories = {}
    for name, rows in sorted(scores.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        categories[name] = {
            "count": len(rows),
            "mask_iou": _mean([r[0] for r in rows]),
            "box_iou": _mean([r[1] for r in rows]),
            "misses": sum(r[2] for r in rows),
        }
    every = [r for rows in scores.values() for r in rows]
    overall = {
        "phrases": len(every),
        "categories": len(categories),
        "mask_iou": _mean([r[0] for r in every]),
        "box_iou": _mean([r[1] for r in every]),
        "mask_iou_categories": _mean([c["mask_iou"] for c in categories.values()]),
        "box_iou_categories": _mean([c["box_iou"] for c in categories.values()]),
        "misses": sum(r[2] for r in every),
    }
    return {"overall": overall, "categories": categories}


def _file_record(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": h.hexdigest()}


def evaluate_mask_quality(settings: MaskQualitySettings) -> dict[str, Any]:
    """Score ``settings.data``'s masks against ``settings.reference``; writes and returns the results."""
    from tokencompose.evaluation.results import now_iso
    from tokencompose.versions import package_versions

    s = settings
    if not s.out:
        raise UserError("evaluate masks needs --out (the output folder)")
    data = Path(s.data) if s.data else None
    if data is None or not data.is_file():
        raise UserError(f"grounded data {s.data or '(none)'} does not exist (give --data, a metadata.jsonl)")
    reference = load_reference(Path(s.reference)) if s.reference else None
    if reference is None:
        raise UserError("evaluate masks needs --reference (a COCO instances JSON or a metadata.jsonl with masks)")
    errors: list[tuple[int, str]] = []
    records = read_jsonl(data, errors=errors)
    if s.limit is not None:
        records = records[: s.limit]
    counts: Counter = Counter(rows=len(records), malformed_lines=len(errors))
    if isinstance(reference, JsonlReference):
        counts["malformed_reference_lines"] = reference.malformed
    scores: dict[str, list[tuple[float, float, bool]]] = defaultdict(list)
    from tqdm.auto import tqdm

    for record in tqdm(records, desc="evaluate masks", unit="row", disable=None):
        lookup = reference.for_row(record)
        counts["phrases"] += len(record.phrases)
        if lookup is None:
            counts["rows_without_reference"] += 1
            continue
        for phrase in record.phrases:
            target = lookup(phrase)
            if isinstance(target, str):
                counts[target] += 1
                if target == "absent_category" and phrase.mask is not None:
                    counts["absent_category_grounded"] += 1  # a mask where the reference has no instance
                continue
            scores[target.category].append(score_phrase(phrase, target, counts))
    for key in ("rows_without_reference", "unmatched_phrases", "resized_masks"):
        counts.setdefault(key, 0)
    result = {
        "kind": KIND,
        "inputs": {
            "data": _file_record(data),
            "reference": _file_record(Path(s.reference)),
            "reference_kind": reference.kind,
            "limit": s.limit,
        },
        "settings": asdict(s),
        "scores": summarize(scores),
        "counts": dict(sorted(counts.items())),
        "environment": package_versions(),
        "created": now_iso(),
    }
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", result)
    atomic_write_text(out / "results.md", markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    """The results as markdown: inputs, overall means, counts, and a table per category (most phrases first)."""
    o, inputs = result["scores"]["overall"], result["inputs"]
    lines = [
        "# Mask quality",
        "",
        f"- data: `{inputs['data']['path']}`",
        f"- reference ({inputs['reference_kind']}): `{inputs['reference']['path']}`",
        f"- created: {result['created']}",
        "",
        f"Over {o['phrases']} phrases in {o['categories']} categories: mask IoU {number(o['mask_iou'], '.4f')} "
        f"(mean over categories {number(o['mask_iou_categories'], '.4f')}), box IoU {number(o['box_iou'], '.4f')} "
        f"(over categories {number(o['box_iou_categories'], '.4f')}), {o['misses']} misses (no grounded mask).",
        "",
        "Counts: " + ", ".join(f"{k} {v}" for k, v in result["counts"].items()) + ".",
        "",
        "| category | phrases | mask IoU | box IoU | misses |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, c in result["scores"]["categories"].items():
        iou, box = number(c["mask_iou"], ".4f"), number(c["box_iou"], ".4f")
        lines.append(f"| {name} | {c['count']} | {iou} | {box} | {c['misses']} |")
    return "\n".join(lines) + "\n"


def summary_line(result: dict[str, Any], out: str | Path) -> str:
    """One line for the console: overall means and the counts of what could not be scored."""
    o, c = result["scores"]["overall"], result["counts"]
    return (
        f"{Path(out) / 'results.json'}: {o['phrases']} phrases in {o['categories']} categories, "
        f"mask IoU {number(o['mask_iou'], '.4f')} (categories {number(o['mask_iou_categories'], '.4f')}), "
        f"box IoU {number(o['box_iou'], '.4f')}, {o['misses']} misses; {c['unmatched_phrases']} unmatched phrases, "
        f"{c['rows_without_reference']} rows without a reference"
    )


__all__ = [
    "MaskQualitySettings",
    "Target",
    "box_iou",
    "evaluate_mask_quality",
    "mask_iou",
    "markdown",
    "phrase_words",
    "score_phrase",
    "summarize",
    "summary_line",
]
