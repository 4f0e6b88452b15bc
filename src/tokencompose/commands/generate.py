"""``tokencompose generate``: images from a base model + a checkpoint of ours, batched, seeded per image, resumable.

Also holds the prompt / generation / sharding flags that ``tokencompose evaluate multigen`` shares. Every
flag sets a field of :class:`tokencompose.evaluation.settings.GenerateSettings`; ``key=value`` sets any.
"""

from __future__ import annotations

import argparse

from tokencompose.commands.options import add_model_options, add_settings_arguments, option


def add_prompt_options(p: argparse.ArgumentParser, allow_text: bool = False) -> None:
    g = p.add_argument_group("prompts")
    option(g, "--prompts", key="prompts.prompts", help="coco | ade20k (the paper's files) | a prompt JSON file")
    option(g, "--categories", key="prompts.categories", help="sample from coco|ade20k|shapes|shapes_nouns|a file")
    option(g, "--num-prompts", key="prompts.num_prompts", help="with --categories (default 100)")
    option(g, "--num-objects", key="prompts.num_objects", help="with --categories: K categories a prompt (<= 10)")
    option(g, "--prompt-seed", key="prompts.prompt_seed", help="with --categories")
    option(g, "--limit", key="prompts.limit", help="use only the first N prompts (smoke runs)")
    if allow_text:
        option(g, "--prompt", key="prompts.texts", action="append", help="a prompt text (repeatable)")


def add_generation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation (defaults: the command's protocol; MultiGen's are the paper's)")
    option(g, "--steps", key="generation.steps", help="denoising steps (MultiGen: 50)")
    option(g, "--guidance-scale", key="generation.guidance_scale", help="classifier-free guidance (MultiGen: 7.5)")
    option(g, "--resolution", key="generation.resolution", help="image size in pixels (default: the model's)")
    option(g, "--images-per-prompt", key="generation.images_per_prompt", help="(MultiGen 10, VISOR 4, FID 1)")
    option(g, "--scheduler", key="generation.scheduler", help="pndm | ddim | ddpm | euler | euler-ancestral | dpm")
    option(g, "--seed", key="generation.seed", help="base seed; image seeds derive from (seed, prompt id, index)")
    option(g, "--negative-prompt", key="generation.negative_prompt")
    option(g, "--safety-checker", key="generation.safety_checker", action="store_true",
           help="run the model's safety checker (off: a blacked-out image would count as a miss)")  # fmt: skip
    r = p.add_argument_group("sharding")
    option(r, "--batch-size", key="run.batch_size", help="images per pipeline call (8)")
    option(r, "--shard", key="run.shard", help="this process's shard (default: accelerate's rank)")
    option(r, "--num-shards", key="run.num_shards", help="number of shards (default: accelerate's world size)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    option(parser, "--out", key="out", required=True, help="image folder (<prompt id>_<index>.png)")
    add_model_options(parser)
    add_prompt_options(parser, allow_text=True)
    add_generation_options(parser)
    add_settings_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from tokencompose.commands.options import settings_from_args
    from tokencompose.evaluation.run import run_generate
    from tokencompose.evaluation.settings import GenerateSettings

    report = run_generate(settings_from_args(GenerateSettings, args))
    print(f"{len(report.written)} images written, {report.skipped} already present")
    return 0
