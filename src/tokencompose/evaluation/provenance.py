"""Provenance of generated images and detections: record what made them, refuse to reuse what does not match.

A MultiGen folder is resumable, so a rerun skips what is already there. That is only sound when what is
there was made by the *same* run: an image of prompt 3 drawn with another ``--prompt-seed`` has another
text, a detection made by another detector or query mode has other scores. So every artefact carries its
provenance and a rerun compares it before reusing anything:

- a folder-level record (``generation.json`` next to the images, ``detection.json`` next to the detections):
  every setting that changes the artefacts. Written once (atomically; shards write the same content), and
  compared field by field on every later run.
- a per-image record inside each PNG (a ``tEXt`` chunk): prompt id, prompt text, image index, image seed and
  the digest of the folder record. It travels with the file and is written in the same atomic rename, so it
  is shard-safe by construction and survives a lost or replaced ``generation.json``.
- per detection row: the prompt text and the fingerprint of the image it was made from.

A mismatch raises :class:`~tokencompose.errors.UserError` naming the folder and the first differing field.
A PNG that does not read back whole (truncated, empty) is not a mismatch but a broken file: generation
redoes it (same seed, same provenance), scoring names it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokencompose.errors import UserError
from tokencompose.evaluation.results import write_json_atomic

PNG_KEY = "tokencompose"  # the PNG text chunk holding an image's provenance
IMAGE_FIELDS = ("prompt", "uid", "index", "seed", "settings")  # compared in this order
_BROKEN = (OSError, SyntaxError, ValueError, EOFError)  # what PIL raises on a truncated or foreign file


def digest(record: Mapping[str, Any]) -> str:
    """SHA-256 of a record's canonical JSON (key order does not matter)."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def first_mismatch(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> tuple[str, Any, Any] | None:
    """``(dotted field, old value, new value)`` of the first field (sorted, depth first) that differs, else None."""
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            found = first_mismatch(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}", a, b
    return None


def refusal(folder: Path, what: str, field: str, old: Any, new: Any) -> UserError:
    """The one message for "this folder holds something else": folder, first field, both values, what to do."""
    return UserError(
        f"{folder} holds {what} made with other settings: {field} is {_short(old)} there, {_short(new)} now; "
        f"use a new --out (or --images) folder, or delete {folder} to start over"
    )


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_folder_record(folder: Path, filename: str, record: Mapping[str, Any], what: str) -> None:
    """Compare ``record`` with the one stored in ``folder/filename`` (refuse on a difference), or store it.

    Every shard of a run calls this with the same record; each writes through its own temporary file and
    renames, so concurrent first writes leave one complete, identical file.
    """
    path = folder / filename
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"{path} is unreadable ({err}): delete {folder} or use a new --out folder") from err
        found = first_mismatch(old, dict(record))
        if found:
            raise refusal(folder, what, *found)
        return
    write_json_atomic(path, dict(record))


def image_record(uid: int, index: int, prompt: str, seed: int, settings_digest: str) -> dict[str, Any]:
    """What one image was made from (stored in its PNG; compared in :data:`IMAGE_FIELDS` order)."""
    return {"prompt": prompt, "uid": uid, "index": index, "seed": seed, "settings": settings_digest}


def png_info(record: Mapping[str, Any]) -> Any:
    """A ``PngInfo`` carrying ``record`` as the :data:`PNG_KEY` text chunk (deterministic bytes)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PNG_KEY, json.dumps(record, sort_keys=True, separators=(",", ":")))
    return info


def read_png(path: Path) -> tuple[bool, dict[str, Any] | None]:
    """``(intact, provenance)`` of a PNG: intact when every chunk reads back with a valid CRC up to IEND.

    ``verify`` reads the whole file without decoding pixels, so it catches a truncated or empty file at a
    fraction of the cost of decoding it.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            text = im.info.get(PNG_KEY)
            im.verify()
    except _BROKEN:
        return False, None
    try:
        record = json.loads(text) if text else None
    except json.JSONDecodeError:
        record = None
    return True, record if isinstance(record, dict) else None


def check_image(path: Path, expected: Mapping[str, Any]) -> bool:
    """True when the image at ``path`` is intact and was made from ``expected``; False when it is broken.

    Raises :class:`UserError` when it is intact but made from something else (or by something that did not
    record its provenance): never reuse it, never overwrite it silently.
    """
    intact, record = read_png(path)
    if not intact:
        return False
    folder = path.parent
    if record is None:
        raise UserError(
            f"{folder} holds {path.name} without a provenance record (made by another tool or an older "
            f"version): use a new --out (or --images) folder, or delete {folder} to start over"
        )
    for name in IMAGE_FIELDS:
        if record.get(name) != expected.get(name):
            raise refusal(folder, f"images ({path.name})", "prompt text" if name == "prompt" else name,
                          record.get(name), expected.get(name))  # fmt: skip
    return True


def image_fingerprint(path: Path) -> str | None:
    """What a detection was made from: the digest of the image's provenance record, else of its bytes.

    The provenance digest is stable when a broken image is regenerated (same prompt, seed and settings);
    images of other tools have no record and are fingerprinted by content. None for a broken file.
    """
    intact, record = read_png(path)
    if not intact:
        return None
    if record is not None:
        return "provenance:" + digest(record)
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
