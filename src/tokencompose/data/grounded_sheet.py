"""Figures of a grounded-mask folder's QA: the summary panels (:func:`draw_qa`) and a contact sheet of random rows.

The numbers come from :func:`tokencompose.data.grounded_qa.qa_summary`; the sheet reads only the sampled rows'
images and masks, and says on a tile what was missing or unreadable instead of failing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tokencompose.atomic import atomic_write_bytes
from tokencompose.console import number
from tokencompose.data.grounded_qa import DETECTION_BINS, _box, _count, _number, _phrases, _resolve
from tokencompose.data.official import image_drop_reason, load_mask, open_image

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


# -- figures ---------------------------------------------------------------------------------------------


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
        ax_null.bar_label(bars, [number(r, ".1%", "–") for r in rates], fontsize=8)
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
