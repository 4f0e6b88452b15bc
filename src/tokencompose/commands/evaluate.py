"""``tokencompose evaluate multigen|grounding|masks``: MultiGen and attention-grounding scores, mask quality.

multigen: prompts -> images (skipped when present) -> detections (stored, skipped when present) -> scores
(MG_k ± std, bootstrap CI) in ``OUT/results.json``. ``--rescore OUT/results.json --threshold T`` recomputes
the scores from the stored detections only (no GPU). Under ``accelerate launch`` each process takes a
shard of the images; process 0 scores once all shards are done.

grounding: captioned images with phrase masks (a metadata.jsonl, or a freshly rendered shapes world) ->
mean IoU over a threshold sweep and AUROC of each phrase's cross-attention against its mask.

masks: a grounded dataset's phrase masks and boxes against ground truth (COCO instances or another
metadata.jsonl with masks): mask IoU and box IoU per category in ``OUT/results.json`` and ``results.md``.

Flags set fields of :mod:`tokencompose.evaluation.settings`; ``key=value`` sets any field.
"""

from __future__ import annotations

import argparse

from tokencompose.commands.generate import add_generation_options, add_prompt_options
from tokencompose.commands.options import add_model_options, add_settings_arguments, option
from tokencompose.console import number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="evaluation", metavar="EVALUATION", required=True)
    mg = sub.add_parser("multigen", help="MultiGen: generate, detect, score (MG_k ± std, 95%% CI)")
    option(mg, "--out", key="out", required=True, help="output folder (images/, detections*.jsonl, results.json)")
    option(mg, "--images", key="images", help="image folder (default OUT/images)")
    option(mg, "--name", key="name", help="label of this model in comparison tables")
    option(mg, "--skip-generation", key="skip_generation", action="store_true", help="score the images present")
    option(mg, "--output", key="output", help="results file (default OUT/results.json)")
    mg.add_argument("--rescore", default=None, help="a results.json: rescore its stored detections (no model)")
    d = mg.add_argument_group("detector")
    option(d, "--detector", key="detector.detector", help="hub id, folder, or 'shapes' (default: OWLv2 large)")
    option(d, "--detector-revision", key="detector.revision")
    option(d, "--detector-batch-size", key="detector.batch_size")
    option(d, "--detector-dtype", key="detector.dtype", help="fp32 | fp16 | bf16")
    option(d, "--query-template", key="detector.query_template", help="default: 'a photo of a {category}' (OWL)")
    option(d, "--queries", key="detector.queries", help="vocabulary (the paper) | prompt")
    option(d, "--threshold", key="detector.threshold", help="a category counts when a box scores above this (0.1)")
    option(d, "--bootstrap", key="detector.bootstrap", help="bootstrap samples for the 95%% CI (0: none)")
    add_model_options(mg)
    add_prompt_options(mg)
    add_generation_options(mg)
    add_settings_arguments(mg)

    gr = sub.add_parser("grounding", help="attention grounding: phrase attention vs masks (mIoU sweep, AUROC)")
    option(gr, "--out", key="out", required=True, help="output folder (results.json)")
    option(gr, "--name", key="name")
    add_grounding_options(
        gr,
        timesteps="comma-separated noise timesteps (100,300,500)",
        layers="text-attention layers (default: the family's supervised set; down, mid, up, joint, single, patterns)",
    )

    ma = sub.add_parser("masks", help="mask quality: grounded phrase masks vs ground truth (mask IoU, box IoU)")
    option(ma, "--data", key="data", required=True, help="the grounded metadata.jsonl to check")
    option(ma, "--reference", key="reference", required=True,
           help="ground truth: a COCO instances JSON or a metadata.jsonl with masks")  # fmt: skip
    option(ma, "--out", key="out", required=True, help="output folder (results.json, results.md)")
    option(ma, "--limit", key="limit", help="first N rows only")
    add_settings_arguments(ma)
    _add_extra_metrics(sub)


# Metrics whose subcommands live in their own command module (``commands/eval_<name>.py``: ``add_parser(sub)``
# and ``run(args)``), so this file stays a table of contents.
EXTRA_METRICS = ("visor", "fid", "compbench", "shapes", "latency", "suite")


def _add_extra_metrics(sub: argparse._SubParsersAction) -> None:
    import importlib

    for name in EXTRA_METRICS:
        module = importlib.import_module(f"tokencompose.commands.eval_{name}")
        before = set(sub.choices)
        module.add_parser(sub)
        for added in set(sub.choices) - before:
            sub.choices[added].set_defaults(_metric_run=module.run)


def add_grounding_options(p: argparse.ArgumentParser, timesteps: str, layers: str) -> None:
    """The fields of :class:`GroundingSettings` (model, data, metric), shared with ``probe layers``."""
    add_model_options(p)
    option(p, "--data", key="data", help="metadata.jsonl with phrase masks")
    option(p, "--shapes", key="shapes", help="instead of --data: render this many shapes-world scenes")
    option(p, "--shapes-seed", key="shapes_seed", help="scenes unseen in training by default (12345)")
    option(p, "--shapes-world", key="shapes_world", help="those scenes' world (the model's): attributes | nouns")
    option(p, "--resolution", key="resolution", help="image size in pixels (default: the model's)")
    option(p, "--eval-size", key="eval_size", help="mask/score resolution (default: the image size)")
    option(p, "--timesteps", key="timesteps", help=timesteps)
    option(p, "--layers", key="layers", help=layers)
    option(p, "--normalize", key="normalize", help="SD3 / Flux maps: text (renormalised over text keys) | joint")
    option(p, "--thresholds", key="thresholds", help="comma-separated mIoU thresholds (0.1,...,0.9)")
    option(p, "--batch-size", key="batch_size")
    option(p, "--limit", key="limit", help="first N images only")
    option(p, "--seed", key="seed")
    add_settings_arguments(p)


def run(args: argparse.Namespace) -> int:
    from tokencompose.commands.options import settings_from_args

    if getattr(args, "_metric_run", None) is not None:
        return args._metric_run(args)

    if args.evaluation == "masks":  # numpy + pycocotools only: before the model stack is imported
        from tokencompose.evaluation.mask_quality import MaskQualitySettings, evaluate_mask_quality, summary_line

        masks = settings_from_args(MaskQualitySettings, args)
        print(summary_line(evaluate_mask_quality(masks), masks.out))
        return 0
    from tokencompose.evaluation import run as R
    from tokencompose.evaluation.settings import GroundingSettings, MultiGenSettings

    if args.evaluation == "grounding":
        grounding = settings_from_args(GroundingSettings, args)
        s = R.run_grounding(grounding)["scores"]
        corr, spec = (number(s.get(k)) for k in ("map_correlation", "specificity"))
        ci = s.get("specificity_ci95")
        spec += "" if ci is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]"
        print(f"{grounding.out}/results.json: best mIoU {s['best_miou']:.4f} (thr {s['best_threshold']:g}), "
              f"AUROC {s['auroc']:.4f}, correlation between phrases' maps {corr}, "
              f"specificity {spec} (own object over another's; chance 0.5)")  # fmt: skip
        return 0
    settings = settings_from_args(MultiGenSettings, args)
    if args.rescore:
        result = R.rescore_multigen(args.rescore, settings.detector.threshold, settings.detector.bootstrap,
                                    settings.output)  # fmt: skip
        _print_scores(result, result.pop("_path"))
        return 0
    result = R.run_multigen(settings)
    if result:  # process 0 scores
        _print_scores(result, settings.output or f"{settings.out}/results.json")
    return 0


def _print_scores(result: dict, path: str) -> None:
    s = result["scores"]
    cells = [f"MG{k + 1} {p:.2f} ± {d:.2f}" for k, (p, d) in enumerate(zip(s["mg_percent"], s["mg_std"], strict=True))]
    print(f"{path}: threshold {s['threshold']:g}, {s['num_prompts']} prompts x {s['images_per_prompt']} images")
    print("  " + " | ".join(cells))
