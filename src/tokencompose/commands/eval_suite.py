"""``tokencompose evaluate suite``: a preset's metrics over seeds as one table (the paper's Table 1 layout)."""

from __future__ import annotations

import argparse

from tokencompose.commands.options import add_model_options, add_settings_arguments, option


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("suite", help="every metric of a preset over seeds: the paper's Table 1 (or the shapes world's)")
    option(p, "--out", key="out", required=True, help="output folder (seed_<s>/<metric>/, suite.json, table.md)")
    option(p, "--name", key="name", help="label of this model's row")
    option(p, "--preset", key="preset", help="paper (Table 1) | shapes (exact shapes-world metrics, offline)")
    option(p, "--metrics", key="metrics", help="comma-separated subset of the preset's metrics")
    option(p, "--seeds", key="seeds", help="comma-separated generation seeds (cells: mean ± std over them)")
    option(p, "--num-prompts", key="num_prompts", help="quick runs: first N prompts of every metric")
    option(p, "--images-per-prompt", key="images_per_prompt", help="quick runs: images per prompt")
    option(p, "--steps", key="steps", help="quick runs: sampler steps")
    option(p, "--resolution", key="resolution", help="image size in pixels (default: the model's)")
    f = p.add_argument_group("FID inputs (local files)")
    option(f, "--inception-weights", key="inception_weights", help="the FID Inception weights file")
    option(f, "--coco-captions", key="coco_captions", help="captions_val2017.json")
    option(f, "--coco-images", key="coco_images", help="val2017 image folder")
    option(f, "--flickr-captions", key="flickr_captions", help="Flickr30K captions file")
    option(f, "--flickr-images", key="flickr_images", help="Flickr30K image folder")
    add_model_options(p)
    option(p, "--batch-size", key="run.batch_size", help="images per pipeline call (8)")
    add_settings_arguments(p)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tokencompose.commands.options import settings_from_args
    from tokencompose.evaluation.suite import SuiteSettings, run_suite

    settings = settings_from_args(SuiteSettings, args)
    if run_suite(settings):  # process 0 of a sharded run writes the table
        print((Path(settings.out) / "table.md").read_text(), end="")
    return 0
