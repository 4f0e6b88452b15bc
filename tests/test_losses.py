"""Batched losses against a literal per-phrase, per-token transcription of DESIGN.md's formulas."""

from __future__ import annotations

import math

import torch

from tokencompose.losses import denoise_loss, grounding_losses, pixel_loss, remap_to_columns, token_loss
from tokencompose.tokens import pad_token_positions


def _reference(maps, spans, masks):
    """Loops over layers, phrases, tokens and heads, as the paper's code does, for one sample."""
    token_total, pixel_total = 0.0, 0.0
    for size, layers in maps.items():
        m = masks[size].double()  # [P, N]
        tok = 0.0
        for a in layers:  # [H, N, L]
            a = a.double()
            for i, span in enumerate(spans):
                obj = 0.0
                for t in span:
                    shares = [(a[h, :, t] * m[i]).sum() / a[h, :, t].sum() for h in range(a.shape[0])]
                    obj += (1 - sum(shares) / len(shares)) ** 2
                tok += obj / len(span)
        token_total += tok / len(spans)
        avg = sum(a.double().mean(0) for a in layers) / len(layers)  # [N, L]
        pix = 0.0
        for i, span in enumerate(spans):
            p = sum(avg[:, t] for t in span).clamp(0, 1)
            logp = torch.log(p).clamp_min(-100)
            log1p = torch.log(1 - p).clamp_min(-100)
            pix += (-(m[i] * logp + (1 - m[i]) * log1p)).mean()
        pixel_total += pix / len(spans)
    return float(token_total), float(pixel_total)


def _random_case(seed, spans, sizes=((2, 2), (4, 4)), heads=3, layers=(1, 2), L=12):
    g = torch.Generator().manual_seed(seed)
    maps, masks = {}, {}
    for (h, w), n in zip(sizes, layers, strict=True):
        maps[(h, w)] = [torch.randn(heads, h * w, L, generator=g).mul(3).softmax(-1) for _ in range(n)]
        masks[(h, w)] = torch.rand(len(spans), h * w, generator=g) > 0.5
    return maps, masks


def test_batched_losses_equal_literal_reference():
    samples = [[[1], [3, 4]], [[2, 3, 4]], [[5], [6], [7, 8]]]
    cases = [_random_case(s, spans) for s, spans in enumerate(samples)]
    index, valid = pad_token_positions(samples)
    p = index.shape[1]
    maps = {s: [torch.stack([c[0][s][i] for c in cases]) for i in range(len(cases[0][0][s]))] for s in cases[0][0]}
    masks = {
        s: torch.stack([torch.cat([c[1][s], c[1][s].new_zeros(p - c[1][s].shape[0], c[1][s].shape[1])]) for c in cases])
        for s in cases[0][1]
    }
    g = grounding_losses(maps, index, valid, masks)
    for b, (case, spans) in enumerate(zip(cases, samples, strict=True)):
        tok, pix = _reference(case[0], spans, case[1])
        assert math.isclose(float(g.token[b]), tok, rel_tol=1e-5)
        assert math.isclose(float(g.pixel[b]), pix, rel_tol=1e-5)
    assert torch.allclose(token_loss(maps, index, valid, masks), g.token)
    assert torch.allclose(pixel_loss(maps, index, valid, masks), g.pixel)
    assert torch.allclose(sum(g.token_parts.values()), g.token)


def test_zero_attention_column_gives_no_nan_value_or_gradient():
    a = torch.rand(1, 2, 4, 6)
    a[..., 2] = 0.0  # a token that receives no attention anywhere
    a = (a / a.sum(-1, keepdim=True)).requires_grad_(True)
    index, valid = pad_token_positions([[[2], [3]]])
    masks = {(2, 2): torch.tensor([[[1, 0, 0, 1], [1, 1, 0, 0]]])}
    g = grounding_losses({(2, 2): [a]}, index, valid, masks)
    assert torch.isfinite(g.token).all() and torch.isfinite(g.pixel).all()
    # the zero column's share is 0 -> term 1; the other phrase contributes its usual term
    (g.token.sum() + g.pixel.sum()).backward()
    assert torch.isfinite(a.grad).all()
    # pixel BCE with p = 0 on an object pixel is clamped at 100, as torch's BCELoss
    assert float(g.pixel.detach()) > 100 * 2 / 4 / 2 - 1e-4


def test_sample_without_phrases_is_exactly_zero_with_finite_grad():
    a = torch.rand(2, 2, 4, 6).softmax(-1).requires_grad_(True)
    index, valid = pad_token_positions([[], [[1]]])
    masks = {(2, 2): torch.tensor([[[1, 0, 0, 0]], [[1, 0, 0, 0]]], dtype=torch.bool)}
    g = grounding_losses({(2, 2): [a]}, index, valid, masks)
    assert g.token[0] == 0 and g.pixel[0] == 0 and g.token[1] > 0
    (g.token.sum() + g.pixel.sum()).backward()
    assert torch.isfinite(a.grad).all() and a.grad[0].abs().sum() == 0


def test_remap_to_captured_columns():
    index, valid = pad_token_positions([[[5, 6], [9]], [[2]]])
    cols = torch.tensor([2, 5, 6, 9])
    out = remap_to_columns(index, valid, cols)
    assert out[0].tolist() == [[1, 2], [3, 0]] and out[1].tolist() == [[0, 0], [0, 0]]
    full = torch.rand(2, 2, 4, 12).softmax(-1)
    masks = {(2, 2): torch.rand(2, 2, 4) > 0.5}
    ref = grounding_losses({(2, 2): [full]}, index, valid, masks)
    sub = grounding_losses({(2, 2): [full[..., cols]]}, out, valid, masks)
    torch.testing.assert_close(ref.token, sub.token)
    torch.testing.assert_close(ref.pixel, sub.pixel)


def test_denoise_loss_is_per_sample_mse():
    pred, target = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    out = denoise_loss(pred.bfloat16(), target)
    assert out.shape == (3,) and out.dtype == torch.float32
    torch.testing.assert_close(out, ((pred.bfloat16().float() - target) ** 2).mean((1, 2, 3)))
