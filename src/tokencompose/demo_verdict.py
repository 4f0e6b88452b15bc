"""What a demo run's results say: the per-arm table, the paired MG_k effects and the verdict in words.

Pure readers of the result files ``tokencompose.demo`` writes (MultiGen, grounding and exact-score
``results.json`` per arm); nothing here trains or samples.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def summarize(results: dict[str, dict[str, Path]]) -> dict[str, Any]:
    """``{model: {"mg": [...], "mg_ci": [...], "miou": x, "auroc": y, "map_corr": z, ...}}`` from the result files."""
    table = {}
    for name, files in results.items():
        row: dict[str, Any] = {}
        if files["multigen"].is_file():
            sc = json.loads(files["multigen"].read_text())["scores"]
            row["mg"] = sc.get("mg_percent")
            row["mg_ci"] = sc.get("mg_ci95") or sc.get("ci95")
        if files["grounding"].is_file():
            g = json.loads(files["grounding"].read_text())["scores"]
            row["miou"], row["auroc"] = g.get("best_miou"), g.get("auroc")
            row["map_corr"] = g.get("map_correlation")  # do the phrases' maps differ (1: all alike)
            row["specificity"] = g.get("specificity")  # ... and each on its own object (0.5: chance)
            row["specificity_ci"] = g.get("specificity_ci95")  # bootstrap over the scenes
        if files.get("exact") is not None and files["exact"].is_file():
            ex = json.loads(files["exact"].read_text())["scores"]
            row["spatial"] = (ex.get("spatial") or {}).get("visor_uncond")
            row["binding"] = (ex.get("attribute") or {}).get("binding_score")
        table[name] = row
    return table


def paired_effect(
    results: dict[str, dict[str, Path]], prompts: Path, images_per_prompt: int, seed: int, reference: str = "control"
) -> dict:
    """TokenCompose minus ``reference`` (the control, or the base) on MG_k, image for image (same prompts and
    seeds): difference, CI, MDE."""
    from tokencompose.evaluation.prompts import load_prompts
    from tokencompose.evaluation.results import read_detections
    from tokencompose.evaluation.scoring import found_counts, paired_difference

    plist = load_prompts(prompts)
    counts = {}
    for arm in ("tokencompose", reference):
        mg = results[arm]["multigen"]
        threshold = json.loads(mg.read_text())["threshold"]
        counts[arm] = found_counts(read_detections(mg.parent), plist, images_per_prompt, threshold)
    k = max(len(p.categories) for p in plist)
    return paired_difference(counts["tokencompose"], counts[reference], k, seed=seed)


def _points(value: float | None) -> str:
    """A minimum detectable effect in points, or why there is none (no spread between prompts)."""
    return "undefined (no spread)" if value is None else f"{value:.1f}"


def _cells(effect: dict[str, Any]) -> str:
    """``MG2 +1.0 [-2.0, +4.0]; MG3 ...``: a paired difference per MG_k (MG2..MG_K) with its 95% CI."""
    d, ci = effect["diff"], effect["ci95"]
    return "; ".join(f"MG{k + 1} {d[k]:+.1f} [{ci[k][0]:+.1f}, {ci[k][1]:+.1f}]" for k in range(1, len(d)))


def verdict(table: dict[str, Any], effect: dict[str, Any] | None = None, against_base: dict | None = None) -> str:
    """A plain statement of whether TokenCompose beat the control: the paired MG_k differences and grounding.

    With ``effect`` (:func:`paired_effect`) the verdict is the difference TokenCompose - control per MG_k with its
    95% CI (a CI above zero is a win on that k, below zero a loss) and the minimum detectable effect; without
    it, the older comparison of each arm's own CIs. ``against_base`` (:func:`paired_effect` with the base as
    reference) adds TokenCompose - base: whether the fine-tuned model draws more than the one it started from.
    """
    tc, ctl = table.get("tokencompose", {}), table.get("control", {})
    if not tc.get("mg") or not ctl.get("mg"):
        return "MultiGen scores missing: no verdict."
    d_iou = (tc.get("miou") or 0) - (ctl.get("miou") or 0)
    grounding = (f"changed the attention-grounding mIoU by {d_iou:+.3f} "
                 f"({tc.get('miou') or 0:.3f} vs {ctl.get('miou') or 0:.3f})")  # fmt: skip
    if effect:
        ks = range(1, len(effect["diff"]))  # MG2..MG_K, as the paper reports
        won = [f"MG{k + 1}" for k in ks if effect["ci95"][k][0] > 0]
        lost = [f"MG{k + 1}" for k in ks if effect["ci95"][k][1] < 0]
        mde = ", ".join(f"MG{k + 1} {_points(effect['mde'][k])}" for k in ks)
        if won and not lost:
            head = f"TokenCompose beat the control on {', '.join(won)} (95% CI of the paired difference above zero)"
        elif lost and not won:
            head = f"TokenCompose did worse than the control on {', '.join(lost)}"
        elif won:
            head = f"TokenCompose beat the control on {', '.join(won)} and did worse on {', '.join(lost)}"
        else:
            head = "No MG_k difference between TokenCompose and the control is distinguishable from zero"
        base = (
            f" Against the base it was fine-tuned from, TokenCompose - base: {_cells(against_base)}."
            if against_base
            else ""
        )
        return (f"{head}. TokenCompose - control, percentage points with 95% CIs over "
                f"{effect['num_prompts']} prompts: {_cells(effect)}. This design detects true differences of {mde} "
                f"points (80% power).{base} TokenCompose {grounding}.")  # fmt: skip
    d_mg = round(sum(tc["mg"][1:]) - sum(ctl["mg"][1:]), 2)  # percentages: 0.01 is below one image
    mg_word = "beat" if d_mg > 0 else ("tied with" if d_mg == 0 else "did not beat")
    return f"TokenCompose {mg_word} the control on MultiGen (sum of MG2..MG5 {d_mg:+.2f} points) and {grounding}."
