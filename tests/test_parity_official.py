"""Oracle parity: our batched losses and token spans reproduce the paper's code on its own cases."""

from __future__ import annotations

import json

import pytest
import torch

from official import cases, load_loss_case
from tokencompose.losses import grounding_losses
from tokencompose.masks import masks_at_resolutions
from tokencompose.models import clip_tokenizer
from tokencompose.tokens import pad_token_positions, phrase_token_positions

REL = 1e-5
LOSS_CASES = cases("losses_*.json")


def _close(value: float, expected: float) -> bool:
    return abs(value - expected) <= REL * max(abs(expected), 1e-8)


def _inputs(case):
    meta = case["meta"]
    index, valid = pad_token_positions([meta["token_indices"]])
    masks = {s: m.unsqueeze(0) for s, m in masks_at_resolutions(case["masks"], case["maps"].keys()).items()}
    return index, valid, masks


def _check(g, meta, row: int = 0) -> None:
    assert _close(float(g.token[row]), meta["token_loss"]), (float(g.token[row]), meta["token_loss"])
    assert _close(float(g.pixel[row]), meta["pixel_loss"]), (float(g.pixel[row]), meta["pixel_loss"])
    for res, parts in meta["per_resolution"].items():
        size = (int(res), int(res))
        assert _close(float(g.token_parts[size][row]), parts["token_loss"]), (res, "token")
        assert _close(float(g.pixel_parts[size][row]), parts["pixel_loss"]), (res, "pixel")


@pytest.mark.parametrize("path", LOSS_CASES)
def test_loss_case_matches_paper(path):
    case = load_loss_case(path)
    index, valid, masks = _inputs(case)
    _check(grounding_losses(case["maps"], index, valid, masks), case["meta"])


def test_all_loss_cases_as_one_padded_batch():
    paths = [p.values[0] for p in LOSS_CASES if p.values[0] is not None]
    if not paths:
        pytest.skip("no reference loss cases found")
    loaded = [load_loss_case(p) for p in paths]
    sizes = list(loaded[0]["maps"].keys())
    assert all(list(c["maps"].keys()) == sizes for c in loaded), "cases with different layer layouts"
    index, valid = pad_token_positions([c["meta"]["token_indices"] for c in loaded])
    p = index.shape[1]
    maps = {s: [torch.cat([c["maps"][s][i] for c in loaded]) for i in range(len(loaded[0]["maps"][s]))] for s in sizes}
    masks = {}
    for s in sizes:
        rows = []
        for c in loaded:
            m = masks_at_resolutions(c["masks"], [s])[s]
            rows.append(torch.cat([m, m.new_zeros(p - m.shape[0], m.shape[1])]))
        masks[s] = torch.stack(rows)
    g = grounding_losses(maps, index, valid, masks)
    assert g.token.shape == (len(loaded),)
    for row, c in enumerate(loaded):
        _check(g, c["meta"], row)


@pytest.mark.parametrize("path", cases("word_index_*.json"))
def test_word_indices_match_paper(path):
    tokenizer = clip_tokenizer()
    entries = json.loads(path.read_text())
    assert entries, "empty word-index file"
    mismatches = []
    for e in entries:
        got = phrase_token_positions(tokenizer, e["text"], e["phrase"])
        if got != e["token_indices"]:
            mismatches.append((e["text"], e["phrase"], got, e["token_indices"]))
    assert not mismatches, f"{len(mismatches)}/{len(entries)} differ, e.g. {mismatches[:3]}"
