"""``tokencompose demo``: base vs control vs TokenCompose on the shapes world, with an HTML report."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder; re-running resumes from it")
    parser.add_argument(
        "--base", default=None, help="base model folder or shipped base name (default: shapes_nouns16_wordwise)"
    )
    parser.add_argument("--smoke", action="store_true", help="a tiny version (about a minute): checks the wiring")
    parser.add_argument("--roi", action="store_true", help="add a third arm: TokenCompose + ROI-token alignment")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument(
        "settings", nargs="*", metavar="key=value", help="override a demo setting, e.g. steps=500 token_weight=5e-3"
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from tokencompose.demo import SMOKE, DemoSettings, run_demo
    from tokencompose.typed_data import load_settings, merge

    if args.threads:
        torch.set_num_threads(args.threads)
    given: dict = {"out": args.out}
    if args.base is not None:
        given["base"] = args.base
    if args.roi:
        given["roi_weight"] = 1e-2
    # Smoke sizes, then the flags, then key=value: the one typed parsing path (errors name the key).
    settings = load_settings(DemoSettings, merge(SMOKE if args.smoke else {}, given), args.settings)
    summary = run_demo(settings)
    print()
    nan = float("nan")
    print(f"{'model':<18} {'MG1':>7} {'MG2':>7} {'MG3':>7} {'MG4':>7} {'MG5':>7} {'mIoU':>7} {'AUROC':>7} "
          f"{'mapcorr':>7} {'specif':>7} {'spatial':>7} {'binding':>7}")  # fmt: skip
    for name, row in summary["table"].items():
        mg = row.get("mg") or [nan] * 5
        cells = " ".join(f"{v:7.2f}" for v in mg[:5])
        extra = [row.get(k) for k in ("miou", "auroc", "map_corr", "specificity", "spatial", "binding")]
        fmts = ("7.4f", "7.4f", "7.3f", "7.3f", "7.2f", "7.3f")
        more = " ".join(format(nan if v is None else v, f) for v, f in zip(extra, fmts, strict=True))
        print(f"{name:<18} {cells} {more}")
    effect = summary.get("diff") or {}
    if effect.get("diff"):
        print(f"{'TC - control':<18} " + " ".join(f"{v:+7.2f}" for v in effect["diff"][:5]))
        mde = (f"{v:7.2f}" if v is not None else f"{'-':>7}" for v in effect["mde"][:5])  # None: no spread
        print(f"{'  MDE (80% power)':<18} " + " ".join(mde))
    if (summary.get("diff_base") or {}).get("diff"):
        print(f"{'TC - base':<18} " + " ".join(f"{v:+7.2f}" for v in summary["diff_base"]["diff"][:5]))
    print()
    print(summary["verdict"])
    print(f"report: {settings.out}/report.html")
    return 0
