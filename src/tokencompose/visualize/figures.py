"""Rendering with matplotlib (imported lazily, inside each function; no pyplot, no global state).

Figures are built on ``matplotlib.figure.Figure`` and written by the Agg backend with the PNG
``Software`` metadata removed, so the bytes depend only on the data: same seeds, same file.
Heatmaps use a perceptually uniform colour map (``inferno`` by default) with a colour bar.

Shapes: images uint8 ``[S, S, 3]``; maps float ``[W, S, S]`` (one per word/phrase, image size).
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_CMAP = "inferno"
DEFAULT_DPI = 150
PANEL_INCH = 2.0


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save_png(fig: Any, path: str | Path, dpi: int = DEFAULT_DPI) -> Path:
    """Write ``fig`` as PNG without version metadata (deterministic bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(fig, dpi))
    return path


def png_bytes(fig: Any, dpi: int = DEFAULT_DPI) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None}, facecolor="white")
    return buf.getvalue()


def _wrap(text: str, width: int = 28) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text


def _off(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def _gray(image: np.ndarray) -> np.ndarray:
    """Luminance of a uint8 ``[S, S, 3]`` image, dimmed, as the backdrop of a heatmap.

    A colour photo under a colour map makes the image's own reds read as attention; grey does not.
    """
    lum = image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return lum / 255.0 * 0.8


def _colorbar(fig: Any, cmap: str, axes: Any, label: str) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    # A separate full-opacity mappable: the bar shows the colour map, not the half-transparent overlay.
    cb = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap), ax=axes, shrink=0.8, pad=0.01, aspect=30)
    cb.set_label(label, fontsize=8)
    cb.ax.tick_params(labelsize=7)


def attention_figure(
    image: np.ndarray,
    words: Sequence[str],
    maps: np.ndarray,
    title: str | None = None,
    cmap: str = DEFAULT_CMAP,
    alpha: float = 0.6,
    ncols: int = 6,
    label: str = "attention (min-max per word)",
) -> Any:
    """The image, then one heatmap overlay per word (word as title), one shared colour bar.

    ``maps [W, S, S]`` are expected in [0, 1] (see ``aggregate.normalize``).
    """
    from matplotlib.colors import Normalize

    n = 1 + len(words)
    gray = _gray(image)
    cols = min(ncols, n)
    rows = -(-n // cols)
    fig = _figure(PANEL_INCH * cols + 0.6, PANEL_INCH * rows + (0.5 if title else 0.2))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    norm = Normalize(0.0, 1.0)
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=9)
    for ax, word, m in zip(axes[1:], words, maps, strict=False):
        ax.imshow(gray, cmap="gray", vmin=0, vmax=1)
        ax.imshow(m, cmap=cmap, norm=norm, alpha=alpha, interpolation="bilinear")
        ax.set_title(word, fontsize=10)
    for ax in axes:
        _off(ax)
    for ax in axes[n:]:
        ax.set_visible(False)
    if words:
        _colorbar(fig, cmap, list(axes[:n]), label)
    if title:
        fig.suptitle(_wrap(title, 20 * cols), fontsize=10)
    return fig


def mask_figure(
    image: np.ndarray,
    phrases: Sequence[str],
    masks: np.ndarray,
    model_maps: Mapping[str, np.ndarray],
    scores: Mapping[str, Sequence[float]] | None = None,
    title: str | None = None,
    cmap: str = DEFAULT_CMAP,
    alpha: float = 0.65,
) -> Any:
    """One row per phrase: image | mask | each model's attention for that phrase.

    ``masks [P, S, S]`` bool; ``model_maps[label] [P, S, S]`` in [0, 1]; ``scores[label][p]`` (the share of
    attention inside the mask) is printed under each attention panel when given.
    """
    from matplotlib.colors import Normalize

    labels = list(model_maps)
    rows, cols = max(len(phrases), 1), 2 + len(labels)
    fig = _figure(PANEL_INCH * 0.9 * cols + 0.9, PANEL_INCH * 0.9 * rows + (0.5 if title else 0.3))
    axes = fig.subplots(rows, cols, squeeze=False)
    norm = Normalize(0.0, 1.0)
    gray = _gray(image)
    for r, phrase in enumerate(phrases):
        axes[r, 0].imshow(image)
        axes[r, 0].set_ylabel(_wrap(phrase, 16), fontsize=10)
        axes[r, 1].imshow(masks[r], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        for c, label in enumerate(labels, start=2):
            ax = axes[r, c]
            ax.imshow(gray, cmap="gray", vmin=0, vmax=1)
            ax.imshow(model_maps[label][r], cmap=cmap, norm=norm, alpha=alpha, interpolation="bilinear")
            if scores is not None and label in scores:
                ax.set_xlabel(f"in mask {scores[label][r]:.2f}", fontsize=8)
    for c, head in enumerate(["image", "mask", *labels]):
        axes[0, c].set_title(_wrap(head, 18), fontsize=9)
    for ax in axes.ravel():
        _off(ax)
    if phrases and labels:
        _colorbar(fig, cmap, axes.ravel().tolist(), "attention (min-max per phrase)")
    if title:
        fig.suptitle(_wrap(title, 22 * cols), fontsize=10)
    return fig


def grid_figure(
    images: Mapping[str, Sequence[np.ndarray]],
    captions: Sequence[str],
    title: str | None = None,
) -> Any:
    """Models side by side (one column each), one row per (prompt, seed) with its caption at the left.

    ``images[label][r]`` is the image of row ``r`` for that model; every model has ``len(captions)`` images.
    """
    labels = list(images)
    rows, cols = len(captions), max(len(labels), 1)
    fig = _figure(PANEL_INCH * cols + 1.6, PANEL_INCH * rows + (0.5 if title else 0.3))
    axes = fig.subplots(rows, cols, squeeze=False)
    for c, label in enumerate(labels):
        axes[0, c].set_title(_wrap(label, 24), fontsize=10)
        for r in range(rows):
            axes[r, c].imshow(images[label][r])
    for r, cap in enumerate(captions):
        axes[r, 0].set_ylabel(_wrap(cap, 24), fontsize=8)
    for ax in axes.ravel():
        _off(ax)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def probe_figure(
    miou: np.ndarray,
    auroc: np.ndarray,
    rows: Sequence[str],
    cols: Sequence[str],
    title: str = "",
    cmap: str = DEFAULT_CMAP,
) -> Any:
    """The layer probe as two heat maps, layers x timestep buckets: mIoU (left) and AUROC (right).

    ``miou``, ``auroc``: ``[R, C]`` (``R`` layers in UNet order, ``C`` buckets); each cell is annotated with
    its value. Each panel's colour scale spans its own data, so the ranking of layers reads at a glance.
    """
    from matplotlib.colors import Normalize

    n_rows, n_cols = miou.shape
    fig = _figure(2 * (1.6 + 0.55 * n_cols) + 1.5, 1.2 + 0.28 * n_rows)
    axes = fig.subplots(1, 2, sharey=True)
    for k, (ax, data, label) in enumerate(zip(axes, (miou, auroc), ("best mIoU", "AUROC"), strict=True)):
        finite = data[np.isfinite(data)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        norm = Normalize(lo, hi if hi > lo else lo + 1e-6)
        im = ax.imshow(data, cmap=cmap, norm=norm, aspect="auto")
        for i in range(n_rows):
            for j in range(n_cols):
                v = data[i, j]
                dark = not np.isfinite(v) or norm(v) < 0.6
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=6, color="white" if dark else "black")
        ax.set_xticks(range(n_cols), [str(c) for c in cols], fontsize=7)
        ax.set_xlabel("timestep", fontsize=8)
        ax.set_title(label, fontsize=9)
        if k == 0:
            ax.set_yticks(range(n_rows), list(rows), fontsize=7)
        cb = fig.colorbar(im, ax=ax, shrink=0.8, pad=0.01, aspect=30)
        cb.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(_wrap(title, 80), fontsize=9)
    return fig
