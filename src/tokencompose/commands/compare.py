"""``tokencompose compare RESULT...``: several models' results side by side (markdown table + JSON)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", help="results JSON files of `tokencompose evaluate`")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the table as JSON here")
    parser.add_argument("--markdown", default=None, help="also write the markdown table here")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from tokencompose.evaluation.results import compare, load_result, markdown_table

    table = compare([load_result(p) for p in args.results])
    text = markdown_table(table)
    print(text, end="")
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(table, indent=2) + "\n")
    return 0
