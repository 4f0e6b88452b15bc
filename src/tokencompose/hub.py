"""Models named by the user: a local folder or a hub id, checked offline first, loaded with provenance.

Detectors, segmenters and scorers (OWL, Grounding DINO, SAM, CLIP, BLIP) are all transformers models given
by name. :func:`check_model_name` refuses a name that cannot resolve before any work starts (cheap, no
network); :func:`load_hf` loads a processor + model pair the same way everywhere (a folder never touches
the network; a failure is one line) and returns the commit a hub download resolved to, for results files.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from tokencompose.errors import UserError, one_line
from tokencompose.models import hf_dtype, looks_like_path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name: every model this package loads by id


def hf_kwargs(name: str | Path, revision: str | None = None) -> dict[str, Any]:
    """``from_pretrained`` keywords: no network for a local folder, else the revision when given."""
    if Path(str(name)).expanduser().exists():
        return {"local_files_only": True}
    return {"revision": revision} if revision else {}


def check_model_name(name: str | Path, what: str, builtin: str | None, example: str, accepts: str) -> None:
    """Refuse a ``what`` name that cannot resolve: not ``builtin``, not a folder with a config.json, not ``org/name``.

    ``accepts`` says which folders fit ("a transformers detector folder"); ``example`` is a hub id to suggest.
    """
    text = str(name)
    if builtin is not None and text == builtin:
        return
    folder = Path(text).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise UserError(f"{what} folder {text} has no config.json: pass {accepts}")
        return
    if looks_like_path(text) or folder.exists():
        raise UserError(f"{what} folder {text} does not exist")
    if not HUB_ID.match(text):
        also = f"'{builtin}', " if builtin else ""
        raise UserError(f"unknown {what} {text!r}: use {also}{accepts}, or a hub id such as {example}")


def load_hf(
    model_cls: Any,
    processor_cls: Any,
    name: str | Path,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    what: str = "model",
) -> tuple[Any, Any, str | None]:
    """``(processor, model in eval mode on device, resolved revision)``; a load failure is one :class:`UserError` line.

    The revision is the commit a hub download resolved to (or the one asked for); None for a local folder.
    """
    local = Path(str(name)).expanduser()
    where = str(local) if local.exists() else str(name)
    kw = hf_kwargs(name, revision)
    try:
        processor = processor_cls.from_pretrained(where, **kw)
        model = model_cls.from_pretrained(where, **hf_dtype(dtype), **kw)
    except (OSError, ValueError) as err:
        raise UserError(f"{what} {name} could not be loaded: {one_line(str(err))}") from err
    model.to(torch.device(device)).eval()
    resolved = None if local.exists() else (getattr(model.config, "_commit_hash", None) or revision)
    return processor, model, resolved
