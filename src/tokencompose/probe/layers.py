"""The layer probe: attention grounding of every candidate cross-attention layer, per timestep.

For a base model (optionally a checkpoint of ours) and images with phrase masks, score each
cross-attention layer *on its own* with the grounding metric of ``evaluate grounding``
(:func:`tokencompose.evaluation.grounding.evaluate_grounding_groups`: one UNet forward per batch and
timestep captures every candidate layer, each layer is one group), per timestep bucket and for the map
averaged over the buckets (``mean``, as ``evaluate grounding`` averages its timesteps). A bucket is one
noise timestep. The point: choose a family's supervised layers from data.

Writes to ``out``: ``probe.json`` (every number and the settings), ``probe.md`` (the table),
``probe_layers.png`` (heat maps: layers x buckets, mIoU and AUROC) with its ``figures.json`` entry
(kind ``probe``), and ``settings.json``.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokencompose.atomic import atomic_write_text, write_json_atomic
from tokencompose.attention import select_layers
from tokencompose.data.dataset import collate
from tokencompose.errors import UserError
from tokencompose.evaluation.grounding import evaluate_grounding_groups
from tokencompose.evaluation.results import now_iso
from tokencompose.evaluation.run import (
    SETTINGS_FILE,
    check_grounding_data,
    grounding_dataset,
    model_record,
    save_settings,
)
from tokencompose.evaluation.settings import GroundingSettings
from tokencompose.families import family_of
from tokencompose.loading import load_model
from tokencompose.typed_data import to_dict
from tokencompose.versions import package_versions
from tokencompose.visualize.figures import probe_figure, save_png
from tokencompose.visualize.make import add_to_manifest

BLOCKS = ("down", "mid", "up")  # UNet forward order
RESULT_FILE = "probe.json"
TABLE_FILE = "probe.md"
FIGURE_FILE = "probe_layers.png"


@dataclass
class ProbeSettings(GroundingSettings):
    """``tokencompose probe layers``: grounding of each cross-attention layer per timestep bucket.

    ``evaluate grounding``'s settings (same data, model and metric fields), with probe defaults: five
    timestep buckets, every block's layers as candidates. ``out`` gets ``probe.json``, ``probe.md``,
    ``probe_layers.png``, ``figures.json`` and ``settings.json``; ``name`` titles the table.
    """

    timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700, 900])
    """Noise timesteps, each its own bucket (a column of the table)."""
    layers: list[str] | None = None
    """Candidate layers, each scored alone (``down``, ``mid``, ``up``; ``joint``, ``single``; blocks or module-name
    patterns); None: every text-attention layer of the model (its family's candidates)."""


def block_of(name: str) -> str:
    """``down`` / ``mid`` / ``up`` of a UNet module name, ``joint`` / ``single`` of an SD3 / Flux one."""
    if name.startswith("transformer_blocks."):
        return "joint"
    if name.startswith("single_transformer_blocks."):
        return "single"
    return next((b for b in BLOCKS if name.startswith(f"{b}_block")), "other")


def unet_order(names: list[str]) -> list[str]:
    """Layer names in the UNet's forward order: down blocks, mid block, up blocks (model order within each)."""
    rank = {b: i for i, b in enumerate(BLOCKS)}
    return sorted(names, key=lambda n: (rank.get(block_of(n), len(BLOCKS)), names.index(n)))


def short_name(name: str) -> str:
    """``up_blocks.1.attentions.2.transformer_blocks.0.attn2`` -> ``up1.a2.t0``, ``transformer_blocks.9.attn`` ->
    ``j9``, ``single_transformer_blocks.3.attn`` -> ``s3`` (figure labels)."""
    if name.startswith(("transformer_blocks.", "single_transformer_blocks.")):
        kind, index = name.split(".")[:2]
        return ("s" if kind.startswith("single") else "j") + index
    for long, short in (("down_blocks.", "down"), ("up_blocks.", "up"), ("mid_block", "mid"),
                        (".attentions.", ".a"), (".transformer_blocks.", ".t"), (".attn2", "")):  # fmt: skip
        name = name.replace(long, short)
    return name


def check_settings(s: ProbeSettings, num_train_timesteps: int) -> None:
    """Refuse settings the probe cannot run, as one-line :class:`UserError`."""
    if not s.timesteps:
        raise UserError("probe layers needs at least one timestep (--timesteps 100,300,500)")
    bad = [t for t in s.timesteps if not 0 <= t < num_train_timesteps]
    if bad:
        raise UserError(f"timesteps {bad} are outside the model's noise schedule [0, {num_train_timesteps})")
    if len(set(s.timesteps)) != len(s.timesteps):
        raise UserError(f"timesteps {s.timesteps} repeat a bucket")
    if not s.thresholds or any(not 0 < t < 1 for t in s.thresholds):
        raise UserError(f"thresholds {s.thresholds} must lie strictly between 0 and 1")
    if s.batch_size < 1:
        raise UserError(f"batch_size {s.batch_size} must be at least 1")


def run_probe(settings: ProbeSettings) -> dict[str, Any]:
    """``tokencompose probe layers``: score every candidate layer per timestep bucket; writes and returns the result."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    s = settings
    if not s.out:
        raise UserError("probe layers needs --out (the output folder)")
    check_grounding_data(s, "probe layers")
    comps = load_model(s.model)
    scheduler = comps.scheduler  # the training noise schedule
    check_settings(s, int(scheduler.config.num_train_timesteps))
    try:
        candidates = s.layers if s.layers is not None else family_of(comps).probe_layers
        names = unet_order(select_layers(comps.unet, candidates))
    except ValueError as err:
        raise UserError(str(err)) from err
    out_dir = Path(s.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ds, data_info, _, eval_size = grounding_dataset(s, comps, tmp)
        if len(ds) == 0:
            raise UserError(f"no images to probe in {s.data or 'the shapes scenes'}")
        loader = tqdm(DataLoader(ds, batch_size=s.batch_size, collate_fn=collate), desc="probe", unit="batch",
                      disable=None)  # fmt: skip
        scores, sizes = evaluate_grounding_groups(
            comps, scheduler, loader, {n: [n] for n in names},
            timesteps=s.timesteps, eval_size=(eval_size, eval_size), thresholds=s.thresholds, seed=s.seed,
            normalize=s.normalize,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    buckets = [str(t) for t in s.timesteps]
    layers = []
    for n in names:
        sc = scores[n]
        cells = {
            b: {"miou": sc["per_timestep"][b]["best_miou"], "auroc": sc["per_timestep"][b]["auroc"]} for b in buckets
        }
        cells["mean"] = {"miou": sc["best_miou"], "auroc": sc["auroc"]}
        layers.append({"name": n, "block": block_of(n), "resolution": list(sizes[n]), "cells": cells, "scores": sc})
    result = {
        "kind": "probe",
        "probe": "layers",
        "name": s.name,
        "model": model_record(s.model),
        "data": data_info,
        "buckets": buckets,
        "timesteps": list(s.timesteps),
        "thresholds": list(s.thresholds),
        "seed": s.seed,
        "num_images": scores[names[0]]["num_images"],
        "num_phrases": scores[names[0]]["num_phrases"],
        "layers": layers,
        "by_block": by_block(layers),
        "dtype": str(comps.unet.dtype),
        "device": str(comps.unet.device),
        "seconds": round(seconds, 3),
        "settings": SETTINGS_FILE,
        "environment": package_versions(),
        "created": now_iso(),
    }
    save_settings(out_dir, s)
    write_json_atomic(out_dir / RESULT_FILE, result)
    atomic_write_text(out_dir / TABLE_FILE, markdown_table(result))
    write_figure(result, out_dir, to_dict(s))
    return result


def by_block(layers: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean over each block's layers of the ``mean`` column: ``{block: {"miou", "auroc", "layers"}}``."""
    out: dict[str, dict[str, float]] = {}
    for b in (*BLOCKS, "other"):
        rows = [r["cells"]["mean"] for r in layers if r["block"] == b]
        if rows:
            out[b] = {
                "miou": round(sum(r["miou"] for r in rows) / len(rows), 6),
                "auroc": round(sum(r["auroc"] for r in rows) / len(rows), 6),
                "layers": len(rows),
            }
    return out


def markdown_table(result: dict[str, Any]) -> str:
    """The probe as a markdown table: a row per layer (UNet order) with its resolution; mIoU/AUROC per bucket."""
    cols = [*result["buckets"], "mean"]
    head = ["layer", "res"] + [f"{m} t={c}" if c != "mean" else f"{m} mean" for c in cols for m in ("mIoU", "AUROC")]
    lines = [
        f"# Layer probe: {result['name'] or result['model']['base']}",
        "",
        f"Attention-grounding per cross-attention layer (each layer alone): best mIoU over the thresholds "
        f"{result['thresholds']} and AUROC, per noise timestep and for the map averaged over them (mean); "
        f"{result['num_images']} images, {result['num_phrases']} phrases, seed {result['seed']}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|",
    ]
    for r in result["layers"]:
        h, w = r["resolution"]
        vals = [f"{r['cells'][c][m]:.3f}" for c in cols for m in ("miou", "auroc")]
        lines.append("| " + " | ".join([f"`{r['name']}`", f"{h}×{w}", *vals]) + " |")
    lines += ["", "| block | layers | mIoU mean | AUROC mean |", "|---|---:|---:|---:|"]
    for b, v in result["by_block"].items():
        lines.append(f"| {b} | {v['layers']} | {v['miou']:.3f} | {v['auroc']:.3f} |")
    return "\n".join(lines) + "\n"


def write_figure(result: dict[str, Any], out_dir: Path, settings: dict[str, Any]) -> Path:
    """The heat-map figure and its ``figures.json`` entry (kind ``probe``, with the ``settings`` that drew it)."""
    import numpy as np

    cols = [*result["buckets"], "mean"]
    miou = np.array([[r["cells"][c]["miou"] for c in cols] for r in result["layers"]], dtype=float)
    auc = np.array([[r["cells"][c]["auroc"] for c in cols] for r in result["layers"]], dtype=float)
    rows = [f"{short_name(r['name'])} {r['resolution'][0]}×{r['resolution'][1]}" for r in result["layers"]]
    title = f"layer probe: {result['name'] or result['model']['base']}"
    png = save_png(probe_figure(miou, auc, rows, cols, title), out_dir / FIGURE_FILE)
    add_to_manifest(out_dir, "probe", png, title, settings=settings)
    return png
