"""``tokencompose evaluate visor``: VISOR's object accuracy and spatial scores, end to end.

Prompts (VISOR's file or SR2D rebuilt from a category list) -> images through the same resumable, sharded,
provenance-checked generation as MultiGen (:func:`tokencompose.evaluation.run._generate`) -> detections
stored per image (every box above ``store_threshold``, labelled with its best query among the prompt's two
objects; ``detections*.jsonl`` + ``detection.json``, checked like MultiGen's) -> scores
(:func:`tokencompose.evaluation.visor.score_visor`) in ``OUT/results.json``. Rescoring at any threshold
>= ``store_threshold`` reads the stored boxes only: no model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tokencompose.errors import UserError
from tokencompose.evaluation.generation import GenerationSettings
from tokencompose.evaluation.multigen import detect_pending, precheck_detections
from tokencompose.evaluation.prompts import Prompt, categories
from tokencompose.evaluation.provenance import digest
from tokencompose.evaluation.results import (
    now_iso,
    package_versions,
    read_detections,
    write_json_atomic,
)
from tokencompose.evaluation.visor import (
    VisorPrompt,
    load_visor_prompts,
    sample_visor_prompts,
    save_visor_prompts,
    score_visor,
)
from tokencompose.loading import ModelSettings
from tokencompose.sharding import ShardSettings

VISOR_DETECTOR = "google/owlvit-base-patch32"  # the detector of VISOR's table (and so of the paper's 29.86)
VISOR_TEMPLATE = "a photo of a {category}"


@dataclass
class VisorPromptSettings:
    """Where VISOR's prompts come from: its own file, or SR2D rebuilt from a category list (optionally sampled)."""

    prompts: str | None = None
    """VISOR's prompt JSON (``text_spatial_rel_phrases.json``; its spatial rows are used as they are)."""
    categories: str = "coco"
    """Without ``prompts``: build SR2D's spatial prompts from ``coco`` (the 80 COCO categories: exactly SR2D's
    25,280, ids included), ``ade20k``, ``shapes`` or a text file of categories."""
    num_prompts: int | None = None
    """Without ``prompts``: draw this many of them (seeded, SR2D ids kept); None: all (the paper: 25,280)."""
    prompt_seed: int = 0
    """Seed of that draw."""
    limit: int | None = None
    """Use only the first N prompts (smoke runs)."""


@dataclass
class VisorDetectorSettings:
    """VISOR's detector rule: OWL-ViT asked for the prompt's two objects, boxes scoring above 0.1."""

    detector: str = VISOR_DETECTOR
    """Hub id or local folder (OWL-ViT as VISOR, OWLv2, Grounding DINO), or ``shapes``."""
    revision: str | None = None
    """Hub revision of the detector."""
    batch_size: int = 16
    """Images per detector call."""
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    """Detector precision."""
    query_template: str | None = None
    """Query text per object; default ``a photo of a {category}`` (VISOR's)."""
    threshold: float = 0.1
    """A box counts when its score is above this (VISOR: 0.1)."""
    store_threshold: float = 0.05
    """Boxes scoring above this are stored, so rescoring at any threshold >= it needs no model."""
    bootstrap: int = 1000
    """Bootstrap samples for the 95% CIs (0: none)."""


@dataclass
class VisorSettings:
    """``tokencompose evaluate visor``: generate, detect, score VISOR's OA, VISOR_uncond / _cond, VISOR_1..N."""

    out: str = ""
    """Output folder (``images/``, ``detections*.jsonl``, ``prompts.json``, ``results.json``)."""
    name: str | None = None
    """Label of this model in comparison tables."""
    images: str | None = None
    """Image folder (default ``OUT/images``)."""
    skip_generation: bool = False
    """Score the images already in the image folder (no model needed)."""
    output: str | None = None
    """Results file (default ``OUT/results.json``)."""
    model: ModelSettings = field(default_factory=ModelSettings)
    prompts: VisorPromptSettings = field(default_factory=VisorPromptSettings)
    generation: GenerationSettings = field(default_factory=lambda: GenerationSettings(images_per_prompt=4))
    """Sampling; VISOR draws 4 images per prompt (VISOR_1..4)."""
    detector: VisorDetectorSettings = field(default_factory=VisorDetectorSettings)
    run: ShardSettings = field(default_factory=ShardSettings)


def resolve_visor_prompts(settings: VisorPromptSettings) -> tuple[list[VisorPrompt], dict[str, Any]]:
    """The prompts ``settings`` name and a record of where they came from (file, or category list + draw)."""
    if settings.prompts:
        prompts = load_visor_prompts(settings.prompts)
        info: dict[str, Any] = {"name": Path(settings.prompts).name, "file": str(settings.prompts)}
    else:
        try:
            cats = categories(settings.categories)
        except ValueError as err:
            raise UserError(str(err)) from err
        prompts = sample_visor_prompts(cats, settings.num_prompts, settings.prompt_seed)
        info = {
            "name": f"sr2d:{settings.categories}",
            "sampler": {"categories": settings.categories, "num_categories": len(cats),
                        "num_prompts": settings.num_prompts, "seed": settings.prompt_seed},
        }  # fmt: skip
    if settings.limit:
        prompts = prompts[: settings.limit]
        info["limit"] = settings.limit
    info["num_prompts"] = len(prompts)
    info["sha256"] = digest(
        {"rows": [[v.prompt.uid, *v.prompt.categories, v.relation, v.prompt.text] for v in prompts]}
    )
    return prompts, info


def visor_detection_record(
    kind: str, name: str, template: str, dtype: Any, revision: str | None, store_threshold: float
) -> dict[str, Any]:
    """Every setting that changes a stored VISOR detection (the scoring threshold does not)."""
    return {
        "protocol": "visor",  # per-prompt queries, every box kept: not MultiGen's detections
        "kind": kind,
        "detector": str(name),
        "revision": revision,
        "template": template,
        "queries": "prompt",
        "store_threshold": store_threshold,
        "dtype": None if kind == "shapes" else str(dtype),
    }


def box_detections(logits: Any, boxes: Any, objects: Sequence[str], store_threshold: float) -> dict[str, list]:
    """One image: ``logits [Q, C]`` (box x object), ``boxes [Q, 4]`` -> every box above ``store_threshold``.

    Each box gets its argmax object and that logit's sigmoid (transformers' OWL post-processing, which VISOR
    used); rows are sorted by score, highest first.
    """
    import torch

    if logits.numel() == 0:
        return {"classes": [], "scores": [], "boxes": []}
    top, label = logits.float().max(dim=-1)
    score = torch.sigmoid(top)
    order = [i for i in torch.argsort(score, descending=True).tolist() if float(score[i]) > store_threshold]
    return {
        "classes": [objects[int(label[i])] for i in order],
        "scores": [round(float(score[i]), 6) for i in order],
        "boxes": [[round(float(v), 2) for v in boxes[i].tolist()] for i in order],
    }


def detect_visor_folder(
    detector: Any,
    prompts: Sequence[VisorPrompt],
    image_dir: str | Path,
    out_dir: str | Path,
    images_per_prompt: int,
    store_threshold: float = 0.05,
    batch_size: int = 16,
    shard: int = 0,
    num_shards: int = 1,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Detect this shard's images that have no stored detections; returns every detection in ``out_dir``.

    Each image is asked for its prompt's two objects only (VISOR). Stored rows are reused only when made with
    the same detector settings, for the same prompt text and from the same image (else :class:`UserError`).
    """
    model = getattr(detector, "model", None)
    kind = model.config.model_type if model is not None else str(detector.name)
    record = visor_detection_record(kind, detector.name, detector.template, getattr(detector, "dtype", None),
                                    getattr(detector, "resolved_revision", None), store_threshold)  # fmt: skip

    def run(images: list[Any], batch: list[Prompt]) -> list[dict[str, Any]]:
        objects = [list(p.categories) for p in batch]
        found = detector.candidates(images, objects)
        return [box_detections(logits, boxes, obj, store_threshold) for obj, (logits, boxes) in
                zip(objects, found, strict=True)]  # fmt: skip

    return detect_pending(run, record, [v.prompt for v in prompts], image_dir, out_dir, images_per_prompt, batch_size,
                          shard, num_shards, on_batch)  # fmt: skip


def visor_result(
    detections: dict[str, dict[str, Any]],
    prompts: Sequence[VisorPrompt],
    images_per_prompt: int,
    threshold: float = 0.1,
    bootstrap: int = 1000,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The results record: ``{"kind": "visor", **provenance, "threshold", "scores", "environment", "created"}``."""
    scores = score_visor(detections, prompts, images_per_prompt, threshold, bootstrap)
    return {"kind": "visor", **(provenance or {}), "threshold": threshold, "scores": scores,
            "environment": package_versions(), "created": now_iso()}  # fmt: skip


def _check_thresholds(threshold: float, store_threshold: float) -> None:
    if not (math.isfinite(threshold) and math.isfinite(store_threshold)):
        raise UserError("thresholds must be finite numbers")
    if threshold < store_threshold:
        raise UserError(f"threshold {threshold:g} is below the stored boxes' floor {store_threshold:g}: "
                        f"detect again with a lower --store-threshold")  # fmt: skip


def run_visor(settings: VisorSettings) -> dict[str, Any]:
    """``tokencompose evaluate visor``: generate, detect, score; returns (and writes) the results ({} off rank 0)."""
    from tokencompose.evaluation.detectors import default_template, detector_kind, load_detector
    from tokencompose.evaluation.run import _generate, detection_provenance, save_settings
    from tokencompose.loading import DTYPES
    from tokencompose.sharding import progress_bar, resolve_shard

    s, d = settings, settings.detector
    _check_thresholds(d.threshold, d.store_threshold)
    out_dir = Path(s.out)
    image_dir = Path(s.images or out_dir / "images")
    prompts, info = resolve_visor_prompts(s.prompts)
    info["saved"] = "prompts.json"
    # Everything that can be refused is checked before the hours of generation.
    kind = detector_kind(d.detector, d.revision)
    template = default_template(kind) if kind == "shapes" else (d.query_template or VISOR_TEMPLATE)
    precheck_detections(out_dir, visor_detection_record(kind, d.detector, template, DTYPES[d.dtype], None,
                                                        d.store_threshold))  # fmt: skip
    shard = resolve_shard(s.model.device, s.run)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not s.skip_generation:
        _generate(s.model, [v.prompt for v in prompts], s.generation, s.run, image_dir, shard)
    detector = load_detector(d.detector, revision=d.revision, device=shard.device, dtype=DTYPES[d.dtype],
                             template=template, batch_size=d.batch_size)  # fmt: skip
    n = s.generation.images_per_prompt
    detect_visor_folder(detector, prompts, image_dir, out_dir, n, d.store_threshold, d.batch_size, shard.index,
                        shard.count, on_batch=progress_bar("detecting", "image"))  # fmt: skip
    shard.wait()
    if shard.index != 0:
        return {}
    save_visor_prompts(prompts, out_dir / "prompts.json")  # what rescoring reads
    save_settings(out_dir, s)
    detector_block = {"id": str(d.detector), "revision": getattr(detector, "resolved_revision", None),
                      "template": detector.template, "queries": "prompt", "dtype": d.dtype,
                      "store_threshold": d.store_threshold}  # fmt: skip
    provenance = detection_provenance(s.name, s.model, info, image_dir, detector_block, s.generation.seed, shard)
    result = visor_result(read_detections(out_dir), prompts, n, d.threshold, d.bootstrap, provenance)
    write_json_atomic(Path(s.output or out_dir / "results.json"), result)
    return result


def rescore_visor(results: str | Path, threshold: float, bootstrap: int = 1000, output: str | None = None) -> dict:
    """Scores of a finished VISOR run at another threshold, from its stored boxes only (no model).

    Writes ``results_thr<T>.json`` beside ``results`` unless ``output`` is given; the path is in ``"_path"``.
    """
    path = Path(results)
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path} ({err}): pass a results.json written by evaluate visor") from err
    if not isinstance(old, dict) or old.get("kind") != "visor":
        raise UserError(f"{path} is not a results file of evaluate visor")
    _check_thresholds(threshold, float(old["detector"]["store_threshold"]))
    folder = path.parent
    prompts = load_visor_prompts(folder / old["prompts"]["saved"])
    derived = ("kind", "threshold", "scores", "environment", "created")
    provenance = {k: v for k, v in old.items() if k not in derived}
    provenance["rescored_from"] = str(path)
    n = old["scores"]["images_per_prompt"]
    result = visor_result(read_detections(folder), prompts, n, threshold, bootstrap, provenance)
    target = Path(output or folder / f"results_thr{threshold:g}.json")
    write_json_atomic(target, result)
    return {**result, "_path": str(target)}
