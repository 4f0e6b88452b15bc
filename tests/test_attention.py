"""Attention capture on a tiny random-init UNet of the real diffusers class."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from tokencompose.attention import AttentionCapture, CaptureAttnProcessor, cross_attention_names, select_layers
from tokencompose.losses import grounding_losses
from tokencompose.masks import masks_at_resolutions
from tokencompose.tokens import pad_token_positions


def _inputs(tiny, b=2, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, size, size, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    ctx = torch.randn(b, 77, tiny.unet.config.cross_attention_dim, generator=g)
    return x, t, ctx


def _phrase_batch(b: int, image: int = 64, seed: int = 0):
    """Ragged phrases (sample i has i % 3 phrases, at least one sample with none) and random box masks."""
    g = torch.Generator().manual_seed(seed)
    spans = []
    masks = torch.zeros(b, 3, image, image)
    for i in range(b):
        n = i % 3
        sample = []
        for j in range(n):
            start = 1 + 4 * j
            sample.append(list(range(start, start + 1 + j)))  # 1- and 2-token phrases
            y, x = torch.randint(0, image // 2, (2,), generator=g).tolist()
            masks[i, j, y : y + image // 2, x : x + image // 3] = 1
        spans.append(sample)
    index, valid = pad_token_positions(spans)
    return index, valid, masks[:, : index.shape[1]]


def test_default_selection_is_mid_and_up(tiny):
    names = select_layers(tiny.unet)
    assert len(names) == 10  # like SD 1.4: mid block + 3 up blocks x 3 transformers
    assert all(n.endswith("attn2") and not n.startswith("down") for n in names)
    assert select_layers(tiny.unet, ["up_blocks.3.*"]) == [n for n in names if n.startswith("up_blocks.3")]
    assert len(cross_attention_names(tiny.unet)) == 16
    with pytest.raises(ValueError, match="matches no"):
        select_layers(tiny.unet, ["nonexistent.*"])


def test_only_supervised_layers_lose_the_fused_processor_and_all_are_restored(tiny):
    before = dict(tiny.unet.attn_processors)
    assert all(isinstance(p, AttnProcessor2_0) for p in before.values())
    with AttentionCapture(tiny.unet) as cap:
        inside = tiny.unet.attn_processors
        captured = {k for k, p in inside.items() if isinstance(p, CaptureAttnProcessor)}
        assert captured == {f"{n}.processor" for n in cap.names}
        assert all(isinstance(p, AttnProcessor2_0) for k, p in inside.items() if k not in captured)
    after = tiny.unet.attn_processors
    assert all(after[k] is before[k] for k in before)


def test_capture_output_equals_default_processor(tiny):
    x, t, ctx = _inputs(tiny)
    with torch.no_grad():
        ref = tiny.unet(x, t, ctx).sample
        with AttentionCapture(tiny.unet) as cap:
            out = tiny.unet(x, t, ctx).sample
            maps = cap.by_size()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert sorted(maps) == [(1, 1), (2, 2), (4, 4), (8, 8)]
    assert [len(v) for _, v in sorted(maps.items())] == [1, 3, 3, 3]
    for (h, w), layers in maps.items():
        for m in layers:
            assert m.shape == (2, 2, h * w, 77) and m.dtype == torch.float32
            torch.testing.assert_close(m.sum(-1), torch.ones(2, 2, h * w))


def test_non_square_latents_get_their_own_sizes(tiny):
    x, t, ctx = _inputs(tiny, b=1)
    x = torch.randn(1, 4, 8, 16)
    with torch.no_grad(), AttentionCapture(tiny.unet) as cap:
        tiny.unet(x, t, ctx)
        assert sorted(cap.by_size()) == [(1, 2), (2, 4), (4, 8), (8, 16)]


def test_cond_half_and_column_subset(tiny):
    x, t, ctx = _inputs(tiny, b=4)
    cols = torch.tensor([1, 5, 6])
    with torch.no_grad():
        with AttentionCapture(tiny.unet) as full:
            tiny.unet(x, t, ctx)
            ref = full.maps
        with AttentionCapture(tiny.unet, keep_cond_only=True, columns=cols) as cap:
            tiny.unet(x, t, ctx)
            sub = cap.maps
    for name, m in sub.items():
        assert m.shape[0] == 2 and m.shape[-1] == 3
        torch.testing.assert_close(m, ref[name][2:][..., cols])


def _loss_and_grads(unet, x, t, ctx, index, valid, masks64):
    unet.zero_grad(set_to_none=True)
    with AttentionCapture(unet) as cap:
        unet(x, t, ctx)
        maps = cap.by_size()
        masks = {s: m for s, m in masks_at_resolutions(masks64, maps.keys()).items()}
        g = grounding_losses(maps, index, valid, masks)
        (g.token.mean() + g.pixel.mean()).backward()
        n_maps = len(cap.maps)
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
    return g, grads, n_maps


def test_gradients_reach_unet_through_both_losses(tiny):
    unet = copy.deepcopy(tiny.unet)
    x, t, ctx = _inputs(tiny)
    index, valid, masks = _phrase_batch(3)
    index, valid, masks = index[1:], valid[1:], masks[1:]  # both samples have phrases
    for term in ("token", "pixel"):
        unet.zero_grad(set_to_none=True)
        with AttentionCapture(unet) as cap:
            unet(x, t, ctx)
            maps = cap.by_size()
            g = grounding_losses(maps, index, valid, masks_at_resolutions(masks, maps.keys()))
            getattr(g, term).sum().backward()
        q = unet.up_blocks[3].attentions[0].transformer_blocks[0].attn2.to_q.weight.grad
        assert q is not None and q.abs().sum() > 0, term
        # query projections feed the softmax; the up-block convolutions before them get gradient too
        assert unet.up_blocks[3].resnets[0].conv1.weight.grad.abs().sum() > 0, term


def test_gradient_checkpointing_gives_same_losses_and_grads(tiny):
    x, t, ctx = _inputs(tiny)
    index, valid, masks = _phrase_batch(3)
    index, valid, masks = index[1:], valid[1:], masks[1:]
    plain = copy.deepcopy(tiny.unet).train()
    ckpt = copy.deepcopy(tiny.unet).train()
    ckpt.enable_gradient_checkpointing()
    g1, grads1, n1 = _loss_and_grads(plain, x, t, ctx, index, valid, masks)
    g2, grads2, n2 = _loss_and_grads(ckpt, x, t, ctx, index, valid, masks)
    assert n1 == n2 == 10  # the recomputed forward neither doubled nor replaced the store
    torch.testing.assert_close(g1.token, g2.token)
    torch.testing.assert_close(g1.pixel, g2.pixel)
    assert grads1.keys() == grads2.keys() and len(grads1) > 0
    for k in grads1:
        torch.testing.assert_close(grads1[k], grads2[k], rtol=1e-4, atol=1e-6)


def test_bf16_autocast_runs_and_losses_are_float32(tiny):
    unet = copy.deepcopy(tiny.unet)
    x, t, ctx = _inputs(tiny)
    index, valid, masks = _phrase_batch(3)
    index, valid, masks = index[1:], valid[1:], masks[1:]
    with torch.autocast("cpu", dtype=torch.bfloat16), AttentionCapture(unet) as cap:
        out = unet(x, t, ctx).sample
        maps = cap.by_size()
        g = grounding_losses(maps, index, valid, masks_at_resolutions(masks, maps.keys()))
    assert out.dtype == torch.bfloat16
    assert all(m.dtype == torch.float32 for ms in maps.values() for m in ms)
    assert g.token.dtype == g.pixel.dtype == torch.float32
    assert torch.isfinite(g.token).all() and torch.isfinite(g.pixel).all()
    (g.token.sum() + g.pixel.sum()).backward()


def test_batch_with_ragged_phrases_equals_singles(tiny):
    b = 4
    x, t, ctx = _inputs(tiny, b=b)
    index, valid, masks = _phrase_batch(b)
    with torch.no_grad(), AttentionCapture(tiny.unet) as cap:
        tiny.unet(x, t, ctx)
        maps = cap.by_size()
        batch = grounding_losses(maps, index, valid, masks_at_resolutions(masks, maps.keys()))
        for i in range(b):
            tiny.unet(x[i : i + 1], t[i : i + 1], ctx[i : i + 1])
            m_i = cap.by_size()
            p_i = int(valid[i].any(-1).sum())
            sl = slice(0, max(p_i, 1))
            single = grounding_losses(
                m_i, index[i : i + 1, sl], valid[i : i + 1, sl], masks_at_resolutions(masks[i : i + 1, sl], m_i.keys())
            )
            torch.testing.assert_close(batch.token[i], single.token[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(batch.pixel[i], single.pixel[0], rtol=1e-5, atol=1e-6)
    has = valid.any(-1).any(-1)
    assert has.tolist() == [False, True, True, False]
    assert (batch.token[~has] == 0).all() and (batch.pixel[~has] == 0).all()  # no phrase: exactly 0
    assert (batch.token[has] > 0).all() and (batch.pixel[has] > 0).all()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_sdpa_output_gives_the_same_outputs_maps_and_gradients(tiny, checkpointing):
    """``sdpa_output``: the layer output from the fused kernel, the explicit maps for the losses only."""
    x, t, ctx = _inputs(tiny, b=3)
    index, valid, masks64 = _phrase_batch(3)
    runs = []
    for sdpa in (False, True):
        unet = copy.deepcopy(tiny.unet).train()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        with AttentionCapture(unet, sdpa_output=sdpa) as cap:
            out = unet(x, t, ctx).sample
            maps = cap.by_size()
            g = grounding_losses(maps, index, valid, masks_at_resolutions(masks64, maps.keys()))
            # both paths to the weights: through the layer outputs and through the maps
            (out.square().mean() + g.token.mean() + g.pixel.mean()).backward()
            processors = [unet.attn_processors[f"{n}.processor"] for n in cap.names]
        assert all(p.sdpa_output is sdpa for p in processors)
        grads = {n: p.grad for n, p in unet.named_parameters() if p.grad is not None}
        runs.append((out.detach(), {k: [m.detach() for m in v] for k, v in maps.items()}, g, grads))
    (out0, maps0, g0, grads0), (out1, maps1, g1, grads1) = runs
    torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-5)
    for size in maps0:
        for a, b in zip(maps1[size], maps0[size], strict=True):
            torch.testing.assert_close(a, b)
    torch.testing.assert_close(g1.token, g0.token)
    torch.testing.assert_close(g1.pixel, g0.pixel)
    assert grads0.keys() == grads1.keys() and len(grads0) > 0
    for k in grads0:
        torch.testing.assert_close(grads1[k], grads0[k], rtol=1e-4, atol=1e-6)
