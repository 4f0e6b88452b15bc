"""``tokencompose train CONFIG [key=value ...]``: fine-tune with TokenCompose's losses.

CONFIG is a YAML path or a preset name (``tokencompose train shapes_tiny``); overrides use the
config's dotted names (``train.max_steps=100 loss.token_weight=0``). Rerunning the same command in
the same run folder resumes from its newest checkpoint. Multi-GPU: ``accelerate launch -m
tokencompose.cli train CONFIG ...`` (see docs/training.md).
"""

from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML file or preset name (see --list-presets)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--list-presets", action="store_true", help="list the shipped presets and exit")


def run(args: argparse.Namespace) -> int:
    from tokencompose.config import dump_yaml, load_config, preset_names
    from tokencompose.errors import UserError

    if args.list_presets:
        print("\n".join(preset_names()))
        return 0
    if not args.config:
        raise UserError("name a config file or preset (tokencompose train --list-presets)")
    try:
        # Parsed and validated before anything heavy is imported or loaded; a ConfigError is a UserError.
        cfg = load_config(args.config, args.overrides)
    except FileNotFoundError as err:
        raise UserError(str(err)) from None
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0

    from tokencompose.train import NonFiniteLossError, train

    try:
        result = train(cfg)
    except NonFiniteLossError as err:
        log.error("%s", err)
        return 3
    if int(os.environ.get("RANK", "0")) == 0:  # one line, not one per process
        log.info("done: step %d, final checkpoint %s", result.step, result.checkpoint)
    return 0
