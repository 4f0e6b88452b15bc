"""``tokencompose evaluate shapes``: generate the shapes-world spatial and colour-binding prompts, score them exactly.

Typed settings (:class:`ShapesExactSettings`) -> :func:`run_shapes_exact` -> ``OUT/results.json``. Each task has
its own image folder (``OUT/spatial/``, ``OUT/attribute/``: ``<uid>_<index>.png``, ``generation.json``,
``prompts.json``, ``detections.json``), generated through the same resumable, sharded path as
``tokencompose generate`` (:func:`tokencompose.evaluation.run._generate`); re-running skips the images present.
Scoring (:mod:`tokencompose.evaluation.shapes_exact`) needs no model: ``skip_generation`` scores what is there.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokencompose.console import number
from tokencompose.errors import UserError
from tokencompose.evaluation.generation import GenerationSettings, Sampler, image_name
from tokencompose.evaluation.scoring import image_key
from tokencompose.evaluation.shapes_exact import TASKS, detect_image, score_detections, task_prompts
from tokencompose.loading import ModelSettings
from tokencompose.sharding import ShardSettings
from tokencompose.shipped import shipped_base

log = logging.getLogger(__name__)

DEFAULT_TASKS = ("spatial", "attribute")  # what the demo and the suite report; ``objects`` on request


@dataclass
class ShapesGenerationSettings(GenerationSettings):
    """:class:`GenerationSettings` with the demo's defaults for the 64 px shapes base (VISOR's 4 images a prompt).

    A subclass rather than other values in a factory, so that setting one field (``--steps 2``) keeps these
    defaults for the others.
    """

    steps: int = 25
    """Denoising steps."""
    guidance_scale: float = 5.0
    """Classifier-free guidance scale."""
    images_per_prompt: int = 4
    """Images per prompt (VISOR_k counts k = 1..this)."""
    scheduler: Sampler = "ddim"
    """Sampler (see :class:`GenerationSettings`)."""


@dataclass
class ShapesExactSettings:
    """``tokencompose evaluate shapes``: exact VISOR and colour-binding scores on the shapes world."""

    out: str = ""
    """Output folder (``spatial/``, ``attribute/``, ``results.json``, ``settings.json``)."""
    name: str | None = None
    """Label of this model in comparison tables."""
    model: ModelSettings = field(default_factory=ModelSettings)
    """The model; an empty ``model.model`` is the shipped shapes-world base."""
    generation: ShapesGenerationSettings = field(default_factory=ShapesGenerationSettings)
    """How images are sampled (default: the demo's 25 DDIM steps, guidance 5, 4 images per prompt)."""
    num_prompts: int = 40
    """Prompts per task."""
    prompt_seed: int = 0
    """Seed of the prompt sampler (the image seeds come from ``generation.seed``)."""
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    """Which scores: ``spatial`` (VISOR), ``attribute`` (colour binding), ``objects`` (the error taxonomy of
    1..4-object prompts: what each asked object became)."""
    threshold: float = 0.1
    """A region counts when its exact-detector score is strictly above this (VISOR's 0.1)."""
    world: str = "attributes"
    """The shapes world the prompts name (:data:`tokencompose.data.shapes.WORLDS`): ``attributes`` (every colour in
    every shape; the shipped base) or ``nouns`` (one shape per colour); use the world the model was trained on."""
    skip_generation: bool = False
    """Score the images already in the task folders (no model needed)."""
    run: ShardSettings = field(default_factory=ShardSettings)


def _check(s: ShapesExactSettings) -> None:
    if not s.out:
        raise UserError("no output folder given: pass --out")
    unknown = [t for t in s.tasks if t not in TASKS]
    if unknown or not s.tasks:
        raise UserError(f"tasks must be among {', '.join(TASKS)}, got {', '.join(s.tasks) or 'none'}")
    if s.num_prompts < 1:
        raise UserError(f"num_prompts must be at least 1, got {s.num_prompts}")
    if s.generation.images_per_prompt < 1:
        raise UserError(f"images_per_prompt must be at least 1, got {s.generation.images_per_prompt}")
    from tokencompose.data.shapes import check_world

    check_world(s.world)
    if not 0.0 <= s.threshold < 1.0:
        raise UserError(f"threshold must be in [0, 1) (exact-detector scores), got {s.threshold}")


def _model(s: ShapesExactSettings) -> ModelSettings:
    """The settings' model, or the shipped shapes base when none is named."""
    if s.model.model:
        return s.model
    base = shipped_base()
    if base is None:
        raise UserError("no model given and no shapes-world base is shipped with this install: pass --model")
    return dataclasses.replace(s.model, model=str(base))


def run_shapes_exact(settings: ShapesExactSettings) -> dict[str, Any]:
    """Generate (this process's shard of) each task's images, then score them; returns (and writes) the results.

    Under ``accelerate launch`` every process generates and detects its shard, process 0 merges the detections
    and scores them; other processes return ``{}``.
    """
    from tokencompose.evaluation.multigen import prompts_digest
    from tokencompose.evaluation.prompts import save_prompts
    from tokencompose.evaluation.results import now_iso, package_versions, write_json_atomic
    from tokencompose.evaluation.run import SETTINGS_FILE, _generate, model_record, save_settings
    from tokencompose.sharding import resolve_shard, shard_map

    s = settings
    _check(s)
    out = Path(s.out)
    model = None if s.skip_generation else _model(s)
    shard = resolve_shard(s.model.device, s.run)
    from tokencompose.data.shapes import world_categories

    cats = world_categories(s.world)
    sets = {task: task_prompts(task, s.num_prompts, s.prompt_seed, cats) for task in s.tasks}
    n = s.generation.images_per_prompt
    for task, prompts in sets.items():
        if model is not None:
            log.info("%s: %d prompts x %d images", task, len(prompts), n)
            _generate(model, prompts, s.generation, s.run, out / task, shard)
    shard.wait()
    if shard.state is None and shard.index != 0:  # shards picked by hand: shard 0 scores once all are there
        return {}
    missing = sum(
        not (out / t / image_name(p.uid, i)).is_file() for t, ps in sets.items() for p in ps for i in range(n)
    )
    if missing and shard.count > 1 and shard.state is None:
        # --shard/--num-shards without accelerate: no barrier, the other shards may still be generating.
        log.warning("%d images of other shards are not there yet: score them later with --skip-generation", missing)
        return {}
    scores, prompt_info, generation = {}, {}, {}
    for task, prompts in sets.items():
        folder = out / task
        jobs = [(p.uid, i) for p in prompts for i in range(n)]
        regions = shard_map(shard, jobs, lambda part, f=folder: [detect_image(f / image_name(*j)) for j in part],
                            out / "parts", task)  # fmt: skip
        if regions is None:  # a launched process other than 0: its detections went to process 0
            continue
        detections = {image_key(*j): r for j, r in zip(jobs, regions, strict=True)}
        save_prompts(prompts, folder / "prompts.json")
        write_json_atomic(folder / "detections.json", detections)  # per-image regions: what the scores read
        scores[task] = score_detections(task, detections, prompts, n, s.threshold)
        prompt_info[task] = {"saved": f"{task}/prompts.json", "num_prompts": len(prompts), "seed": s.prompt_seed,
                             "sha256": prompts_digest(prompts)}  # fmt: skip
        gen_file = folder / "generation.json"
        generation[task] = json.loads(gen_file.read_text()) if gen_file.is_file() else None
    if not shard.main:
        return {}
    used = model or (s.model if s.model.model else None)
    result = {
        "kind": "shapes_exact",
        "name": s.name,
        "model": model_record(used) if used is not None else None,
        "prompts": prompt_info,
        "generation": generation,
        "detector": {"id": "shapes", "threshold": s.threshold},
        "seeds": {"base_seed": s.generation.seed, "image_seed": "sha256('tokencompose/<seed>/<uid>/<index>')[:8]"},
        "shards": shard.count,
        "device": str(shard.device),
        "settings": SETTINGS_FILE,
        "scores": scores,
        "environment": package_versions(),
        "created": now_iso(),
    }
    save_settings(out, s)
    write_json_atomic(out / "results.json", result)
    return result


def summary_line(result: dict[str, Any], path: str) -> str:
    """One line of the headline numbers (VISOR in percent, binding as T2I-CompBench's 0..1 score)."""
    parts = [path + ":"]
    sp, at = result["scores"].get("spatial"), result["scores"].get("attribute")
    if sp:
        oa, unc, cond = (number(sp[k], ".2f") for k in ("object_accuracy", "visor_uncond", "visor_cond"))
        parts.append(f"spatial OA {oa}, VISOR_uncond {unc}, VISOR_cond {cond}")
    if at:
        binding, swap = number(at["binding_score"], ".4f"), number(at["swap_rate"], ".4f")
        parts.append(f"attribute binding {binding}, swap rate {swap}")
    ob = result["scores"].get("objects")
    if ob:
        multi = ob["multi"] or {}
        parts.append(f"single object {number(ob['single_object_accuracy'], '.1f')}%, multi-object failures mostly "
                     f"{multi.get('dominant_failure') or 'n/a'}")  # fmt: skip
    return " ".join(parts)
