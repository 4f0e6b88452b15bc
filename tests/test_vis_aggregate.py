"""Aggregation of captured attention into per-word maps: hand-built maps, exact expected values."""

from __future__ import annotations

import pytest
import torch

from tokencompose.families.base import SpanFinder
from tokencompose.models import clip_tokenizer
from tokencompose.visualize import aggregate as agg


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


def test_prompt_words_merge_subtokens_and_drop_punctuation(tok):
    words = agg.prompt_words(tok, "An apple on a bench with a helicopter behind it.")
    assert [w.text for w in words] == ["an", "apple", "on", "a", "bench", "with", "a", "helicopter", "behind", "it"]
    assert [w.positions for w in words][:2] == [(1,), (2,)]
    merged = agg.prompt_words(tok, "a tokencompose thing")
    assert [w.text for w in merged] == ["a", "tokencompose", "thing"]
    assert merged[1].positions == (2, 3)  # "token" + "compose</w>": one word, two sub-tokens
    assert merged[2].positions == (4,)


def test_prompt_words_special_and_punctuation(tok):
    words = agg.prompt_words(tok, "a cat.", special=True, punctuation=True)
    assert [(w.text, w.positions) for w in words] == [
        ("<start>", (0,)),
        ("a", (1,)),
        ("cat", (2,)),
        (".", (3,)),
        ("<end>", (4,)),
    ]


def test_prompt_words_cut_at_text_window(tok):
    words = agg.prompt_words(tok, " ".join(["cat"] * 100))
    assert len(words) == 75 and words[-1].positions == (75,)


def test_phrase_words_first_occurrence(tok):
    spans = SpanFinder([(tok, 0, "ids")])
    words = agg.phrase_words(spans, "a red circle and a blue circle", ["blue circle", "circle", "giraffe"])
    assert [(w.text, w.positions) for w in words] == [("blue circle", (6, 7)), ("circle", (3,))]


def test_layer_mean_heads_then_layers():
    # two layers, 2 heads, 2x2 positions, 3 tokens; layer 0 heads hold 1 and 3, layer 1 heads 5 and 7
    a = torch.stack([torch.full((4, 3), 1.0), torch.full((4, 3), 3.0)])[None]  # [1, 2, 4, 3]
    b = torch.stack([torch.full((4, 3), 5.0), torch.full((4, 3), 7.0)])[None]
    a[0, 0, 1, 2] = 9.0  # one position of one head of token 2
    out = agg.layer_mean([a, b], (2, 2))
    assert out.shape == (1, 3, 2, 2)
    assert torch.allclose(out[0, 0], torch.full((2, 2), 4.0))
    # position 1 (row 0, col 1) of token 2: ((9 + 3) / 2 + (5 + 7) / 2) / 2
    assert out[0, 2, 0, 1].item() == pytest.approx(6.0)
    assert out[0, 2, 1, 1].item() == pytest.approx(4.0)


def test_layer_mean_position_order_is_row_major():
    m = torch.arange(6.0).reshape(1, 1, 6, 1)  # N = 6 positions of a 2x3 map
    out = agg.layer_mean([m], (2, 3))
    assert torch.equal(out[0, 0], torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]))


def test_timestep_accumulator_mean_and_size_filter():
    acc = agg.TimestepAccumulator(sizes=[(2, 2)])
    for v in (1.0, 2.0, 6.0):
        acc.add({(2, 2): [torch.full((1, 2, 4, 5), v)], (1, 1): [torch.full((1, 2, 1, 5), 100.0)]})
    out = acc.mean()
    assert list(out) == [(2, 2)] and acc.count == 3
    assert torch.allclose(out[(2, 2)], torch.full((1, 5, 2, 2), 3.0))
    with pytest.raises(ValueError, match="no attention"):
        agg.TimestepAccumulator().mean()


def test_combine_resolutions_each_resolution_weighs_the_same():
    per = {(1, 1): torch.full((1, 2, 1, 1), 1.0), (4, 4): torch.full((1, 2, 4, 4), 3.0)}
    out = agg.combine_resolutions(per)
    assert out.shape == (1, 2, 4, 4)
    assert torch.allclose(out, torch.full_like(out, 2.0))
    assert agg.combine_resolutions(per, (8, 8)).shape == (1, 2, 8, 8)


def test_upsample_is_bilinear_without_align_corners():
    m = torch.tensor([[[[0.0, 1.0]]]])  # [1, 1, 1, 2]
    up = agg.upsample(m, (1, 4))
    assert torch.allclose(up[0, 0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))


def test_word_maps_mean_and_sum():
    token_maps = torch.arange(5.0)[None, :, None, None].expand(2, 5, 2, 2)  # token t has value t everywhere
    words = [agg.Word("a", (1,)), agg.Word("tokencompose", (2, 4))]
    mean = agg.word_maps(token_maps, words, merge="mean")
    total = agg.word_maps(token_maps, [(1,), (2, 4)])  # the default: the phrase map's sum
    assert mean.shape == (2, 2, 2, 2)
    assert mean[:, 0].unique().tolist() == [1.0] and mean[:, 1].unique().tolist() == [3.0]
    assert total[:, 1].unique().tolist() == [6.0]
    with pytest.raises(ValueError):
        agg.word_maps(token_maps, words, merge="max")


def test_normalize_and_mass_in_mask():
    maps = torch.tensor([[[1.0, 3.0], [5.0, 1.0]], [[2.0, 2.0], [2.0, 2.0]]])
    n = agg.normalize(maps)
    assert torch.allclose(n[0], torch.tensor([[0.0, 0.5], [1.0, 0.0]]))
    assert torch.equal(n[1], torch.zeros(2, 2))
    masks = torch.tensor([[[False, True], [True, False]], [[True, False], [False, False]]])
    assert agg.mass_in_mask(maps, masks).tolist() == pytest.approx([0.8, 0.25])


def test_select_sizes():
    sizes = [(8, 8), (1, 1), (4, 4), (2, 2)]
    assert agg.select_sizes(sizes, None) == [(1, 1), (2, 2), (4, 4), (8, 8)]
    assert agg.select_sizes(sizes, [4, 8]) == [(4, 4), (8, 8)]
    with pytest.raises(ValueError, match="available"):
        agg.select_sizes(sizes, [16])


def test_same_maps_as_grounding_evaluation():
    """With sum-merging, our pipeline gives the grounding evaluation's phrase maps (same reduction order)."""
    grounding = pytest.importorskip("tokencompose.evaluation.grounding")
    torch.manual_seed(1)
    by_size = {
        (2, 2): [torch.rand(2, 2, 4, 77).softmax(-1) for _ in range(3)],
        (4, 4): [torch.rand(2, 2, 16, 77).softmax(-1) for _ in range(2)],
    }
    index = torch.tensor([[[1, 2], [4, 0]], [[2, 0], [3, 0]]])
    valid = index > 0
    ref = grounding.phrase_score_maps(by_size, index, valid, (8, 8)).reshape(2, 2, 8, 8)
    acc = agg.TimestepAccumulator()
    acc.add(by_size)
    ours = agg.combine_resolutions(acc.mean(), (8, 8))
    words = [[tuple(index[b, p][valid[b, p]].tolist()) for p in range(2)] for b in range(2)]
    ours = agg.normalize(torch.cat([agg.word_maps(ours[b : b + 1], words[b]) for b in range(2)]))
    assert torch.allclose(ours, ref, atol=1e-5)
