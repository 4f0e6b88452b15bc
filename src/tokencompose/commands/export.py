"""``tokencompose export --model BASE --checkpoint CK --out DIR``: a diffusers folder stock diffusers loads.

DiffusionPipeline.from_pretrained(DIR)          # fine-tuned UNet, or the LoRA fused into it
pipe.load_lora_weights(DIR)                     # after --keep-lora: the adapter beside the base
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="base model: diffusers-layout folder or hub id")
    parser.add_argument("--checkpoint", default=None, help="a training checkpoint of ours (step-N/): UNet or LoRA")
    parser.add_argument("--ema", action="store_true", help="export the checkpoint's EMA UNet (unet_ema/)")
    parser.add_argument(
        "--family", default="auto", choices=("auto", "sd", "sdxl", "sd3", "flux"), help="architecture of the base"
    )
    parser.add_argument("--out", required=True, help="output folder (must not exist yet)")
    parser.add_argument(
        "--keep-lora", action="store_true", help="LoRA: write the adapter beside the untouched base instead of fusing"
    )


def run(args: argparse.Namespace) -> int:
    from tokencompose.export import ExportSettings, export_pipeline

    settings = ExportSettings(
        model=args.model,
        checkpoint=args.checkpoint,
        out=args.out,
        ema=args.ema,
        keep_lora=args.keep_lora,
        family=args.family,
    )
    print(f"exported: {export_pipeline(settings)}")
    return 0
