"""The report's HTML pieces: page style, escaping, embedded figures and one renderer per section.

:mod:`tokencompose.visualize.report` finds the inputs and lays the page out; each ``*_section`` function here
turns what it found into a fragment (tables with ± and CIs, figures as data URIs), and never raises on a
malformed value (``–`` stands in).
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokencompose.evaluation.results import compare, markdown_table
from tokencompose.visualize.make import loss_curves


def summary_section(summaries: list[dict[str, Any]]) -> str:
    """What happened, in words first: each summary's verdict, its per-model table and its notes."""
    parts = []
    for s in summaries:
        parts.append(f"<p><strong>{esc(s['verdict'])}</strong></p>")
        table = s.get("table") or {}
        if table:
            kmax = max((len(r.get("mg") or []) for r in table.values()), default=0)
            exact = any("binding" in r or "spatial" in r for r in table.values())
            corr = any("map_corr" in r for r in table.values())
            head = ["model", *(f"MG{k}" for k in range(1, kmax + 1)), "mIoU", "AUROC"]
            spec = any(r.get("specificity") is not None for r in table.values())
            head += ["phrase-map correlation"] if corr else []
            head += ["specificity"] if spec else []
            head += ["spatial (VISOR)", "colour binding"] if exact else []
            rows = []
            for name, r in table.items():
                mg, ci = r.get("mg") or [], r.get("mg_ci") or []
                cells = [f"<td>{esc(name)}</td>"]
                for k in range(kmax):
                    text = _num(mg[k]) if k < len(mg) else "–"
                    cells.append(f'<td class="num">{text}{_ci_span(ci[k] if k < len(ci) else None)}</td>')
                cells += [f'<td class="num">{_num(r.get("miou"), "{:.3f}")}</td>']
                cells += [f'<td class="num">{_num(r.get("auroc"), "{:.3f}")}</td>']
                if corr:
                    cells += [f'<td class="num">{_num(r.get("map_corr"), "{:.3f}")}</td>']
                if spec:
                    text = _num(r.get("specificity"), "{:.3f}") + _ci_span(r.get("specificity_ci"), "{:.3f}")
                    cells += [f'<td class="num">{text}</td>']
                if exact:
                    cells += [f'<td class="num">{_num(r.get("spatial"))}</td>']
                    cells += [f'<td class="num">{_num(r.get("binding"), "{:.3f}")}</td>']
                rows.append("<tr>" + "".join(cells) + "</tr>")
            th = "".join(f"<th>{esc(h)}</th>" for h in head)
            parts.append(f"<table><tr>{th}</tr>{''.join(rows)}</table>")
            parts.append('<p class="meta">MG<sub>k</sub> in percent with 95% bootstrap CIs over prompts; mIoU is the '
                         "best over the threshold sweep; both are detailed below. Phrase-map correlation: between "
                         "the attention maps of two phrases of one image (1: every phrase looks at the same "
                         "place). Specificity: how often a phrase's map is higher on its own object than on another "
                         "named object of the image (0.5: chance, 1: always), with a 95% bootstrap CI over the "
                         "scenes.</p>")  # fmt: skip
        if isinstance(s.get("diff"), dict):
            parts.append(_effect_table(s["diff"], s.get("diff_base")))
        parts.extend(f"<p>{esc(str(n))}</p>" for n in s.get("notes", []))
    return "".join(parts)


def _with_ci(effect: dict[str, Any]) -> list[str]:
    """Each MG_k's paired difference with its 95% CI, as table cells."""
    pairs = zip(effect.get("diff") or [], effect.get("ci95") or [], strict=False)
    return [f"{_num(d, '{:+.2f}')}<span class=\"ci\">[{_num(c[0], '{:+.2f}')}, {_num(c[1], '{:+.2f}')}]</span>"
            for d, c in pairs]  # fmt: skip


def _effect_table(effect: dict[str, Any], against_base: dict[str, Any] | None = None) -> str:
    """TokenCompose - control per MG_k (paired, with its 95% CI), what the design can detect, and (when given)
    TokenCompose - base."""
    diff, mde, need = (effect.get(k) or [] for k in ("diff", "mde", "prompts_for_5"))
    head = ["", *(f"MG{k}" for k in range(1, len(diff) + 1))]
    cells = [
        ("TokenCompose − control", _with_ci(effect)),
        ("minimum detectable effect", [_num(m) for m in mde]),
        ("prompts for a 5-point MDE", [esc(n if n is not None else "–") for n in need]),
    ]
    if against_base:
        cells.append(("TokenCompose − base", _with_ci(against_base)))
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    rows = "".join(f"<tr><td>{esc(name)}</td>" + "".join(f'<td class="num">{v}</td>' for v in vals) + "</tr>"
                   for name, vals in cells)  # fmt: skip
    note = (f'<p class="meta">Paired over {esc(effect.get("num_prompts", "?"))} prompts (same prompts and image seeds '
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


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def figure_html(path: Path, caption: str) -> str:
    img = f'<img alt="{esc(caption)}" src="{png_data_uri(path)}">'
    return f"<figure>{img}<figcaption>{esc(caption)}</figcaption></figure>"


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


def config_section(configs: list[tuple[str, dict[str, Any]]]) -> str:
    parts = []
    for name, cfg in configs:
        rows = "".join(
            f"<tr><td><code>{esc(k)}</code></td><td>{esc(json.dumps(v) if not isinstance(v, str) else v)}</td></tr>"
            for k, v in flatten(cfg).items()
        )
        parts.append(
            f"<h3>{esc(name)}</h3><details><summary>config.yaml (click to expand)</summary>"
            f"<table>{rows}</table></details>"
        )
    return "".join(parts)


def _label(result: Mapping[str, Any]) -> str:
    if result.get("name"):
        return str(result["name"])
    model = result.get("model") if isinstance(result.get("model"), Mapping) else {}
    return str(model.get("unet") or model.get("lora") or model.get("base") or Path(result.get("_path", "?")).stem)


def _ci_span(ci: Any, fmt: str = "{:.2f}") -> str:
    """``[lo, hi]`` as the tables' small CI text; nothing when there is no interval."""
    if not (isinstance(ci, Sequence) and len(ci) == 2):
        return ""
    return f'<span class="ci">[{_num(ci[0], fmt)}, {_num(ci[1], fmt)}]</span>'


def _num(v: Any, fmt: str = "{:.2f}") -> str:
    try:
        return fmt.format(float(v))
    except (TypeError, ValueError):
        return "–"


def multigen_section(results: list[dict[str, Any]]) -> str:
    kmax = max(len(r["scores"].get("mg_percent") or []) for r in results)
    head = ["model", "prompts", "detector", "threshold", "images / prompt"] + [f"MG{k}" for k in range(1, kmax + 1)]
    rows = []
    for r in results:
        s = r["scores"]
        pct, std, ci = s.get("mg_percent") or [], s.get("mg_std") or [], s.get("mg_ci95") or []
        prompts = r.get("prompts", {}).get("name") if isinstance(r.get("prompts"), Mapping) else r.get("prompts")
        det = r.get("detector", {}).get("id") if isinstance(r.get("detector"), Mapping) else r.get("detector")
        cells = [f"<td>{esc(_label(r))}</td>", f"<td>{esc(prompts or '–')}</td>", f"<td>{esc(det or '–')}</td>"]
        cells += [f'<td class="num">{_num(s.get("threshold"), "{:g}")}</td>']
        cells += [f'<td class="num">{esc(s.get("images_per_prompt", "–"))}</td>']
        for k in range(kmax):
            if k >= len(pct):
                cells.append("<td>–</td>")
                continue
            text = _num(pct[k]) + (f" ± {_num(std[k])}" if k < len(std) else "")
            if k < len(ci) and isinstance(ci[k], Sequence) and len(ci[k]) == 2:
                text += f'<span class="ci">95% CI [{_num(ci[k][0])}, {_num(ci[k][1])}]</span>'
            cells.append(f'<td class="num">{text}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    note = (
        '<p class="meta">MG<sub>k</sub>: percent of images with at least k of the prompt\'s categories detected; '
        "± is the standard deviation over image-index subsets (as the paper); CI: bootstrap over prompts.</p>"
    )
    return f"{note}<table><tr>{th}</tr>{''.join(rows)}</table>"


def grounding_section(results: list[dict[str, Any]]) -> str:
    head = ["model", "best mIoU", "at threshold", "AUROC", "phrases", "timesteps", "mIoU per threshold"]
    rows = []
    for r in results:
        s = r["scores"]
        miou = [float(x) for x in (s.get("miou") or []) if isinstance(x, int | float)]
        thr = s.get("thresholds") or []
        best = max(range(len(miou)), key=miou.__getitem__) if miou else None
        sweep = ", ".join(f"{_num(t, '{:g}')}: {_num(m, '{:.3f}')}" for t, m in zip(thr, miou, strict=False))
        rows.append(
            f"<tr><td>{esc(_label(r))}</td>"
            f'<td class="num">{_num(miou[best], "{:.4f}") if best is not None else "–"}</td>'
            f'<td class="num">{_num(thr[best], "{:g}") if best is not None and best < len(thr) else "–"}</td>'
            f'<td class="num">{_num(s.get("auroc"), "{:.4f}")}</td>'
            f'<td class="num">{esc(s.get("num_phrases", "–"))}</td>'
            f"<td>{esc(s.get('timesteps', '–'))}</td>"
            f'<td class="meta">{esc(sweep)}</td></tr>'
        )
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    return f"<table><tr>{th}</tr>{''.join(rows)}</table>"


def markdown_section(results: list[dict[str, Any]]) -> str:
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
            head = "".join(f"<th>{esc(c)}</th>" for c in rows[0])
            body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
            rows = []
        if line.strip():
            parts.append(f'<p class="meta">{esc(line)}</p>')
    return "".join(parts)


def _pct(v: Any) -> str:
    """A fraction as a percentage (``–`` when absent)."""
    return _num(100 * v if isinstance(v, int | float) else None, "{:.1f}%")


def grounded_section(grounded: list[tuple[str, Path, dict[str, Any]]]) -> str:
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
                ref_text += f"{esc(ref.get('rows_compared', '–'))} rows</span>"
        agree = "–"
        if ref:
            matched = esc(ref.get("matched_phrases", "–"))
            agree = _pct(ref.get("agreement")) + f'<span class="ci">of {matched} phrases</span>'
        rows.append(
            f"<tr><td>{esc(name)}</td>"
            f'<td class="num">{esc(s.get("rows", "–"))}</td><td class="num">{esc(s.get("phrases", "–"))}</td>'
            f'<td class="num">{_pct(s.get("null_rate"))}</td><td class="num">{ref_text}</td>'
            f'<td class="num">{agree}</td>'
            f'<td class="num">{_num(area.get("mean"), "{:.3f}")}</td>'
            f'<td class="num">{_num(area.get("median"), "{:.3f}")}</td>'
            f'<td class="num">{esc(det_text)}</td><td>{esc(err_text)}</td></tr>'
        )
        figures = s.get("figures") if isinstance(s.get("figures"), Mapping) else {}
        for key, default, caption in (
            ("qa", "qa.png", "mask areas, detections per phrase and null rate"),
            ("contact_sheet", "contact_sheet.png", "random rows with their masks, boxes and scores"),
        ):
            png = folder / Path(str(figures.get(key) or default)).name
            if png.is_file():
                figs.append(figure_html(png, f"{name}: {caption}"))
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    note = (
        '<p class="meta">Null rate: phrases left without a mask (no detection passed the thresholds). The '
        "reference is the input list (the paper's masks: a null there means Grounded-SAM found nothing), over "
        "the same rows; agreement: phrases (matched by row and text) that both lists leave null or both give a "
        "mask. Areas are fractions of the image's pixels.</p>"
    )
    return f"{note}<table><tr>{th}</tr>{''.join(rows)}</table>{''.join(figs)}"


def curves_section(metrics: list[tuple[str, Path]], figures: list[tuple[str, Path, str]], notes: list[str]) -> str:
    # A run's own loss_curves.png is redrawn from its metrics (fresher for a run in progress): skip it.
    redrawn = {path.parent.resolve() for _, path in metrics}
    parts = [figure_html(p, t) for _, p, t in figures if p.parent.resolve() not in redrawn]
    if not metrics:
        return "".join(parts)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, path) in enumerate(metrics):
            try:
                png = loss_curves(path, Path(tmp) / str(i))
            except Exception as err:  # a broken metrics file must not sink the whole report
                notes.append(f"{path}: loss curves not drawn ({err})")
                continue
            parts.append(figure_html(png, f"loss curves of {name}"))
    return "".join(parts)
