"""``tokencompose evaluate latency``: seconds per image of the model's sampling call (Table 1's latency column)."""

from __future__ import annotations

import argparse

from tokencompose.commands.generate import add_generation_options
from tokencompose.commands.options import add_model_options, add_settings_arguments, option


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("latency", help="inference latency: seconds per image (mean ± std after warm-up)")
    option(p, "--out", key="out", required=True, help="output folder (results.json)")
    option(p, "--name", key="name", help="label of this model in comparison tables")
    option(p, "--prompt", key="prompt", help="the prompt of every timed call")
    option(p, "--repeats", key="repeats", help="timed calls, one image each (10)")
    option(p, "--warmup", key="warmup", help="untimed calls first (2)")
    add_model_options(p)
    add_generation_options(p)
    add_settings_arguments(p)


def run(args: argparse.Namespace) -> int:
    from tokencompose.commands.options import settings_from_args
    from tokencompose.evaluation.latency import LatencySettings, run_latency

    settings = settings_from_args(LatencySettings, args)
    s = run_latency(settings)["scores"]
    print(f"{settings.out}/results.json: {s['seconds_per_image']:.3f} ± {s['std']:.3f} s per image "
          f"({s['repeats']} calls)")  # fmt: skip
    return 0
