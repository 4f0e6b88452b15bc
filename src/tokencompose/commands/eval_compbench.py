"""``tokencompose evaluate compbench|clipscore``: T2I-CompBench attribute binding / non-spatial, and CLIP score.

compbench: T2I-CompBench's prompt files (``--prompt-dir``, its ``examples/dataset``) -> images per category
(generated, or ``--images DIR`` holding ``<category>/<line>_<index>.png``) -> BLIP-VQA attribute binding
(color, shape, texture) and the CLIP non-spatial score, mean and std over images in ``OUT/results.json``.

clipscore: prompts (``--prompt-file`` one a line, or the MultiGen prompt options) -> images -> Hessel et al.'s
CLIP-S (``w * max(cos, 0)``, ``w`` = 2.5) and the raw cosine in ``OUT/results.json``.

Flags set fields of :class:`~tokencompose.evaluation.compbench.CompBenchSettings` and
:class:`~tokencompose.evaluation.clip_score.ClipScoreSettings`; ``key=value`` sets any field. The rules and
their sources are in those modules' docstrings.
"""

from __future__ import annotations

import argparse
from typing import Any

from tokencompose.commands.generate import add_generation_options, add_prompt_options
from tokencompose.commands.options import add_model_options, add_settings_arguments, option

COMMANDS = ("compbench", "clipscore")


def add_clip_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("CLIP scorer")
    option(g, "--clip-model", key="clip.model", help="hub id or folder (default: openai/clip-vit-base-patch32)")
    option(g, "--clip-revision", key="clip.revision")
    option(g, "--clip-batch-size", key="clip.batch_size", help="images per CLIP call (32)")
    option(g, "--clip-dtype", key="clip.dtype", help="fp32 | fp16 | bf16")


def add_parser(sub: Any) -> None:
    """Add the ``compbench`` and ``clipscore`` subcommands to ``evaluate``'s subparsers ``sub``."""
    cb = sub.add_parser("compbench", help="T2I-CompBench: attribute binding (BLIP-VQA) and non-spatial (CLIP)")
    option(cb, "--out", key="out", required=True, help="output folder (images/<category>/, results.json)")
    option(cb, "--prompt-dir", key="prompt_dir", required=True,
           help="T2I-CompBench's prompt folder (examples/dataset: <category>_val.txt)")  # fmt: skip
    option(cb, "--categories", key="categories", help="comma-separated: color,shape,texture,non_spatial (all)")
    option(cb, "--split", key="split", help="prompt file suffix (val)")
    option(cb, "--images", key="images", help="score DIR/<category>/<line>_<index>.png without a model")
    option(cb, "--name", key="name", help="label of this model in comparison tables")
    option(cb, "--limit", key="limit", help="first N prompts of each category (smoke runs)")
    v = cb.add_argument_group("BLIP-VQA scorer")
    option(v, "--vqa-model", key="vqa.model", help="hub id or folder (default: Salesforce/blip-vqa-base)")
    option(v, "--vqa-revision", key="vqa.revision")
    option(v, "--vqa-batch-size", key="vqa.batch_size", help="images per BLIP call (32)")
    option(v, "--vqa-dtype", key="vqa.dtype", help="fp32 | fp16 | bf16")
    option(v, "--vqa-image-size", key="vqa.image_size", help="input size in pixels (T2I-CompBench: 480)")
    option(v, "--spacy-model", key="vqa.spacy_model", help="spaCy pipeline for noun chunks")
    add_clip_options(cb)
    add_model_options(cb)
    add_generation_options(cb)
    add_settings_arguments(cb)

    cs = sub.add_parser("clipscore", help="CLIP score (Hessel et al.: 2.5 * max(cos, 0)) of images and prompts")
    option(cs, "--out", key="out", required=True, help="output folder (images/, results.json)")
    option(cs, "--prompt-file", key="prompt_file", help="a text file, one prompt a line")
    option(cs, "--images", key="images", help="score an existing folder (<uid>_<index>.png) without a model")
    option(cs, "--name", key="name", help="label of this model in comparison tables")
    option(cs, "--weight", key="weight", help="w of w * max(cos, 0): 2.5 (Hessel et al.), 100 (torchmetrics)")
    add_clip_options(cs)
    add_model_options(cs)
    add_prompt_options(cs)
    add_generation_options(cs)
    add_settings_arguments(cs)


def run(args: argparse.Namespace) -> int:
    """Run the subcommand ``args.evaluation`` (``compbench`` or ``clipscore``); prints the scores' summary."""
    from tokencompose.commands.options import settings_from_args

    if args.evaluation == "compbench":
        from tokencompose.evaluation.compbench import CompBenchSettings, run_compbench

        settings = settings_from_args(CompBenchSettings, args)
        result = run_compbench(settings)
    else:
        from tokencompose.evaluation.clip_score import ClipScoreSettings, run_clipscore

        settings = settings_from_args(ClipScoreSettings, args)
        result = run_clipscore(settings)
    if result:  # process 0 scores
        cells = [f"{k} {v['mean']:.4f} ± {v['std']:.4f}" for k, v in result["scores"].items()]
        print(f"{settings.out}/results.json: {result['images_per_prompt']} images a prompt")
        print("  " + " | ".join(cells))
    return 0
