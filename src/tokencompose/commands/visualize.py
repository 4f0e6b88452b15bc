"""``tokencompose visualize {attention,masks,grid,curves}``: the figures, one command each, on any checkpoint.

Every figure runs ``--model BASE`` and/or checkpoints of it (``--checkpoint [LABEL=]CK``: full, EMA or
LoRA), loaded by the one loader. Flags set fields of :class:`tokencompose.visualize.run.VisualizeSettings`
(lists are comma-separated: ``--timesteps 200,600``); ``key=value`` sets any field.
"""

from __future__ import annotations

import argparse

from tokencompose.commands.options import add_model_options, add_settings_arguments, option


def _common(p: argparse.ArgumentParser) -> None:
    option(p, "--out", key="out", help="output folder (PNG + figures.json manifest; default: figures)")
    add_model_options(p)
    option(p, "--resolution", key="resolution", help="image size in pixels (default: the model's native size)")
    option(p, "--seed", key="seed")
    option(p, "--dpi", key="dpi")
    add_settings_arguments(p)


def _several(p: argparse.ArgumentParser) -> None:
    option(p, "--checkpoints", key="checkpoints", metavar="[LABEL=]CK,...", help="checkpoints to show, comma-separated")
    option(p, "--no-base", key="no_base", action="store_true", help="leave the base model out (shown first)")


def _attention_opts(p: argparse.ArgumentParser) -> None:
    option(p, "--layers", key="layers", help="down, mid, up, joint, single or patterns (default: the family's)")
    option(p, "--normalize", key="normalize", help="SD3 / Flux maps: text (renormalised over text keys) | joint")
    option(p, "--res", key="res", help="attention resolutions (map height) to average, e.g. 16,32; default all")
    option(p, "--cmap", key="cmap", help="colour map (inferno, magma, viridis)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="figure", metavar="FIGURE", required=True)

    p = sub.add_parser("attention", help="per-word attention maps of a generated (or given) image")
    p.add_argument("prompt", help="prompt to generate, or the caption of --image")
    option(p, "--label", key="label", help="name shown in the title (default: the checkpoint's run/step)")
    option(p, "--image", key="image", help="use this image (noised at --timesteps) instead of generating")
    option(p, "--steps", key="steps")
    option(p, "--guidance-scale", key="guidance_scale")
    option(p, "--scheduler", key="scheduler", help="sampler: auto (the family's: DDIM for SD) | dpm | ddim | ...")
    option(p, "--t-range", key="t_range", metavar="LO,HI", help="denoising timesteps to average (0..1000)")
    option(p, "--timesteps", key="timesteps", help="with --image: noise timesteps to average (400)")
    option(p, "--words", key="words", help="only these comma-separated words/phrases (default: every word)")
    option(p, "--special", key="special", action="store_true", help="also show the start and end tokens")
    option(p, "--merge", key="merge", help="how sub-tokens of a word merge: sum (the phrase map) | mean")
    _attention_opts(p)
    _common(p)

    p = sub.add_parser("masks", help="each phrase's mask beside each model's attention for it")
    option(p, "--data", key="data", required=True, help="metadata.jsonl with phrase masks")
    _several(p)
    option(p, "--num", key="num", help="first N samples (ignored with --indices)")
    option(p, "--indices", key="indices", help="comma-separated dataset indices to show")
    option(p, "--timesteps", key="timesteps", help="noise timesteps to average (fixed noise; 400)")
    _attention_opts(p)
    _common(p)

    p = sub.add_parser("grid", help="same prompts and seeds, models side by side")
    _several(p)
    option(p, "--prompt", key="prompts", action="append", help="a prompt (repeatable; one row each per seed)")
    option(p, "--prompts-file", key="prompts_file", help="text file, one prompt per line")
    option(p, "--seeds", key="seeds", help="comma-separated seeds (0)")
    option(p, "--steps", key="steps")
    option(p, "--guidance-scale", key="guidance_scale")
    option(p, "--scheduler", key="scheduler", help="sampler: auto (the family's: DDIM for SD) | dpm | ddim | ...")
    option(p, "--name", key="name", help="file name (without .png)")
    _common(p)

    p = sub.add_parser("curves", help="loss curves of a run folder: raw, smoothed, per-epoch min-max scaled")
    p.add_argument("run", help="run folder (or its metrics.jsonl)")
    option(p, "--smoothing", key="smoothing", help="EMA smoothing factor in [0, 1)")
    option(p, "--out", key="out", help="output folder (default: the run folder)")


def run(args: argparse.Namespace) -> int:
    from tokencompose.commands.options import settings_from_args
    from tokencompose.visualize.run import VisualizeSettings, run_visualize

    fixed: dict = {"figure": args.figure}
    if args.figure == "attention":
        fixed["prompts"] = [args.prompt]
    if args.figure == "curves":
        fixed["run"] = args.run
    files = run_visualize(settings_from_args(VisualizeSettings, args, **fixed))
    print("\n".join(map(str, files)))
    return 0
