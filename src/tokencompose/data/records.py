"""Training records and the one on-disk format every source writes (the paper's ``metadata.jsonl``).

A row is ``{"file_name", "text", "attn_list": [[phrase, mask_path | null], ...]}`` plus an optional
``"boxes": [[x0, y0, x1, y1] | null, ...]`` aligned with ``attn_list`` (pixels of the original image).
Relative paths are relative to the folder of the jsonl file. Bad lines never crash a run: they are
reported with their line number and counted by reason (see :class:`DropCounter`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokencompose.atomic import atomic_writer

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]

# Every reason a record, phrase or line can be dropped (or fixed up) for; one string each so that
# counts can travel through DataLoader workers inside batches.
MALFORMED_LINE = "malformed_line"
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
IMAGE_NOT_A_FILE = "image_not_a_regular_file"  # a FIFO, device or folder: opening it could block forever
IMAGE_TOO_LARGE = "image_too_large"  # header claims more pixels than MAX_IMAGE_PIXELS (decompression bomb)
NULL_MASK = "null_mask"
MISSING_MASK = "missing_mask"
UNREADABLE_MASK = "unreadable_mask"
MASK_NOT_A_FILE = "mask_not_a_regular_file"
MASK_TOO_LARGE = "mask_too_large"
MASK_RESIZED = "mask_resized_to_image"  # not a drop: the mask was resized to the image, then cropped
MASK_ASPECT_MISMATCH = "mask_aspect_differs_from_image"  # stretching it would misplace the object
BAD_BOX = "bad_box"  # NaN/inf or empty box: the phrase keeps its mask, its box comes from the mask
EMPTY_MASK = "empty_mask_after_crop"
PHRASE_NOT_IN_CAPTION = "phrase_not_in_caption"
BEYOND_TOKEN_WINDOW = "phrase_beyond_token_window"
# The model's text encoders place the phrase at different positions (SDXL's tokenizer 2 reads a "!" in
# the caption as its pad token, so "?!" shifts what follows by one): no column holds only the phrase.
SPAN_DIFFERS = "phrase_span_differs_between_tokenizers"
DUPLICATE_PHRASE = "duplicate_phrase"
NO_USABLE_PHRASE = "no_usable_phrase"  # the sample is kept for the denoising loss only
MISSING_LATENT = "missing_latent"

# Every reason, in a fixed order (drop counts are summed across processes as one tensor).
ALL_REASONS: tuple[str, ...] = (
    MALFORMED_LINE,
    MISSING_IMAGE,
    UNREADABLE_IMAGE,
    IMAGE_NOT_A_FILE,
    IMAGE_TOO_LARGE,
    NULL_MASK,
    MISSING_MASK,
    UNREADABLE_MASK,
    MASK_NOT_A_FILE,
    MASK_TOO_LARGE,
    MASK_RESIZED,
    MASK_ASPECT_MISMATCH,
    BAD_BOX,
    EMPTY_MASK,
    PHRASE_NOT_IN_CAPTION,
    BEYOND_TOKEN_WINDOW,
    SPAN_DIFFERS,
    DUPLICATE_PHRASE,
    NO_USABLE_PHRASE,
    MISSING_LATENT,
)
# Record-level reasons: the whole sample was unusable (another record was trained on in its place).
RECORD_DROPS = frozenset(
    {MALFORMED_LINE, MISSING_IMAGE, UNREADABLE_IMAGE, IMAGE_NOT_A_FILE, IMAGE_TOO_LARGE, MISSING_LATENT}
)
# Counts that describe the data as the format allows it, not a broken input (see ``prepare official``).
INFORMATIONAL = frozenset(
    {MASK_RESIZED, NULL_MASK, NO_USABLE_PHRASE, DUPLICATE_PHRASE, PHRASE_NOT_IN_CAPTION, BEYOND_TOKEN_WINDOW,
     SPAN_DIFFERS}
)  # fmt: skip

_warned: set[str] = set()  # reasons already warned about in this process


def note_drop(dropped: list[str], reason: str, message: str, *args: Any) -> None:
    """Append ``reason`` to ``dropped`` and log ``message % args``: a warning the first time per reason
    in this process, debug after that (the counts go to the run's metrics, not the console)."""
    dropped.append(reason)
    if reason in _warned:
        log.debug(message, *args)
        return
    _warned.add(reason)
    log.warning(message + " (further %s drops are counted in the run's metrics, not logged)", *args, reason)


def valid_box(box: Box) -> bool:
    """A box is usable when all four values are finite and it has positive width and height."""
    x0, y0, x1, y1 = box
    return all(math.isfinite(v) for v in box) and x1 > x0 and y1 > y0


def mask_box(mask: np.ndarray) -> Box | None:
    """Bounding box ``(x0, y0, x1, y1)`` (exclusive max, pixels) of a bool ``[H, W]`` mask; None when it is empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


@dataclass(frozen=True)
class Phrase:
    """A noun phrase of a caption with its mask file (None = no mask) and box (x0, y0, x1, y1) or None."""

    text: str
    mask: str | None = None
    box: Box | None = None


@dataclass
class Record:
    """One training image: image path, caption, phrases."""

    image: str
    caption: str
    phrases: list[Phrase] = field(default_factory=list)


class MalformedRow(ValueError):
    """A jsonl line that cannot be turned into a :class:`Record`."""


def _resolve(root: Path | None, path: str | None) -> str | None:
    if path is None or root is None or os.path.isabs(path):
        return path
    return str(root / path)


def parse_row(row: Any, root: Path | None = None) -> Record:
    """One decoded jsonl row -> :class:`Record` (paths resolved against ``root``); raises :class:`MalformedRow`."""
    if not isinstance(row, dict):
        raise MalformedRow(f"expected a JSON object, got {type(row).__name__}")
    image, text = row.get("file_name"), row.get("text")
    if not isinstance(image, str) or not image:
        raise MalformedRow("missing or non-string 'file_name'")
    if not isinstance(text, str):
        raise MalformedRow("missing or non-string 'text'")
    attn = row.get("attn_list", [])
    if not isinstance(attn, list):
        raise MalformedRow("'attn_list' must be a list of [phrase, mask_path | null]")
    boxes = row.get("boxes")
    if boxes is not None and (not isinstance(boxes, list) or len(boxes) != len(attn)):
        raise MalformedRow("'boxes' must be a list aligned with 'attn_list'")
    phrases = []
    for k, item in enumerate(attn):
        if not (isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise MalformedRow(f"attn_list[{k}] must be [phrase, mask_path | null]")
        if item[1] is not None and not isinstance(item[1], str):
            raise MalformedRow(f"attn_list[{k}] mask path must be a string or null")
        box = None
        if boxes is not None and boxes[k] is not None:
            b = boxes[k]
            if not (isinstance(b, list | tuple) and len(b) == 4 and all(isinstance(v, int | float) for v in b)):
                raise MalformedRow(f"boxes[{k}] must be [x0, y0, x1, y1] or null")
            box = (float(b[0]), float(b[1]), float(b[2]), float(b[3]))
        phrases.append(Phrase(item[0], _resolve(root, item[1]), box))
    return Record(image=_resolve(root, image), caption=text, phrases=phrases)


def record_to_row(record: Record, root: Path | None = None) -> dict[str, Any]:
    """:class:`Record` -> jsonl row; paths under ``root`` are written relative to it."""

    def rel(p: str | None) -> str | None:
        if p is None or root is None:
            return p
        try:
            return os.path.relpath(p, root) if os.path.isabs(p) else p
        except ValueError:  # another drive on Windows
            return p

    row: dict[str, Any] = {
        "file_name": rel(record.image),
        "text": record.caption,
        "attn_list": [[p.text, rel(p.mask)] for p in record.phrases],
    }
    if any(p.box is not None for p in record.phrases):
        row["boxes"] = [None if p.box is None else [round(float(v), 2) for v in p.box] for p in record.phrases]
    return row


def iter_jsonl_lines(path: str | Path) -> Iterator[tuple[int, int, bytes]]:
    """Yield ``(line_number, byte_offset, raw_line)`` for every non-blank line (1-based line numbers)."""
    with open(path, "rb") as f:
        offset = 0
        for lineno, raw in enumerate(f, start=1):
            if raw.strip():
                yield lineno, offset, raw
            offset += len(raw)


def read_jsonl(
    path: str | Path, root: str | Path | None = None, errors: list[tuple[int, str]] | None = None
) -> list[Record]:
    """Read a Source-A jsonl file into records; malformed lines are logged with their line number and skipped.

    ``root`` defaults to the file's folder; ``errors`` (if given) receives ``(line_number, message)``.
    """
    base = Path(root) if root is not None else Path(path).resolve().parent
    records = []
    for lineno, _, raw in iter_jsonl_lines(path):
        try:
            records.append(parse_row(json.loads(raw), base))
        except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError and MalformedRow are ValueErrors
            log.warning("%s:%d: malformed line skipped: %s", path, lineno, err)
            if errors is not None:
                errors.append((lineno, str(err)))
    return records


def write_jsonl(path: str | Path, records: Iterable[Record]) -> int:
    """Write records as Source-A rows, paths relative to the file's folder; returns the number written.

    Atomic: rows go to a temporary sibling renamed onto ``path`` at the end, so an interrupted write
    (the records are often rendered on the fly) never leaves a short file that looks complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = path.resolve().parent
    n = 0
    with atomic_writer(path) as f:
        for record in records:
            f.write(json.dumps(record_to_row(record, root), ensure_ascii=False) + "\n")
            n += 1
    return n


class DropCounter:
    """Counts drops by reason over an epoch; fed with batches (``batch["dropped"]``) in the training loop.

    With DataLoader workers, per-sample drops happen in worker processes, so they travel inside the
    batches; index-time drops (malformed lines) come from :meth:`TokenDataset.drop_counts` once.
    """

    def __init__(self, initial: Mapping[str, int] | None = None) -> None:
        self._initial = Counter(initial or {})
        self.counts: Counter[str] = Counter(self._initial)
        self.samples: Counter[str] = Counter()  # per-sample drops of the whole run, never reset

    def update(self, dropped: Mapping[str, Any] | Iterable[str]) -> None:
        """Add a batch (dict with a ``"dropped"`` list) or an iterable of reason strings."""
        reasons = list(dropped.get("dropped", []) if isinstance(dropped, Mapping) else dropped)
        self.counts.update(reasons)
        self.samples.update(reasons)

    @property
    def initial(self) -> dict[str, int]:
        """Index-time drops (malformed lines): once per dataset, whatever the number of epochs."""
        return dict(self._initial)

    def reset(self) -> None:
        """Start a new epoch (index-time drops are kept: they apply to every epoch)."""
        self.counts = Counter(self._initial)

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def report(self, logger: logging.Logger | None = None, prefix: str = "data drops") -> str:
        """One line ``prefix: reason=n, ...`` (or ``none``), also logged at INFO."""
        body = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())) or "none"
        line = f"{prefix}: {body}"
        (logger or log).info(line)
        return line


class JsonlIndex:
    """Byte offsets of the valid rows of a jsonl file; rows are parsed on access (lazy, flat memory)."""

    def __init__(self, path: str | Path, root: str | Path | None = None) -> None:
        self.path = str(path)
        self.root = Path(root) if root is not None else Path(path).resolve().parent
        self.errors: list[tuple[int, str]] = []
        offsets = []
        for lineno, offset, raw in iter_jsonl_lines(self.path):
            try:  # validate once here so a bad line is reported with its number, not in a worker later
                parse_row(json.loads(raw), None)
                offsets.append(offset)
            except (ValueError, UnicodeDecodeError) as err:
                log.warning("%s:%d: malformed line skipped: %s", self.path, lineno, err)
                self.errors.append((lineno, str(err)))
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self._fh = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> Record:
        if self._fh is None or self._pid != os.getpid():  # one handle per (worker) process
            self._fh = open(self.path, "rb")  # noqa: SIM115 -- kept open for the life of the process
            self._pid = os.getpid()
        self._fh.seek(int(self.offsets[i]))
        return parse_row(json.loads(self._fh.readline()), self.root)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fh"], state["_pid"] = None, -1
        return state
