"""``tokencompose evaluate visor``: VISOR's object accuracy (the paper's Table 1) and spatial-relation scores.

prompts (VISOR's file, or SR2D rebuilt from a category list) -> images (skipped when present) -> OWL-ViT
boxes for each prompt's two objects (stored, skipped when present) -> OA, VISOR_uncond / _cond, VISOR_1..N
with 95% CIs in ``OUT/results.json``. ``--rescore OUT/results.json --threshold T`` recomputes the scores
from the stored boxes only (no model). Flags set fields of
:class:`tokencompose.evaluation.visor_run.VisorSettings`; ``key=value`` sets any field.
"""

from __future__ import annotations

import argparse
from typing import Any

from tokencompose.commands.generate import add_generation_options
from tokencompose.commands.options import add_model_options, add_settings_arguments, option
from tokencompose.console import number


def add_parser(sub: Any) -> None:
    """Add the ``visor`` subcommand to the ``evaluate`` subparsers ``sub``."""
    vi = sub.add_parser("visor", help="VISOR: object accuracy (both objects found) and spatial relations")
    option(vi, "--out", key="out", required=True, help="output folder (images/, detections*.jsonl, results.json)")
    option(vi, "--images", key="images", help="image folder (default OUT/images)")
    option(vi, "--name", key="name", help="label of this model in comparison tables")
    option(vi, "--skip-generation", key="skip_generation", action="store_true", help="score the images present")
    option(vi, "--output", key="output", help="results file (default OUT/results.json)")
    vi.add_argument("--rescore", default=None, help="a results.json: rescore its stored boxes (no model)")
    p = vi.add_argument_group("prompts (default: all 25,280 of VISOR's SR2D spatial prompts, as the paper)")
    option(p, "--prompts", key="prompts.prompts", help="VISOR's prompt JSON (text_spatial_rel_phrases.json)")
    option(p, "--categories", key="prompts.categories", help="build SR2D from: coco (default) | ade20k | a file")
    option(p, "--num-prompts", key="prompts.num_prompts", help="draw this many of them (default: all)")
    option(p, "--prompt-seed", key="prompts.prompt_seed", help="seed of that draw (0)")
    option(p, "--limit", key="prompts.limit", help="use only the first N prompts (smoke runs)")
    d = vi.add_argument_group("detector (default: VISOR's OWL-ViT B/32, threshold 0.1)")
    option(d, "--detector", key="detector.detector", help="hub id, folder, or 'shapes'")
    option(d, "--detector-revision", key="detector.revision")
    option(d, "--detector-batch-size", key="detector.batch_size")
    option(d, "--detector-dtype", key="detector.dtype", help="fp32 | fp16 | bf16")
    option(d, "--query-template", key="detector.query_template", help="default: 'a photo of a {category}'")
    option(d, "--threshold", key="detector.threshold", help="a box counts when it scores above this (0.1)")
    option(d, "--store-threshold", key="detector.store_threshold", help="boxes stored for rescoring (0.05)")
    option(d, "--bootstrap", key="detector.bootstrap", help="bootstrap samples for the 95%% CIs (0: none)")
    add_model_options(vi)
    add_generation_options(vi)  # VISOR's default is 4 images per prompt
    add_settings_arguments(vi)


def run(args: argparse.Namespace) -> int:
    from tokencompose.commands.options import settings_from_args
    from tokencompose.evaluation.visor_run import VisorSettings, rescore_visor, run_visor

    settings = settings_from_args(VisorSettings, args)
    if args.rescore:
        d = settings.detector
        result = rescore_visor(args.rescore, d.threshold, d.bootstrap, settings.output)
        print(summary(result, result.pop("_path")))
        return 0
    result = run_visor(settings)
    if result:  # process 0 scores
        print(summary(result, settings.output or f"{settings.out}/results.json"))
    return 0


def summary(result: dict, path: str) -> str:
    """Two lines: where the results are, and OA / VISOR scores."""
    s = result["scores"]
    n = s["images_per_prompt"]
    head = f"{path}: threshold {s['threshold']:g}, {s['num_prompts']} prompts x {n} images"
    names = ["object_accuracy", "visor_uncond", "visor_cond"] + [f"visor_{k}" for k in range(1, n + 1)]
    labels = ["OA", "VISOR_uncond", "VISOR_cond"] + [f"VISOR_{k}" for k in range(1, n + 1)]
    cells = [f"{label} {number(s[key], '.2f')}" for label, key in zip(labels, names, strict=True)]
    return head + "\n  " + " | ".join(cells)
