"""Training-state faults (issue #14): what goes wrong on disk, in the maps or in the config must end in a
policy decision or a one-line error, never in a crash, lost work or code run from a run folder."""

from __future__ import annotations

import pytest
import torch

from tokencompose.config import load_config
from train_util import config_dict, make_base, make_data


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return root, make_base(root), make_data(root, num=4)


def _cfg(assets, name, *overrides):
    root, base, data = assets
    over = ["train.max_steps=3", "checkpoint.every=1", "checkpoint.keep_last=5", "log.curves=false",
            "log.tensorboard=false"]  # fmt: skip
    return load_config(config_dict(base, data, root / name), over + list(overrides))


# --- 6. non-finite maps reach train.nan_policy ---------------------------------------------------------


def test_pixel_loss_of_a_nan_map_is_nan_not_an_error():
    from tokencompose.losses import grounding_losses

    maps = torch.softmax(torch.randn(2, 2, 4, 6), -1)
    maps[0, 0, 1, 2] = float("nan")  # sample 0 diverged, sample 1 did not
    index = torch.tensor([[[1, 2]], [[3, 0]]])
    valid = torch.tensor([[[True, True]], [[True, False]]])
    masks = {(2, 2): (torch.rand(2, 1, 4) > 0.5).float()}
    g = grounding_losses({(2, 2): [maps]}, index, valid, masks)
    assert torch.isnan(g.pixel[0]) and torch.isfinite(g.pixel[1])
    clean = grounding_losses({(2, 2): [maps[1:]]}, index[1:], valid[1:], {(2, 2): masks[(2, 2)][1:]})
    assert torch.equal(g.pixel[1:], clean.pixel)  # finite samples keep torch's BCE values exactly


def _nan_maps_on(monkeypatch, bad_calls: set[int]) -> None:
    """Make the captured maps NaN on chosen training steps (as a diverged UNet would)."""
    from tokencompose.attention import AttentionCapture

    original = AttentionCapture.by_size
    calls = [0]

    def by_size(self):
        calls[0] += 1
        maps = original(self)
        if calls[0] in bad_calls:
            return {s: [m * float("nan") for m in ms] for s, ms in maps.items()}
        return maps

    monkeypatch.setattr(AttentionCapture, "by_size", by_size)


def test_nan_maps_with_pixel_loss_are_skipped_by_the_policy(assets, monkeypatch):
    from tokencompose.train import train

    _nan_maps_on(monkeypatch, {2})
    result = train(_cfg(assets, "nan_maps_skip"))
    assert result.step == 3 and result.nan_skips == 1


def test_nan_maps_with_pixel_loss_stop_under_stop_policy(assets, monkeypatch):
    from tokencompose.train import NonFiniteLossError, train

    _nan_maps_on(monkeypatch, {2})
    with pytest.raises(NonFiniteLossError, match=r"step 2 .*pixel"):
        train(_cfg(assets, "nan_maps_stop", "train.nan_policy=stop"))


# --- 7. the attention store stays empty after clear() -------------------------------------------------


def test_checkpoint_recompute_does_not_refill_a_cleared_store(tiny):
    from tokencompose.attention import AttentionCapture

    unet = tiny.unet
    unet.enable_gradient_checkpointing()
    unet.train()
    try:
        x = torch.randn(1, 4, 8, 8)
        ctx = torch.randn(1, 77, tiny.text_encoder.config.hidden_size)
        with AttentionCapture(unet, ("mid", "up")) as cap:
            out = unet(x, torch.tensor([10]), encoder_hidden_states=ctx).sample
            maps = cap.by_size()
            n = sum(len(v) for v in maps.values())
            assert n > 0
            loss = out.square().mean() + sum(m.sum() for v in maps.values() for m in v)
            cap.clear()
            loss.backward()  # recomputes the checkpointed blocks, capturing processors included
            assert cap.maps == {} and cap.store.maps == {}
            # The next forward records again.
            unet(x, torch.tensor([10]), encoder_hidden_states=ctx)
            assert sum(len(v) for v in cap.by_size().values()) == n
    finally:
        unet.disable_gradient_checkpointing()
        unet.zero_grad(set_to_none=True)
