"""MultiGen end to end: detect a folder of generated images (resumable), score, write the results JSON.

Detections are stored per image (JSON lines, one file per shard); scoring reads them back, so scoring,
rescoring at another threshold and merging shards need no GPU. ``detection.json`` records the detector
settings, and each row the prompt text and the fingerprint of its image: a rerun reuses only rows that
match (:mod:`tokencompose.evaluation.provenance`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tokencompose.errors import UserError
from tokencompose.evaluation.detectors import Detector
from tokencompose.evaluation.generation import image_name
from tokencompose.evaluation.prompts import Prompt, vocabulary
from tokencompose.evaluation.provenance import (
    check_folder_record,
    digest,
    first_mismatch,
    image_fingerprint,
    refusal,
)
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
DETECTION_FILE = "detection.json"


def prompts_digest(prompts: Sequence[Prompt]) -> str:
    """SHA-256 of the prompt set's content, so a results file names exactly what was scored."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(f"{p.uid}\t{'|'.join(p.categories)}\t{p.text}\n".encode())
    return h.hexdigest()


def detection_record(
    kind: str, name: str, template: str, queries: str, prompts: Sequence[Prompt], dtype: Any, revision: str | None
) -> dict[str, Any]:
    """Every setting that changes a stored detection (the threshold does not: it applies at scoring)."""
    vocab = vocabulary(prompts)
    return {
        "kind": kind,
        "detector": str(name),
        "revision": revision,
        "template": template,
        "queries": queries,
        # In vocabulary mode every image is asked for every category of the set, and boxes compete.
        "vocabulary": {"size": len(vocab), "sha256": digest({"v": vocab})} if queries == "vocabulary" else None,
        "dtype": None if kind == "shapes" else str(dtype),
    }


def detector_record(detector: Detector, queries: str, prompts: Sequence[Prompt]) -> dict[str, Any]:
    """:func:`detection_record` of a loaded detector."""
    model = getattr(detector, "model", None)
    kind = model.config.model_type if model is not None else str(detector.name)
    revision = getattr(detector, "resolved_revision", None)
    dtype = getattr(detector, "dtype", None)
    return detection_record(kind, detector.name, detector.template, queries, prompts, dtype, revision)


def precheck_detections(out_dir: Path, record: dict[str, Any]) -> None:
    """Refuse early (before generating) when ``out_dir`` holds detections of another detector setup.

    Compare-only: the revision is left out (a hub id resolves it when the model loads), the full record is
    checked and stored by :func:`detect_folder`.
    """
    import json

    path = out_dir / DETECTION_FILE
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return  # detect_folder reports it
    found = first_mismatch({k: v for k, v in old.items() if k != "revision"}, {**record, "revision": None})
    if found:
        raise refusal(out_dir, "detections", *found)


def _check_row(out_dir: Path, key: str, row: dict[str, Any], prompt: Prompt, expected: dict[str, str | None]) -> None:
    """Refuse a stored detection made with other settings, for another prompt text or from another image."""
    if "settings" not in row:
        raise UserError(
            f"{out_dir} holds detections without a provenance record (made by an older version): "
            f"use a new --out folder, or delete its detections*.jsonl to detect again"
        )
    for name, have, want in (
        ("settings", row["settings"], expected["settings"]),
        ("prompt text", row.get("prompt"), prompt.text),
        ("image", row.get("image"), expected["image"]),
    ):
        if want is not None and have != want:
            raise refusal(out_dir, f"detections ({key})", name, have, want)


def _load_rgb(path: Path) -> Any:
    """The image at ``path`` as RGB, or a :class:`UserError` naming it when it does not decode."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(
            f"image {path} cannot be read ({err}): delete it and run again without --skip-generation to make it"
        ) from err


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
    Stored detections are reused only when made with the same detector settings, for the same prompt text
    and from the same image; otherwise :class:`UserError` names the folder and the first differing field.
    """
    if queries not in QUERY_MODES:
        raise ValueError(f"queries must be one of {QUERY_MODES}, got {queries!r}")
    vocab = vocabulary(prompts)

    def run(images: list[Any], batch: list[Prompt]) -> list[dict[str, Any]]:
        return detector.detect(images, [vocab if queries == "vocabulary" else list(p.categories) for p in batch])

    record = detector_record(detector, queries, prompts)
    return detect_pending(run, record, prompts, image_dir, out_dir, images_per_prompt, batch_size, shard, num_shards,
                          on_batch)  # fmt: skip


def detect_pending(
    run: Callable[[list[Any], list[Prompt]], list[dict[str, Any]]],
    record: dict[str, Any],
    prompts: Sequence[Prompt],
    image_dir: str | Path,
    out_dir: str | Path,
    images_per_prompt: int,
    batch_size: int = 16,
    shard: int = 0,
    num_shards: int = 1,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """The resumable, provenance-checked detection loop: ``run(images, prompts)`` on this shard's undetected images.

    ``record`` describes the detector settings (stored in ``detection.json``; another folder's is refused);
    each stored row carries its digest, the prompt text and the image's fingerprint, and is reused only when
    all three still match (else :class:`UserError` names the folder and the first differing field). Returns
    every detection in ``out_dir``. MultiGen and VISOR detect through it.
    """
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_folder_record(out_dir, DETECTION_FILE, record, "detections")
    settings = digest(record)
    path = detections_path(out_dir, shard, num_shards)
    done = read_detections(out_dir) if any(out_dir.glob("detections*.jsonl")) else {}
    jobs = [(p, i) for p in prompts for i in range(images_per_prompt)][shard::num_shards]
    todo = []
    for p, i in jobs:
        key, image = image_key(p.uid, i), image_dir / image_name(p.uid, i)
        if key not in done:
            todo.append((p, i))
        else:
            # An image deleted (or broken) since it was detected cannot be compared; its row stays valid.
            fingerprint = image_fingerprint(image) if image.is_file() else None
            _check_row(out_dir, key, done[key], p, {"settings": settings, "image": fingerprint})
    missing = [image_name(p.uid, i) for p, i in todo if not (image_dir / image_name(p.uid, i)).is_file()]
    if missing:
        raise UserError(f"{len(missing)} images missing in {image_dir}, e.g. {missing[:3]}; generate them first")
    for b in range(0, len(todo), batch_size):
        batch = todo[b : b + batch_size]
        files = [image_dir / image_name(p.uid, i) for p, i in batch]
        dets = run([_load_rgb(f) for f in files], [p for p, _ in batch])
        rows = [
            (image_key(p.uid, i), {"settings": settings, "prompt": p.text, "image": image_fingerprint(f), **d})
            for (p, i), f, d in zip(batch, files, dets, strict=True)
        ]
        append_detections(path, rows)
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
