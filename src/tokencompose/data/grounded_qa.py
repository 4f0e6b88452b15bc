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
- ``qa.png``: :func:`draw_qa`, the area histogram, the detections bars and the null rates;
- ``contact_sheet.png``: :func:`contact_sheet`, a seeded random sample of rows, each image with its
  masks overlaid in distinct colours, its boxes drawn and a legend of phrases and scores.

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

from tokencompose.atomic import atomic_write_bytes, write_json_atomic
from tokencompose.data.official import image_drop_reason, load_mask, open_image
from tokencompose.data.records import iter_jsonl_lines
from tokencompose.errors import UserError

log = logging.getLogger(__name__)

KIND = "grounded_qa"
QA_JSON, QA_PNG, SHEET_PNG = "qa.json", "qa.png", "contact_sheet.png"
AREA_BINS = 10
DETECTION_BINS = ("0", "1", "2", "3+")
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
TOP_NULLS = 20

# draw_qa: three panels, FIGSIZE inches at DPI -> a PNG of exactly QA_SIZE pixels.
QA_FIGSIZE = (12.0, 3.4)
QA_DPI = 100
QA_SIZE = (int(QA_FIGSIZE[0] * QA_DPI), int(QA_FIGSIZE[1] * QA_DPI))

# contact_sheet: each cell is a title line, the tile, then LEGEND_LINES legend lines (pixels at SHEET_DPI).
SHEET_DPI = 100
TITLE_PX, LINE_PX, PAD_PX = 16, 12, 6
LEGEND_LINES = 5
# tab10 without its grey: distinct colours for the masks of one tile (cycled past nine phrases).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
NULL_GREY, ERROR_RED = "#8e8e93", "#c0392b"
OVERLAY_ALPHA = 0.45


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


# -- figures ---------------------------------------------------------------------------------------------


def _fmt(x: Any, spec: str = "{:.3f}") -> str:
    return "–" if x is None else spec.format(x)


def _no_data(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, color=NULL_GREY, transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def draw_qa(summary: dict[str, Any], path: Path) -> Path:
    """One PNG of ``QA_SIZE`` pixels: mask-area histogram | detections per phrase | null rate (vs reference)."""
    from tokencompose.visualize.figures import _figure, png_bytes

    fig = _figure(*QA_FIGSIZE)
    ax_area, ax_det, ax_null = fig.subplots(1, 3, width_ratios=(1.3, 1.0, 1.0))

    area = summary.get("area") or {}
    counts, edges = area.get("counts") or [], area.get("edges") or []
    if area.get("count") and len(edges) == len(counts) + 1:
        widths = np.diff(edges)
        ax_area.bar(edges[:-1], counts, width=widths, align="edge", color="tab:blue", edgecolor="white", lw=0.8)
        for stat, ls in (("mean", "-"), ("median", "--")):
            if area.get(stat) is not None:
                ax_area.axvline(area[stat], color="tab:orange", ls=ls, lw=1.3, label=f"{stat} {area[stat]:.3f}")
        ax_area.set_xlim(0, 1)
        ax_area.legend(fontsize=7, frameon=False)
        ax_area.set_ylabel("masks", fontsize=8)
    else:
        _no_data(ax_area, "no readable masks")
    ax_area.set_xlabel("mask area (fraction of the image)", fontsize=8)
    ax_area.set_title(f"mask area ({area.get('count', 0)} masks)", fontsize=9)

    det = summary.get("detections")
    if det and det.get("phrases"):
        hist = det["histogram"]
        vals = [hist.get(b, 0) for b in DETECTION_BINS]
        bars = ax_det.bar(DETECTION_BINS, vals, color="tab:blue")
        ax_det.bar_label(bars, [f"{v / det['phrases']:.0%}" for v in vals], fontsize=7)
        ax_det.set_ylabel("phrases", fontsize=8)
        ax_det.margins(y=0.15)
    else:
        _no_data(ax_det, "no detection counts\n(rows in the paper's format)")
    ax_det.set_xlabel("detector boxes assigned to the phrase", fontsize=8)
    ax_det.set_title("detections per phrase", fontsize=9)

    ref = summary.get("reference")
    labels, rates, colors = [], [], []
    if ref and ref.get("ours_null_rate") is not None:
        labels += ["ours", "reference"]
        rates += [ref["ours_null_rate"], ref.get("null_rate")]
        colors += ["tab:blue", "tab:orange"]
    elif summary.get("null_rate") is not None:
        labels, rates, colors = ["ours"], [summary["null_rate"]], ["tab:blue"]
    if labels:
        shown = [r if r is not None else 0.0 for r in rates]
        bars = ax_null.bar(labels, shown, color=colors, width=0.55)
        ax_null.bar_label(bars, [_fmt(r, "{:.1%}") for r in rates], fontsize=8)
        ax_null.set_ylim(0, max(1e-9, *shown) * 1.25 if max(shown) > 0 else 1.0)
        ax_null.set_ylabel("phrases without a mask", fontsize=8)
        if ref and ref.get("agreement") is not None:
            ax_null.set_xlabel(
                f"agree on null/not null: {ref['agreement']:.1%} of {ref['matched_phrases']} phrases", fontsize=8
            )
    else:
        _no_data(ax_null, "no phrases")
    ax_null.set_title("null rate" + (" vs reference (same rows)" if ref else ""), fontsize=9)
    for ax in (ax_area, ax_det, ax_null):
        ax.tick_params(labelsize=7)
    atomic_write_bytes(path, png_bytes(fig, QA_DPI))
    return Path(path)


def _short(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _hex_rgb(color: str) -> np.ndarray:
    return np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.float32)


def _tile(row: Any, root: Path, tile: int) -> tuple[np.ndarray | None, str | None, list, list]:
    """``(picture uint8 [h, w, 3] | None, problem | None, boxes [(xywh, colour)], legend [(text, colour)])``."""
    from PIL import Image

    phrases = _phrases(row)
    if phrases is None:
        return None, "malformed row", [], []
    name = row.get("file_name")
    picture, problem, scale = None, None, (1.0, 1.0)
    if not isinstance(name, str) or not name:
        problem = "no file_name"
    else:
        try:
            with open_image(_resolve(root, name)) as im:
                full = im.size
                im.draft("RGB", (tile, tile))  # JPEG: decode at a reduced scale
                rgb = im.convert("RGB")
            fit = tile / max(rgb.size)  # small images (the shapes world's 64 px) are enlarged, pixels kept sharp
            size = (max(1, round(rgb.size[0] * fit)), max(1, round(rgb.size[1] * fit)))
            rgb = rgb.resize(size, Image.NEAREST if fit > 1 else Image.BILINEAR)
            picture = np.asarray(rgb, dtype=np.float32)
            scale = (rgb.size[0] / full[0], rgb.size[1] / full[1])
        except (OSError, ValueError) as err:
            problem = f"{image_drop_reason(err).replace('_', ' ')}\n{_short(Path(name).name, max(8, tile // 6))}"
    boxes, legend, k = [], [], 0
    for text, mask, box, score, det in phrases:
        s = _number(score)
        label = _short(text, 26) + (f"  {s:.2f}" if s is not None else "")
        if (d := _count(det)) is not None and d > 1:
            label += f"  ×{d}"
        if mask is None:
            legend.append(("○ " + _short(text, 26) + "  (no mask)", NULL_GREY))
            continue
        color = PALETTE[k % len(PALETTE)]
        k += 1
        try:  # read even without a picture: the legend says which masks are broken
            m = load_mask(_resolve(root, mask))
        except (OSError, ValueError) as err:
            legend.append(("× " + label + f"  ({image_drop_reason(err, mask=True).replace('_', ' ')})", ERROR_RED))
            continue
        if picture is not None:
            h, w = picture.shape[:2]
            if m.shape != (h, w):
                m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127
            picture[m] = picture[m] * (1 - OVERLAY_ALPHA) + _hex_rgb(color) * OVERLAY_ALPHA
            if (b := _box(box)) is not None:
                x0, y0, x1, y1 = b[0] * scale[0], b[1] * scale[1], b[2] * scale[0], b[3] * scale[1]
                boxes.append(((x0, y0, x1 - x0, y1 - y0), color))
        legend.append(("■ " + label, color))
    out = None if picture is None else np.clip(np.rint(picture), 0, 255).astype(np.uint8)
    return out, problem, boxes, legend


def contact_sheet(rows: Sequence[dict], root: Path, path: Path, n: int = 16, seed: int = 0, tile: int = 256) -> Path:
    """A grid of ``n`` rows drawn at random (seeded: same rows, order and bytes for the same seed).

    Each cell: ``#index file`` above; the image (fit into ``tile`` x ``tile`` pixels) with every phrase's
    mask overlaid in its own colour and its box outlined; below, a legend line per phrase with its score
    (and ``×k`` when ``k > 1`` detector boxes were merged); phrases without a mask are listed in grey, a
    missing or unreadable mask in red. A missing or unreadable image leaves a grey tile that says why.
    """
    from matplotlib.patches import Rectangle

    from tokencompose.visualize.figures import png_bytes

    root, total = Path(root), len(rows)
    rng = np.random.default_rng(seed)
    picks = [int(i) for i in rng.permutation(total)[: max(0, n)]] if total else []
    count = max(len(picks), 1)
    cols = math.ceil(math.sqrt(count))
    grid_rows = math.ceil(count / cols)
    cell_w, cell_h = tile + 2 * PAD_PX, TITLE_PX + tile + LEGEND_LINES * LINE_PX + 2 * PAD_PX
    width, height = cols * cell_w, grid_rows * cell_h
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width / SHEET_DPI, height / SHEET_DPI), dpi=SHEET_DPI)

    def frac(x: float, y: float) -> tuple[float, float]:  # pixels from the top left -> figure fraction
        return x / width, 1 - y / height

    if not picks:
        fig.text(0.5, 0.5, "no rows to show", ha="center", va="center", fontsize=10, color=NULL_GREY)
    for slot, index in enumerate(picks):
        row = rows[index]
        cx, cy = (slot % cols) * cell_w + PAD_PX, (slot // cols) * cell_h + PAD_PX
        name = row.get("file_name") if isinstance(row, dict) else None
        title = f"#{index}  {_short(Path(name).name, 34) if isinstance(name, str) else ''}"
        fig.text(*frac(cx, cy + TITLE_PX - 4), title, fontsize=7, color="#1d1d1f")
        left, top = frac(cx, cy + TITLE_PX + tile)
        ax = fig.add_axes((left, top, tile / width, tile / height))
        ax.set_xticks([])
        ax.set_yticks([])
        for sp in ax.spines.values():
            sp.set_color("#d2d2d7")
        picture, problem, boxes, legend = _tile(row, root, tile)
        if picture is not None:
            h, w = picture.shape[:2]
            ax.imshow(picture, interpolation="nearest", extent=(0, w, h, 0))
            ax.set_xlim((w - tile) / 2, (w + tile) / 2)  # centred in the square tile, one data unit per pixel
            ax.set_ylim((h + tile) / 2, (h - tile) / 2)
            for (x, y, bw, bh), color in boxes:
                ax.add_patch(Rectangle((x, y), bw, bh, fill=False, edgecolor=color, lw=1.4))
        else:
            ax.set_facecolor("#e5e5ea")
            ax.text(0.5, 0.5, problem or "no image", ha="center", va="center", fontsize=7, color=ERROR_RED,
                    transform=ax.transAxes, multialignment="center")  # fmt: skip
        if len(legend) > LEGEND_LINES:
            rest = len(legend) - (LEGEND_LINES - 1)
            legend = [*legend[: LEGEND_LINES - 1], (f"+{rest} more", NULL_GREY)]
        if not legend and picture is not None:
            legend = [("(no phrases)", NULL_GREY)]
        for line, (text, color) in enumerate(legend):
            y = cy + TITLE_PX + tile + (line + 1) * LINE_PX
            fig.text(*frac(cx, y), text, fontsize=7, color=color)
    atomic_write_bytes(path, png_bytes(fig, SHEET_DPI))
    return Path(path)


# -- the folder ------------------------------------------------------------------------------------------


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
    draw_qa(summary, out / QA_PNG)
    contact_sheet(rows, out, out / SHEET_PNG, seed=seed)
    write_json_atomic(out / QA_JSON, summary)
    log.info(
        "grounded QA of %s: %d rows, %d phrases, null rate %s%s",
        out, summary["rows"], summary["phrases"], _fmt(summary["null_rate"], "{:.1%}"),
        "" if summary["reference"] is None else f" (reference {_fmt(summary['reference']['null_rate'], '{:.1%}')})",
    )  # fmt: skip
    return summary
