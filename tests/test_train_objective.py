"""The objective: overfitting one batch lowers it; non-finite steps are skipped or stop the run, never saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tokencompose.config import load_config
from tokencompose.train.step import Conditioner, LossTerm, LossWeights, NoiseSource, StepContext, training_step
from train_util import config_dict, load_unet_weights, make_base, make_data


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("objective")
    return root, make_base(root), make_data(root, num=4)


def test_overfitting_one_batch_lowers_the_total_loss(assets):
    from tokencompose.attention import AttentionCapture
    from tokencompose.data.dataset import TokenDataset, collate
    from tokencompose.masks import attention_sizes
    from tokencompose.models import tiny_components

    _, _, data = assets
    comps = tiny_components(seed=0)
    comps.vae.requires_grad_(False)
    comps.text_encoder.requires_grad_(False)
    sizes = attention_sizes((64, 64), comps.vae_scale_factor, len(comps.unet.config.block_out_channels))
    ds = TokenDataset(str(data), comps.tokenizer, 64, attention_sizes=sizes)
    batch = collate([ds[0], ds[1]])
    weights = LossWeights(token=1e-3, pixel=5e-5)
    cond = Conditioner(comps, 64)
    opt = torch.optim.AdamW(comps.unet.parameters(), lr=1e-3)

    def evaluate() -> float:
        noise = NoiseSource(seed=123, device=torch.device("cpu"))  # the same noise and timesteps each time
        with torch.no_grad(), AttentionCapture(comps.unet, ["mid", "up"]) as cap:
            return sum(
                float(training_step(comps.unet, comps.vae, cond, comps.scheduler, batch, weights, noise, cap).loss)
                for _ in range(4)
            )

    before = evaluate()
    noise = NoiseSource(seed=0, device=torch.device("cpu"))
    with AttentionCapture(comps.unet, ["mid", "up"]) as cap:
        for _ in range(25):
            out = training_step(comps.unet, comps.vae, cond, comps.scheduler, batch, weights, noise, cap)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
    after = evaluate()
    assert after < 0.8 * before, (before, after)


class NanProbe(LossTerm):
    """An extra term (through the loss-term hook) that turns the loss and the gradients NaN on chosen calls."""

    name = "probe"

    def __init__(self, bad_calls: set[int], weight: float = 1.0) -> None:
        super().__init__()
        self.bad_calls, self.weight, self.calls = bad_calls, weight, 0

    def forward(self, ctx: StepContext) -> torch.Tensor:
        self.calls += 1
        scale = float("nan") if self.calls in self.bad_calls else 0.0
        return ctx.model_pred.float().flatten(1).mean(1) * scale


def _cfg(assets, name, *overrides):
    root, base, data = assets
    over = ["train.max_steps=3", "checkpoint.every=1", "checkpoint.keep_last=5", "log.curves=false"]
    return load_config(config_dict(base, data, root / name), over + list(overrides))


def test_nan_step_is_skipped_counted_and_never_saved(assets):
    from tokencompose.train import train

    result = train(_cfg(assets, "nan_skip"), extra_terms=[NanProbe({2})])
    assert result.step == 3 and result.nan_skips == 1
    ckpts = result.run_dir / "checkpoints"
    w1, w2, w3 = (load_unet_weights(ckpts / f"step-0000000{i}") for i in (1, 2, 3))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # the NaN step did not touch the weights
    assert any(not torch.equal(w2[k], w3[k]) for k in w1)  # training went on after it
    assert all(bool(torch.isfinite(v).all()) for v in w3.values())
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["nan_skips"] for r in rows] == [0, 1, 1]
    assert "loss/probe" in rows[0]


def test_nan_stop_policy_raises_before_saving(assets):
    from tokencompose.train import NonFiniteLossError, train

    cfg = _cfg(assets, "nan_stop", "train.nan_policy=stop")
    with pytest.raises(NonFiniteLossError, match=r"step 2 .*probe"):
        train(cfg, extra_terms=[NanProbe({2})])
    names = sorted(p.name for p in (Path(cfg.run_dir) / "checkpoints").iterdir())
    assert names == ["step-00000001"]


def test_too_many_skips_stop(assets):
    from tokencompose.train import NonFiniteLossError, train

    cfg = _cfg(assets, "nan_many", "train.max_nan_skips=1")
    with pytest.raises(NonFiniteLossError, match="max_nan_skips"):
        train(cfg, extra_terms=[NanProbe({1, 2})])


def test_zero_weight_extra_term_is_not_run(assets):
    from tokencompose.train import train

    probe = NanProbe({1, 2}, weight=0.0)
    result = train(_cfg(assets, "zero_term", "train.max_steps=1"), extra_terms=[probe])
    assert probe.calls == 0 and result.nan_skips == 0


class LearnedTerm(LossTerm):
    """A batch-level (scalar) term with a parameter, like the ROI contrastive head."""

    name = "learned"
    weight = 0.5

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(3.0))
        self.steps = 0

    def forward(self, ctx: StepContext) -> torch.Tensor:
        return (self.w - 1.0) ** 2 + 0.0 * ctx.model_pred.float().mean()

    def param_groups(self, weight_decay: float) -> list[dict]:
        return [{"params": [self.w], "weight_decay": 0.0}]

    def after_step(self) -> None:
        self.steps += 1

    def save(self, folder: Path) -> None:
        (folder / "learned.txt").write_text(f"{float(self.w.detach()):.6f}")


def test_extra_term_hook_trains_its_parameters_and_saves(assets):
    from tokencompose.train import train

    term = LearnedTerm()
    result = train(_cfg(assets, "learned", "optim.lr=1e-1"), extra_terms=[term])
    assert term.steps == 3 and float(term.w.detach()) < 3.0  # optimised with the UNet, after_step ran every step
    assert float((result.checkpoint / "learned.txt").read_text()) == pytest.approx(float(term.w.detach()))
    row = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert row["loss/learned"] == pytest.approx(4.0)  # the scalar, broadcast over the batch, mean-logged
    assert row["loss/total"] == pytest.approx(row["loss/denoise"] + 1e-3 * row["loss/token"]
                                              + 5e-5 * row["loss/pixel"] + 0.5 * 4.0, rel=1e-5)  # fmt: skip
