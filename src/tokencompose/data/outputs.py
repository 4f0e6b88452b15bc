"""Multi-file outputs that are complete or visibly not: atomic files and a completion marker per folder.

Rule: a command never writes into a folder it did not create, unless that folder is a completed output
of the same command with the same settings (then it is reused as it is). Every command that writes
a folder of files (``prepare shapes``, ``prepare coco``, the latent cache) claims the folder first
with :func:`claim_output_dir`, which writes the marker :data:`MARKER` (``{"command", "settings",
"state": "in_progress"}``); after the last file it calls :func:`mark_complete`. So:

- a missing or empty folder is claimed;
- our marker, ``in_progress``, same settings: an interrupted run; it is redone;
- our marker, ``complete``, same settings: reused, nothing is written;
- our marker with other settings, or a non-empty folder without our marker: refused
  (:class:`~tokencompose.errors.UserError` naming the folder and what to do).

Files the consumer reads (``metadata.jsonl``, the marker) are written to a temporary sibling, flushed
to disk and renamed (:func:`tokencompose.atomic.atomic_writer`), so a reader sees the whole file or none.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tokencompose.atomic import atomic_write_text, atomic_writer  # noqa: F401  (part of this module's API)
from tokencompose.errors import UserError

MARKER = ".tokencompose_output.json"
IN_PROGRESS, COMPLETE = "in_progress", "complete"


def _canonical(settings: Mapping[str, Any]) -> Any:
    """Settings as JSON would store them (tuples -> lists), so a stored copy compares equal."""
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def read_marker(folder: str | Path) -> dict[str, Any] | None:
    """The folder's marker, or None when there is none (or it is unreadable: then it is not ours)."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def claim_output_dir(
    folder: str | Path,
    command: str,
    settings: Mapping[str, Any],
    intact: Callable[[dict[str, Any]], bool] | None = None,
) -> dict[str, Any] | None:
    """Claim ``folder`` for ``command`` with ``settings``; returns the marker of a reusable complete output.

    Returns None when the caller must (re)write the folder (the marker now says ``in_progress``);
    returns the stored marker (with the caller's ``complete`` summary) when the folder already holds a
    completed output of the same command and settings that ``intact(marker)`` accepts (a complete
    output whose files were since deleted is redone). Raises :class:`UserError` for a foreign
    non-empty folder or one written with other settings.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"output folder {folder} is a file; choose a folder path for the output")
    wanted = _canonical(settings)
    marker = read_marker(folder) if folder.is_dir() else None
    if marker is None:
        if folder.is_dir() and any(folder.iterdir()):
            raise UserError(
                f"output folder {folder} already exists, is not empty and was not written by `{command}`; "
                "refusing to write into it: choose a new or empty folder (or check the path for a typo)"
            )
    elif marker.get("command") != command or marker.get("settings") != wanted:
        changed = _changed_keys(marker.get("settings"), wanted)
        what = f"`{marker.get('command')}`" if marker.get("command") != command else f"other settings ({changed})"
        raise UserError(
            f"output folder {folder} holds the output of {what}; refusing to overwrite it: "
            "choose a new folder, or delete that one to rebuild it"
        )
    elif marker.get("state") == COMPLETE and (intact is None or intact(marker)):
        return marker
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / MARKER, json.dumps({"command": command, "settings": wanted, "state": IN_PROGRESS}))
    return None


def mark_complete(folder: str | Path, command: str, settings: Mapping[str, Any], **summary: Any) -> None:
    """Record that ``folder`` holds the complete output (the last write of a command)."""
    marker = {"command": command, "settings": _canonical(settings), "state": COMPLETE, **summary}
    atomic_write_text(Path(folder) / MARKER, json.dumps(marker, indent=2, default=str))


def _changed_keys(old: Any, new: Mapping[str, Any]) -> str:
    if not isinstance(old, dict):
        return "unknown"
    return ", ".join(sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))) or "unknown"


def count_lines(path: str | Path) -> int:
    """Number of non-blank lines of a text file (0 when it does not exist)."""
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0
