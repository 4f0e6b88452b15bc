"""``tokencompose evaluate shapes``: exact spatial (VISOR) and colour-binding scores on the shapes world.

Generates ``--num-prompts`` prompts per task with the model (the shipped shapes base when ``--model`` is not
given), reads every image back with the exact shapes detector, and writes ``OUT/results.json``. Flags set
fields of :class:`tokencompose.evaluation.shapes_exact_run.ShapesExactSettings`; ``key=value`` sets any.
"""

from __future__ import annotations

import argparse

from tokencompose.commands.generate import add_generation_options
from tokencompose.commands.options import add_model_options, add_settings_arguments, option

HELP = "shapes world, exact: VISOR spatial scores, colour binding and the error taxonomy, no learned detector"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``shapes`` subcommand to ``evaluate``'s subparsers."""
    p = sub.add_parser("shapes", help=HELP, description=HELP + ". Generation defaults here: 25 DDIM steps, "
                       "guidance 5, 4 images per prompt.")  # fmt: skip
    option(p, "--out", key="out", required=True, help="output folder (spatial/, attribute/, results.json)")
    option(p, "--name", key="name", help="label of this model in comparison tables")
    option(p, "--num-prompts", key="num_prompts", help="prompts per task (40)")
    option(p, "--prompt-seed", key="prompt_seed", help="seed of the prompt sampler (0)")
    option(p, "--tasks", key="tasks", help="comma-separated: spatial,attribute,objects (default spatial,attribute)")
    option(p, "--world", key="world", help="the shapes world the model was trained on: attributes | nouns (attributes)")
    option(p, "--threshold", key="threshold", help="a region counts when its score is above this (0.1)")
    option(p, "--skip-generation", key="skip_generation", action="store_true", help="score the images present")
    add_model_options(p)
    add_generation_options(p)
    add_settings_arguments(p)


def run(args: argparse.Namespace) -> int:
    """Parse the settings, run the evaluation, print the headline numbers (process 0)."""
    from tokencompose.commands.options import settings_from_args
    from tokencompose.evaluation.shapes_exact_run import ShapesExactSettings, run_shapes_exact, summary_line

    settings = settings_from_args(ShapesExactSettings, args)
    result = run_shapes_exact(settings)
    if result:
        print(summary_line(result, f"{settings.out}/results.json"))
    return 0
