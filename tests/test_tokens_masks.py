from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from tokencompose.masks import attention_sizes, masks_at_resolutions, resize_masks
from tokencompose.models import clip_tokenizer
from tokencompose.tokens import find_span, pad_token_positions, phrase_token_positions, phrase_tokens


def test_find_span_first_occurrence():
    assert find_span([5, 1, 2, 3, 1, 2], [1, 2]) == 1
    assert find_span([5, 1, 2], [2, 5]) is None
    assert find_span([1], [1, 2]) is None
    assert find_span([1, 2], []) is None


def test_multi_token_phrase_every_subtoken_and_first_occurrence():
    tok = clip_tokenizer()
    caption = "A hot dog next to a teddy bear and another hot dog."
    assert phrase_token_positions(tok, caption, "hot dog") == [2, 3]
    assert phrase_token_positions(tok, caption, "Teddy Bear") == [7, 8]  # case-insensitive
    ids = tok(caption).input_ids
    assert tok.convert_ids_to_tokens([ids[7], ids[8]]) == ["teddy</w>", "bear</w>"]


def test_unusable_phrases_are_dropped_with_warning(caplog):
    tok = clip_tokenizer()
    long_caption = "a photo of " + "a big red thing and " * 20 + "a cat."
    assert phrase_token_positions(tok, long_caption, "cat") is None  # beyond the 77-token window
    with caplog.at_level(logging.WARNING):
        pt = phrase_tokens(tok, ["a dog on a mat", long_caption], [["zebra", "dog", "mat"], ["cat", "thing"]])
    assert pt.kept == [[1, 2], [1]]
    assert "zebra" in caplog.text and "cat" in caplog.text
    assert pt.index.shape == (2, 2, 1)
    assert pt.valid[1].tolist() == [[True], [False]]
    assert pt.phrase_valid.tolist() == [[True, True], [True, False]]


def test_window_edge_last_slot():
    tok = clip_tokenizer()
    words = ["cat"] * 74 + ["dog", "fish"]  # dog at position 75 (last usable), fish at 76 (end-token slot)
    caption = " ".join(words)
    assert phrase_token_positions(tok, caption, "dog") == [75]
    assert phrase_token_positions(tok, caption, "fish") is None


def test_pad_token_positions_handles_empty():
    index, valid = pad_token_positions([[], [[3, 4], [7]]])
    assert index.shape == (2, 2, 2)
    assert not valid[0].any()
    assert index[1].tolist() == [[3, 4], [7, 0]]


def test_resize_is_bilinear_without_antialias_then_positive():
    m = torch.zeros(2, 64, 64, dtype=torch.uint8)
    m[0, 10:12, 20:21] = 1  # a 2x1 sliver: survives only because bilinear footprints touch it
    m[1, 30:50, 5:60] = 255
    out = resize_masks(m, (8, 8))
    ref = F.interpolate(m[:, None].float(), size=(8, 8), mode="bilinear", align_corners=False) > 0
    assert out.dtype == torch.bool and torch.equal(out, ref[:, 0])
    # antialiasing would spread the sliver further: the rule is exactly the non-antialiased one
    aa = F.interpolate(m[:, None].float(), size=(8, 8), mode="bilinear", align_corners=False, antialias=True) > 0
    assert not torch.equal(out, aa[:, 0])


def test_masks_at_resolutions_flattens_and_keeps_identity():
    m = (torch.rand(3, 32, 32) > 0.5).to(torch.uint8)
    out = masks_at_resolutions(m, [(32, 32), (4, 8)])
    assert torch.equal(out[(32, 32)], m.bool().flatten(-2))
    assert out[(4, 8)].shape == (3, 32)
    assert attention_sizes((512, 768)) == [(64, 96), (32, 48), (16, 24), (8, 12)]
