"""ROI-token contrastive alignment: labels, loss vs brute force, ROI-Align geometry, hook, gradients, I/O."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tokencompose.phrase_ids import phrase_text_id, phrase_text_ids
from tokencompose.roi import (
    TAU_INIT,
    RoiAlignmentHead,
    block_channels,
    decoder_feature_hook,
    info_nce,
    phrase_text_embeddings,
    roi_features,
    same_text_mask,
)


def _same(texts: list[str]) -> torch.Tensor:
    """Same-text mask of a flat list of texts, through the ids ``collate`` builds."""
    return same_text_mask(phrase_text_ids([texts])[0])


def _unit(m: int, e: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(m, e, generator=g, dtype=torch.float64), dim=-1).float()


def _brute_force(img, txt, tau: float, texts: list[str], symmetric: bool) -> float:
    """Per-pair reference in float64 Python: -log(exp(s_ii/tau) / sum over i and the different-text j)."""
    norm = [" ".join(t.lower().split()) for t in texts]
    sim = (img.double() @ txt.double().T).tolist()
    m = len(texts)

    def direction(s) -> float:
        total = 0.0
        for i in range(m):
            den = sum(math.exp(s[i][j] / tau) for j in range(m) if j == i or norm[j] != norm[i])
            total += -math.log(math.exp(s[i][i] / tau) / den)
        return total / m

    forward = direction(sim)
    if not symmetric:
        return forward
    return 0.5 * (forward + direction([list(col) for col in zip(*sim, strict=True)]))


# ---------------------------------------------------------------------------------------------------
# Labels and loss
# ---------------------------------------------------------------------------------------------------
def test_same_text_mask_normalises_case_and_spaces():
    mask = _same(["A dog", " a  dog ", "cat", "dogs"])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_phrase_text_ids_are_stable_and_padded():
    # A fixed value: Python's salted hash() would differ per process, and DDP compares ids across processes.
    assert phrase_text_id("Red  Circle ") == phrase_text_id("red circle") == 2946446551055536404
    ids = phrase_text_ids([["dog", "cat"], [], ["Dog"]], num_phrases=3)
    assert ids.dtype == torch.long and ids.shape == (3, 3)
    assert ids[0, 0] == ids[2, 0] != ids[0, 1] and not ids[1].any() and not ids[:, 2].any()


TEXTS = ["dog", "cat", "Dog", "bird", "cat ", "tree"]


@pytest.mark.parametrize("symmetric", [False, True])
def test_loss_equals_brute_force_with_repeated_texts(symmetric):
    img, txt = _unit(6, 8, 1), _unit(6, 8, 2)
    tau = torch.tensor(0.2)
    got = info_nce(img, txt, tau, _same(TEXTS), symmetric)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_brute_force(img, txt, 0.2, TEXTS, symmetric), rel=1e-5)


def test_repeated_text_is_neither_negative_nor_positive():
    # Perfect alignment: img_i == txt_i, distinct texts orthogonal, repeats share one embedding (as
    # identical phrases would). Counting a repeat as a negative would cost >= log 2 per row; masked, ~0.
    basis = torch.eye(4)
    texts = ["dog", "cat", "dog", "bird"]
    emb = basis[[0, 1, 0, 2]]
    tau = torch.tensor(0.01)
    assert info_nce(emb, emb, tau, _same(texts)).item() < 1e-6
    unmasked = info_nce(emb, emb, tau, torch.eye(4, dtype=torch.bool))
    assert unmasked.item() == pytest.approx(2 / 4 * math.log(2), rel=1e-4)  # the two "dog" rows


def test_denominators_hold_exactly_the_different_texts():
    # d loss / d img_i depends on txt_j only for j == i or text_j != text_i: perturb each txt_j and look.
    img, txt = _unit(6, 8, 3), _unit(6, 8, 4)
    same = _same(TEXTS)
    tau = torch.tensor(0.1)

    def grad_img(t):
        x = img.clone().requires_grad_(True)
        info_nce(x, t, tau, same).backward()
        return x.grad

    base = grad_img(txt)
    for j in range(6):
        moved = txt.clone()
        moved[j] = _unit(1, 8, 10 + j)[0]
        changed = (grad_img(moved) - base).abs().sum(dim=1) > 1e-7  # which rows' gradients moved
        for i in range(6):
            in_denominator = i == j or not bool(same[i, j])
            assert bool(changed[i]) == in_denominator, (i, j)


def test_positive_is_the_diagonal():
    # Swapping the texts of two different phrases must raise the loss of an aligned batch.
    emb = torch.eye(3)
    same = _same(["a", "b", "c"])
    tau = torch.tensor(0.1)
    assert info_nce(emb, emb, tau, same) < info_nce(emb, emb[[1, 0, 2]], tau, same)


def test_degenerate_batches_give_exact_zero_with_graph():
    tau = torch.tensor(0.07, requires_grad=True)
    for m, texts in ((0, []), (1, ["dog"]), (3, ["dog", "Dog", "dog "])):
        img = _unit(max(m, 1), 4, 5)[:m].requires_grad_(True)
        txt = _unit(max(m, 1), 4, 6)[:m].requires_grad_(True)
        loss = info_nce(img, txt, tau, _same(texts), symmetric=True)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert torch.isfinite(img.grad).all() and torch.isfinite(tau.grad)
        assert not img.grad.any() and not txt.grad.any() and tau.grad == 0


@pytest.mark.parametrize("symmetric", [False, True])
def test_padding_rows_are_masked_not_selected(symmetric):
    # Padding rows (any embedding, any id, even a repeat of a real text's) change neither loss nor gradients.
    img, txt = _unit(6, 8, 11), _unit(6, 8, 12)
    ids = phrase_text_ids([TEXTS])[0]
    valid = torch.tensor([True, False, True, True, False, True])
    ids_padded = ids.clone()
    ids_padded[1] = ids[0]  # a padding slot whose id equals a real phrase's
    tau = torch.tensor(0.15)

    def run(x, t, i, v):
        x, t = x.clone().requires_grad_(True), t.clone().requires_grad_(True)
        loss = info_nce(x, t, tau, same_text_mask(i), symmetric, valid=v)
        loss.backward()
        return loss, x.grad, t.grad

    loss, g_img, g_txt = run(img, txt, ids_padded, valid)
    ref, r_img, r_txt = run(img[valid], txt[valid], ids[valid], None)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(g_img[valid], r_img)
    torch.testing.assert_close(g_txt[valid], r_txt)
    assert not g_img[~valid].any() and not g_txt[~valid].any()  # exactly zero, not just small


# ---------------------------------------------------------------------------------------------------
# ROI-Align geometry
# ---------------------------------------------------------------------------------------------------
def _coordinate_features(b: int, h: int, w: int) -> torch.Tensor:
    """``[b, 3, h, w]``: channel 0 = column index, 1 = row index, 2 = batch index."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    out = torch.stack([xs, ys, torch.zeros(h, w)])[None].repeat(b, 1, 1, 1)
    out[:, 2] = torch.arange(b, dtype=torch.float32)[:, None, None]
    return out


def test_roi_align_maps_boxes_to_their_feature_cells():
    feats = _coordinate_features(2, 8, 8)  # 64-px image -> 8x8 features: 8 pixels per cell
    boxes = torch.tensor(
        [
            [[16, 8, 40, 32], [0, 0, 0, 0], [8, 8, 24, 56]],
            [[0, 0, 0, 0], [32, 16, 56, 24], [0, 0, 0, 0]],
        ],
        dtype=torch.float32,
    )
    valid = torch.tensor([[True, False, True], [False, True, False]])
    for output_size, ratio in ((1, 2), (2, 2), (3, 4), (4, 1)):
        got = roi_features(feats, boxes, valid, (64, 64), output_size, ratio)
        assert got.shape == (2, 3, 3) and not got[~valid].any()  # padding slots are zero rows
        # Pixel box [x0, x1) covers cells [x0/8, x1/8); the mean of cell indices is its centre - 0.5.
        expected = torch.tensor([[3.0, 2.0, 0.0], [1.5, 3.5, 0.0], [5.0, 2.0, 1.0]])  # row-major (b, p)
        torch.testing.assert_close(got[valid], expected, rtol=0, atol=1e-5)


def test_roi_align_cell_weights_and_non_square_scale():
    # One-hot features (channel k = cell k): pooling must put its mass on exactly the box's cells.
    h, w, height, width = 8, 16, 64, 128  # 8 px per cell on both axes
    feats = torch.eye(h * w).reshape(h * w, h, w)[None]
    boxes = torch.tensor([[[32, 8, 56, 32]]], dtype=torch.float32)  # cells x 4..6, y 1..3
    # Bin = one cell and one sample per bin: samples at cell centres exactly.
    got = roi_features(feats, boxes, torch.ones(1, 1, dtype=torch.bool), (height, width), 3, 1)[0, 0]
    expected = torch.zeros(h, w)
    expected[1:4, 4:7] = 1 / 9
    torch.testing.assert_close(got.reshape(h, w), expected, rtol=0, atol=1e-6)


def test_roi_features_with_no_valid_box_is_zero():
    boxes = torch.full((2, 3, 4), float("nan"))  # whatever padding holds must not reach roi_align
    out = roi_features(torch.randn(2, 5, 8, 8), boxes, torch.zeros(2, 3, dtype=torch.bool), (64, 64))
    assert out.shape == (2, 3, 5) and not out.any()


def test_phrase_text_embeddings_mean_over_span():
    hidden = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)
    token_index = torch.tensor([[[1, 2], [4, 0]], [[3, 0], [0, 0]]])
    token_valid = torch.tensor([[[True, True], [True, False]], [[True, False], [False, False]]])
    got = phrase_text_embeddings(hidden, token_index, token_valid)
    expected = torch.stack(
        [
            torch.stack([hidden[0, 1:3].mean(0), hidden[0, 4]]),
            torch.stack([hidden[1, 3], torch.zeros(3)]),
        ]
    )
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------------------------------------------
# Hook, head, gradients
# ---------------------------------------------------------------------------------------------------
def _unet_inputs(b: int = 2):
    g = torch.Generator().manual_seed(7)
    return torch.randn(b, 4, 8, 8, generator=g), torch.tensor([10] * b), torch.randn(b, 77, 32, generator=g)


def test_hook_captures_block_output_in_the_same_forward(tiny):
    unet = tiny.unet.eval()
    latents, t, cond = _unet_inputs()
    with torch.no_grad():
        reference = unet(latents, t, cond).sample
    calls = []
    probe = unet.up_blocks[2].register_forward_hook(lambda m, a, o: calls.append(o))
    n_hooks = len(unet._forward_pre_hooks)
    try:
        with torch.no_grad(), decoder_feature_hook(unet, "up_blocks.2") as cap:
            out = unet(latents, t, cond).sample
            first = cap.features
            assert first.shape == (2, block_channels(unet, "up_blocks.2"), 8, 8)
            assert len(calls) == 1 and first is calls[0]  # one UNet pass, the block's own output
            torch.testing.assert_close(out, reference, rtol=0, atol=0)  # the hook changes nothing
            unet(latents + 1, t, cond)  # a new forward replaces it (pre-hook clears)
            assert cap.features is calls[1] and not torch.equal(cap.features, first)
    finally:
        probe.remove()
    assert len(unet._forward_pre_hooks) == n_hooks


def test_hook_first_write_wins_under_gradient_checkpointing(tiny):
    import torch.utils.checkpoint

    unet = tiny.unet.train()
    unet.enable_gradient_checkpointing()
    block = "up_blocks.2.resnets.0"  # checkpointed: recomputed during backward
    calls = []
    probe = unet.get_submodule(block).register_forward_hook(lambda m, a, o: calls.append(1))
    latents, t, cond = _unet_inputs()
    # Full recomputation (the default non-reentrant checkpoint may stop early, before hooks run).
    with decoder_feature_hook(unet, block) as cap, torch.utils.checkpoint.set_checkpoint_early_stop(False):
        out = unet(latents, t, cond).sample
        held = cap.features
        (out.square().mean() + held.square().mean()).backward()
        assert len(calls) == 2  # the recomputation did run the block again ...
        assert cap.features is held  # ... and did not replace the captured map
    probe.remove()
    unet.disable_gradient_checkpointing()
    unet.zero_grad(set_to_none=True)


def _batch():
    boxes = torch.tensor([[[8, 8, 40, 40], [24, 0, 64, 32]], [[0, 16, 32, 64], [0, 0, 0, 0]]], dtype=torch.float32)
    box_valid = torch.tensor([[True, True], [True, False]])
    token_index = torch.tensor([[[2, 3], [5, 0]], [[1, 2], [0, 0]]])
    token_valid = torch.tensor([[[True, True], [True, False]], [[True, True], [False, False]]])
    return boxes, box_valid, token_index, token_valid, phrase_text_ids([["red circle", "square"], ["Red circle"]])


def test_gradients_reach_unet_heads_and_temperature(tiny):
    unet, text_encoder = tiny.unet.train(), tiny.text_encoder
    unet.zero_grad(set_to_none=True)
    head = RoiAlignmentHead.for_unet(unet, text_encoder.config.hidden_size, embed_dim=16, symmetric=True)
    boxes, box_valid, token_index, token_valid, texts = _batch()
    ids = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hidden = text_encoder(ids).last_hidden_state  # frozen text side
    latents, t, _ = _unet_inputs()
    with decoder_feature_hook(unet, head.block) as cap:
        unet(latents, t, hidden)
        out = head(cap.features, boxes, box_valid, (64, 64), hidden, token_index, token_valid, texts)
    # Three valid phrases, but "red circle" twice: only the pairs against "square" contrast.
    assert out.num_phrases.item() == 3 and out.skipped is None and out.loss.item() > 0
    out.loss.backward()
    for name, module in (("unet block", unet.up_blocks[2]), ("unet input", unet.conv_in)):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name
    for name, module in (("image head", head.image_proj), ("text head", head.text_proj)):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name
    assert head.log_tau.grad is not None and head.log_tau.grad.abs() > 0
    unet.zero_grad(set_to_none=True)


def test_head_single_phrase_is_zero_without_nan():
    head = RoiAlignmentHead(feature_dim=6, text_dim=5, embed_dim=4)
    feats = torch.randn(1, 6, 8, 8, requires_grad=True)
    out = head(
        feats,
        torch.tensor([[[0.0, 0.0, 32.0, 32.0]]]),
        torch.tensor([[True]]),
        (64, 64),
        torch.randn(1, 77, 5),
        torch.tensor([[[1]]]),
        torch.tensor([[[True]]]),
        phrase_text_ids([["dog"]]),
    )
    assert out.loss.item() == 0.0 and out.num_phrases.item() == 1 and "1 valid" in out.skipped
    out.loss.backward()
    grads = [feats.grad] + [p.grad for p in head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and not g.any() for g in grads)


def test_head_loss_matches_info_nce_on_its_embeddings():
    head = RoiAlignmentHead(feature_dim=6, text_dim=5, embed_dim=4, symmetric=True)
    boxes, box_valid, token_index, token_valid, texts = _batch()
    feats, hidden = torch.randn(2, 6, 8, 8), torch.randn(2, 77, 5)
    out = head(feats, boxes, box_valid, (64, 64), hidden, token_index, token_valid, texts)
    img = F.normalize(head.image_proj(roi_features(feats, boxes, box_valid, (64, 64))[box_valid]), dim=-1)
    txt = F.normalize(head.text_proj(phrase_text_embeddings(hidden, token_index, token_valid)[box_valid]), dim=-1)
    flat = ["red circle", "square", "Red circle"]
    ref = _brute_force(img.detach(), txt.detach(), TAU_INIT, flat, symmetric=True)
    assert out.loss.item() == pytest.approx(ref, rel=1e-5)


def test_temperature_clamped_with_straight_through_gradient():
    head = RoiAlignmentHead(feature_dim=2, text_dim=2, embed_dim=2)
    assert head.temperature().item() == pytest.approx(0.07)
    with torch.no_grad():
        head.log_tau.fill_(math.log(1e-4))
    tau = head.temperature()
    assert tau.item() == pytest.approx(0.01)
    tau.backward()
    assert head.log_tau.grad.item() != 0.0  # not stuck at the bound
    head.clamp_temperature_()
    assert head.log_tau.item() == pytest.approx(math.log(0.01))
    groups = head.param_groups(0.01)
    assert groups[1]["params"] == [head.log_tau] and groups[1]["weight_decay"] == 0.0
    assert len(groups[0]["params"]) == 8


def test_save_load_roundtrip(tmp_path):
    head = RoiAlignmentHead(feature_dim=6, text_dim=5, embed_dim=4, block="up_blocks.1", symmetric=True)
    with torch.no_grad():
        head.log_tau.fill_(-1.5)
    path = head.save(tmp_path / "checkpoint")
    assert path.name == "roi_head.safetensors"
    loaded = RoiAlignmentHead.load(tmp_path / "checkpoint")
    assert loaded.config == head.config and loaded.block == "up_blocks.1" and loaded.symmetric
    for (k, a), (_, b) in zip(head.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_head_runs_in_float32_under_autocast_with_bf16_features():
    head = RoiAlignmentHead(feature_dim=6, text_dim=5, embed_dim=4)
    boxes, box_valid, token_index, token_valid, texts = _batch()
    feats = torch.randn(2, 6, 8, 8).bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(feats, boxes, box_valid, (64, 64), torch.randn(2, 77, 5).bfloat16(), token_index, token_valid, texts)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    assert feats.grad.dtype == torch.bfloat16 and feats.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------
# No host sync in the step: ids from collate, padding as masks, one graph
# ---------------------------------------------------------------------------------------------------
def _sample(phrases: list[str], boxes: list[list[float]]) -> dict:
    k = len(phrases)
    return {
        "index": 0,
        "caption": "a caption",
        "input_ids": torch.zeros(77, dtype=torch.long),
        "positions": [[1 + i] for i in range(k)],
        "masks": {(2, 2): torch.ones(k, 4, dtype=torch.bool)},
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "box_valid": torch.ones(k, dtype=torch.bool),
        "phrases": phrases,
    }


def test_collate_builds_phrase_ids_aligned_with_phrases():
    from tokencompose.data.dataset import collate

    batch = collate([_sample(["red circle", "square"], [[0, 0, 8, 8]] * 2), _sample(["Red  circle"], [[0, 0, 8, 8]])])
    assert torch.equal(batch["phrase_ids"], phrase_text_ids([["red circle", "square"], ["red circle"]], 2))
    assert batch["phrase_ids"].shape == batch["box_valid"].shape


def test_head_loss_compiles_as_one_graph_and_matches_eager():
    """``fullgraph=True`` raises at any graph break, and every host sync (``.item()``, ``.tolist()``,
    ``bool(tensor)``, ``nonzero``, boolean-mask indexing, ``torch.unique``) is one on a CPU trace."""
    import torch._dynamo

    head = RoiAlignmentHead(feature_dim=6, text_dim=5, embed_dim=4, symmetric=True)
    boxes, box_valid, token_index, token_valid, ids = _batch()
    boxes[1, 1] = float("nan")  # padding slot: masked, never selected
    feats = torch.randn(2, 6, 8, 8, requires_grad=True)
    hidden = torch.randn(2, 77, 5)

    def loss(feats):
        out = head(feats, boxes, box_valid, (64, 64), hidden, token_index, token_valid, ids)
        return out.loss, out.num_phrases, out.contrasted

    torch._dynamo.reset()
    try:
        compiled = torch.compile(loss, backend="eager", fullgraph=True)(feats)
    finally:
        torch._dynamo.reset()
    eager = loss(feats)
    for c, e in zip(compiled, eager, strict=True):
        torch.testing.assert_close(c, e)
    assert compiled[1].item() == 3 and compiled[0] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="sync debug mode is CUDA-only")
def test_head_loss_makes_no_cuda_sync():
    head = RoiAlignmentHead(feature_dim=6, text_dim=5, embed_dim=4, symmetric=True).cuda()
    boxes, box_valid, token_index, token_valid, ids = (x.cuda() for x in _batch())
    feats, hidden = torch.randn(2, 6, 8, 8, device="cuda"), torch.randn(2, 77, 5, device="cuda")
    head(feats, boxes, box_valid, (64, 64), hidden, token_index, token_valid, ids)  # warm-up (lazy init)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = head(feats, boxes, box_valid, (64, 64), hidden, token_index, token_valid, ids)
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.loss.item() > 0
