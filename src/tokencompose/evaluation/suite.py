"""``tokencompose evaluate suite``: every metric of a preset, over seeds, in the paper's Table 1 layout.

Presets:

- ``paper``: the paper's Table 1: object accuracy (VISOR's protocol), MultiGen on the COCO and ADE20K prompt
  files (MG2..MG5), FID on COCO (10k random val2017 captions) and Flickr30K, latency. FID needs the Inception
  weights file and each set's captions + images (``inception_weights``, ``coco_captions`` / ``coco_images``,
  ``flickr_captions`` / ``flickr_images``); leave FID out with ``metrics=...`` when they are not at hand.
- ``shapes``: the shapes world's exact metrics, offline: MultiGen with the exact detector on shapes prompts,
  spatial relations (VISOR's rules) and colour binding, latency.

Each (seed, metric) runs the metric's own library function into ``OUT/seed_<s>/<metric>/`` -- resumable, sharded
and provenance-checked as that command is -- with the generation seed ``s``. A cell is the mean over seeds
± their standard deviation; with one seed, the metric's own ± (MultiGen's std over image indices, latency's
over calls), as the paper reports. ``OUT/suite.json`` (``kind: suite``) holds every cell and the paths of the
runs behind it; ``OUT/table.md`` the table with the paper's rows beside ours.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from tokencompose.errors import UserError
from tokencompose.evaluation.generation import GenerationSettings
from tokencompose.evaluation.paper_table import COLUMNS, PAPER_ROWS, REFERENCE_ROWS, format_cell, markdown_rows
from tokencompose.loading import ModelSettings
from tokencompose.sharding import ShardSettings

log = logging.getLogger(__name__)

PRESETS: dict[str, tuple[str, ...]] = {
    "paper": ("visor", "multigen_coco", "multigen_ade20k", "fid_coco", "fid_flickr30k", "latency"),
    "shapes": ("multigen_shapes", "shapes_spatial", "shapes_attribute", "latency"),
}
SHAPES_COLUMNS: tuple[str, ...] = ("shapes_mg2", "shapes_mg3", "shapes_mg4", "spatial_oa", "spatial_visor_cond",
                                   "attribute_binding", "attribute_swap_rate", "latency")  # fmt: skip
SHAPES_HEADERS = {**{f"shapes_mg{k}": f"MG{k}" for k in range(2, 5)}, "spatial_oa": "Object Acc.",
                  "spatial_visor_cond": "VISOR cond", "attribute_binding": "Colour binding",
                  "attribute_swap_rate": "Colour swaps", "latency": "Latency (s)"}  # fmt: skip


@dataclass
class SuiteSettings:
    """``tokencompose evaluate suite``: a preset's metrics over seeds, as one table."""

    out: str = ""
    """Output folder (``seed_<s>/<metric>/``, ``suite.json``, ``table.md``)."""
    name: str | None = None
    """Label of this model's row."""
    preset: Literal["paper", "shapes"] = "paper"
    """``paper`` (Table 1) or ``shapes`` (the shapes world's exact metrics, offline)."""
    metrics: list[str] | None = None
    """A subset of the preset's metrics (default: all of them)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Generation seeds; cells are mean ± std over them."""
    model: ModelSettings = field(default_factory=ModelSettings)
    num_prompts: int | None = None
    """Quick runs: only the first N prompts of every prompt-based metric (None: each protocol's full set)."""
    images_per_prompt: int | None = None
    """Quick runs: images per prompt (None: each protocol's: MultiGen 10, VISOR 4, shapes 4)."""
    steps: int | None = None
    """Quick runs: sampler steps (None: each protocol's)."""
    resolution: int | None = None
    """Image size (None: the model's native size)."""
    fid_captions: int = 10000
    """Captions sampled for each FID set (the paper: 10k)."""
    inception_weights: str | None = None
    """The FID Inception weights file (``fid_*`` metrics)."""
    coco_captions: str | None = None
    """COCO ``captions_val2017.json`` (``fid_coco``)."""
    coco_images: str | None = None
    """COCO ``val2017`` image folder (``fid_coco``)."""
    flickr_captions: str | None = None
    """Flickr30K captions file (``fid_flickr30k``)."""
    flickr_images: str | None = None
    """Flickr30K image folder (``fid_flickr30k``)."""
    multigen_detector: str = "google/owlv2-large-patch14-ensemble"
    """MultiGen's detector (the paper's OWLv2)."""
    visor_detector: str = "google/owlvit-base-patch32"
    """VISOR's detector (its OWL-ViT)."""
    latency_repeats: int = 10
    """Timed calls for the latency column."""
    run: ShardSettings = field(default_factory=ShardSettings)


@dataclass(frozen=True)
class Metric:
    """How one metric of the suite runs and which table cells it fills."""

    run: Callable[[SuiteSettings, int, Path], dict[str, Any]]
    cells: Callable[[dict[str, Any]], dict[str, tuple[float | None, float | None]]]
    needs: tuple[str, ...] = ()


def _generation(s: SuiteSettings, seed: int, **defaults: Any) -> GenerationSettings:
    g = GenerationSettings(seed=seed, resolution=s.resolution, **defaults)
    if s.steps is not None:
        g = replace(g, steps=s.steps)
    if s.images_per_prompt is not None:
        g = replace(g, images_per_prompt=s.images_per_prompt)
    return g


def _multigen(prompts: str | None, categories: str | None = None) -> Metric:
    def run(s: SuiteSettings, seed: int, out: Path) -> dict[str, Any]:
        from tokencompose.evaluation.prompts import PromptSettings
        from tokencompose.evaluation.run import run_multigen
        from tokencompose.evaluation.settings import DetectorSettings, MultiGenSettings

        shapes = categories == "shapes"
        ps = PromptSettings(prompts=prompts, categories=categories, limit=s.num_prompts, num_objects=4 if shapes else 5)
        if shapes:
            ps = replace(ps, num_prompts=s.num_prompts or 60)
        gen = _generation(s, seed, **({"steps": 25, "guidance_scale": 5.0, "scheduler": "ddim", "images_per_prompt": 4}
                                      if shapes else {}))  # fmt: skip
        det = (
            DetectorSettings(detector="shapes", queries="prompt")
            if shapes
            else DetectorSettings(detector=s.multigen_detector)
        )
        return run_multigen(MultiGenSettings(out=str(out), name=s.name, model=s.model, prompts=ps, generation=gen,
                                             detector=det, run=s.run))  # fmt: skip

    def cells(result: dict[str, Any]) -> dict[str, tuple[float | None, float | None]]:
        sc = result["scores"]
        prefix = "shapes" if categories == "shapes" else (prompts or "coco")
        last = 4 if categories == "shapes" else 5
        return {f"{prefix}_mg{k}": (sc["mg_percent"][k - 1], sc["mg_std"][k - 1])
                for k in range(2, last + 1) if k <= len(sc["mg_percent"])}  # fmt: skip

    return Metric(run, cells)


def _visor() -> Metric:
    def run(s: SuiteSettings, seed: int, out: Path) -> dict[str, Any]:
        from tokencompose.evaluation.visor_run import (
            VisorDetectorSettings,
            VisorPromptSettings,
            VisorSettings,
            run_visor,
        )

        settings = VisorSettings(
            out=str(out), name=s.name, model=s.model, prompts=VisorPromptSettings(num_prompts=s.num_prompts),
            generation=_generation(s, seed, images_per_prompt=4),
            detector=VisorDetectorSettings(detector=s.visor_detector), run=s.run,
        )  # fmt: skip
        return run_visor(settings)

    def cells(result: dict[str, Any]) -> dict[str, tuple[float | None, float | None]]:
        sc = result["scores"]
        return {"object_accuracy": (sc["object_accuracy"], sc.get("object_accuracy_std"))}

    return Metric(run, cells)


def _fid(column: str, captions: str, images: str) -> Metric:
    def run(s: SuiteSettings, seed: int, out: Path) -> dict[str, Any]:
        from tokencompose.evaluation.fid import FidSettings, run_fid

        return run_fid(FidSettings(out=str(out), name=s.name, inception_weights=str(s.inception_weights),
                                   reference=getattr(s, images), captions=getattr(s, captions),
                                   num_captions=s.fid_captions, caption_seed=0, model=s.model,
                                   generation=_generation(s, seed, images_per_prompt=1), run=s.run))  # fmt: skip

    def cells(result: dict[str, Any]) -> dict[str, tuple[float | None, float | None]]:
        return {column: (result["scores"]["fid"], None)}

    return Metric(run, cells, needs=("inception_weights", captions, images))


def _shapes_exact(task: str) -> Metric:
    def run(s: SuiteSettings, seed: int, out: Path) -> dict[str, Any]:
        from tokencompose.evaluation.shapes_exact_run import (
            ShapesExactSettings,
            ShapesGenerationSettings,
            run_shapes_exact,
        )

        gen = ShapesGenerationSettings(seed=seed, resolution=s.resolution)
        gen = replace(gen, **{k: v for k, v in (("steps", s.steps), ("images_per_prompt", s.images_per_prompt))
                              if v is not None})  # fmt: skip
        settings = ShapesExactSettings(out=str(out), name=s.name, model=s.model, generation=gen,
                                       num_prompts=s.num_prompts or 40, tasks=[task], run=s.run)  # fmt: skip
        return run_shapes_exact(settings)

    def cells(result: dict[str, Any]) -> dict[str, tuple[float | None, float | None]]:
        sc = result["scores"][task]
        if task == "spatial":
            return {"spatial_oa": (sc["object_accuracy"], None), "spatial_visor_cond": (sc["visor_cond"], None)}
        return {"attribute_binding": (sc["binding_score"], None), "attribute_swap_rate": (sc["swap_rate"], None)}

    return Metric(run, cells)


def _latency() -> Metric:
    def run(s: SuiteSettings, seed: int, out: Path) -> dict[str, Any]:
        from tokencompose.evaluation.latency import LatencySettings, run_latency

        shapes = s.preset == "shapes"
        gen = _generation(s, seed, **({"steps": 25, "guidance_scale": 5.0, "scheduler": "ddim"} if shapes else {}))
        return run_latency(LatencySettings(out=str(out), name=s.name, model=s.model, generation=gen,
                                           repeats=s.latency_repeats))  # fmt: skip

    def cells(result: dict[str, Any]) -> dict[str, tuple[float | None, float | None]]:
        return {"latency": (result["scores"]["seconds_per_image"], result["scores"]["std"])}

    return Metric(run, cells)


METRICS: dict[str, Metric] = {
    "visor": _visor(),
    "multigen_coco": _multigen("coco"),
    "multigen_ade20k": _multigen("ade20k"),
    "fid_coco": _fid("fid_coco", "coco_captions", "coco_images"),
    "fid_flickr30k": _fid("fid_flickr30k", "flickr_captions", "flickr_images"),
    "latency": _latency(),
    "multigen_shapes": _multigen(None, categories="shapes"),
    "shapes_spatial": _shapes_exact("spatial"),
    "shapes_attribute": _shapes_exact("attribute"),
}


def selected_metrics(s: SuiteSettings) -> list[str]:
    """The preset's metrics (or the asked subset, in the preset's order); refuses unknown or unprepared ones."""
    preset = PRESETS[s.preset]
    wanted = list(preset) if s.metrics is None else list(s.metrics)
    unknown = [m for m in wanted if m not in preset]
    if unknown or not wanted:
        raise UserError(f"metrics {unknown or wanted} are not in preset {s.preset!r}: choose from {', '.join(preset)}")
    for m in wanted:
        missing = [k for k in METRICS[m].needs if not getattr(s, k)]
        if missing:
            others = ",".join(x for x in wanted if x != m)
            raise UserError(f"metric {m} needs {', '.join(missing)} (a local file or folder): set it, or leave the "
                            f"metric out with metrics=[{others}]")  # fmt: skip
    return [m for m in preset if m in wanted]


def aggregate(per_seed: list[dict[str, tuple[float | None, float | None]]]) -> dict[str, tuple[float, float | None]]:
    """Cells of several seeds -> mean ± std over seeds; one seed keeps its own ± (None when it has none)."""
    out: dict[str, tuple[float, float | None]] = {}
    for key in {k for cells in per_seed for k in cells}:
        values = [cells[key][0] for cells in per_seed if key in cells and cells[key][0] is not None]
        if not values:
            continue
        if len(per_seed) == 1:
            out[key] = (values[0], per_seed[0][key][1])
        else:
            out[key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None)
    return out


def run_suite(settings: SuiteSettings) -> dict[str, Any]:
    """Run every (seed, metric), then write ``suite.json`` and ``table.md``; returns the suite record."""
    from tokencompose.atomic import atomic_write_text
    from tokencompose.evaluation.results import now_iso, write_json_atomic
    from tokencompose.evaluation.run import model_record

    s = settings
    if not s.out:
        raise UserError("evaluate suite needs --out FOLDER")
    if not s.seeds:
        raise UserError("evaluate suite needs at least one seed")
    names = selected_metrics(s)
    out = Path(s.out)
    per_seed, runs = [], {}
    for seed in s.seeds:
        cells: dict[str, tuple[float | None, float | None]] = {}
        for name in names:
            folder = out / f"seed_{seed}" / name
            log.info("suite: %s, seed %d -> %s", name, seed, folder)
            result = METRICS[name].run(s, seed, folder)
            if not result:  # a non-zero process of a sharded run: process 0 scores and writes the table
                continue
            cells.update(METRICS[name].cells(result))
            runs.setdefault(str(seed), {})[name] = str(folder)
        per_seed.append(cells)
    if not any(per_seed):
        return {}
    columns = COLUMNS if s.preset == "paper" else SHAPES_COLUMNS
    ours = aggregate(per_seed)
    record = {
        "kind": "suite",
        "name": s.name or s.model.model,
        "preset": s.preset,
        "metrics": names,
        "seeds": list(s.seeds),
        "model": model_record(s.model),
        "columns": list(columns),
        "cells": {k: list(v) for k, v in sorted(ours.items())},
        "per_seed": [{k: list(v) for k, v in sorted(c.items())} for c in per_seed],
        "runs": runs,
        "created": now_iso(),
    }
    write_json_atomic(out / "suite.json", record)
    atomic_write_text(out / "table.md", suite_markdown([record]))
    return record


def suite_markdown(records: list[dict[str, Any]], reference: bool = True) -> str:
    """Several suite records (and, for the paper preset, the paper's rows) as one Table 1 markdown table."""
    preset = records[0]["preset"]
    rows: dict[str, dict[str, Any]] = {}
    if preset == "paper" and reference:
        rows.update({name: PAPER_ROWS[name] for name in REFERENCE_ROWS})
    for r in records:
        rows[str(r["name"])] = {k: tuple(v) for k, v in r["cells"].items()}
    if preset == "paper":
        lines = markdown_rows(rows)
    else:
        lines = ["| method | " + " | ".join(SHAPES_HEADERS[c] for c in SHAPES_COLUMNS) + " |",
                 "|---" * (len(SHAPES_COLUMNS) + 1) + "|"]  # fmt: skip
        for name, cells in rows.items():
            lines.append(f"| {name} | " + " | ".join(format_cell(cells.get(c), 3 if "attribute" in c else 2)
                                                      for c in SHAPES_COLUMNS) + " |")  # fmt: skip
    if all(len(r["seeds"]) > 1 for r in records):
        note = "Our rows: mean ± std over seeds."
    else:
        note = "Our rows with one seed: ± is each metric's own (MultiGen: std over image indices; latency: over calls)."
    source = " The paper's rows: its Table 1." if preset == "paper" and reference else ""
    return "\n".join(lines) + f"\n\n{note}{source}\n"
