"""Quality assurance of a grounded-mask folder (``tokencompose prepare grounded``): numbers and figures.

A folder ``OUT`` holds ``metadata.jsonl`` (the paper's rows, plus ``"boxes"``, ``"scores"`` and
``"detections"`` aligned with ``"attn_list"``) and the mask PNGs. :func:`write_qa` reads it once and
writes three files beside it:

- ``qa.json``: :func:`qa_summary` -- rows, phrases, the null rate (phrases without a mask), the
  detections-per-phrase histogram (0, 1, 2, 3+), the histogram of mask areas (fraction of the image's
  pixels, 10 bins over [0, 1]) with its mean and median, detector score quantiles, the phrases most
  often left without a mask and, given the input list as a reference (the paper's own list, where a
  null means "Grounded-SAM found nothing"), the reference's null rate over the same rows and how often
  the two agree on null / not null, phrase by phrase (matched by row index and phrase text);
- ``qa.png``: :func:`~tokencompose.data.grounded_sheet.draw_qa`, the area histogram, the detections bars and
  the null rates;
- ``contact_sheet.png``: :func:`~tokencompose.data.grounded_sheet.contact_sheet`, a seeded random sample of
  rows, each image with its masks overlaid in distinct colours, its boxes drawn and a legend of phrases and
  scores.

Rows written in the paper's format (no boxes, scores or detections) are summarised too: those
statistics are then ``None``. A malformed row, a missing or unreadable mask or image is counted or
shown as such, never raised. Rows are streamed: memory holds the rows' byte offsets, one float per
mask area and the phrase counters, so a 100k-row folder is fine; every mask is read once, and only
the sampled rows' images are opened.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np

from tokencompose.atomic import write_json_atomic
from tokencompose.console import number
from tokencompose.data.official import image_drop_reason, load_mask
from tokencompose.data.records import iter_jsonl_lines
from tokencompose.errors import UserError

log = logging.getLogger(__name__)

KIND = "grounded_qa"
QA_JSON, QA_PNG, SHEET_PNG = "qa.json", "qa.png", "contact_sheet.png"
AREA_BINS = 10
DETECTION_BINS = ("0", "1", "2", "3+")
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
TOP_NULLS = 20

# -- rows ------------------------------------------------------------------------------------------------


class JsonlRows(Sequence):
    """The rows of a jsonl file, decoded on access: byte offsets in memory, one ``seek`` per item.

    Iterating streams the file front to back; an undecodable line reads as ``None`` (it keeps its index,
    so rows stay aligned with a reference list by line).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.offsets = np.fromiter((off for _, off, _ in iter_jsonl_lines(self.path)), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets)

    @staticmethod
    def _decode(raw: bytes) -> Any:
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return None

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[i]))
            return self._decode(f.readline())

    def __iter__(self) -> Iterator[Any]:
        for _, _, raw in iter_jsonl_lines(self.path):
            yield self._decode(raw)


def _aligned(row: dict, key: str, n: int) -> list | None:
    """``row[key]`` when it is a list aligned with ``attn_list`` (``n`` items), else None (absent/old format)."""
    value = row.get(key)
    return value if isinstance(value, list) and len(value) == n else None


def _phrases(row: Any) -> list[tuple[str, str | None, Any, Any, Any]] | None:
    """``[(text, mask, box, score, detections)]`` of a row; None when the row is malformed.

    Absent or misaligned ``boxes``/``scores``/``detections`` give ``None`` in their slot (old format).
    """
    if not isinstance(row, dict) or not isinstance(row.get("attn_list", []), list):
        return None
    attn = row.get("attn_list", [])
    if not all(isinstance(it, list | tuple) and len(it) == 2 and isinstance(it[0], str) for it in attn):
        return None
    if not all(it[1] is None or isinstance(it[1], str) for it in attn):
        return None
    n = len(attn)
    boxes, scores, dets = (_aligned(row, k, n) or [None] * n for k in ("boxes", "scores", "detections"))
    return [(str(t), m, b, s, d) for (t, m), b, s, d in zip(attn, boxes, scores, dets, strict=True)]


def _key(text: str) -> str:
    return " ".join(text.lower().split())


def _resolve(root: Path, path: str) -> Path:
    return Path(path) if os.path.isabs(path) else root / path


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return None
    return float(x)


def _box(x: Any) -> tuple[float, float, float, float] | None:
    if not isinstance(x, list | tuple) or len(x) != 4:
        return None
    vals = [_number(v) for v in x]
    if any(v is None for v in vals) or vals[2] <= vals[0] or vals[3] <= vals[1]:  # type: ignore[operator]
        return None
    return tuple(vals)  # type: ignore[return-value]


def _count(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) and x >= 0 else None


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def _top(counter: Counter, totals: Counter, k: int = TOP_NULLS) -> list[dict[str, Any]]:
    ranked = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return [{"phrase": p, "nulls": n, "total": totals[p]} for p, n in ranked]


# -- summary ---------------------------------------------------------------------------------------------


def qa_summary(rows: Iterable[dict], root: Path, reference_rows: Iterable[dict] | None = None) -> dict[str, Any]:
    """The numbers of a grounded folder's rows (mask paths resolved against ``root``); see the module doc.

    ``rows`` is iterated once (a list, or :class:`JsonlRows` to stream a file); so is ``reference_rows``,
    in step with it: row ``i`` is compared with reference row ``i``, phrase by phrase text (case and
    spacing ignored; a repeated phrase pairs with the repeats in order). Keys:

    ``rows``, ``malformed_rows``, ``phrases``, ``phrases_with_mask``, ``null_phrases``, ``null_rate``,
    ``mask_errors`` (``{reason: count}``: a mask path whose file is missing or unreadable),
    ``area`` (``count``, ``mean``, ``median``, ``empty``, ``edges``, ``counts``),
    ``detections`` (``phrases``, ``histogram`` over ``0/1/2/3+``) or None, ``scores`` (``count``, ``mean``,
    ``quantiles``) or None, ``boxes`` (phrases with a valid box) or None, ``top_nulls``, and ``reference``
    (None without one).
    """
    root = Path(root)
    n_rows = malformed = n_phrases = with_mask = 0
    mask_errors: Counter = Counter()
    areas: list[float] = []
    dets: Counter = Counter()
    det_rows = score_rows = box_rows = n_boxes = 0
    scores: list[float] = []
    nulls_by_text: Counter = Counter()
    totals_by_text: Counter = Counter()
    ref = _RefTally() if reference_rows is not None else None

    end = object()  # past the end of the shorter list
    pairs = zip_longest(rows, reference_rows, fillvalue=end) if reference_rows is not None else ((r, end) for r in rows)
    for index, (row, ref_row) in enumerate(pairs):
        if row is end:
            ref.reference_only += 1  # type: ignore[union-attr]  # the reference is longer than our list
            continue
        phrases = _phrases(row)
        if phrases is None:
            malformed += 1
            continue
        n_rows += 1
        det_rows += _aligned(row, "detections", len(phrases)) is not None
        score_rows += _aligned(row, "scores", len(phrases)) is not None
        box_rows += _aligned(row, "boxes", len(phrases)) is not None
        for text, mask, box, score, det in phrases:
            n_phrases += 1
            totals_by_text[_key(text)] += 1
            if (d := _count(det)) is not None:
                dets[DETECTION_BINS[min(d, 3)]] += 1
            if (s := _number(score)) is not None:
                scores.append(s)
            n_boxes += _box(box) is not None
            if mask is None:
                nulls_by_text[_key(text)] += 1
                continue
            with_mask += 1
            try:
                m = load_mask(_resolve(root, mask))
            except (OSError, ValueError) as err:
                mask_errors[image_drop_reason(err, mask=True)] += 1
                continue
            areas.append(float(m.sum()) / m.size if m.size else 0.0)
        if ref is not None and ref_row is not end:  # rows past the reference's end are not compared
            ref.add(row, phrases, ref_row)
        if (index + 1) % 10000 == 0:
            log.info("grounded QA: %d rows read", index + 1)

    a = np.asarray(areas, dtype=np.float64)
    counts, edges = np.histogram(a, bins=AREA_BINS, range=(0.0, 1.0))
    s = np.asarray(scores, dtype=np.float64)
    n_det = sum(dets.values())
    return {
        "kind": KIND,
        "rows": n_rows,
        "malformed_rows": malformed,
        "phrases": n_phrases,
        "phrases_with_mask": with_mask,
        "null_phrases": n_phrases - with_mask,
        "null_rate": _ratio(n_phrases - with_mask, n_phrases),
        "mask_errors": dict(sorted(mask_errors.items())),
        "area": {
            "count": int(a.size),
            "mean": float(a.mean()) if a.size else None,
            "median": float(np.median(a)) if a.size else None,
            "empty": int((a == 0).sum()),
            "edges": [round(float(e), 6) for e in edges],
            "counts": [int(c) for c in counts],
        },
        "detections": (
            {"rows": det_rows, "phrases": n_det, "histogram": {b: dets[b] for b in DETECTION_BINS}}
            if det_rows
            else None
        ),
        "scores": (
            {
                "rows": score_rows,
                "count": int(s.size),
                "mean": float(s.mean()) if s.size else None,
                "quantiles": {f"{q:g}": float(np.quantile(s, q)) for q in QUANTILES} if s.size else None,
            }
            if score_rows
            else None
        ),
        "boxes": {"rows": box_rows, "phrases": n_boxes} if box_rows else None,
        "top_nulls": _top(nulls_by_text, totals_by_text),
        "reference": ref.result() if ref is not None else None,
    }


class _RefTally:
    """Null / not-null agreement with a reference list, row by row (by index) and phrase by phrase (by text)."""

    def __init__(self) -> None:
        self.rows = self.malformed = self.reference_only = self.file_mismatches = 0
        self.ours_phrases = self.ours_nulls = self.ref_phrases = self.ref_nulls = 0
        self.both_null = self.both_mask = self.only_ours_null = self.only_ref_null = 0
        self.unmatched_ours = self.unmatched_ref = 0
        self.only_ours_by_text: Counter = Counter()
        self.only_ref_by_text: Counter = Counter()
        self.totals_by_text: Counter = Counter()

    def add(self, row: dict, phrases: list, ref_row: Any) -> None:
        theirs = _phrases(ref_row)
        if theirs is None:
            self.malformed += 1
            return
        self.rows += 1
        ours_name, ref_name = row.get("file_name"), ref_row.get("file_name")
        if isinstance(ours_name, str) and isinstance(ref_name, str):
            self.file_mismatches += Path(ours_name).name != Path(ref_name).name
        self.ours_phrases += len(phrases)
        self.ours_nulls += sum(m is None for _, m, *_ in phrases)
        self.ref_phrases += len(theirs)
        self.ref_nulls += sum(m is None for _, m, *_ in theirs)
        pool: dict[str, list[bool]] = {}
        for text, mask, *_ in theirs:
            pool.setdefault(_key(text), []).append(mask is None)
        for text, mask, *_ in phrases:
            key = _key(text)
            if not pool.get(key):
                self.unmatched_ours += 1
                continue
            ref_null, ours_null = pool[key].pop(0), mask is None
            self.totals_by_text[key] += 1
            if ours_null and ref_null:
                self.both_null += 1
            elif not ours_null and not ref_null:
                self.both_mask += 1
            elif ours_null:
                self.only_ours_null += 1
                self.only_ours_by_text[key] += 1
            else:
                self.only_ref_null += 1
                self.only_ref_by_text[key] += 1
        self.unmatched_ref += sum(len(v) for v in pool.values())

    def result(self) -> dict[str, Any]:
        matched = self.both_null + self.both_mask + self.only_ours_null + self.only_ref_null
        return {
            "rows_compared": self.rows,
            "malformed_rows": self.malformed,
            "reference_only_rows": self.reference_only,
            "file_name_mismatches": self.file_mismatches,
            "phrases": self.ref_phrases,
            "null_rate": _ratio(self.ref_nulls, self.ref_phrases),
            "ours_phrases": self.ours_phrases,
            "ours_null_rate": _ratio(self.ours_nulls, self.ours_phrases),
            "matched_phrases": matched,
            "agreement": _ratio(self.both_null + self.both_mask, matched),
            "both_null": self.both_null,
            "both_mask": self.both_mask,
            "only_ours_null": self.only_ours_null,
            "only_reference_null": self.only_ref_null,
            "unmatched_ours": self.unmatched_ours,
            "unmatched_reference": self.unmatched_ref,
            "top_only_ours_null": _top(self.only_ours_by_text, self.totals_by_text),
            "top_only_reference_null": _top(self.only_ref_by_text, self.totals_by_text),
        }


def write_qa(out: Path, reference: Path | None = None, seed: int = 0) -> dict[str, Any]:
    """Read ``out/metadata.jsonl`` (and the ``reference`` jsonl), write ``qa.png``, ``contact_sheet.png``
    and then ``qa.json`` (atomically, last: a folder with ``qa.json`` has its figures); returns the summary."""
    out = Path(out)
    jsonl = out / "metadata.jsonl"
    if not jsonl.is_file():
        raise UserError(f"{jsonl} does not exist: give the folder written by `tokencompose prepare grounded`")
    if reference is not None and not Path(reference).is_file():
        raise UserError(f"reference list {reference} does not exist: give the input metadata.jsonl")
    rows = JsonlRows(jsonl)
    ref_rows = JsonlRows(reference) if reference is not None else None
    summary = qa_summary(rows, out, ref_rows)
    summary["source"] = {"metadata": "metadata.jsonl", "reference": str(reference) if reference else None}
    summary["figures"] = {"qa": QA_PNG, "contact_sheet": SHEET_PNG, "seed": seed}
    from tokencompose.data.grounded_sheet import contact_sheet, draw_qa  # lazy: matplotlib

    draw_qa(summary, out / QA_PNG)
    contact_sheet(rows, out, out / SHEET_PNG, seed=seed)
    write_json_atomic(out / QA_JSON, summary)
    log.info(
        "grounded QA of %s: %d rows, %d phrases, null rate %s%s",
        out, summary["rows"], summary["phrases"], number(summary["null_rate"], ".1%", "–"),
        "" if summary["reference"] is None else f" (reference {number(summary['reference']['null_rate'], '.1%', '–')})",
    )  # fmt: skip
    return summary
