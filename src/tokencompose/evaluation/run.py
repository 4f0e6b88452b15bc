"""The evaluation commands as library functions: typed settings in, results out.

``generate``, ``evaluate multigen`` and ``evaluate grounding`` are :func:`run_generate`,
:func:`run_multigen` (and :func:`rescore_multigen`) and :func:`run_grounding`; the CLI only parses
flags into their settings (:mod:`tokencompose.evaluation.settings`) and the demo calls them directly.
Models load through the one loader (:mod:`tokencompose.loading`). Under ``accelerate launch`` each
process takes a disjoint shard of the (prompt, image) pairs; process 0 scores once every shard is done.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from tokencompose.data.dataset import TokenDataset, collate
from tokencompose.data.shapes import check_world, make_shapes_dataset
from tokencompose.errors import UserError
from tokencompose.evaluation.detectors import default_template, detector_kind, load_detector
from tokencompose.evaluation.generation import GenerationReport, generate_images
from tokencompose.evaluation.grounding import evaluate_grounding
from tokencompose.evaluation.multigen import (
    detect_folder,
    detection_record,
    multigen_result,
    precheck_detections,
    prompts_digest,
)
from tokencompose.evaluation.prompts import Prompt, load_prompts, resolve_prompts, save_prompts
from tokencompose.evaluation.results import load_result, now_iso, package_versions, read_detections, write_json_atomic
from tokencompose.evaluation.settings import (
    GenerateSettings,
    GroundingSettings,
    ModelSettings,
    MultiGenSettings,
    ShardSettings,
)
from tokencompose.families import denoiser_of, family_of, family_of_pipeline, resolve_family
from tokencompose.loading import DTYPES, default_image_size, load_model, load_pipeline, release_memory
from tokencompose.sharding import Shard, progress_bar, resolve_shard
from tokencompose.typed_data import to_dict

log = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"  # the typed settings of the command that wrote a folder


def detection_provenance(
    name: str | None, model: ModelSettings, prompts: dict[str, Any], image_dir: Path, detector: dict[str, Any],
    seed: int, shard: Shard,
) -> dict[str, Any]:  # fmt: skip
    """What a detector-scored results file (MultiGen, VISOR) records about where its numbers came from."""
    gen_file = image_dir / "generation.json"
    return {
        "name": name,
        "model": model_record(model) if model.model else None,
        "prompts": prompts,
        "generation": json.loads(gen_file.read_text()) if gen_file.is_file() else None,
        "images": str(image_dir),
        "detector": detector,
        "seeds": {"base_seed": seed, "image_seed": "sha256('tokencompose/<seed>/<uid>/<index>')[:8]"},
        "shards": shard.count,
        "device": str(shard.device),
        "settings": SETTINGS_FILE,
    }


def model_record(model: ModelSettings) -> dict[str, Any]:
    """What identifies the model in provenance records and results."""
    return {"base": model.model, "checkpoint": model.checkpoint, "ema": model.ema, "lora_scale": model.lora_scale}


def save_settings(folder: Path, settings: Any) -> None:
    """The command's typed settings beside its output (every field, as plain data)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / SETTINGS_FILE, to_dict(settings))


def _generate(
    model: ModelSettings, prompts: list[Prompt], generation: Any, run: ShardSettings, folder: Path, shard: Shard
) -> GenerationReport:
    """Load the pipeline, generate this shard's missing images into ``folder``, free the pipeline."""
    if not model.model:
        raise UserError("no model given: pass --model (a diffusers folder or hub id)")
    if not generation.safety_checker:
        log.info("safety checker: off (pass --safety-checker to run the model's own)")
    settings = dataclasses.replace(model, device=str(shard.device))
    if generation.scheduler == "auto":  # recorded as what it resolves to
        sampler = resolve_family(model.family, model.model).sampler
        generation = dataclasses.replace(generation, scheduler=sampler)
    pipe = load_pipeline(settings, scheduler=generation.scheduler, safety_checker=generation.safety_checker)
    denoiser = denoiser_of(pipe)
    native = family_of_pipeline(pipe).native_size(denoiser, pipe.vae_scale_factor)
    generation = dataclasses.replace(generation, resolution=generation.resolution or native)  # recorded as used
    report = generate_images(
        pipe,
        prompts,
        folder,
        generation,
        batch_size=run.batch_size,
        shard=shard.index,
        num_shards=shard.count,
        record={"model": model_record(model), "dtype": str(denoiser.dtype)},
        on_batch=progress_bar("generating", "image"),
    )
    rate = len(report.written) / report.seconds if report.seconds else 0.0
    log.info("%d images written, %d already present, %.1f s (%.3f images/s)", len(report.written),
             report.skipped, report.seconds, rate)  # fmt: skip
    if report.nsfw:
        log.warning("safety checker blacked out %d images: %s", len(report.nsfw), report.nsfw[:10])
    del pipe
    release_memory()
    return report


def run_generate(settings: GenerateSettings) -> GenerationReport:
    """``tokencompose generate``: this process's share of the images, resumable; ``prompts.json`` beside them."""
    prompts, info = resolve_prompts(settings.prompts)
    shard = resolve_shard(settings.model.device, settings.run)
    out = Path(settings.out)
    log.info("prompts: %s (%d); shard %d/%d on %s", info["name"], len(prompts), shard.index, shard.count, shard.device)
    report = _generate(settings.model, prompts, settings.generation, settings.run, out, shard)
    shard.wait()
    if shard.index == 0:
        # Only once the folder's images are known to be these prompts' (generation refuses others).
        save_prompts(prompts, out / "prompts.json")
        save_settings(out, settings)
    return report


def run_multigen(settings: MultiGenSettings) -> dict[str, Any]:
    """``tokencompose evaluate multigen``: generate, detect, score; returns (and writes) the results."""
    s, d = settings, settings.detector
    out_dir = Path(s.out)
    image_dir = Path(s.images or out_dir / "images")
    prompts, info = resolve_prompts(s.prompts)
    info.update(saved="prompts.json", sha256=prompts_digest(prompts))
    # Everything that can be refused is checked before the hours of generation.
    kind = detector_kind(d.detector, d.revision)
    # The shapes detector has one fixed template; the others take query_template.
    template = default_template(kind) if kind == "shapes" else (d.query_template or default_template(kind))
    precheck_detections(
        out_dir, detection_record(kind, d.detector, template, d.queries, prompts, DTYPES[d.dtype], None)
    )
    shard = resolve_shard(s.model.device, s.run)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not s.skip_generation:
        _generate(s.model, prompts, s.generation, s.run, image_dir, shard)
    detector = load_detector(d.detector, revision=d.revision, device=shard.device, dtype=DTYPES[d.dtype],
                             template=d.query_template, batch_size=d.batch_size)  # fmt: skip
    detect_folder(detector, prompts, image_dir, out_dir, s.generation.images_per_prompt, queries=d.queries,
                  batch_size=d.batch_size, shard=shard.index, num_shards=shard.count,
                  on_batch=progress_bar("detecting", "image"))  # fmt: skip
    shard.wait()
    if shard.index != 0:
        return {}
    save_prompts(prompts, out_dir / "prompts.json")  # what rescoring reads: these prompts' detections only
    save_settings(out_dir, s)
    detector_block = {"id": str(d.detector), "revision": getattr(detector, "resolved_revision", None),
                      "template": detector.template, "queries": d.queries, "dtype": d.dtype}  # fmt: skip
    provenance = detection_provenance(s.name, s.model, info, image_dir, detector_block, s.generation.seed, shard)
    result = multigen_result(read_detections(out_dir), prompts, s.generation.images_per_prompt, d.threshold,
                             d.bootstrap, provenance=provenance)  # fmt: skip
    write_json_atomic(Path(s.output or out_dir / "results.json"), result)
    return result


def rescore_multigen(results: str | Path, threshold: float, bootstrap: int = 1000, output: str | None = None) -> dict:
    """Scores of a finished MultiGen run at another threshold, from its stored detections only (no model)."""
    old = load_result(results)
    folder = Path(results).parent
    prompts = load_prompts(folder / old["prompts"]["saved"])
    derived = ("kind", "threshold", "scores", "environment", "created", "_path")
    provenance = {k: v for k, v in old.items() if k not in derived}
    provenance["rescored_from"] = str(results)
    n = old["scores"]["images_per_prompt"]
    result = multigen_result(read_detections(folder), prompts, n, threshold, bootstrap, provenance=provenance)
    result["_path"] = str(Path(output or folder / f"results_thr{threshold:g}.json"))
    write_json_atomic(result["_path"], {k: v for k, v in result.items() if k != "_path"})
    return result


def run_grounding(settings: GroundingSettings) -> dict[str, Any]:
    """``tokencompose evaluate grounding``: phrase attention vs masks; returns (and writes) the results."""
    import tempfile

    from torch.utils.data import DataLoader

    s = settings
    check_grounding_data(s, "evaluate grounding")
    comps = load_model(s.model)
    layers = list(s.layers) if s.layers is not None else list(family_of(comps).default_layers)
    out_dir = Path(s.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        ds, data_info, image_size, eval_size = grounding_dataset(s, comps, tmp)
        from tqdm.auto import tqdm

        loader = tqdm(
            DataLoader(ds, batch_size=s.batch_size, collate_fn=collate), desc="grounding", unit="batch", disable=None
        )
        scores = evaluate_grounding(
            comps,
            comps.scheduler,  # the training noise schedule
            loader, timesteps=s.timesteps, layers=layers, eval_size=(eval_size, eval_size), normalize=s.normalize,
            thresholds=s.thresholds, seed=s.seed,
        )  # fmt: skip
    result = {
        "kind": "grounding",
        "name": s.name,
        "model": model_record(s.model),
        "data": data_info,
        "layers": ",".join(layers),
        "normalize": s.normalize,
        "seed": s.seed,
        "dtype": str(comps.unet.dtype),
        "device": str(comps.unet.device),
        "scores": scores,
        "settings": SETTINGS_FILE,
        "environment": package_versions(),
        "created": now_iso(),
    }
    save_settings(out_dir, s)
    write_json_atomic(out_dir / "results.json", result)
    return result


def check_grounding_data(s: GroundingSettings, command: str) -> None:
    """Exactly one of ``s.data`` (an existing metadata.jsonl) or ``s.shapes``; else a :class:`UserError`."""
    if (s.data is None) == (s.shapes is None):
        raise UserError(f"{command} needs exactly one of --data (a metadata.jsonl) or --shapes N")
    if s.data is not None and not Path(s.data).is_file():
        raise UserError(f"grounding data {s.data} does not exist (give a metadata.jsonl with phrase masks)")
    if s.shapes is not None:
        check_world(s.shapes_world)


def grounding_dataset(s: GroundingSettings, comps: Any, tmp: str) -> tuple[Any, dict[str, Any], int, int]:
    """The images with phrase masks that grounding scores: ``(dataset, data record, image size, eval size)``.

    ``s``: grounding's settings (or the layer probe's, which extend them); shapes scenes are rendered into
    ``tmp``, which must outlive the dataset.
    """
    from torch.utils.data import Subset

    image_size = s.resolution or default_image_size(comps)
    eval_size = s.eval_size or image_size
    if s.shapes is not None:
        data = make_shapes_dataset(tmp, num=s.shapes, seed=s.shapes_seed, size=image_size, world=s.shapes_world)
        info: dict[str, Any] = {"source": "shapes", "num": s.shapes, "seed": s.shapes_seed, "world": s.shapes_world}
    else:
        data, info = Path(s.data), {"source": s.data}
    family = family_of(comps)
    ds: Any = TokenDataset(
        data, family.index_tokenizer(comps), image_size=image_size, attention_sizes=[(eval_size, eval_size)],
        **family.dataset_text(comps),
    )  # fmt: skip
    if s.limit:
        ds = Subset(ds, range(min(s.limit, len(ds))))
    return ds, {**info, "image_size": image_size, "eval_size": eval_size, "limit": s.limit}, image_size, eval_size
