"""torch.compile friendliness of the hot path: capture, losses, and the trainer's ``train.compile``.

Inductor's code generation is too slow for the suite on 2 CPU cores; these tests use the ``eager``
and ``aot_eager`` backends, which run Dynamo's tracing (graph breaks, guards, recompiles) and, for
``aot_eager``, AOTAutograd's forward/backward split: the parts that decide whether a compiled step
is one graph and gives the same numbers.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend
from torch._dynamo.utils import counters

from tokencompose.attention import AttentionCapture, no_store_replay_under_checkpoint
from tokencompose.losses import grounding_losses
from tokencompose.tokens import pad_token_positions

# torch versions without this setting break the graph at every checkpointed block holding a capture.
NO_REPLAY = hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint")
needs_no_replay = pytest.mark.skipif(not NO_REPLAY, reason="this torch cannot skip side-effect replay")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _inputs(unet, batch: int = 2):
    size, dim = unet.config.sample_size, unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, size, size, generator=g)
    ctx = torch.randn(batch, 77, dim, generator=g)
    return x, torch.tensor([10, 500])[:batch], ctx


@pytest.mark.parametrize("sdpa_output", [False, True], ids=["explicit-output", "sdpa-output"])
def test_capture_forward_is_one_graph_and_matches_eager(tiny, sdpa_output):
    """The supervised processors, the store and the clearing pre-hook trace with no graph break."""
    unet = copy.deepcopy(tiny.unet)
    x, t, ctx = _inputs(unet)
    with AttentionCapture(unet, sdpa_output=sdpa_output) as cap:

        def forward(x, t, ctx):
            return unet(x, t, ctx).sample, cap.maps

        eager_out, eager_maps = forward(x, t, ctx)
        eager_maps = dict(eager_maps)
        counter = CompileCounter()
        # fullgraph=True raises at the first graph break
        compiled_out, compiled_maps = torch.compile(forward, backend=counter, fullgraph=True)(x, t, ctx)
        assert counter.frame_count == 1
    torch.testing.assert_close(compiled_out, eager_out)
    assert list(compiled_maps) == list(eager_maps) and len(eager_maps) == len(cap.names)
    for name in eager_maps:
        torch.testing.assert_close(compiled_maps[name], eager_maps[name])


def test_grounding_losses_compile_fullgraph_and_match_eager():
    """fullgraph=True fails on any host sync (``.item()``, ``bool(tensor)``) or data-dependent branch."""
    b, h, n_tokens = 2, 2, 77
    g = torch.Generator().manual_seed(1)
    index, valid = pad_token_positions([[[1], [3, 4]], [[2]]])
    maps = {(s, s): [torch.randn(b, h, s * s, n_tokens, generator=g).softmax(-1) for _ in range(2)] for s in (4, 8)}
    masks = {(s, s): torch.rand(b, index.shape[1], s * s, generator=g) > 0.5 for s in (4, 8)}

    def losses(maps):
        out = grounding_losses(maps, index, valid, masks)
        return out.token, out.pixel

    leaves = {k: [m.clone().requires_grad_() for m in v] for k, v in maps.items()}
    eager = losses(leaves)
    eager_grads = torch.autograd.grad(sum(x.sum() for x in eager), [m for v in leaves.values() for m in v])
    compiled = torch.compile(losses, backend="aot_eager", fullgraph=True)(leaves)
    compiled_grads = torch.autograd.grad(sum(x.sum() for x in compiled), [m for v in leaves.values() for m in v])
    for a, e in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, e)
    for a, e in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, e)


def test_changing_column_subsets_compile_once(tiny):
    """``loss.capture_columns`` changes K every batch: after the first subset, no new trace per K."""
    unet = copy.deepcopy(tiny.unet)
    x, t, ctx = _inputs(unet)
    counter = CompileCounter()
    model = torch.compile(unet, backend=counter)
    with AttentionCapture(unet) as cap:
        for k in (3, 5, 7, 2):
            cap.columns = torch.arange(1, 1 + k)
            model(x, t, ctx)
            assert all(m.shape[-1] == k for m in cap.maps.values())
    assert counter.frame_count == 1


@needs_no_replay
def test_gradient_checkpointing_under_compile_is_one_graph_and_correct(tiny):
    """Storing a map inside a checkpointed block is a side effect, which Dynamo by default answers with a
    graph break (those blocks then run eagerly). With ``skip_fwd_side_effects_in_bwd_under_checkpoint``
    (what the trainer sets; not storing during the recomputation is first-write-wins' rule anyway) the
    checkpointed UNet is one graph, and its losses and gradients must be the eager ones."""
    unet = copy.deepcopy(tiny.unet)
    unet.enable_gradient_checkpointing()
    unet.train()
    x, t, ctx = _inputs(unet)
    index, valid = pad_token_positions([[[1], [2]], [[3], [4]]])

    def objective(model):
        # backward inside the context: the recomputation runs the processors installed at that time
        with AttentionCapture(unet) as cap:
            out = model(x, t, ctx).sample
            maps = cap.by_size()
            masks = {s: torch.ones(2, 2, s[0] * s[1], dtype=torch.bool).tril(s[0]) for s in maps}
            g = grounding_losses(maps, index, valid, masks)
            loss = out.square().mean() + g.token.mean() + 1e-2 * g.pixel.mean()
            grads = torch.autograd.grad(loss, [p for p in unet.parameters() if p.requires_grad])
        return loss.detach(), grads, len(maps)

    eager_loss, eager_grads, groups = objective(unet)
    counter = CompileCounterWithBackend("aot_eager")
    with no_store_replay_under_checkpoint():
        compiled_loss, compiled_grads, compiled_groups = objective(torch.compile(unet, backend=counter))
    assert counter.frame_count == 1  # no graph break
    assert groups == compiled_groups
    torch.testing.assert_close(compiled_loss, eager_loss)
    for a, e in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


@needs_no_replay
def test_trainer_compile_and_channels_last_match_eager(tmp_path):
    """``train.compile`` (aot_eager: Dynamo + AOTAutograd) with channels-last weights and gradient
    checkpointing: one graph, and the eager losses."""
    from tokencompose.config import load_config
    from tokencompose.train import train
    from train_util import config_dict, make_base, make_data

    base, data = make_base(tmp_path), make_data(tmp_path, num=4)

    def losses(run: str, *overrides: str) -> list[dict]:
        cfg = load_config(
            config_dict(base, data, tmp_path / run),
            ["train.max_steps=2", "log.tensorboard=false", "log.curves=false", *overrides],
        )
        result = train(cfg)
        assert result.step == 2
        return [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]

    eager = losses("eager")
    assert counters["stats"]["unique_graphs"] == 0
    compiled = losses(
        "compiled",
        "train.compile=true",
        "train.compile_backend=aot_eager",
        "train.channels_last=true",
        "train.grad_checkpointing=true",
    )
    assert counters["stats"]["unique_graphs"] == 1  # the UNet ran compiled, as one graph
    for e, c in zip(eager, compiled, strict=True):
        for key in ("loss/total", "loss/denoise", "loss/token", "loss/pixel"):
            assert c[key] == pytest.approx(e[key], rel=1e-4, abs=1e-6), key
