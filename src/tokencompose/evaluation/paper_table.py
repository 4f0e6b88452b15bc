"""The paper's Table 1 (TokenCompose, CVPR 2024), as reference rows for the suite's table and ``compare``.

Numbers as published (the authors' README and paper): object accuracy (VISOR protocol, %), MultiGen MG2..MG5 on
COCO and ADE20K prompts (%, ± the standard deviation over the 10 per-index image subsets), FID on COCO (10k
random val2017 captions) and Flickr30K, latency (s / image, ± std). ``None``: not reported ("-").
"""

from __future__ import annotations

from typing import Any

COLUMNS: tuple[str, ...] = (
    "object_accuracy",
    "coco_mg2", "coco_mg3", "coco_mg4", "coco_mg5",
    "ade20k_mg2", "ade20k_mg3", "ade20k_mg4", "ade20k_mg5",
    "fid_coco", "fid_flickr30k", "latency",
)  # fmt: skip
"""The columns in the paper's order."""

HEADERS: dict[str, str] = {
    "object_accuracy": "Object Acc.",
    **{f"coco_mg{k}": f"COCO MG{k}" for k in range(2, 6)},
    **{f"ade20k_mg{k}": f"ADE20K MG{k}" for k in range(2, 6)},
    "fid_coco": "FID (COCO)",
    "fid_flickr30k": "FID (Flickr30K)",
    "latency": "Latency (s)",
}


def _row(obj, coco, ade, fid_coco, fid_flickr, latency) -> dict[str, tuple[float, float | None] | None]:
    """One method's cells: ``(value, ± or None)`` per column, None where the paper has none."""
    cells: dict[str, tuple[float, float | None] | None] = {"object_accuracy": (obj, None)}
    for k, cell in zip(range(2, 6), coco, strict=True):
        cells[f"coco_mg{k}"] = cell
    for k, cell in zip(range(2, 6), ade, strict=True):
        cells[f"ade20k_mg{k}"] = cell
    cells["fid_coco"] = None if fid_coco is None else (fid_coco, None)
    cells["fid_flickr30k"] = None if fid_flickr is None else (fid_flickr, None)
    cells["latency"] = latency
    return cells


PAPER_ROWS: dict[str, dict[str, Any]] = {
    "SD 1.4 (paper)": _row(29.86, [(90.72, 1.33), (50.74, 0.89), (11.68, 0.45), (0.88, 0.21)],
                           [(89.81, 0.40), (53.96, 1.14), (16.52, 1.13), (1.89, 0.34)], 20.88, 71.46, (7.54, 0.17)),
    "Composable (paper)": _row(27.83, [(63.33, 0.59), (21.87, 1.01), (3.25, 0.45), (0.23, 0.18)],
                               [(69.61, 0.99), (29.96, 0.84), (6.89, 0.38), (0.73, 0.22)], None, 75.57, (13.81, 0.15)),
    "Layout (paper)": _row(43.59, [(93.22, 0.69), (60.15, 1.58), (19.49, 0.88), (2.27, 0.44)],
                           [(96.05, 0.34), (67.83, 0.90), (21.93, 1.34), (2.35, 0.41)], None, 74.00, (18.89, 0.20)),
    "Structured (paper)": _row(29.64, [(90.40, 1.06), (48.64, 1.32), (10.71, 0.92), (0.68, 0.25)],
                               [(89.25, 0.72), (53.05, 1.20), (15.76, 0.86), (1.74, 0.49)], 21.13, 71.68, (7.74, 0.17)),
    "Attn-Exct (paper)": _row(45.13, [(93.64, 0.76), (65.10, 1.24), (28.01, 0.90), (6.01, 0.61)],
                              [(91.74, 0.49), (62.51, 0.94), (26.12, 0.78), (5.89, 0.40)], None, 71.68, (25.43, 4.89)),
    "TokenCompose (paper)": _row(52.15, [(98.08, 0.40), (76.16, 1.04), (28.81, 0.95), (3.28, 0.48)],
                                 [(97.75, 0.34), (76.93, 1.09), (33.92, 1.47), (6.21, 0.62)], 20.19, 71.13,
                                 (7.56, 0.14)),
}  # fmt: skip
"""The paper's Table 1 rows (its baselines and TokenCompose on SD 1.4)."""

REFERENCE_ROWS = ("SD 1.4 (paper)", "TokenCompose (paper)")
"""The rows shown beside ours by default."""


def format_cell(cell: tuple[float, float | None] | None, digits: int = 2) -> str:
    """``value ± std`` (or ``value``; ``-`` for a missing cell)."""
    if cell is None or cell[0] is None:
        return "-"
    value, spread = cell
    return f"{value:.{digits}f}" if spread is None else f"{value:.{digits}f} ± {spread:.{digits}f}"


def markdown_rows(rows: dict[str, dict[str, Any]], columns: tuple[str, ...] = COLUMNS) -> list[str]:
    """Header, rule and one line per row of a Table 1 layout (cells from :func:`format_cell`)."""
    lines = ["| method | " + " | ".join(HEADERS[c] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, cells in rows.items():
        lines.append(f"| {name} | " + " | ".join(format_cell(cells.get(c)) for c in columns) + " |")
    return lines
