"""``tokencompose prepare grounded`` as a library function: rows in, the paper's format out, resumable and sharded.

Output folder ``OUT`` (claimed like every multi-file output, :mod:`tokencompose.data.outputs`):

- ``seg/<image stem>/mask_<image stem>_<phrase>.png``: the paper's layout (spaces in the phrase become ``_``);
  a stem that two rows share gets ``__<row>`` on its folder from its second row on;
- ``parts/<row>.json``: one file per input row (its output row, drop reason, provenance: model ids and
  resolved revisions, thresholds, dtype, device), written atomically after the row's masks. It is the unit
  of resumption: a re-run skips rows that have one, a killed run loses at most the batch in flight;
- once every row has its part (whichever process finishes last merges): ``metadata.jsonl`` (input order;
  ``attn_list`` with mask paths relative to ``OUT`` or ``null``, plus ``boxes``, ``scores`` and
  ``detections`` aligned with it), ``provenance.jsonl``, ``settings.json``, the QA summary and figures.

Rows are split over shards by index (``row % num_shards``), so ``accelerate launch`` processes, or machines
given ``--shard/--num-shards`` over a shared folder, never write the same file. Within a shard, images are
batched by size, so the detector never sees padding (its outputs then do not depend on the batch).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

from tokencompose.atomic import atomic_write_text, write_json_atomic
from tokencompose.data import records as R
from tokencompose.data.grounded import GroundedSettings, PhraseGrounding, ground_images
from tokencompose.data.official import image_drop_reason, open_image, save_mask
from tokencompose.data.outputs import claim_output_dir, count_lines, mark_complete, read_marker
from tokencompose.errors import UserError
from tokencompose.sharding import progress_bar, resolve_shard
from tokencompose.typed_data import to_dict

log = logging.getLogger(__name__)

COMMAND = "prepare grounded"
PAPER_LIST = "paper"  # --data paper: the paper's 4,526-row training list, shipped (Apache-2.0, TokenCompose authors)


def paper_list() -> Path:
    """The shipped copy of the paper's training list (phrases, and which got a Grounded-SAM mask)."""
    from importlib import resources

    return Path(str(resources.files("tokencompose") / "assets" / "official" / "coco_gsam_train_metadata.jsonl"))


@dataclass(frozen=True)
class InputRow:
    """One input row: its index among the valid rows, image path, caption, and given phrases (None: none given)."""

    index: int
    image: Path
    text: str
    phrases: list[str] | None
    file_name: str


@dataclass
class GroundedReport:
    """What a call did: rows in the input, rows written, phrase counts, and whether the output is complete."""

    out: Path
    rows: int
    complete: bool
    stats: dict[str, int]


def read_rows(path: Path, images: Path, limit: int | None = None) -> tuple[list[InputRow], int]:
    """Valid rows of the input jsonl (malformed lines are logged with their number and skipped) and the skip count."""
    rows: list[InputRow] = []
    bad = 0
    for lineno, _, raw in R.iter_jsonl_lines(path):
        if limit is not None and len(rows) >= limit:
            break
        try:
            row = json.loads(raw)
            if not isinstance(row, dict):
                raise ValueError("expected a JSON object")
            name, text = row.get("file_name"), row.get("text")
            if not isinstance(name, str) or not name or not isinstance(text, str):
                raise ValueError("needs a non-empty string 'file_name' and a string 'text'")
            given = None
            if "attn_list" in row:
                attn = row["attn_list"]
                if not isinstance(attn, list) or not all(_phrase_item(x) for x in attn):
                    raise ValueError("'attn_list' must be a list of [phrase, mask_path | null] or of phrases")
                given = [x if isinstance(x, str) else x[0] for x in attn]
        except ValueError as err:
            log.warning("%s:%d: malformed line skipped: %s", path, lineno, err)
            bad += 1
            continue
        rows.append(InputRow(len(rows), images / name, text, given, name))
    return rows, bad


def _phrase_item(x: Any) -> bool:
    return isinstance(x, str) or (isinstance(x, list | tuple) and len(x) >= 1 and isinstance(x[0], str))


def _slug(text: str) -> str:
    """The paper's mask-name rule (spaces -> ``_``, ``/`` -> ``_``), plus other path-unsafe characters."""
    return re.sub(r"[\\/:*?\"<>|\x00-\x1f]", "_", text.replace(" ", "_")) or "phrase"


def seg_folders(rows: list[InputRow]) -> list[str]:
    """``seg/<stem>`` per row; a stem already used by an earlier row (case-insensitively) gets ``__<row>``."""
    used: set[str] = set()
    out = []
    for row in rows:
        stem = Path(row.file_name).stem
        name = stem if stem.casefold() not in used else f"{stem}__{row.index}"
        used.add(name.casefold())
        out.append(f"seg/{name}")
    return out


def mask_names(folder: str, phrases: list[str]) -> list[str]:
    """Mask paths (relative to OUT) of one row: ``<folder>/mask_<stem>_<phrase>.png``, made unique within the row."""
    stem = folder.split("/", 1)[1]
    names: list[str] = []
    taken: dict[str, str] = {}  # case-folded name -> the phrase that has it
    for k, phrase in enumerate(phrases):
        name = f"mask_{stem}_{_slug(phrase)}"
        if taken.get(name.casefold(), phrase) != phrase:  # another phrase with the same file name
            name = f"{name}_{k}"
        taken.setdefault(name.casefold(), phrase)
        names.append(f"{folder}/{name}.png")
    return names


def part_path(out: Path, index: int) -> Path:
    return out / "parts" / f"{index:08d}.json"


def _claim_settings(s: GroundedSettings, data: Path, images: Path) -> dict[str, Any]:
    """What decides the output (the device and batch size do not: a run may resume elsewhere)."""
    return {
        "data": str(data.resolve()),
        "images": str(images.resolve()),
        "detector": s.detector,
        "detector_revision": s.detector_revision,
        "segmenter": s.segmenter,
        "segmenter_revision": s.segmenter_revision,
        "box_threshold": s.box_threshold,
        "text_threshold": s.text_threshold,
        "phrases": s.phrases,
        "dtype": s.dtype,
        "limit": s.limit,
    }


def check_settings(s: GroundedSettings) -> tuple[Path, Path, Path]:
    """Cheap checks before any model loads; returns (data, images, out) paths."""
    from tokencompose.data.segmenters import check_segmenter_name
    from tokencompose.evaluation.detectors import check_detector_name

    if not s.data or not s.out:
        raise UserError("prepare grounded needs --data ROWS.jsonl and --out FOLDER")
    data = paper_list() if s.data == PAPER_LIST else Path(s.data).expanduser()
    if not data.is_file():
        raise UserError(f"input rows {data} do not exist (or are not a file)")
    if s.data == PAPER_LIST and not s.images:
        raise UserError("--data paper needs --images: the folder of COCO train2017 images")
    images = Path(s.images).expanduser() if s.images else data.resolve().parent
    if not images.is_dir():
        raise UserError(f"image folder {images} does not exist")
    for name in ("box_threshold", "text_threshold"):
        value = getattr(s, name)
        if not 0.0 <= value < 1.0:
            raise UserError(f"{name} must be in [0, 1), got {value}")
    if s.limit is not None and s.limit < 1:
        raise UserError(f"limit must be at least 1, got {s.limit}")
    if s.run.batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {s.run.batch_size}")
    check_detector_name(s.detector)
    check_segmenter_name(s.segmenter)
    return data, images, Path(s.out).expanduser()


def prepare_grounded(
    s: GroundedSettings, on_batch: Callable[[int, int], None] | None = None, nlp: Any = None
) -> GroundedReport:
    """Ground every row's phrases (this process's shard), then merge once every row is done; see the module doc."""
    data, images, out = check_settings(s)
    rows, malformed = read_rows(data, images, s.limit)
    if not rows:
        raise UserError(f"{data} holds no valid row")
    shard = resolve_shard(s.device, s.run)
    claim = _claim_settings(s, data, images)
    if shard.main:
        done = claim_output_dir(
            out, COMMAND, claim, intact=lambda m: count_lines(out / "metadata.jsonl") == m.get("rows")
        )
        if done is not None:
            log.info("%s already holds this complete output: nothing to do", out)
            return GroundedReport(out, int(done["rows"]), True, dict(done.get("stats", {})))
    shard.wait()
    marker = read_marker(out)
    if marker is None or marker.get("command") != COMMAND:  # another process's view of the claim
        raise UserError(f"output folder {out} was not claimed by `{COMMAND}`")
    folders = seg_folders(rows)
    pending = [r for r in rows if shard.owns(r.index) and not part_path(out, r.index).exists()]
    if pending:
        _ground_pending(s, out, pending, folders, shard.device, on_batch or progress_bar("grounding", "image"), nlp)
    shard.wait()
    if not shard.main and shard.state is not None:
        return GroundedReport(out, len(rows), False, {})
    return merge(s, data, out, rows, claim, malformed)


def _ground_pending(s, out, pending, folders, device, on_batch, nlp) -> None:
    """Load both models once, then ground the pending rows in batches of same-sized images."""
    from tokencompose.data.segmenters import load_segmenter
    from tokencompose.evaluation.detectors import load_detector
    from tokencompose.loading import DTYPES

    dtype = DTYPES[s.dtype]
    detector = load_detector(s.detector, s.detector_revision, device=device, dtype=dtype, batch_size=s.run.batch_size)
    segmenter = load_segmenter(
        s.segmenter, s.segmenter_revision, device=device, dtype=dtype, batch_size=s.run.batch_size
    )
    provenance = {
        "detector": s.detector,
        "detector_revision": getattr(detector, "resolved_revision", None),
        "segmenter": s.segmenter,
        "segmenter_revision": getattr(segmenter, "resolved_revision", None),
        "box_threshold": s.box_threshold,
        "text_threshold": s.text_threshold,
        "dtype": s.dtype,
        "device": str(device),
    }
    phrases = _phrases(s, pending, nlp)
    sizes: dict[int, tuple[int, int]] = {}
    for row in pending:  # headers only; an unreadable image is a row without output, counted
        try:
            with open_image(row.image) as im:
                sizes[row.index] = im.size
        except (OSError, ValueError) as err:
            log.warning("row %d: image %s skipped: %s", row.index, row.image, err)
            _write_part(out, row, None, image_drop_reason(err), provenance, phrases[row.index])
    todo = sorted((r for r in pending if r.index in sizes), key=lambda r: (sizes[r.index], r.index))
    batches: list[list[InputRow]] = []
    for _, same in groupby(todo, key=lambda r: sizes[r.index]):
        group = list(same)
        batches += [group[k : k + s.run.batch_size] for k in range(0, len(group), s.run.batch_size)]
    done = len(pending) - len(todo)
    on_batch(done, len(pending))
    for batch in batches:
        _ground_batch(s, out, batch, folders, phrases, provenance, detector, segmenter)
        done += len(batch)
        on_batch(done, len(pending))


def _phrases(s: GroundedSettings, rows: list[InputRow], nlp: Any) -> dict[int, list[str]]:
    """Each row's phrases: the given ones, or spaCy noun phrases (per ``s.phrases``)."""
    want_spacy = [r for r in rows if s.phrases == "spacy" or (s.phrases == "auto" and r.phrases is None)]
    out = {r.index: list(r.phrases or []) for r in rows}
    if want_spacy:
        from tokencompose.data.noun_phrases import load_nlp, noun_phrases_batch

        nlp = nlp if nlp is not None else load_nlp()
        for r, ps in zip(want_spacy, noun_phrases_batch([r.text for r in want_spacy], nlp), strict=True):
            out[r.index] = list(ps)
    return out


def _ground_batch(s, out, batch, folders, phrases, provenance, detector, segmenter) -> None:
    """One batch: read the images, ground their phrases, write masks then each row's part file."""
    images, ok = [], []
    for row in batch:
        try:
            with open_image(row.image) as im:
                images.append(im.convert("RGB"))
            ok.append(row)
        except (OSError, ValueError) as err:  # changed since its header was read
            log.warning("row %d: image %s skipped: %s", row.index, row.image, err)
            _write_part(out, row, None, image_drop_reason(err), provenance, phrases[row.index])
    if not ok:
        return
    texts = [phrases[r.index] for r in ok]
    found = ground_images(detector, segmenter, images, texts, s.box_threshold, s.text_threshold)
    for row, result in zip(ok, found, strict=True):
        names = mask_names(folders[row.index], phrases[row.index])
        for name, g in zip(names, result, strict=True):
            if g.mask is not None:
                save_mask(out / name, g.mask, durable=True)
        _write_part(out, row, (names, result), None, provenance, phrases[row.index])


def _write_part(out, row, grounded, reason, provenance, phrases) -> None:
    """The row's part file: its output row (or the drop reason) and provenance; the last write of a row."""
    part: dict[str, Any] = {"index": row.index, "file_name": row.file_name, "provenance": provenance}
    if grounded is None:
        part["dropped"] = reason
    else:
        names, result = grounded
        part["row"] = output_row(out, row, phrases, names, result)
    write_json_atomic(part_path(out, row.index), part)


def output_row(out: Path, row: InputRow, phrases: list[str], names: list[str], result: list[PhraseGrounding]) -> dict:
    """The paper's row (image path relative to ``out``) plus ``boxes``, ``scores``, ``detections`` per phrase."""
    try:
        image = os.path.relpath(row.image.resolve(), out.resolve())
    except ValueError:  # another drive on Windows
        image = str(row.image.resolve())
    return {
        "file_name": image,
        "text": row.text,
        "attn_list": [[p, n if g.mask is not None else None] for p, n, g in zip(phrases, names, result, strict=True)],
        "boxes": [None if g.box is None else [round(v, 2) for v in g.box] for g in result],
        "scores": [None if g.score is None else round(g.score, 4) for g in result],
        "detections": [g.detections for g in result],
    }


def _has_masks(path: Path) -> bool:
    """Whether some input row names a mask file (its nulls then mean "nothing found", not "not asked")."""
    for _, _, raw in R.iter_jsonl_lines(path):
        try:
            attn = json.loads(raw).get("attn_list") or []
        except (ValueError, AttributeError):
            continue
        if any(isinstance(x, list) and len(x) > 1 and isinstance(x[1], str) for x in attn):
            return True
    return False


def merge(
    s: GroundedSettings, data: Path, out: Path, rows: list[InputRow], claim: dict, malformed: int
) -> GroundedReport:
    """When every row has its part: write ``metadata.jsonl``, ``provenance.jsonl``, QA, and mark the output complete."""
    missing = [r.index for r in rows if not part_path(out, r.index).exists()]
    if missing:
        log.info(
            "%d of %d rows still to ground (other shards); the shard that finishes last merges", len(missing), len(rows)
        )
        return GroundedReport(out, len(rows), False, {"rows_pending": len(missing)})
    stats: Counter[str] = Counter(malformed_line=malformed) if malformed else Counter()
    lines, prov = [], []
    for r in rows:
        part = json.loads(part_path(out, r.index).read_text())
        prov.append(json.dumps({"index": r.index, "file_name": r.file_name, **part["provenance"]}, sort_keys=True))
        if "row" not in part:
            stats[part.get("dropped") or "dropped"] += 1
            continue
        row = part["row"]
        lines.append(json.dumps(row, ensure_ascii=False))
        stats["rows"] += 1
        stats["phrases"] += len(row["attn_list"])
        stats["phrases_with_mask"] += sum(1 for _, m in row["attn_list"] if m is not None)
        stats["phrases_null"] += sum(1 for _, m in row["attn_list"] if m is None)
    atomic_write_text(out / "metadata.jsonl", "".join(line + "\n" for line in lines))
    atomic_write_text(out / "provenance.jsonl", "".join(line + "\n" for line in prov))
    write_json_atomic(out / "settings.json", to_dict(s))
    if s.qa:
        from tokencompose.data.grounded_qa import write_qa

        # The input is a reference when it says which phrases got a mask (the paper's list: null = nothing found).
        write_qa(out, reference=data if _has_masks(data) else None)
    mark_complete(out, COMMAND, claim, rows=len(lines), stats=dict(stats))
    return GroundedReport(out, len(lines), True, dict(stats))
