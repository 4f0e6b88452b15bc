"""One phrase-map definition (tokencompose.maps) under the pixel loss, the grounding metric and the figures."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokencompose import maps
from tokencompose.evaluation import grounding
from tokencompose.losses import pixel_loss
from tokencompose.visualize import aggregate as agg

H, W = 4, 4
INDEX = torch.tensor([[[1, 2], [5, 0]], [[3, 0], [0, 0]]])  # [B=2, P=2, T=2]
VALID = torch.tensor([[[True, True], [True, False]], [[True, False], [False, False]]])


def _layers(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, H * W, 77, generator=g).softmax(-1) for _ in range(2)]  # 2 layers [B, H, N, L]


def _reference(layers: list[torch.Tensor]) -> torch.Tensor:
    """The paper's map, written out: S_i[u] = sum_{t in T_i} mean_l mean_h A_{l,h}[u, t] -> [B, P, N]."""
    out = torch.zeros(2, 2, H * W)
    for b in range(2):
        for p in range(2):
            for t in range(2):
                if VALID[b, p, t]:
                    out[b, p] += sum(a[b, :, :, INDEX[b, p, t]].mean(0) for a in layers) / len(layers)
    return out


def test_phrase_maps_is_the_papers_formula() -> None:
    layers = _layers()
    torch.testing.assert_close(maps.phrase_maps(layers, INDEX, VALID), _reference(layers))


def test_the_pixel_loss_scores_this_map() -> None:
    layers = _layers(1)
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(2, 2, H * W, generator=g) > 0.5
    prob = maps.phrase_maps(layers, INDEX, VALID).clamp(0, 1)
    bce = F.binary_cross_entropy(prob, mask.float(), reduction="none").mean(-1)  # [B, P]
    phrase_valid = VALID.any(-1)
    expected = (bce * phrase_valid).sum(-1) / phrase_valid.sum(-1)
    got = pixel_loss({(H, W): layers}, INDEX, VALID, {(H, W): mask})
    torch.testing.assert_close(got, expected)


def test_the_grounding_metric_scores_this_map() -> None:
    """At the capture's own size with one resolution, the metric's scores are the map, min-max normalised."""
    layers = _layers(3)
    ref = _reference(layers)
    lo, hi = ref.amin(-1, keepdim=True), ref.amax(-1, keepdim=True)
    got = grounding.phrase_score_maps({(H, W): layers}, INDEX, VALID, (H, W))
    torch.testing.assert_close(got[VALID.any(-1)], ((ref - lo) / (hi - lo).clamp_min(1e-12))[VALID.any(-1)])


def test_the_figures_draw_this_map() -> None:
    layers = _layers(4)
    acc = agg.TimestepAccumulator()
    acc.add({(H, W): layers})
    token_maps = acc.mean()[(H, W)]  # [B, L, h, w]
    for b in range(2):
        words = [tuple(INDEX[b, p][VALID[b, p]].tolist()) for p in range(2) if VALID[b, p].any()]
        drawn = agg.word_maps(token_maps[b : b + 1], words)[0].reshape(len(words), -1)
        torch.testing.assert_close(drawn, _reference(layers)[b, : len(words)])


def test_no_second_definition_remains() -> None:
    assert (
        not hasattr(agg, "phrase_maps")
        and not hasattr(grounding, "phrase_maps")
        or (grounding.phrase_maps is maps.phrase_maps)
    )


def test_text_side_gather_matches_indexing() -> None:
    x = torch.randn(2, 77, 5)
    rows = maps.gather_phrase_rows(x, INDEX)
    assert rows.shape == (2, 2, 2, 5)
    torch.testing.assert_close(rows[0, 1, 0], x[0, 5])
    torch.testing.assert_close(rows[1, 0, 0], x[1, 3])
