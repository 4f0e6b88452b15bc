"""Command-line entry point: ``tokencompose SUBCOMMAND ...``.

Each subcommand lives in its own module that exposes ``add_arguments(parser)`` and ``run(args) -> int``;
heavy imports (torch, diffusers) happen inside ``run`` so ``tokencompose --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

# name -> (module, one-line help). A module that is not importable is skipped, so the CLI never
# breaks because one optional part is missing.
# Commands that load diffusers / transformers models: their per-model loading bars are silenced
# (importing those libraries just to silence them would cost the light commands seconds).
LOADS_MODELS = {"demo", "pretrain", "train", "generate", "evaluate", "probe", "visualize", "export"}
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("tokencompose.commands.demo", "run the whole method on the built-in shapes world"),
    "prepare": ("tokencompose.commands.prepare", "build datasets (shapes, coco) and latent caches"),
    "pretrain": ("tokencompose.commands.pretrain", "train the shapes-world base model from scratch"),
    "train": ("tokencompose.commands.train", "fine-tune a model with TokenCompose's losses"),
    "generate": ("tokencompose.commands.generate", "generate images with a (fine-tuned) model"),
    "evaluate": ("tokencompose.commands.evaluate", "MultiGen and attention-grounding evaluation"),
    "probe": ("tokencompose.commands.probe", "attention grounding of each cross-attention layer per timestep"),
    "compare": ("tokencompose.commands.compare", "side-by-side table of evaluation results"),
    "visualize": ("tokencompose.commands.visualize", "attention maps, masks vs attention, grids"),
    "report": ("tokencompose.commands.report", "one self-contained HTML report"),
    "export": ("tokencompose.commands.export", "a diffusers pipeline folder that stock diffusers loads"),
}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2): a usage block above the message buries it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        """Also take ``key=value`` settings that come after an option (``pretrain R --work W unet_steps=5``).

        argparse fills a trailing ``nargs="*"`` positional from the first run of positionals only; what follows
        an option would be refused as unrecognized. Those ``key=value`` words join the list, in order.
        """
        ns, extras = super().parse_known_args(args, namespace)
        lists = [a for a in self._actions if not a.option_strings and a.nargs == "*"]
        if lists and isinstance(getattr(ns, lists[-1].dest, None), list):
            late = [a for a in extras if "=" in a and not a.startswith("-")]
            setattr(ns, lists[-1].dest, [*getattr(ns, lists[-1].dest), *late])
            extras = [a for a in extras if a not in late]
        return ns, extras


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="tokencompose", description="TokenCompose: token-level supervision.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and module_name.startswith(err.name):
                continue
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from tokencompose.console import setup_console

    setup_console(verbose=args.verbose)
    if args.version:
        from tokencompose import __version__

        print(__version__)
        return 0
    if not getattr(args, "_run", None):
        parser.print_help()
        return 1
    return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command; user mistakes become one line on stderr and exit status 2."""
    from tokencompose.console import quiet_model_loading
    from tokencompose.errors import UserError, environment_error_message, one_line

    if args.command in LOADS_MODELS:
        quiet_model_loading()
    try:
        return int(args._run(args) or 0)
    except UserError as err:
        print(f"tokencompose {args.command}: error: {one_line(str(err))}", file=sys.stderr)
        return 2
    except OSError as err:
        message = environment_error_message(err)
        if message is None:
            raise
        print(f"tokencompose {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
