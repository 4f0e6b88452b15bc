"""MultiGen end to end: detect a folder of generated images (resumable), score, write the results JSON.

Detections are stored per image (JSON lines, one file per shard); scoring reads them back, so scoring,
rescoring at another threshold and merging shards need no GPU.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tokencompose.evaluation.detectors import Detector
from tokencompose.evaluation.generation import image_name
from tokencompose.evaluation.prompts import Prompt, vocabulary
from tokencompose.evaluation.results import (
    append_detections,
    detections_path,
    now_iso,
    package_versions,
    read_detections,
)
from tokencompose.evaluation.scoring import image_key, score_multigen

log = logging.getLogger(__name__)

QUERY_MODES = ("vocabulary", "prompt")


def prompts_digest(prompts: Sequence[Prompt]) -> str:
    """SHA-256 of the prompt set's content, so a results file names exactly what was scored."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(f"{p.uid}\t{'|'.join(p.categories)}\t{p.text}\n".encode())
    return h.hexdigest()


def detect_folder(
    detector: Detector,
    prompts: Sequence[Prompt],
    image_dir: str | Path,
    out_dir: str | Path,
    images_per_prompt: int,
    queries: str = "vocabulary",
    batch_size: int = 16,
    shard: int = 0,
    num_shards: int = 1,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run ``detector`` on this shard's images that have no detections yet; returns all detections in ``out_dir``.

    ``queries``: ``vocabulary`` asks every image for every category of the prompt set (what the paper's
    detections show: classes outside the prompt appear in them), ``prompt`` only for the prompt's own.
    """
    from PIL import Image

    if queries not in QUERY_MODES:
        raise ValueError(f"queries must be one of {QUERY_MODES}, got {queries!r}")
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = detections_path(out_dir, shard, num_shards)
    done = read_detections(out_dir) if any(out_dir.glob("detections*.jsonl")) else {}
    vocab = vocabulary(prompts)
    jobs = [(p, i) for p in prompts for i in range(images_per_prompt)][shard::num_shards]
    todo = [(p, i) for p, i in jobs if image_key(p.uid, i) not in done]
    missing = [image_name(p.uid, i) for p, i in todo if not (image_dir / image_name(p.uid, i)).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images missing in {image_dir}, e.g. {missing[:3]}; generate first")
    for b in range(0, len(todo), batch_size):
        batch = todo[b : b + batch_size]
        images = []
        for p, i in batch:
            with Image.open(image_dir / image_name(p.uid, i)) as im:
                images.append(im.convert("RGB"))
        qs = [vocab if queries == "vocabulary" else list(p.categories) for p, _ in batch]
        dets = detector.detect(images, qs)
        append_detections(path, [(image_key(p.uid, i), d) for (p, i), d in zip(batch, dets, strict=True)])
        if on_batch:
            on_batch(min(b + batch_size, len(todo)), len(todo))
    return read_detections(out_dir)


def multigen_result(
    detections: dict[str, dict[str, Any]],
    prompts: Sequence[Prompt],
    images_per_prompt: int,
    threshold: float = 0.1,
    bootstrap: int = 1000,
    bootstrap_seed: int = 0,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The results record: scores plus ``provenance`` (``model``, ``prompts``, ``generation``, ``detector``, ...)."""
    scores = score_multigen(detections, prompts, images_per_prompt, threshold, bootstrap, bootstrap_seed)
    return {
        "kind": "multigen",
        **(provenance or {}),
        "threshold": threshold,
        "scores": scores,
        "environment": package_versions(),
        "created": now_iso(),
    }
