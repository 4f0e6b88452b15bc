"""``tokencompose visualize {attention,masks,grid,curves}``: the figures, one command each, on any checkpoint.

Every figure runs ``--model BASE`` and/or checkpoints of it (``--checkpoint [LABEL=]CK``: full, EMA or LoRA),
loaded by the one loader (:mod:`tokencompose.loading`). Lists are comma-separated (``--timesteps 200,600``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _ints(text: str) -> list[int]:
    """``"200,600"`` -> ``[200, 600]`` (lists on the command line are comma-separated, as in key=value)."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _common(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--out", type=Path, default=Path(out), help="output folder (PNG + figures.json manifest)")
    p.add_argument("--model", required=True, help="base model: diffusers-layout folder or hub id")
    p.add_argument("--ema", action="store_true", help="use each checkpoint's EMA UNet (unet_ema/)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--resolution", type=int, help="image size in pixels (default: the model's native size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dpi", type=int, default=150)


def _several(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", action="append", default=[], metavar="[LABEL=]CK", help="a checkpoint to show (repeatable)"
    )
    p.add_argument("--no-base", action="store_true", help="leave the base model out (it is shown first by default)")


def _attention_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=_names, default=["mid", "up"], help="down, mid, up or module-name patterns")
    p.add_argument("--res", type=_ints, help="attention resolutions (map height) to average, e.g. 16,32; default all")
    p.add_argument("--cmap", default="inferno", help="colour map (perceptually uniform: inferno, magma, viridis)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="figure", metavar="FIGURE", required=True)

    p = sub.add_parser("attention", help="per-word attention maps of a generated (or given) image")
    p.add_argument("prompt", help="prompt to generate, or the caption of --image")
    p.add_argument("--checkpoint", default=None, help="a training checkpoint of ours (default: the base model)")
    p.add_argument("--label", default=None, help="name shown in the title (default: the checkpoint's folder)")
    p.add_argument("--image", type=Path, help="use this image (noised at --timesteps) instead of generating")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--t-range", type=_ints, metavar="LO,HI", help="denoising timesteps to average (0..1000)")
    p.add_argument("--timesteps", type=_ints, default=[400], help="with --image: noise timesteps to average")
    p.add_argument("--words", type=_names, help="only these comma-separated words/phrases (default: every word)")
    p.add_argument("--special", action="store_true", help="also show the start and end tokens")
    p.add_argument("--merge", choices=["sum", "mean"], default="sum", help="how sub-tokens of a word merge")
    _attention_opts(p)
    _common(p, "figures")

    p = sub.add_parser("masks", help="each phrase's mask beside each model's attention for it")
    p.add_argument("--data", required=True, type=Path, help="Source-A metadata.jsonl")
    _several(p)
    p.add_argument("--num", type=int, default=4, help="first N samples (ignored with --indices)")
    p.add_argument("--indices", type=_ints, help="comma-separated dataset indices to show")
    p.add_argument("--timesteps", type=_ints, default=[400], help="noise timesteps to average (fixed noise)")
    _attention_opts(p)
    _common(p, "figures")

    p = sub.add_parser("grid", help="same prompts and seeds, models side by side")
    _several(p)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable; one row each per seed)")
    p.add_argument("--prompts-file", type=Path, help="text file, one prompt per line")
    p.add_argument("--seeds", type=_ints, default=[0], help="comma-separated seeds")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--name", default="grid", help="file name (without .png)")
    _common(p, "figures")

    p = sub.add_parser("curves", help="loss curves of a run folder: raw, smoothed, per-epoch min-max scaled")
    p.add_argument("run", type=Path, help="run folder (or its metrics.jsonl)")
    p.add_argument("--smoothing", type=float, default=0.9, help="EMA smoothing factor in [0, 1)")
    p.add_argument("--out", type=Path, help="output folder (default: the run folder)")


def _label(checkpoint: str) -> str:
    """A readable default label: ``run/step-00000300`` for our checkpoints, else the folder's name."""
    p = Path(checkpoint)
    return f"{p.parent.parent.name}/{p.name}" if p.parent.name == "checkpoints" else (p.name or str(p))


def _models(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """``(label, ModelSettings)`` of the base (unless --no-base) and of each ``--checkpoint [LABEL=]CK``."""
    from tokencompose.errors import UserError
    from tokencompose.loading import ModelSettings
    from tokencompose.visualize.capture import parse_model_spec

    models = [] if args.no_base else [("base", ModelSettings(model=args.model, device=args.device))]
    for spec in args.checkpoint:
        label, path = parse_model_spec(spec)
        label = label if "=" in spec and not Path(spec).exists() else _label(path)
        models.append((label, ModelSettings(model=args.model, checkpoint=path, ema=args.ema, device=args.device)))
    if not models:
        raise UserError("--no-base and no --checkpoint: nothing to show")
    return models


def run(args: argparse.Namespace) -> int:
    from tokencompose.errors import UserError
    from tokencompose.loading import ModelSettings, load_model, resolve_device
    from tokencompose.visualize import make

    if args.figure == "curves":
        out = args.out or (args.run if args.run.is_dir() else args.run.parent)
        print(make.loss_curves(args.run, out, args.smoothing))
        return 0

    device = resolve_device(args.device)
    if args.figure == "attention":
        if args.t_range is not None and len(args.t_range) != 2:
            raise UserError(f"--t-range takes two timesteps LO,HI, got {args.t_range}")
        settings = ModelSettings(model=args.model, checkpoint=args.checkpoint, ema=args.ema, device=args.device)
        label = args.label or (_label(args.checkpoint) if args.checkpoint else "base")
        comps = load_model(settings)
        args.out.mkdir(parents=True, exist_ok=True)
        common = dict(
            size=args.resolution,
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
                comps, args.image, args.prompt, args.out, args.seed, args.timesteps, **common
            )
        else:
            t_range = tuple(args.t_range) if args.t_range else None
            file = make.attention_from_prompt(
                comps, args.prompt, args.out, args.seed, args.steps, args.guidance_scale, t_range=t_range, **common
            )
        print(file)
        return 0

    models = _models(args)
    if args.figure == "masks":
        args.out.mkdir(parents=True, exist_ok=True)
        files = make.mask_comparisons(
            args.data, models, args.out, args.indices, args.num, args.seed, args.timesteps, args.resolution,
            args.layers, args.res, args.cmap, args.dpi, device,
        )  # fmt: skip
        print("\n".join(map(str, files)))
        return 0

    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [ln.strip() for ln in args.prompts_file.read_text().splitlines() if ln.strip()]
    if not prompts:
        raise UserError("grid needs --prompt or --prompts-file")
    args.out.mkdir(parents=True, exist_ok=True)
    file = make.model_grid(
        models, prompts, args.out, args.seeds, args.steps, args.guidance_scale, args.resolution, args.dpi, device,
        args.name,
    )  # fmt: skip
    print(file)
    return 0
