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

import base64
import html
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tokencompose.atomic import atomic_write_text
from tokencompose.errors import UserError
from tokencompose.evaluation.results import RESULT_KINDS, compare, markdown_table
from tokencompose.visualize.make import loss_curves

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


def _summary_section(summaries: list[dict[str, Any]]) -> str:
    """What happened, in words first: each summary's verdict, its per-model table and its notes."""
    parts = []
    for s in summaries:
        parts.append(f"<p><strong>{_e(s['verdict'])}</strong></p>")
        table = s.get("table") or {}
        if table:
            kmax = max((len(r.get("mg") or []) for r in table.values()), default=0)
            exact = any("binding" in r or "spatial" in r for r in table.values())
            head = ["model", *(f"MG{k}" for k in range(1, kmax + 1)), "mIoU", "AUROC"]
            head += ["spatial (VISOR)", "colour binding"] if exact else []
            rows = []
            for name, r in table.items():
                mg, ci = r.get("mg") or [], r.get("mg_ci") or []
                cells = [f"<td>{_e(name)}</td>"]
                for k in range(kmax):
                    text = _num(mg[k]) if k < len(mg) else "–"
                    if k < len(ci) and isinstance(ci[k], Sequence) and len(ci[k]) == 2:
                        text += f'<span class="ci">[{_num(ci[k][0])}, {_num(ci[k][1])}]</span>'
                    cells.append(f'<td class="num">{text}</td>')
                cells += [f'<td class="num">{_num(r.get("miou"), "{:.3f}")}</td>']
                cells += [f'<td class="num">{_num(r.get("auroc"), "{:.3f}")}</td>']
                if exact:
                    cells += [f'<td class="num">{_num(r.get("spatial"))}</td>']
                    cells += [f'<td class="num">{_num(r.get("binding"), "{:.3f}")}</td>']
                rows.append("<tr>" + "".join(cells) + "</tr>")
            th = "".join(f"<th>{_e(h)}</th>" for h in head)
            parts.append(f"<table><tr>{th}</tr>{''.join(rows)}</table>")
            parts.append('<p class="meta">MG<sub>k</sub> in percent with 95% bootstrap CIs over prompts; mIoU is the '
                         "best over the threshold sweep; both are detailed below.</p>")  # fmt: skip
        if isinstance(s.get("diff"), dict):
            parts.append(_effect_table(s["diff"]))
        parts.extend(f"<p>{_e(str(n))}</p>" for n in s.get("notes", []))
    return "".join(parts)


def _effect_table(effect: dict[str, Any]) -> str:
    """TokenCompose - control per MG_k (paired, with its 95% CI) and what the design can detect."""
    diff, ci, mde, need = (effect.get(k) or [] for k in ("diff", "ci95", "mde", "prompts_for_5"))
    head = ["", *(f"MG{k}" for k in range(1, len(diff) + 1))]
    cells = [
        ("TokenCompose − control", [f"{_num(d, '{:+.2f}')}<span class=\"ci\">[{_num(c[0], '{:+.2f}')}, "
                                    f"{_num(c[1], '{:+.2f}')}]</span>" for d, c in zip(diff, ci, strict=False)]),
        ("minimum detectable effect", [_num(m) for m in mde]),
        ("prompts for a 5-point MDE", [_e(n if n is not None else "–") for n in need]),
    ]  # fmt: skip
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    rows = "".join(f"<tr><td>{_e(name)}</td>" + "".join(f'<td class="num">{v}</td>' for v in vals) + "</tr>"
                   for name, vals in cells)  # fmt: skip
    note = (f'<p class="meta">Paired over {_e(effect.get("num_prompts", "?"))} prompts (same prompts and image seeds '
            "in both arms): the difference in percentage points with its 95% bootstrap CI; the minimum detectable "
            "effect is the true difference this design finds with 80% power in a two-sided 5% test.</p>")  # fmt: skip
    return f"<h3>The effect</h3><table><tr>{th}</tr>{rows}</table>{note}"


# -- rendering ---------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1200px;
padding:0 1rem;color:#1d1d1f;background:#fff}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{border-bottom:2px solid #e5e5ea;padding-bottom:.2rem;margin-top:2.2rem}
h3{font-size:1rem;margin:1.2rem 0 .4rem}.meta{color:#6e6e73;font-size:.85rem}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}th,td{border:1px solid #d2d2d7;padding:.25rem .5rem;
text-align:left;vertical-align:top}th{background:#f5f5f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
.ci{color:#6e6e73;font-size:.75rem;display:block}figure{margin:1rem 0}figure img{max-width:100%;height:auto;
border:1px solid #e5e5ea}figcaption{font-size:.85rem;color:#3a3a3c}.note{background:#fff8e1;border-left:4px solid
#f5c518;padding:.4rem .8rem;font-size:.85rem;margin:.4rem 0}nav a{margin-right:1rem}code{font-size:.8rem}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _figure_html(path: Path, caption: str) -> str:
    img = f'<img alt="{_e(caption)}" src="{png_data_uri(path)}">'
    return f"<figure>{img}<figcaption>{_e(caption)}</figcaption></figure>"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> ``{"a.b.c": value}`` (the dotted names the CLI takes)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _config_section(configs: list[tuple[str, dict[str, Any]]]) -> str:
    parts = []
    for name, cfg in configs:
        rows = "".join(
            f"<tr><td><code>{_e(k)}</code></td><td>{_e(json.dumps(v) if not isinstance(v, str) else v)}</td></tr>"
            for k, v in flatten(cfg).items()
        )
        parts.append(
            f"<h3>{_e(name)}</h3><details><summary>config.yaml (click to expand)</summary>"
            f"<table>{rows}</table></details>"
        )
    return "".join(parts)


def _label(result: Mapping[str, Any]) -> str:
    if result.get("name"):
        return str(result["name"])
    model = result.get("model") if isinstance(result.get("model"), Mapping) else {}
    return str(model.get("unet") or model.get("lora") or model.get("base") or Path(result.get("_path", "?")).stem)


def _num(v: Any, fmt: str = "{:.2f}") -> str:
    try:
        return fmt.format(float(v))
    except (TypeError, ValueError):
        return "–"


def _multigen_section(results: list[dict[str, Any]]) -> str:
    kmax = max(len(r["scores"].get("mg_percent") or []) for r in results)
    head = ["model", "prompts", "detector", "threshold", "images / prompt"] + [f"MG{k}" for k in range(1, kmax + 1)]
    rows = []
    for r in results:
        s = r["scores"]
        pct, std, ci = s.get("mg_percent") or [], s.get("mg_std") or [], s.get("mg_ci95") or []
        prompts = r.get("prompts", {}).get("name") if isinstance(r.get("prompts"), Mapping) else r.get("prompts")
        det = r.get("detector", {}).get("id") if isinstance(r.get("detector"), Mapping) else r.get("detector")
        cells = [f"<td>{_e(_label(r))}</td>", f"<td>{_e(prompts or '–')}</td>", f"<td>{_e(det or '–')}</td>"]
        cells += [f'<td class="num">{_num(s.get("threshold"), "{:g}")}</td>']
        cells += [f'<td class="num">{_e(s.get("images_per_prompt", "–"))}</td>']
        for k in range(kmax):
            if k >= len(pct):
                cells.append("<td>–</td>")
                continue
            text = _num(pct[k]) + (f" ± {_num(std[k])}" if k < len(std) else "")
            if k < len(ci) and isinstance(ci[k], Sequence) and len(ci[k]) == 2:
                text += f'<span class="ci">95% CI [{_num(ci[k][0])}, {_num(ci[k][1])}]</span>'
            cells.append(f'<td class="num">{text}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    note = (
        '<p class="meta">MG<sub>k</sub>: percent of images with at least k of the prompt\'s categories detected; '
        "± is the standard deviation over image-index subsets (as the paper); CI: bootstrap over prompts.</p>"
    )
    return f"{note}<table><tr>{th}</tr>{''.join(rows)}</table>"


def _grounding_section(results: list[dict[str, Any]]) -> str:
    head = ["model", "best mIoU", "at threshold", "AUROC", "phrases", "timesteps", "mIoU per threshold"]
    rows = []
    for r in results:
        s = r["scores"]
        miou = [float(x) for x in (s.get("miou") or []) if isinstance(x, int | float)]
        thr = s.get("thresholds") or []
        best = max(range(len(miou)), key=miou.__getitem__) if miou else None
        sweep = ", ".join(f"{_num(t, '{:g}')}: {_num(m, '{:.3f}')}" for t, m in zip(thr, miou, strict=False))
        rows.append(
            f"<tr><td>{_e(_label(r))}</td>"
            f'<td class="num">{_num(miou[best], "{:.4f}") if best is not None else "–"}</td>'
            f'<td class="num">{_num(thr[best], "{:g}") if best is not None and best < len(thr) else "–"}</td>'
            f'<td class="num">{_num(s.get("auroc"), "{:.4f}")}</td><td class="num">{_e(s.get("num_phrases", "–"))}</td>'
            f"<td>{_e(s.get('timesteps', '–'))}</td>"
            f'<td class="meta">{_e(sweep)}</td></tr>'
        )
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    return f"<table><tr>{th}</tr>{''.join(rows)}</table>"


def _markdown_section(results: list[dict[str, Any]]) -> str:
    """Results without a section of their own, as ``compare`` tabulates them (markdown tables -> HTML)."""
    if not results:
        return ""
    parts, rows = [], []
    for line in [*markdown_table(compare(results)).splitlines(), ""]:
        if line.startswith("|"):
            if not set(line) <= set("|-: "):  # skip the rule line
                rows.append([c.strip() for c in line.strip("|").split("|")])
            continue
        if rows:
            head = "".join(f"<th>{_e(c)}</th>" for c in rows[0])
            body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
            rows = []
        if line.strip():
            parts.append(f'<p class="meta">{_e(line)}</p>')
    return "".join(parts)


def _pct(v: Any) -> str:
    """A fraction as a percentage (``–`` when absent)."""
    return _num(100 * v if isinstance(v, int | float) else None, "{:.1f}%")


def _grounded_section(grounded: list[tuple[str, Path, dict[str, Any]]]) -> str:
    """One table row per grounded folder (summary numbers), then each folder's two figures."""
    head = ["folder", "rows", "phrases", "null rate", "reference null rate", "null agreement", "mean area",
            "median area", "detections 0 / 1 / 2 / 3+", "mask errors"]  # fmt: skip
    rows, figs = [], []
    for name, folder, s in grounded:
        ref = s.get("reference") if isinstance(s.get("reference"), Mapping) else None
        area = s.get("area") if isinstance(s.get("area"), Mapping) else {}
        det = s.get("detections") if isinstance(s.get("detections"), Mapping) else None
        hist = det.get("histogram") if det and isinstance(det.get("histogram"), Mapping) else None
        det_text = " / ".join(str(hist.get(b, 0)) for b in ("0", "1", "2", "3+")) if hist else "–"
        errors = s.get("mask_errors") if isinstance(s.get("mask_errors"), Mapping) else {}
        err_text = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in errors.items()) or "none"
        ref_text = "–"
        if ref:
            ref_text = _pct(ref.get("null_rate"))
            if ref.get("rows_compared") != s.get("rows"):  # compare like with like: ours over the same rows
                ref_text += f'<span class="ci">ours {_pct(ref.get("ours_null_rate"))} over the same '
                ref_text += f"{_e(ref.get('rows_compared', '–'))} rows</span>"
        agree = "–"
        if ref:
            matched = _e(ref.get("matched_phrases", "–"))
            agree = _pct(ref.get("agreement")) + f'<span class="ci">of {matched} phrases</span>'
        rows.append(
            f"<tr><td>{_e(name)}</td>"
            f'<td class="num">{_e(s.get("rows", "–"))}</td><td class="num">{_e(s.get("phrases", "–"))}</td>'
            f'<td class="num">{_pct(s.get("null_rate"))}</td><td class="num">{ref_text}</td>'
            f'<td class="num">{agree}</td>'
            f'<td class="num">{_num(area.get("mean"), "{:.3f}")}</td>'
            f'<td class="num">{_num(area.get("median"), "{:.3f}")}</td>'
            f'<td class="num">{_e(det_text)}</td><td>{_e(err_text)}</td></tr>'
        )
        figures = s.get("figures") if isinstance(s.get("figures"), Mapping) else {}
        for key, default, caption in (
            ("qa", "qa.png", "mask areas, detections per phrase and null rate"),
            ("contact_sheet", "contact_sheet.png", "random rows with their masks, boxes and scores"),
        ):
            png = folder / Path(str(figures.get(key) or default)).name
            if png.is_file():
                figs.append(_figure_html(png, f"{name}: {caption}"))
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    note = (
        '<p class="meta">Null rate: phrases left without a mask (no detection passed the thresholds). The '
        "reference is the input list (the paper's masks: a null there means Grounded-SAM found nothing), over "
        "the same rows; agreement: phrases (matched by row and text) that both lists leave null or both give a "
        "mask. Areas are fractions of the image's pixels.</p>"
    )
    return f"{note}<table><tr>{th}</tr>{''.join(rows)}</table>{''.join(figs)}"


def _curves_section(metrics: list[tuple[str, Path]], figures: list[tuple[str, Path, str]], notes: list[str]) -> str:
    # A run's own loss_curves.png is redrawn from its metrics (fresher for a run in progress): skip it.
    redrawn = {path.parent.resolve() for _, path in metrics}
    parts = [_figure_html(p, t) for _, p, t in figures if p.parent.resolve() not in redrawn]
    if not metrics:
        return "".join(parts)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, path) in enumerate(metrics):
            try:
                png = loss_curves(path, Path(tmp) / str(i))
            except Exception as err:  # a broken metrics file must not sink the whole report
                notes.append(f"{path}: loss curves not drawn ({err})")
                continue
            parts.append(_figure_html(png, f"loss curves of {name}"))
    return "".join(parts)


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
        "summary": _summary_section(got.summaries),
        "config": _config_section(got.configs) if got.configs else "",
        "grounded": _grounded_section(got.grounded) if got.grounded else "",
        "curves": _curves_section(got.metrics, by_kind["curves"], notes),
        "multigen": _multigen_section(mg) if (mg := [r for r in got.results if r["kind"] == "multigen"]) else "",
        "grounding": _grounding_section(gr) if (gr := [r for r in got.results if r["kind"] == "grounding"]) else "",
        "table1": _markdown_section([r for r in got.results if r["kind"] == "suite"]),
        "metrics": _markdown_section([r for r in got.results if r["kind"] not in ("suite", "multigen", "grounding")]),
    }
    for kind in ("probe", "attention", "masks", "grid"):
        bodies[kind] = "".join(_figure_html(p, t) for _, p, t in by_kind[kind])
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
    nav = " ".join(f'<a href="#{key}">{_e(name)}</a>' for key, name in present)
    sections = "".join(f'<section id="{key}"><h2>{_e(name)}</h2>{bodies[key]}</section>' for key, name in present)
    omitted = [f"{name}: {missing[key]}" for key, name in SECTIONS if not bodies[key] and key in missing]
    note_html = "".join(f'<div class="note">{_e(n)}</div>' for n in [*(f"Omitted — {o}" for o in omitted), *notes])
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
        f'<h1>{_e(title)}</h1><p class="meta">generated {stamp} by tokencompose</p><nav>{nav}</nav>'
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
