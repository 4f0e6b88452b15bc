"""``tokencompose generate``: images from a base model + our UNet or LoRA, batched, seeded per image, resumable.

Also holds the model / generation / prompt options that ``tokencompose evaluate multigen`` shares.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

log = logging.getLogger(__name__)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="base model: diffusers-layout folder or hub id")
    g.add_argument("--checkpoint", default=None, help="a training checkpoint of ours (step-N/): UNet or LoRA, found")
    g.add_argument("--ema", action="store_true", help="with --checkpoint: use its EMA UNet (unet_ema/)")
    g.add_argument("--unet", default=None, help="fine-tuned UNet folder (config.json + weights, or unet/)")
    g.add_argument("--lora", default=None, help="LoRA weights (diffusers format) to fuse into the UNet")
    g.add_argument("--lora-scale", type=float, default=1.0)
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"], help="auto: fp16 on CUDA")


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation (defaults: the paper's settings)")
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--guidance-scale", type=float, default=7.5)
    g.add_argument("--resolution", type=int, default=512, help="image height and width in pixels")
    g.add_argument("--images-per-prompt", type=int, default=10)
    g.add_argument("--scheduler", default="pndm", help="pndm | ddim | euler | euler-ancestral | dpm | default")
    g.add_argument("--seed", type=int, default=0, help="base seed; image seeds derive from (seed, prompt id, index)")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--batch-size", type=int, default=8, help="images per pipeline call")
    g.add_argument(
        "--safety-checker",
        action="store_true",
        help="run the model's safety checker (off by default: a blacked-out image would count as a miss)",
    )
    g.add_argument("--shard", type=int, default=None, help="this process's shard (default: accelerate's rank)")
    g.add_argument("--num-shards", type=int, default=None, help="number of shards (default: accelerate's world)")


def add_prompt_arguments(p: argparse.ArgumentParser, allow_text: bool = False) -> None:
    g = p.add_argument_group("prompts")
    g.add_argument("--prompts", default=None, help="coco | ade20k (the paper's files) | a prompt JSON file")
    g.add_argument("--categories", default=None, help="sample new prompts from: coco | ade20k | shapes | a text file")
    g.add_argument("--num-prompts", type=int, default=100, help="with --categories")
    g.add_argument("--num-objects", type=int, default=5, help="with --categories: K categories a prompt (<= 10)")
    g.add_argument("--prompt-seed", type=int, default=0, help="with --categories")
    g.add_argument("--limit", type=int, default=None, help="use only the first N prompts (smoke runs)")
    if allow_text:
        g.add_argument("--prompt", action="append", default=None, help="a prompt text (repeatable)")


def resolve_prompts(args: argparse.Namespace) -> tuple[list[Any], dict[str, Any]]:
    """The prompt list and a record of where it came from (file + digest, or sampler settings)."""
    from tokencompose.evaluation import prompts as P

    if getattr(args, "prompt", None):
        prompts = [P.Prompt(uid=i, categories=(), text=t) for i, t in enumerate(args.prompt)]
        info: dict[str, Any] = {"name": "command-line"}
    elif args.categories:
        cats = P.categories(args.categories)
        text_fn = P.multigen_text
        if args.categories == "shapes":
            from tokencompose.data.shapes import multigen_caption

            text_fn = multigen_caption  # the captions the shapes world trains on
        prompts = P.sample_prompts(cats, args.num_prompts, args.num_objects, args.prompt_seed, text_fn=text_fn)
        info = {
            "name": f"sampled:{args.categories}",
            "sampler": {
                "categories": args.categories,
                "num_categories": len(cats),
                "num_prompts": args.num_prompts,
                "num_objects": args.num_objects,
                "seed": args.prompt_seed,
            },
        }
    else:
        name = args.prompts or "coco"
        prompts = P.load_prompts(name)
        info = {"name": name, "file": str(P.multigen_path(name))}
    if args.limit:
        prompts = prompts[: args.limit]
        info["limit"] = args.limit
    info["num_prompts"] = len(prompts)
    return prompts, info


def resolve_device_and_shard(args: argparse.Namespace) -> tuple[Any, int, int, Any]:
    """(device, shard, num_shards, accelerate state or None): under ``accelerate launch`` one shard per process."""
    import os

    import torch

    state = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.shard is None:
        from accelerate import PartialState

        state = PartialState()
        return state.device, state.process_index, state.num_processes, state
    if args.device == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda")
        elif torch.backends.mps.is_available():
            device = torch.device("mps")
        else:
            device = torch.device("cpu")
    else:
        device = torch.device(args.device)
    return device, args.shard or 0, args.num_shards or 1, state


def settings_from_args(args: argparse.Namespace) -> Any:
    """The generation settings of the command line, checked before any model loads."""
    from tokencompose.evaluation.generation import GenerationSettings, check_scheduler

    check_scheduler(args.scheduler)
    return GenerationSettings(
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.resolution,
        width=args.resolution,
        images_per_prompt=args.images_per_prompt,
        scheduler=args.scheduler,
        seed=args.seed,
        negative_prompt=args.negative_prompt,
        safety_checker=args.safety_checker,
    )


def resolve_model_args(args: argparse.Namespace) -> None:
    """``--checkpoint`` (+ ``--ema``) -> ``args.unet`` / ``args.lora``."""
    if getattr(args, "checkpoint", None) and not getattr(args, "_checkpoint_resolved", False):
        if args.unet or args.lora:
            raise SystemExit("pass --checkpoint or --unet/--lora, not both")
        from tokencompose.evaluation.generation import resolve_checkpoint

        unet, lora = resolve_checkpoint(args.checkpoint, ema=args.ema)
        args.unet = str(unet) if unet else None
        args.lora = str(lora) if lora else None
        args._checkpoint_resolved = True  # idempotent: evaluate resolves, then generation resolves again


def model_record(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "base": str(args.model),
        "checkpoint": getattr(args, "checkpoint", None),
        "ema": getattr(args, "ema", False),
        "unet": args.unet,
        "lora": args.lora,
        "lora_scale": args.lora_scale,
    }


def run_generation(args: argparse.Namespace, prompts: list[Any], image_dir: Any, device: Any, shard: int, n: int):
    """Build the pipeline, generate this shard's missing images, free the pipeline; returns the report."""
    import gc

    import torch

    from tokencompose.evaluation.generation import build_pipeline, generate_images

    resolve_model_args(args)
    settings = settings_from_args(args)
    if not settings.safety_checker:
        log.info("safety checker: off (pass --safety-checker to run the model's own)")
    pipe = build_pipeline(
        args.model,
        unet=args.unet,
        lora=args.lora,
        lora_scale=args.lora_scale,
        device=device,
        dtype=args.dtype,
        scheduler=args.scheduler,
        safety_checker=args.safety_checker,
    )
    report = generate_images(
        pipe,
        prompts,
        image_dir,
        settings,
        batch_size=args.batch_size,
        shard=shard,
        num_shards=n,
        record={"model": model_record(args), "dtype": str(pipe.unet.dtype)},
        on_batch=lambda done, total: log.info("generated %d/%d", done, total),
    )
    log.info(
        "%d images written, %d already present, %.1f s (%.3f images/s)",
        len(report.written),
        report.skipped,
        report.seconds,
        len(report.written) / report.seconds if report.seconds else 0.0,
    )
    if report.nsfw:
        log.warning("safety checker blacked out %d images: %s", len(report.nsfw), report.nsfw[:10])
    del pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="image folder (<prompt id>_<index>.png)")
    add_model_arguments(parser)
    add_prompt_arguments(parser, allow_text=True)
    add_generation_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tokencompose.evaluation.prompts import save_prompts

    prompts, info = resolve_prompts(args)
    device, shard, n, state = resolve_device_and_shard(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log.info("prompts: %s (%d); shard %d/%d on %s", info["name"], len(prompts), shard, n, device)
    run_generation(args, prompts, out, device, shard, n)
    if state is not None:
        state.wait_for_everyone()
    if shard == 0:
        # Only once the folder's images are known to be these prompts' (generation refuses others).
        save_prompts(prompts, out / "prompts.json")
    return 0
