"""``tokencompose report RUN_OR_RESULT... --out report.html``: one self-contained HTML page.

Gathers config summaries, loss curves, MultiGen tables with CIs, grounding IoU and the figures written
by ``tokencompose visualize`` from run folders, results files and figure folders.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", type=Path, help="run folders, results JSON files, figure folders")
    parser.add_argument("--out", type=Path, default=Path("report.html"), help="HTML file to write")
    parser.add_argument("--title", default="TokenCompose report")


def run(args: argparse.Namespace) -> int:
    from tokencompose.visualize.report import build_report

    print(build_report(args.inputs, args.out, args.title))
    return 0
