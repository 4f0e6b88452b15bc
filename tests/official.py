"""Locate and load the reference cases computed by the paper's own code (see the fixture README).

The folder is ``$TOKENCOMPOSE_FIXTURES`` when set, else ``../shared/fixtures/official`` beside the
repo. Cases are discovered by globbing, so the set can grow without touching the tests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def fixtures_dir() -> Path:
    env = os.environ.get("TOKENCOMPOSE_FIXTURES")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "fixtures" / "official"


def cases(pattern: str) -> list:
    """pytest params, one per file matching ``pattern``; a single skipped param when none exist."""
    folder = fixtures_dir()
    files = sorted(folder.glob(pattern)) if folder.is_dir() else []
    if not files:
        reason = f"no {pattern} reference cases in {folder} (set TOKENCOMPOSE_FIXTURES)"
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason), id="absent")]
    return [pytest.param(f, id=f.stem) for f in files]


def load_loss_case(path: Path) -> dict:
    """One loss case: metadata, full float32 maps ``{(r, r): [[1, 8, r*r, 77], ...]}`` and masks ``[P, 512, 512]``.

    The fixture stores only the phrase columns (float16); the other ``77 - K`` columns of each row
    share equally what the stored ones leave, exactly as the oracle was run.
    """
    from safetensors.torch import load_file

    meta = json.loads(path.read_text())
    tensors = load_file(str(path.with_suffix(".safetensors")))
    cols = tensors["columns"]
    text_len = int(meta.get("text_len", 77))
    layers: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for key, stored in tensors.items():
        if not key.startswith("attn_"):
            continue
        _, res, layer = key.split("_")
        stored = stored.float()
        rest = (1 - stored.sum(-1, keepdim=True)) / (text_len - len(cols))
        full = rest.expand(*stored.shape[:-1], text_len).clone()
        full[..., cols] = stored
        layers.setdefault(int(res), []).append((int(layer), full.unsqueeze(0)))
    maps = {(r, r): [m for _, m in sorted(ls, key=lambda x: x[0])] for r, ls in sorted(layers.items())}
    return {"meta": meta, "maps": maps, "masks": tensors["masks"]}
