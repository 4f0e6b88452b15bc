"""``tokencompose pretrain``: train the shapes-world base model from scratch (VAE, then text encoder + UNet)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="recipe YAML (default: the built-in shapes_base recipe)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. unet_steps=5000")
    parser.add_argument("--work", default="runs/shapes_base", help="work folder; re-running resumes from it")
    parser.add_argument("--out", help="exported diffusers folder (default: WORK/model)")
    parser.add_argument("--fp32", action="store_true", help="export float32 weights instead of float16")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tokencompose.pretrain.recipe import export, load_pretrain_config, pretrain

    config, overrides = args.config, list(args.overrides)
    if config and "=" in config:  # only overrides were given
        config, overrides = None, [config, *overrides]
    cfg = load_pretrain_config(config, overrides)
    out = pretrain(cfg, args.work, args.out)
    if args.fp32:
        export(cfg, Path(args.work), out, fp16=False)
    print(f"base model written to {out}")
    return 0
