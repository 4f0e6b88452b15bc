"""``tokencompose visualize {attention,masks,grid,curves}``: the figures, one command each, on any checkpoint.

A model is a diffusers-layout folder, or a UNet-only checkpoint with ``--base``; ``LABEL=PATH`` names it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _common(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--out", type=Path, default=Path(out), help="output folder (PNG + figures.json manifest)")
    p.add_argument("--base", help="base model folder for UNet-only checkpoints")
    p.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--size", type=int, help="image size (default: the model's native size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dpi", type=int, default=150)


def _attention_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", nargs="+", default=["mid", "up"], help="down, mid, up or module-name patterns")
    p.add_argument("--res", nargs="+", type=int, help="attention resolutions (map height) to average; default all")
    p.add_argument("--cmap", default="inferno", help="colour map (perceptually uniform: inferno, magma, viridis)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="figure", metavar="FIGURE", required=True)

    p = sub.add_parser("attention", help="per-word attention maps of a generated (or given) image")
    p.add_argument("prompt", help="prompt to generate, or the caption of --image")
    p.add_argument("--model", required=True, help="[LABEL=]PATH of the model")
    p.add_argument("--image", type=Path, help="use this image (noised at --noise-levels) instead of generating")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--t-range", nargs=2, type=float, metavar=("LO", "HI"), help="timesteps to average (0..1000)")
    p.add_argument("--noise-levels", nargs="+", type=int, default=[400], help="with --image: timesteps to average")
    p.add_argument("--words", nargs="+", help="only these words/phrases (default: every word of the prompt)")
    p.add_argument("--special", action="store_true", help="also show the start and end tokens")
    p.add_argument("--merge", choices=["mean", "sum"], default="mean", help="how sub-tokens of a word merge")
    _attention_opts(p)
    _common(p, "figures")

    p = sub.add_parser("masks", help="each phrase's mask beside each model's attention for it")
    p.add_argument("--data", required=True, type=Path, help="Source-A metadata.jsonl")
    p.add_argument("--models", nargs="+", required=True, help="[LABEL=]PATH of each model")
    p.add_argument("--num", type=int, default=4, help="first N samples (ignored with --indices)")
    p.add_argument("--indices", nargs="+", type=int, help="dataset indices to show")
    p.add_argument("--noise-levels", nargs="+", type=int, default=[400], help="timesteps to average (fixed noise)")
    _attention_opts(p)
    _common(p, "figures")

    p = sub.add_parser("grid", help="same prompts and seeds, models side by side")
    p.add_argument("--models", nargs="+", required=True, help="[LABEL=]PATH of each model")
    p.add_argument("--prompts", nargs="+", default=[], help="prompts (one row each per seed)")
    p.add_argument("--prompts-file", type=Path, help="text file, one prompt per line")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--name", default="grid", help="file name (without .png)")
    _common(p, "figures")

    p = sub.add_parser("curves", help="loss curves of a run folder: raw, smoothed, per-epoch min-max scaled")
    p.add_argument("run", type=Path, help="run folder (or its metrics.jsonl)")
    p.add_argument("--smoothing", type=float, default=0.9, help="EMA smoothing factor in [0, 1)")
    p.add_argument("--out", type=Path, help="output folder (default: the run folder)")


def run(args: argparse.Namespace) -> int:
    from tokencompose.visualize import capture, make

    if args.figure == "curves":
        out = args.out or (args.run if args.run.is_dir() else args.run.parent)
        print(make.loss_curves(args.run, out, args.smoothing))
        return 0

    device = args.device or capture.default_device()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.figure == "attention":
        label, path = capture.parse_model_spec(args.model)
        comps = capture.load_model(path, args.base)
        common = dict(
            size=args.size,
            layers=args.layers,
            resolutions=args.res,
            words=args.words,
            special=args.special,
            merge=args.merge,
            cmap=args.cmap,
            dpi=args.dpi,
            device=device,
            label=label,
        )
        if args.image is not None:
            file = make.attention_from_image(
                comps, args.image, args.prompt, args.out, args.seed, args.noise_levels, **common
            )
        else:
            t_range = tuple(args.t_range) if args.t_range else None
            file = make.attention_from_prompt(
                comps, args.prompt, args.out, args.seed, args.steps, args.guidance, t_range=t_range, **common
            )
        print(file)
        return 0

    models = [capture.parse_model_spec(m) for m in args.models]
    if args.figure == "masks":
        files = make.mask_comparisons(
            args.data, models, args.out, args.base, args.indices, args.num, args.seed, args.noise_levels, args.size,
            args.layers, args.res, args.cmap, args.dpi, device,
        )  # fmt: skip
        print("\n".join(map(str, files)))
        return 0

    prompts = list(args.prompts)
    if args.prompts_file:
        prompts += [ln.strip() for ln in args.prompts_file.read_text().splitlines() if ln.strip()]
    if not prompts:
        log.error("grid needs --prompts or --prompts-file")
        return 2
    file = make.model_grid(
        models, prompts, args.out, args.base, args.seeds, args.steps, args.guidance, args.size, args.dpi, device,
        args.name,
    )  # fmt: skip
    print(file)
    return 0
