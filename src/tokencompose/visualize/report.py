"""One self-contained HTML report from run folders, results files and figure folders.

Inputs are files or folders, searched a few levels deep: ``config.yaml`` (config summary),
``metrics.jsonl`` (loss curves, drawn by the trainer's figure), results JSON of any ``tokencompose evaluate``
kind (MultiGen and grounding tables with ± and 95% CIs; suites as Table 1 beside the paper's rows; other
metrics' headline numbers), and figure folders (``figures.json``
manifests written by ``tokencompose visualize`` and ``probe layers``; loose ``attention_*``/``masks_*``/``grid*``/
``loss_curves`` PNGs too), and grounded-mask folders (``qa.json`` written by ``prepare grounded``, with its
``qa.png`` and ``contact_sheet.png``). Images are embedded as base64 data URIs and the CSS is inline, so the page
needs no network and can be mailed as one file. A section with nothing to show is omitted with a note;
nothing here raises on a malformed input file, but an input that does not exist, or inputs with nothing
to report at all, are refused.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tokencompose.atomic import atomic_write_text
from tokencompose.errors import UserError
from tokencompose.evaluation.results import RESULT_KINDS
from tokencompose.visualize.report_html import (  # noqa: F401  (flatten, png_data_uri: part of this module's API)
    CSS,
    config_section,
    curves_section,
    esc,
    figure_html,
    flatten,
    grounded_section,
    grounding_section,
    markdown_section,
    multigen_section,
    png_data_uri,
    summary_section,
)

log = logging.getLogger(__name__)

FIGURE_KINDS = ("curves", "probe", "attention", "masks", "grid")
_PREFIX = {"loss_curves": "curves", "attention_": "attention", "masks_": "masks", "grid": "grid"}
_SKIP_DIRS = ("checkpoint", "images", "samples", "latents", "tensorboard", "logs", "__pycache__")
_DATA_DIRS = ("seg", "masks")  # not searched below a folder that holds a metadata.jsonl
MAX_DEPTH = 3


@dataclass
class Collected:
    """What the inputs hold, in the order found."""

    configs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    metrics: list[tuple[str, Path]] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    figures: list[tuple[str, Path, str]] = field(default_factory=list)  # (kind, png, title)
    notes: list[str] = field(default_factory=list)
    summaries: list[dict[str, Any]] = field(default_factory=list)  # JSON with kind "summary" (the demo's verdict)
    grounded: list[tuple[str, Path, dict[str, Any]]] = field(default_factory=list)  # (name, folder, qa.json)


def _walk(root: Path) -> Iterable[Path]:
    """Files under ``root`` up to ``MAX_DEPTH`` levels, skipping checkpoints and bulk image folders."""
    base = len(root.parts)
    for folder, dirs, files in os.walk(root):
        depth = len(Path(folder).parts) - base
        # a data folder's mask folders hold one subfolder or file per image (100k in a grounded folder)
        data = _DATA_DIRS if "metadata.jsonl" in files else ()
        dirs[:] = sorted(
            d
            for d in dirs
            if depth < MAX_DEPTH and not d.startswith(".") and not d.lower().startswith(_SKIP_DIRS) and d not in data
        )
        for f in sorted(files):
            yield Path(folder) / f


def _run_name(path: Path) -> str:
    return path.parent.name or str(path.parent)


def collect(inputs: Sequence[str | Path]) -> Collected:
    """Find configs, metrics, results and figures in ``inputs`` (files or folders)."""
    got = Collected()
    seen: set[Path] = set()
    for inp in inputs:
        p = Path(inp)
        if not p.exists():
            got.notes.append(f"input {p} does not exist")
            continue
        files = [p] if p.is_file() else list(_walk(p))
        manifests = [f for f in files if f.name == "figures.json"]
        for m in manifests:
            _add_manifest(m, got, seen)
        for f in files:
            if f.resolve() in seen:
                continue
            if f.name in ("config.yaml", "config.yml"):
                _add_config(f, got)
            elif f.name == "metrics.jsonl":
                got.metrics.append((_run_name(f), f))
            elif f.name == "qa.json":
                _add_grounded(f, got)
            elif f.suffix == ".json" and f.name != "figures.json":
                _add_result(f, got)
            elif f.suffix == ".png":
                kind = next((k for pre, k in _PREFIX.items() if f.name.startswith(pre)), None)
                if kind:
                    got.figures.append((kind, f, f.stem))
                    seen.add(f.resolve())
    return got


def _add_manifest(path: Path, got: Collected, seen: set[Path]) -> None:
    try:
        entries = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        got.notes.append(f"{path}: unreadable figure manifest ({err})")
        return
    for e in entries if isinstance(entries, list) else []:
        if not isinstance(e, dict) or "file" not in e:
            continue
        png = path.parent / str(e["file"])
        if png.is_file() and png.resolve() not in seen:
            seen.add(png.resolve())
            got.figures.append((str(e.get("kind", "attention")), png, str(e.get("title", png.stem))))


def _add_config(path: Path, got: Collected) -> None:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        got.notes.append(f"{path}: unreadable config ({err})")
        return
    if isinstance(data, dict):
        got.configs.append((_run_name(path), data))


def _add_grounded(path: Path, got: Collected) -> None:
    """A grounded-mask folder's ``qa.json`` (kind ``grounded_qa``); another ``qa.json`` is read as any result."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        got.notes.append(f"{path}: unreadable grounded-mask summary ({err})")
        return
    if isinstance(data, dict) and data.get("kind") == "grounded_qa":
        got.grounded.append((_run_name(path), path.parent, data))
    else:
        _add_result(path, got)


def _add_result(path: Path, got: Collected) -> None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return  # not every JSON next to a run is a result (generation.json, shapes.json, ...)
    kind = data.get("kind") if isinstance(data, dict) else None
    body = "cells" if kind == "suite" else "scores"
    if kind in RESULT_KINDS and isinstance(data.get(body), dict):
        data.setdefault("_path", str(path))
        got.results.append(data)
    elif kind == "summary" and isinstance(data.get("verdict"), str):
        got.summaries.append(data)


SECTIONS = (
    ("summary", "What happened"),
    ("config", "Configuration"),
    ("grounded", "Grounded masks"),
    ("curves", "Loss curves"),
    ("table1", "Table 1"),
    ("multigen", "MultiGen"),
    ("grounding", "Attention grounding (IoU)"),
    ("metrics", "Other metrics"),
    ("probe", "Layer probe"),
    ("attention", "Attention maps"),
    ("masks", "Masks vs attention"),
    ("grid", "Image grids"),
)


def render(got: Collected, title: str = "TokenCompose report") -> str:
    """The HTML page for what :func:`collect` found."""
    notes = list(got.notes)
    by_kind = {k: [f for f in got.figures if f[0] == k] for k in FIGURE_KINDS}
    other = [f for f in got.figures if f[0] not in FIGURE_KINDS]
    by_kind["attention"] += other
    bodies = {
        "summary": summary_section(got.summaries),
        "config": config_section(got.configs) if got.configs else "",
        "grounded": grounded_section(got.grounded) if got.grounded else "",
        "curves": curves_section(got.metrics, by_kind["curves"], notes),
        "multigen": multigen_section(mg) if (mg := [r for r in got.results if r["kind"] == "multigen"]) else "",
        "grounding": grounding_section(gr) if (gr := [r for r in got.results if r["kind"] == "grounding"]) else "",
        "table1": markdown_section([r for r in got.results if r["kind"] == "suite"]),
        "metrics": markdown_section([r for r in got.results if r["kind"] not in ("suite", "multigen", "grounding")]),
    }
    for kind in ("probe", "attention", "masks", "grid"):
        bodies[kind] = "".join(figure_html(p, t) for _, p, t in by_kind[kind])
    missing = {
        "config": "no config.yaml found",
        "curves": "no metrics.jsonl or loss-curve figure found",
        "multigen": "no MultiGen results file (kind: multigen) found",
        "grounding": "no grounding results file (kind: grounding) found",
        "attention": "no attention figures found (tokencompose visualize attention)",
        "masks": "no mask comparisons found (tokencompose visualize masks)",
        "grid": "no image grids found (tokencompose visualize grid)",
    }
    present = [(key, name) for key, name in SECTIONS if bodies[key]]
    nav = " ".join(f'<a href="#{key}">{esc(name)}</a>' for key, name in present)
    sections = "".join(f'<section id="{key}"><h2>{esc(name)}</h2>{bodies[key]}</section>' for key, name in present)
    omitted = [f"{name}: {missing[key]}" for key, name in SECTIONS if not bodies[key] and key in missing]
    note_html = "".join(f'<div class="note">{esc(n)}</div>' for n in [*(f"Omitted — {o}" for o in omitted), *notes])
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f'<h1>{esc(title)}</h1><p class="meta">generated {stamp} by tokencompose</p><nav>{nav}</nav>'
        f'{sections}<section id="notes">{note_html}</section></body></html>\n'
    )


def build_report(inputs: Sequence[str | Path], out: str | Path, title: str = "TokenCompose report") -> Path:
    """Collect ``inputs`` and write the page to ``out``; returns its path.

    A missing input, or inputs that hold nothing to show, are a :class:`UserError` (an empty page would
    look like a report); a malformed file among usable ones is only noted on the page.
    """
    for inp in inputs:
        if not Path(inp).exists():
            raise UserError(f"report input {inp} does not exist: pass run folders, results JSON or figure folders")
    got = collect(inputs)
    if not (got.configs or got.metrics or got.results or got.figures or got.summaries or got.grounded):
        names = ", ".join(str(i) for i in inputs)
        raise UserError(
            f"nothing to report in {names}: no config.yaml, metrics.jsonl, results JSON, figures or grounded-mask "
            "qa.json found there"
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, render(got, title))
    log.info(
        "report %s: %d configs, %d runs with metrics, %d results, %d figures, %d grounded-mask folders",
        out, len(got.configs), len(got.metrics), len(got.results), len(got.figures), len(got.grounded),
    )  # fmt: skip
    return out
