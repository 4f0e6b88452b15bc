"""``tokencompose demo``: base vs control vs TokenCompose on the shapes world, with an HTML report."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder; re-running resumes from it")
    parser.add_argument("--base", default=None, help="base model folder (default: the shipped shapes-world base)")
    parser.add_argument("--smoke", action="store_true", help="a tiny version (about a minute): checks the wiring")
    parser.add_argument("--roi", action="store_true", help="add a third arm: TokenCompose + ROI-token alignment")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument(
        "settings", nargs="*", metavar="key=value", help="override a demo setting, e.g. steps=500 token_weight=1e-3"
    )


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import torch
    import yaml

    from tokencompose.config import ConfigError
    from tokencompose.demo import DemoSettings, run_demo

    if args.threads:
        torch.set_num_threads(args.threads)
    fields = {f.name: f for f in dataclasses.fields(DemoSettings)}
    kw: dict = {"out": args.out, "base": args.base}
    for text in args.settings:
        key, sep, raw = text.partition("=")
        if not sep or key not in fields or key in ("out", "base"):
            raise ConfigError(key or text, f"unknown demo setting (known: {', '.join(sorted(fields))})")
        kw[key] = yaml.safe_load(raw)
    if args.roi:
        kw.setdefault("roi_weight", 1e-2)
    settings = DemoSettings.smoke(**kw) if args.smoke else DemoSettings(**kw)
    summary = run_demo(settings)
    print()
    print(f"{'model':<18} {'MG1':>7} {'MG2':>7} {'MG3':>7} {'MG4':>7} {'MG5':>7} {'mIoU':>7} {'AUROC':>7}")
    for name, row in summary["table"].items():
        mg = row.get("mg") or [float("nan")] * 5
        cells = " ".join(f"{v:7.2f}" for v in mg[:5])
        print(f"{name:<18} {cells} {row.get('miou') or float('nan'):7.4f} {row.get('auroc') or float('nan'):7.4f}")
    print()
    print(summary["verdict"])
    print(f"report: {settings.out}/report.html")
    return 0
