"""Pure parts of the trainer: schedule, data order and sharding, noise slicing, EMA, curves, checkpoint listing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokencompose.config import OptimConfig
from tokencompose.train.checkpoint import STATE_FILE, list_checkpoints
from tokencompose.train.curves import minmax_per_epoch, smooth
from tokencompose.train.data import EpochBatchSampler, SeededSamples
from tokencompose.train.ema import EMA
from tokencompose.train.setup import lr_at
from tokencompose.train.step import NoiseSource


def test_constant_lr_with_linear_warmup():
    assert [lr_at(s, OptimConfig(lr=1.0, warmup_steps=4)) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_at(0, OptimConfig(lr=5e-6)) == 5e-6


def _epoch(sampler, epoch, start=0):
    sampler.set_position(epoch, start)
    return list(sampler)


def test_global_batches_do_not_depend_on_the_number_of_processes():
    one = EpochBatchSampler(n=10, batch_size=4, seed=3)
    ranks = [EpochBatchSampler(n=10, batch_size=2, seed=3, num_replicas=2, rank=r) for r in range(2)]
    for epoch in range(3):
        single = _epoch(one, epoch)
        split = [_epoch(s, epoch) for s in ranks]
        assert len(single) == 2  # 10 samples, global batch 4: the incomplete third batch is dropped
        assert single == [a + b for a, b in zip(*split, strict=True)]
    assert _epoch(one, 0) != _epoch(one, 1)  # reshuffled each epoch
    keys = [k for b in _epoch(one, 1) for k in b]
    assert all(10 <= k < 20 for k in keys) and len(set(keys)) == 8  # keys carry the epoch


def test_resume_position_skips_consumed_batches():
    s = EpochBatchSampler(n=12, batch_size=2, seed=0)
    assert _epoch(s, 2, start=4) == _epoch(s, 2)[4:]
    s.set_position(2, 4)
    assert len(s) == 2
    with pytest.raises(ValueError, match="fewer than one global batch"):
        EpochBatchSampler(n=3, batch_size=2, seed=0, num_replicas=2)


def test_per_sample_randomness_is_keyed_by_seed_epoch_and_index():
    class Rand:
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return float(torch.rand(()))

    ds = SeededSamples(Rand(), seed=7)
    torch.manual_seed(0)
    a = [ds[k] for k in (0, 1, 7)]
    torch.manual_seed(123)
    before = torch.rand(())
    torch.manual_seed(123)
    b = [ds[k] for k in (7, 1, 0)][::-1]
    assert a == b  # independent of order and of the global RNG
    assert torch.rand(()) == before  # and the global RNG is left untouched
    assert ds[0] != ds[5]  # same sample, next epoch: new draw
    assert SeededSamples(Rand(), seed=8)[0] != a[0]


def test_noise_of_a_process_is_its_slice_of_the_global_batch():
    cpu = torch.device("cpu")
    full = NoiseSource(seed=1, device=cpu)
    parts = [NoiseSource(seed=1, device=cpu, num_processes=2, process_index=r) for r in range(2)]
    t_full = full.timesteps(4, 1000, cpu)
    x_full = full.randn((4, 4, 2, 2), cpu)
    t = [p.timesteps(2, 1000, cpu) for p in parts]
    x = [p.randn((2, 4, 2, 2), cpu) for p in parts]
    assert torch.equal(torch.cat(t), t_full) and torch.equal(torch.cat(x), x_full)
    state = full.state_dict()
    nxt = full.randn((1, 3), cpu)
    full.load_state_dict(state)
    assert torch.equal(full.randn((1, 3), cpu), nxt)


def test_ema_tracks_with_warmup_and_round_trips():
    m = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(0.0)
    ema = EMA(m, decay=0.5)
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema.step(m)  # decay min(0.5, 1/10) = 0.1 -> 0.9 of the way
    assert torch.allclose(ema.shadow[0], torch.full((1, 2), 0.9))
    other = EMA(m, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow[0], ema.shadow[0]) and other.num_updates == 1


def test_curve_helpers():
    v = np.array([4.0, 2.0, 3.0, 10.0, 30.0, 20.0])
    e = np.array([0, 0, 0, 1, 1, 1])
    assert minmax_per_epoch(v, e).tolist() == [1.0, 0.0, 0.5, 0.0, 1.0, 0.5]
    assert smooth(np.array([2.0, 2.0, 2.0]), 0.9).tolist() == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected


def test_only_complete_checkpoints_count(tmp_path):
    for name in ("step-00000002", "step-00000010", ".tmp-step-00000012", "step-00000011"):
        (tmp_path / name).mkdir()
    for name in ("step-00000002", "step-00000010", ".tmp-step-00000012"):
        (tmp_path / name / STATE_FILE).write_text("{}")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 10]  # no temp folder, no folder without state


def test_precision_fallbacks_on_cpu():
    from tokencompose.train.setup import resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("fp16", cpu) == "fp32"  # no loss scaler on the CPU
    assert resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("fp32", cpu) == "fp32"


def test_resume_with_another_batch_layout_is_refused():
    from tokencompose.errors import UserError
    from tokencompose.train.checkpoint import TrainState

    noise = NoiseSource(seed=0, device=torch.device("cpu"))
    saved = TrainState(noise, batch_size=2, grad_accum=2, num_processes=1).counters()
    with pytest.raises(UserError, match="cannot resume"):
        TrainState(noise, batch_size=4, grad_accum=1, num_processes=1).load_counters(saved)


def test_v_prediction_target():
    from diffusers import DDPMScheduler

    from tokencompose.families.base import target as prediction_target

    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    x, eps, t = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.tensor([10, 900])
    assert torch.equal(prediction_target(sched, x, eps, t), sched.get_velocity(x, eps, t))
    sched.register_to_config(prediction_type="epsilon")
    assert prediction_target(sched, x, eps, t) is eps


def test_optimizer_groups_may_hold_generators_and_fuse_only_on_cuda():
    from tokencompose.config import OptimConfig
    from tokencompose.train.setup import build_optimizer

    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = build_optimizer(
        [{"params": a.parameters(), "weight_decay": 0.0}, {"params": iter(b.parameters()), "weight_decay": 0.1}],
        OptimConfig(lr=1e-3),
    )
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]  # not consumed by the device check
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.1]
    assert not opt.defaults["fused"]  # CPU parameters: the default (foreach / for-loop) implementation


def test_lora_under_mixed_precision_stores_the_frozen_base_in_the_half_type():
    from tokencompose.config import load_config
    from tokencompose.models import tiny_components
    from tokencompose.train.setup import prepare_models

    cfg = load_config("shapes_lora", ["train.precision=bf16"])
    comps = tiny_components(seed=0)
    trainable = prepare_models(comps, cfg, torch.device("cpu"), "bf16")
    frozen = [p for p in comps.unet.parameters() if not p.requires_grad]
    assert trainable and frozen
    assert all(p.dtype == torch.float32 for p in trainable)  # fp32 master weights of the adapters
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    # the full fine-tune keeps every weight in fp32
    cfg = load_config("shapes_tiny", ["train.precision=bf16"])
    comps = tiny_components(seed=0)
    prepare_models(comps, cfg, torch.device("cpu"), "bf16")
    assert all(p.dtype == torch.float32 for p in comps.unet.parameters())
