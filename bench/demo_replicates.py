"""Replicate `tokencompose demo` over seeds: the numbers of the shapes base's model card, reproducible.

    python bench/demo_replicates.py --seeds 11,12,13 --out runs/replicates [key=value ...]

Each seed is a full demo run (new training scenes, prompts and training noise; the same base and settings)
in ``OUT/seed_<s>/`` (re-running resumes). Afterwards it prints, per MG_k, the paired difference
TokenCompose - control of every seed with its 95% CI, their mean ± std over seeds, the mean's pooled 95% CI
and MDE (independent runs: ``scoring.pooled_difference``), TokenCompose - base pooled alike, the grounding mIoU
difference, the exact spatial / colour-binding scores, the phrase maps' correlation and specificity per arm and
the wall time, and writes ``OUT/replicates.json``.
The model card lists which seeds chose the settings (design) and which gave the verdict (never used while
choosing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from tokencompose.demo import DemoSettings, run_demo
from tokencompose.evaluation.scoring import pooled_difference
from tokencompose.typed_data import load_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="11,12,13", help="comma-separated demo seeds")
    parser.add_argument("--out", default="runs/replicates")
    parser.add_argument("settings", nargs="*", metavar="key=value", help="demo settings, as `tokencompose demo`")
    args = parser.parse_args()
    rows = []
    for seed in [int(x) for x in args.seeds.split(",")]:
        settings = load_settings(DemoSettings, {"out": f"{args.out}/seed_{seed}", "seed": seed, "figures": False},
                                 args.settings, None)  # fmt: skip
        start = time.perf_counter()
        summary = run_demo(settings)
        seconds = time.perf_counter() - start
        t = summary["table"]
        rows.append({"seed": seed, "seconds": round(seconds, 1), "diff": summary["diff"],
                     "miou": {k: t[k].get("miou") for k in t}, "spatial": {k: t[k].get("spatial") for k in t},
                     "binding": {k: t[k].get("binding") for k in t}, "mg": {k: t[k].get("mg") for k in t},
                     "map_corr": {k: t[k].get("map_corr") for k in t},
                     "specificity": {k: t[k].get("specificity") for k in t},
                     "diff_base": summary.get("diff_base"),
                     "verdict": summary["verdict"]})  # fmt: skip
        print(f"seed {seed}: {seconds:.0f} s; {summary['verdict']}", flush=True)
    k = len(rows[0]["diff"]["diff"])
    report = {
        "seeds": [r["seed"] for r in rows],
        "settings": args.settings,
        "runs": rows,
        "mean_diff": [],
        "std_diff": [],
    }
    # the seeds' mean with its sampling error (independent runs): what the verdict over seeds can detect
    pooled = pooled_difference([r["diff"] for r in rows])
    report["pooled"] = pooled
    if all(r.get("diff_base") for r in rows):
        report["pooled_base"] = pooled_difference([r["diff_base"] for r in rows])
    print("\nTokenCompose - control (percentage points), per seed [95% CI]; mean ± std over seeds")
    for j in range(1, k):
        vals = [r["diff"]["diff"][j] for r in rows]
        cells = ", ".join(f"{d['diff'][j]:+.1f} [{d['ci95'][j][0]:+.1f}, {d['ci95'][j][1]:+.1f}]"
                          for d in (r["diff"] for r in rows))  # fmt: skip
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        mdes = [r["diff"]["mde"][j] for r in rows if r["diff"]["mde"][j] is not None]  # None: no spread
        mde = f"{statistics.fmean(mdes):.1f}" if mdes else "undefined"
        report["mean_diff"].append(statistics.fmean(vals))
        report["std_diff"].append(sd)
        ci, pmde = pooled["ci95"][j], pooled["mde"][j]
        both = (f"pooled [{ci[0]:+.2f}, {ci[1]:+.2f}], MDE {pmde:.1f}" if ci is not None and pmde is not None
                else "pooled: undefined (no spread)")  # fmt: skip
        print(f"MG{j + 1}: {cells}; mean {statistics.fmean(vals):+.2f} ± {sd:.2f}; MDE per run {mde}; {both}")
    d_miou = [r["miou"]["tokencompose"] - r["miou"]["control"] for r in rows]
    print(f"grounding mIoU TC - control: {statistics.fmean(d_miou):+.3f} ± {statistics.pstdev(d_miou):.3f}")
    for key in ("spatial", "binding", "map_corr", "specificity"):
        for arm in ("base", "control", "tokencompose"):
            vals = [r[key][arm] for r in rows if r[key].get(arm) is not None]
            if vals:
                print(f"{key} {arm}: {statistics.fmean(vals):.3f} (per seed {', '.join(f'{v:.3f}' for v in vals)})")
    if "pooled_base" in report:
        pb = report["pooled_base"]
        cells = "; ".join(f"MG{j + 1} {pb['diff'][j]:+.2f}" + (f" [{pb['ci95'][j][0]:+.2f}, {pb['ci95'][j][1]:+.2f}]"
                          if pb["ci95"][j] is not None else "") for j in range(1, k))  # fmt: skip
        print(f"TokenCompose - base, pooled over seeds: {cells}")
    print(f"wall time per run: {', '.join(str(r['seconds']) for r in rows)} s")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "replicates.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
