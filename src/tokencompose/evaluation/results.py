"""Results on disk: detections (JSON lines, crash-tolerant, shard-mergeable), results JSON, comparison tables.

A results JSON records what produced the numbers (model, checkpoint, detector id and revision, threshold,
seeds, sampler settings, package versions) next to the numbers, and names the detections file, so
rescoring at another threshold reads detections only: no GPU.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tokencompose.atomic import write_json_atomic  # noqa: F401  (re-exported)
from tokencompose.console import number
from tokencompose.errors import UserError
from tokencompose.versions import package_versions  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

DETECTIONS_GLOB = "detections*.jsonl"


def detections_path(out_dir: str | Path, shard: int = 0, num_shards: int = 1) -> Path:
    """One file per shard, so processes never write the same file."""
    name = "detections.jsonl" if num_shards == 1 else f"detections-{shard:05d}-of-{num_shards:05d}.jsonl"
    return Path(out_dir) / name


def append_detections(path: str | Path, rows: Iterable[tuple[str, Mapping[str, Any]]]) -> None:
    """Append ``(key, detection)`` rows as JSON lines and flush them to disk (a crash keeps finished batches)."""
    with open(path, "a", encoding="utf-8") as f:
        for key, det in rows:
            f.write(json.dumps({"key": key, **det}, separators=(",", ":")) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_detections(paths: Sequence[str | Path] | str | Path) -> dict[str, dict[str, Any]]:
    """Merge detection files (a folder: every ``detections*.jsonl`` in it) into ``{key: detection}``.

    A line cut short by a crash is skipped with a warning; a later line for the same key wins.
    """
    if isinstance(paths, (str, Path)):
        p = Path(paths)
        paths = sorted(p.glob(DETECTIONS_GLOB)) if p.is_dir() else [p]
    out: dict[str, dict[str, Any]] = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    log.warning("%s:%d: unreadable line skipped (interrupted write?)", path, n)
                    continue
                out[row.pop("key")] = row
    return out


def device_description(device: Any = None) -> str:
    """A human-readable device name (GPU model where there is one)."""
    import torch

    device = torch.device(device or "cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


RESULT_KINDS = ("multigen", "grounding", "visor", "fid", "latency", "compbench", "clipscore", "shapes_exact",
                "mask_quality", "suite")  # fmt: skip

# The headline numbers of each metric's results, as (column label, dotted path into "scores"): what `compare`
# and the report show for kinds without a table of their own.
HEADLINES: dict[str, tuple[tuple[str, str], ...]] = {
    "visor": (("object acc.", "object_accuracy"), ("VISOR uncond", "visor_uncond"), ("VISOR cond", "visor_cond")),
    "fid": (("FID", "fid"), ("KID", "kid_mean"), ("KID ±", "kid_std")),
    "latency": (("s / image", "seconds_per_image"), ("±", "std")),
    "compbench": tuple((c, f"{c}.mean") for c in ("color", "shape", "texture", "non_spatial")),
    "clipscore": (("CLIP score", "clip_score.mean"), ("cosine", "cosine.mean")),
    "shapes_exact": (("spatial object acc.", "spatial.object_accuracy"), ("VISOR cond", "spatial.visor_cond"),
                     ("colour binding", "attribute.binding_score"), ("colour swaps", "attribute.swap_rate")),
    "mask_quality": (("mask IoU", "overall.mask_iou"), ("box IoU", "overall.box_iou"), ("misses", "overall.misses")),
}  # fmt: skip


def headline(result: Mapping[str, Any]) -> dict[str, float | None]:
    """A result's headline numbers by label (None where its scores lack one, e.g. a category not run)."""
    out: dict[str, float | None] = {}
    for label, path in HEADLINES.get(str(result.get("kind")), ()):
        node: Any = result.get("scores")
        for part in path.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        out[label] = float(node) if isinstance(node, int | float) else None
    return out


def load_result(path: str | Path) -> dict[str, Any]:
    """A results file of ``tokencompose evaluate``; anything else (missing, empty, other JSON) is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"results file {path} does not exist: pass a results.json written by tokencompose evaluate")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"results file {path} is empty or not JSON ({err}): evaluate again to rewrite it") from err
    body = "cells" if isinstance(data, dict) and data.get("kind") == "suite" else "scores"
    if not isinstance(data, dict) or data.get("kind") not in RESULT_KINDS or not isinstance(data.get(body), dict):
        raise UserError(f"{path} is not a results file of tokencompose evaluate (kinds: {', '.join(RESULT_KINDS)})")
    data.setdefault("_path", str(path))
    return data


def _label(result: Mapping[str, Any]) -> str:
    if result.get("name"):
        return str(result["name"])
    model = result.get("model") or {}
    return str(model.get("unet") or model.get("lora") or model.get("base") or result.get("_path", "?"))


def compare(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Side-by-side rows of several results files (any kind: MultiGen, grounding, suites, headline metrics)."""
    rows = []
    for r in results:
        row: dict[str, Any] = {"name": _label(r), "kind": r.get("kind"), "path": r.get("_path")}
        if r.get("kind") == "multigen":
            s = r["scores"]
            row.update(
                prompts=(r.get("prompts") or {}).get("name"),
                detector=(r.get("detector") or {}).get("id"),
                threshold=s["threshold"],
                mg_percent=s["mg_percent"],
                mg_std=s["mg_std"],
                mg_ci95=s.get("mg_ci95"),
            )
        elif r.get("kind") == "grounding":
            row.update(
                miou=r["scores"]["miou"],
                thresholds=r["scores"]["thresholds"],
                best_miou=max(r["scores"]["miou"]),
                auroc=r["scores"]["auroc"],
                map_correlation=r["scores"].get("map_correlation"),  # absent from results before 2026-12-03
                specificity=r["scores"].get("specificity"),  # absent from results before 2026-12-03, evening
                timesteps=r["scores"].get("timesteps"),
            )
        elif r.get("kind") == "suite":
            row.update(preset=r.get("preset"), seeds=r.get("seeds"), cells=r["cells"])
        else:
            row.update(headline=headline(r))
        rows.append(row)
    return {"rows": rows, "created": now_iso()}


def markdown_table(table: Mapping[str, Any]) -> str:
    """The comparison as markdown: MultiGen rows (MG_k ± std), grounding rows, one Table 1 per suite preset (with
    the paper's rows), and one table of headline numbers per other kind."""
    lines: list[str] = []
    mg = [r for r in table["rows"] if r["kind"] == "multigen"]
    if mg:
        kmax = max(len(r["mg_percent"]) for r in mg)
        ks = range(2, kmax + 1) if kmax > 1 else range(1, 2)  # the paper reports MG2..MG5
        head = ["model", "prompts", "detector", "thr"] + [f"MG{k}" for k in ks]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in mg:
            cells = [r["name"], str(r["prompts"]), str(r["detector"]), f"{r['threshold']:g}"]
            for k in ks:
                cells.append(
                    f"{r['mg_percent'][k - 1]:.2f} ± {r['mg_std'][k - 1]:.2f}" if k <= len(r["mg_percent"]) else "-"
                )
            lines.append("| " + " | ".join(cells) + " |")
    gr = [r for r in table["rows"] if r["kind"] == "grounding"]
    if gr:
        if lines:
            lines.append("")
        head = ["model", "best mIoU", "AUROC", "map correlation", "specificity", "timesteps"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in gr:
            corr, spec = (number(r.get(k), missing="-") for k in ("map_correlation", "specificity"))
            lines.append(
                f"| {r['name']} | {r['best_miou']:.4f} | {r['auroc']:.4f} | {corr} | {spec} | {r['timesteps']} |"
            )
    for preset in dict.fromkeys(r["preset"] for r in table["rows"] if r["kind"] == "suite"):
        from tokencompose.evaluation.suite import suite_markdown  # lazy: the suite imports every metric

        records = [{"name": r["name"], "preset": preset, "seeds": r["seeds"], "cells": r["cells"]}
                   for r in table["rows"] if r["kind"] == "suite" and r["preset"] == preset]  # fmt: skip
        lines += ([""] if lines else []) + suite_markdown(records).rstrip("\n").splitlines()
    for kind in dict.fromkeys(r["kind"] for r in table["rows"] if "headline" in r):
        labels = [label for label, _ in HEADLINES[kind]]
        lines += ([""] if lines else []) + ["| model | " + " | ".join(f"{kind}: {x}" for x in labels) + " |",
                                            "|---" * (len(labels) + 1) + "|"]  # fmt: skip
        for r in (r for r in table["rows"] if r["kind"] == kind):
            cells = [number(r["headline"][x], ".4g", "-") for x in labels]
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
