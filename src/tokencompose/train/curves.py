"""Loss-curve figure of a run: raw, smoothed, and min-max scaled per epoch, for every logged term.

The per-epoch min-max view rescales each term to [0, 1] within each epoch, so terms of very
different magnitudes (denoise ~0.1, token ~0.5, pixel ~0.02 unweighted) can be compared by shape and
a term that stops improving shows up as a flat band.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def smooth(values: np.ndarray, factor: float) -> np.ndarray:
    """Bias-corrected exponential moving average (TensorBoard's smoothing)."""
    out = np.empty_like(values, dtype=float)
    avg, weight = 0.0, 0.0
    for i, v in enumerate(values):
        avg = factor * avg + (1 - factor) * v
        weight = factor * weight + (1 - factor)
        out[i] = avg / weight
    return out


def minmax_per_epoch(values: np.ndarray, epochs: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] within each epoch (a constant epoch maps to 0)."""
    out = np.zeros_like(values, dtype=float)
    for e in np.unique(epochs):
        sel = epochs == e
        lo, hi = values[sel].min(), values[sel].max()
        out[sel] = (values[sel] - lo) / (hi - lo) if hi > lo else 0.0
    return out


def loss_terms(rows: list[dict[str, Any]]) -> tuple[list[str], dict[str, list[str]]]:
    """Main loss names (total first, then denoise, token, pixel, extra terms) and each one's per-resolution parts.

    Logged names are ``loss/NAME`` for terms and ``loss/NAME_HxW`` for the parts of a term.
    """
    names = sorted({k for r in rows for k in r if k.startswith("loss/")})
    parts: dict[str, list[str]] = {}
    main = []
    for k in names:
        base, _, suffix = k.rpartition("_")
        if base in names and "x" in suffix:
            parts.setdefault(base, []).append(k)
        else:
            main.append(k)
    order = {"loss/total": 0, "loss/denoise": 1, "loss/token": 2, "loss/pixel": 3}
    return sorted(main, key=lambda k: (order.get(k, 4), k)), parts


def _series(rows: list[dict[str, Any]], name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pts = [(r["step"], r[name], r.get("epoch", 0)) for r in rows if name in r]
    return (
        np.array([p[0] for p in pts], dtype=float),
        np.array([p[1] for p in pts], dtype=float),
        np.array([p[2] for p in pts]),
    )


def plot_loss_curves(rows: list[dict[str, Any]], out: str | Path, smoothing: float = 0.9) -> Path | None:
    """Write the figure to ``out`` (PNG), one row per loss term; None when there is nothing to draw.

    Columns: raw and smoothed values; min-max scaled per epoch (raw and smoothed); the smoothed
    per-resolution parts, when the term has them. Terms are unweighted (lambda, gamma not applied).
    """
    names, parts = loss_terms(rows)
    if not names:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display needed; never opens a window
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(names), 3, figsize=(15, 2.6 * len(names)), squeeze=False)
    for row_axes, name in zip(axes, names, strict=True):
        steps, vals, epochs = _series(rows, name)
        smoothed = smooth(vals, smoothing)
        ax = row_axes[0]
        ax.plot(steps, vals, color="tab:blue", alpha=0.35, lw=1, label="raw")
        ax.plot(steps, smoothed, color="tab:blue", lw=1.5, label=f"smoothed ({smoothing})")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
        ax = row_axes[1]
        ax.plot(steps, minmax_per_epoch(vals, epochs), color="tab:orange", alpha=0.35, lw=1, label="raw")
        ax.plot(steps, minmax_per_epoch(smoothed, epochs), color="tab:orange", lw=1.5, label="smoothed")
        for e in np.unique(epochs)[1:]:
            ax.axvline(steps[epochs == e][0], color="gray", lw=0.5, ls=":")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{name}, min-max scaled per epoch", fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
        ax = row_axes[2]
        if parts.get(name):
            for part in parts[name]:
                s, v, _ = _series(rows, part)
                ax.plot(s, smooth(v, smoothing), lw=1.2, label=part.rsplit("_", 1)[1])
            ax.set_title(f"{name} by attention resolution (smoothed)", fontsize=9)
            ax.legend(fontsize=7, loc="upper right")
        else:
            ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
