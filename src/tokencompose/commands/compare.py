"""``tokencompose compare RESULT...``: several models' results side by side (markdown table + JSON)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", help="results JSON files of `tokencompose evaluate`")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the table as JSON here")
    parser.add_argument("--markdown", default=None, help="also write the markdown table here")


def run(args: argparse.Namespace) -> int:
    from tokencompose.atomic import atomic_write_text, write_json_atomic
    from tokencompose.evaluation.results import compare, load_result, markdown_table

    table = compare([load_result(p) for p in args.results])
    text = markdown_table(table)
    print(text, end="")
    if args.markdown:
        atomic_write_text(args.markdown, text)
    if args.json_out:
        write_json_atomic(args.json_out, table)
    return 0
