"""Attention capture on joint-attention transformers: tiny random-init SD3 and Flux models of the real classes.

The reference for every map is the stock processor itself: :class:`_Reference` runs it unchanged and
materialises the full joint softmax from the very queries and keys it hands to
``scaled_dot_product_attention``, so the check does not depend on a re-implementation of the layer.
"""

from __future__ import annotations

import copy
import inspect
from unittest import mock

import diffusers
import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from torch.utils._python_dispatch import TorchDispatchMode

from tokencompose.attention import AttentionCapture, cross_attention_names, select_layers
from tokencompose.joint_attention import JointCaptureProcessor, joint_text_probs, token_grid

L = 8  # text tokens
DIFFUSERS = tuple(int(x) for x in diffusers.__version__.split(".")[:2])
BATCHED_IDS = DIFFUSERS < (0, 31)  # diffusers 0.30 takes img_ids/txt_ids as [B, N, 3]
SD3_CONFIG = dict(
    sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
    joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
)  # fmt: skip
FLUX_CONFIG = dict(
    patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
)  # fmt: skip


@pytest.fixture(scope="module")
def sd3():
    torch.manual_seed(0)
    return SD3Transformer2DModel(**SD3_CONFIG).eval()


@pytest.fixture(scope="module")
def flux():
    torch.manual_seed(0)
    return FluxTransformer2DModel(**FLUX_CONFIG).eval()


def sd3_inputs(b: int, h: int, w: int, seed: int = 0) -> dict:
    """Inputs for an (h, w) patch grid: latents [b, 4, 2h, 2w] (patch size 2)."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(b, 4, 2 * h, 2 * w, generator=g),
        encoder_hidden_states=torch.randn(b, L, 32, generator=g),
        pooled_projections=torch.randn(b, 32, generator=g),
        timestep=torch.randint(0, 1000, (b,), generator=g),
    )


def flux_inputs(b: int, h: int, w: int, seed: int = 0) -> dict:
    """As FluxPipeline builds them: 2x2-packed latents [b, h*w, 16], ids (0, row, col), timestep in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    packed = FluxPipeline._pack_latents(torch.randn(b, 4, 2 * h, 2 * w, generator=g), b, 4, 2 * h, 2 * w)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    img_ids, txt_ids = img_ids.reshape(h * w, 3), torch.zeros(L, 3)
    if BATCHED_IDS:
        img_ids, txt_ids = img_ids.expand(b, -1, -1), txt_ids.expand(b, -1, -1)
    return dict(
        hidden_states=packed,
        encoder_hidden_states=torch.randn(b, L, 32, generator=g),
        pooled_projections=torch.randn(b, 32, generator=g),
        timestep=torch.rand(b, generator=g),
        img_ids=img_ids,
        txt_ids=txt_ids,
    )


def _model(request, which: str):
    """(model, inputs(b, h, w), where the image and the text sit in the joint sequence of n image tokens)."""
    if which == "sd3":  # [image, text]
        return request.getfixturevalue("sd3"), sd3_inputs, lambda n: (slice(0, n), slice(n, None))
    return request.getfixturevalue("flux"), flux_inputs, lambda n: (slice(L, None), slice(0, L))  # [text, image]


class _Reference:
    """The stock processor, plus the full softmax materialised from the q/k it hands to SDPA."""

    def __init__(self, stock, name: str, sink: dict) -> None:
        self.stock, self.name, self.sink = stock, name, sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        real = torch.nn.functional.scaled_dot_product_attention

        def spy(*args, **kwargs):  # diffusers' dispatcher passes query=, key=, value= by name
            q, k = (args + (None, None))[:2] if args else (kwargs["query"], kwargs["key"])
            with torch.autocast("cpu", enabled=False):  # float32 from the (bf16 under autocast) q and k
                logits = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5  # [B, H, S, S]
            self.sink.setdefault(self.name, logits.detach())
            return real(*args, **kwargs)

        rope = () if image_rotary_emb is None else (image_rotary_emb,)
        with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", spy):
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, *rope)


def processors(model) -> dict[str, object]:
    """``{attention module name: processor}`` (diffusers 0.30's Flux model has no ``attn_processors``)."""
    return {n: m.processor for n, m in model.named_modules() if hasattr(m, "set_processor")}


def reference_run(model, inputs: dict, names: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stock output and ``{layer: full logits [B, H, S, S] in float32}`` of the given layers."""
    sink: dict[str, torch.Tensor] = {}
    before = processors(model)
    for name in names:
        model.get_submodule(name).set_processor(_Reference(before[name], name, sink))
    try:
        with torch.no_grad():
            out = model(**inputs).sample
    finally:
        for name in names:
            model.get_submodule(name).set_processor(before[name])
    assert set(sink) == set(names)
    return out, sink


def expected_map(logits: torch.Tensor, image: slice, text: slice, normalize: str) -> torch.Tensor:
    if normalize == "joint":
        return logits.softmax(-1)[:, :, image, text]
    return logits[:, :, image, text].softmax(-1)


def test_text_conditioned_layers_and_groups(sd3, flux):
    assert cross_attention_names(sd3) == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    double = ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    single = ["single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
    assert cross_attention_names(flux) == double + single
    assert select_layers(flux, ["joint"]) == double and select_layers(flux, "single") == single
    assert select_layers(sd3, ["joint"]) == double
    # a block name selects its attention; "transformer_blocks.1" is not a prefix of "single_transformer_blocks.1"
    assert select_layers(flux, ["single_transformer_blocks.1", "transformer_blocks.1"]) == [double[1], single[1]]
    assert select_layers(flux, ["single_*.0.*"]) == [single[0]]
    for groups in (["mid", "up"], ["down"]):
        with pytest.raises(ValueError, match="matches no"):
            select_layers(flux, groups)
    with pytest.raises(ValueError, match="normalize"):
        AttentionCapture(sd3, ["joint"], normalize="softmax")


def test_sd3_grid_is_the_latent_size_over_the_patch_size(sd3):
    x, ctx, pooled, t = sd3_inputs(1, 2, 5).values()  # latents 4 x 10, patch 2
    with torch.no_grad(), AttentionCapture(sd3, ["joint"], normalize="text") as cap:
        sd3(x, ctx, pooled, t)  # positionally, unlike the pipeline
        groups = cap.by_size()
    assert list(groups) == [(2, 5)] and [m.shape for m in groups[(2, 5)]] == [(1, 2, 10, L)] * 2


@pytest.mark.skipif(
    "dual_attention_layers" not in inspect.signature(SD3Transformer2DModel.__init__).parameters,
    reason="SD3.5 options (dual attention, qk_norm) arrived in diffusers 0.31",
)
def test_sd35_variant_image_only_attn2_is_not_text_conditioned_and_qk_norms_are_applied():
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**SD3_CONFIG, dual_attention_layers=(0,), qk_norm="rms_norm").eval()
    names = cross_attention_names(model)
    assert names == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]  # not transformer_blocks.0.attn2
    inputs = sd3_inputs(2, 3, 4)
    ref_out, logits = reference_run(model, inputs, names)
    with torch.no_grad(), AttentionCapture(model, ["joint"]) as cap:
        out = model(**inputs).sample
        maps = cap.maps
    assert torch.equal(out, ref_out)
    for name in names:  # norm_added_q/k are RMSNorms here: a map without them would differ
        torch.testing.assert_close(maps[name], expected_map(logits[name], slice(0, 12), slice(12, None), "joint"))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("normalize", ["joint", "text"])
@pytest.mark.parametrize("which", ["sd3", "flux"])
def test_maps_equal_materialised_softmax_and_output_equals_stock(request, which, normalize, dtype):
    model, make_inputs, order = _model(request, which)
    h, w = 3, 5  # non-square: a transposed grid would not pass
    inputs = make_inputs(2, h, w)
    names = cross_attention_names(model)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    with autocast:
        ref_out, logits = reference_run(model, inputs, names)
        with torch.no_grad(), AttentionCapture(model, names, normalize=normalize) as cap:
            out = model(**inputs).sample
            groups = cap.by_size()
            maps = cap.maps
    assert torch.equal(out, ref_out)  # the capture changes no bit of the output
    assert list(groups) == [(h, w)] and len(groups[(h, w)]) == len(names)
    image, text = order(h * w)
    for name in names:
        m = maps[name]
        assert m.shape == (2, 2, h * w, L) and m.dtype == torch.float32
        expected = expected_map(logits[name], image, text, normalize)
        if dtype == "fp32":
            torch.testing.assert_close(m, expected, rtol=1e-5, atol=1e-7)
        else:  # logits from bf16 q/k, rounded to bf16 before the float32 reductions
            torch.testing.assert_close(m, expected, rtol=2e-2, atol=2e-4)
        sums = m.sum(-1)
        if normalize == "text":
            torch.testing.assert_close(sums, torch.ones_like(sums))
        else:  # the image keys take the rest of the joint softmax
            assert (sums < 0.99).all() and (sums > 0).all()


@pytest.mark.parametrize("which", ["sd3", "flux"])
def test_processors_restored_and_only_selected_layers_replaced(request, which):
    model, make_inputs, _ = _model(request, which)
    before = processors(model)
    chosen = select_layers(model, ["transformer_blocks.1"])
    with AttentionCapture(model, chosen) as cap:
        inside = processors(model)
        replaced = {k for k, p in inside.items() if isinstance(p, JointCaptureProcessor)}
        assert replaced == {"transformer_blocks.1.attn"} and cap.names == chosen
        assert all(inside[k] is before[k] for k in before if k not in replaced)
        with torch.no_grad():
            model(**make_inputs(1, 2, 2))
        assert list(cap.maps) == chosen
    after = processors(model)
    assert all(after[k] is before[k] for k in before)


@pytest.mark.parametrize("normalize", ["joint", "text"])
@pytest.mark.parametrize("which", ["sd3", "flux"])
def test_cond_half_and_column_subset(request, which, normalize):
    model, make_inputs, _ = _model(request, which)
    inputs = make_inputs(4, 2, 3)
    cols = torch.tensor([0, 3, 7])
    with torch.no_grad():
        with AttentionCapture(model, ["joint", "single"], normalize=normalize) as full:
            model(**inputs)
            ref = full.maps
        sub_capture = AttentionCapture(
            model, ["joint", "single"], normalize=normalize, keep_cond_only=True, columns=cols
        )
        with sub_capture as cap:
            model(**inputs)
            sub = cap.maps
    assert list(sub) == list(ref) and len(sub) == len(cross_attention_names(model))
    for name, m in sub.items():
        assert m.shape == (2, 2, 6, 3)
        torch.testing.assert_close(m, ref[name][2:][..., cols])


def test_flux_grid_comes_from_img_ids(flux):
    inputs = flux_inputs(1, 4, 2)
    with torch.no_grad(), AttentionCapture(flux, ["single"]) as cap:
        flux(**inputs)
        assert list(cap.by_size()) == [(4, 2)]
        transposed = flux_inputs(1, 2, 4)  # same N = 8 tokens, other grid
        flux(**transposed)
        assert list(cap.by_size()) == [(2, 4)]
    ids = inputs["img_ids"].reshape(-1, 3) if not BATCHED_IDS else inputs["img_ids"]
    assert token_grid(ids) == (4, 2)
    with pytest.raises(ValueError, match="row-major"):
        token_grid(ids.flip(-2))  # same positions, other token order: the maps' rows would be misplaced


def _map_loss(maps: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(m.square().sum() for m in maps.values())


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _reached(grads: dict[str, torch.Tensor], name: str) -> bool:
    """A nonzero gradient (a parameter whose output is concatenated and sliced off gets zeros, not None)."""
    return name in grads and bool(grads[name].abs().sum() > 0)


@pytest.mark.parametrize("normalize", ["joint", "text"])
def test_sd3_map_gradients_reach_the_captured_layer_only(sd3, normalize):
    model = copy.deepcopy(sd3)
    with AttentionCapture(model, ["transformer_blocks.0"], normalize=normalize) as cap:
        model(**sd3_inputs(2, 2, 3))
        _map_loss(cap.maps).backward()
    grads = _grads(model)
    attn = "transformer_blocks.0.attn."
    for p in ("to_q", "add_k_proj"):
        assert _reached(grads, f"{attn}{p}.weight"), p
    # joint: the image keys share the softmax; text: only the text keys are in it
    assert _reached(grads, f"{attn}to_k.weight") is (normalize == "joint")
    # the maps read no values and no text queries, and nothing after the captured block
    for p in ("to_v", "add_v_proj", "add_q_proj", "to_out.0", "to_add_out"):
        assert not _reached(grads, f"{attn}{p}.weight"), p
    assert not any(n.startswith(("transformer_blocks.1.", "norm_out", "proj_out")) for n in grads)
    assert _reached(grads, "context_embedder.weight")  # upstream: the text path into add_k_proj


def test_flux_map_gradients_reach_double_and_single_captured_layers(flux):
    model = copy.deepcopy(flux)
    with AttentionCapture(model, ["transformer_blocks.1", "single_transformer_blocks.0"]) as cap:
        model(**flux_inputs(2, 2, 3))
        assert list(cap.maps) == ["transformer_blocks.1.attn", "single_transformer_blocks.0.attn"]
        _map_loss(cap.maps).backward()
    grads = _grads(model)
    for p in ("to_q", "to_k", "add_k_proj"):
        assert _reached(grads, f"transformer_blocks.1.attn.{p}.weight"), p
    for p in ("single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k"):
        assert _reached(grads, f"{p}.weight"), p
    assert not _reached(grads, "single_transformer_blocks.0.attn.to_v.weight")  # the maps read no values
    assert not any(n.startswith(("single_transformer_blocks.1.", "norm_out", "proj_out")) for n in grads)


def _train_run(model, inputs, normalize, checkpointing, chunk_size=1024):
    model = copy.deepcopy(model).train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    with AttentionCapture(model, ["joint", "single"], normalize=normalize, chunk_size=chunk_size) as cap:
        out = model(**inputs).sample
        maps = cap.maps
        (_map_loss(maps) + out.square().mean()).backward()  # inside the context: see AttentionCapture
    return {k: m.detach() for k, m in maps.items()}, _grads(model)


@pytest.mark.parametrize("normalize", ["joint", "text"])
@pytest.mark.parametrize("which", ["sd3", "flux"])
def test_gradient_checkpointing_gives_same_maps_and_gradients(request, which, normalize):
    model, make_inputs, _ = _model(request, which)
    inputs = make_inputs(2, 2, 3)
    maps0, grads0 = _train_run(model, inputs, normalize, checkpointing=False)
    maps1, grads1 = _train_run(model, inputs, normalize, checkpointing=True)
    assert list(maps1) == list(maps0) and len(maps0) == len(cross_attention_names(model))
    for k in maps0:
        torch.testing.assert_close(maps1[k], maps0[k])
    assert grads0.keys() == grads1.keys() and len(grads0) > 0
    for k in grads0:
        torch.testing.assert_close(grads1[k], grads0[k], rtol=1e-4, atol=1e-6)


def test_chunk_size_does_not_change_maps_or_gradients(flux):
    inputs = flux_inputs(2, 3, 5)  # N = 15: chunks of 4 leave a remainder
    runs = [_train_run(flux, inputs, "joint", checkpointing=False, chunk_size=c) for c in (1024, 4, 1)]
    (maps0, grads0), *others = runs
    for maps, grads in others:
        for k in maps0:
            torch.testing.assert_close(maps[k], maps0[k], rtol=1e-6, atol=1e-8)
        for k in grads0:
            torch.testing.assert_close(grads[k], grads0[k], rtol=1e-5, atol=1e-6)


def test_joint_probs_function_gradients_match_materialised_softmax():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 10, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 3, 14, 8, generator=g, requires_grad=True)
    w = torch.randn(2, 3, 10, 4, generator=g)
    text = slice(10, None)
    (joint_text_probs(q, k, text, chunk_size=3) * w).sum().backward()
    gq, gk = q.grad.clone(), k.grad.clone()
    q.grad = k.grad = None
    ((q @ k.transpose(-1, -2) / 8**0.5).softmax(-1)[..., text] * w).sum().backward()
    torch.testing.assert_close(gq, q.grad)
    torch.testing.assert_close(gk, k.grad)
    assert k.grad[:, :, :10].abs().sum() > 0  # image keys get gradient through the normaliser


class _Shapes(TorchDispatchMode):
    """Shapes of every tensor an op produces (forward, and backward recomputation)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


@pytest.mark.parametrize("which", ["sd3", "flux"])
def test_no_image_by_joint_matrix_is_saved_or_materialised(request, which):
    """16x16 grid, L = 8: N = 256 image tokens, S = 264. The capture keeps [B, H, N, L] per layer only."""
    model, make_inputs, _ = _model(request, which)
    model = copy.deepcopy(model)
    n, s = 256, 256 + L
    inputs = make_inputs(1, 16, 16)
    big = {(n, s), (n, n)}
    saved: list[tuple[int, ...]] = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.softmax(torch.randn(1, 2, n, s, requires_grad=True), -1)  # a materialising capture: detected
    assert big & {x[-2:] for x in saved}
    saved.clear()

    # default chunk size (>= N: one chunk): without the checkpoint its [B, H, N, S] logits would be saved
    with AttentionCapture(model, ["joint", "single"]) as cap:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(**inputs)
            loss = _map_loss(cap.maps)
        loss.backward()
    assert (n, L) in {x[-2:] for x in saved}  # the hook sees the capture's tensors (the maps, for the loss)
    assert not big & {x[-2:] for x in saved}, sorted(x for x in saved if x[-2:] in big)

    # nor is one ever computed, forward or backward, with chunks of 64 queries: [B, H, 64, S] at most
    ops = _Shapes()
    with AttentionCapture(model, ["joint", "single"], chunk_size=64) as cap, ops:
        model(**inputs)
        _map_loss(cap.maps).backward()
    assert (64, s) in {x[-2:] for x in ops.shapes if len(x) >= 2}
    assert not big & {x[-2:] for x in ops.shapes if len(x) >= 2}
