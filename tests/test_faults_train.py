"""Training-state faults (issue #14): what goes wrong on disk, in the maps or in the config must end in a
policy decision or a one-line error, never in a crash, lost work or code run from a run folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokencompose.config import load_config
from train_util import config_dict, load_unet_weights, make_base, make_data


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


# --- 1. a corrupt newest checkpoint falls back to the previous complete one ---------------------------


def _train_then(assets, name, steps, *overrides):
    from tokencompose.train import train

    return train(_cfg(assets, name, f"train.max_steps={steps}", *overrides))


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(assets, caplog):
    from tokencompose.train.checkpoint import list_checkpoints

    reference = _train_then(assets, "corrupt_ref", 4)
    run = _train_then(assets, "corrupt", 3)
    newest = run.run_dir / "checkpoints" / "step-00000003"
    opt = newest / "optimizer.bin"
    opt.write_bytes(opt.read_bytes()[:100])  # truncated, as by a crash of the disk mid-write
    with caplog.at_level("WARNING"):
        result = _train_then(assets, "corrupt", 4)
    assert "step-00000003" in caplog.text and "cannot be read" in caplog.text
    assert result.step == 4
    assert [s for s, _ in list_checkpoints(run.run_dir / "checkpoints")] == [1, 2, 3, 4]  # step 3 redone
    assert (run.run_dir / "checkpoints" / "step-00000003.unreadable").is_dir()
    got, want = load_unet_weights(result.checkpoint), load_unet_weights(reference.checkpoint)
    assert all(torch.equal(got[k], want[k]) for k in want), "resuming from step 2 is not exact"


def test_no_readable_checkpoint_is_a_user_error(assets):
    from tokencompose.errors import UserError

    run = _train_then(assets, "all_corrupt", 1)
    (run.checkpoint / "train_state.json").write_text("{")
    with pytest.raises(UserError, match="no checkpoint .* can be read"):
        _train_then(assets, "all_corrupt", 2)


# --- 2. nothing in a run folder can run code on resume ------------------------------------------------


class _Planted:
    """Unpickling this writes a marker file: what a planted checkpoint file would do."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"])
def test_planted_pickle_in_a_checkpoint_does_not_run(assets, tmp_path, name, caplog):
    run = _train_then(assets, f"planted_{name}", 2)
    marker = tmp_path / "pwned"
    torch.save({"state": _Planted(marker)}, run.checkpoint / name)
    with caplog.at_level("WARNING"):
        result = _train_then(assets, f"planted_{name}", 3)
    assert not marker.exists(), f"a planted {name} ran code on resume"
    assert result.step == 3
    if name == "optimizer.bin":  # needed for resume: refused, the previous checkpoint is used
        assert "cannot be read" in caplog.text


def test_resume_state_is_safetensors_and_json(assets):
    run = _train_then(assets, "formats", 1)
    names = {p.name for p in run.checkpoint.iterdir()}
    assert {"train_state.json", "rng_state_0.safetensors", "rng_state_0.json"} <= names
    assert not any(n.endswith(".pkl") for n in names), names


def test_pretrain_resume_refuses_a_planted_pickle_and_round_trips_its_state(tmp_path):
    import random

    import numpy as np

    from tokencompose.errors import UserError
    from tokencompose.pretrain import state

    marker = tmp_path / "pwned"
    torch.save({"step": 1, "rng": _Planted(marker)}, tmp_path / "vae_state.pt")
    with pytest.raises(UserError, match="vae_state.pt"):
        state.load_state(tmp_path / "vae_state.pt")
    assert not marker.exists()

    np.random.seed(random.randrange(2**31))
    state.save_state({"step": 2, "rng": state.rng_state()}, tmp_path / "state.pt")
    want = np.random.rand(3), torch.rand(3)
    state.set_rng_state(state.load_state(tmp_path / "state.pt")["rng"])  # loads with weights_only=True
    got = np.random.rand(3), torch.rand(3)
    assert np.array_equal(got[0], want[0]) and torch.equal(got[1], want[1])


# --- 3. one trainer per run folder ---------------------------------------------------------------------


def test_second_trainer_on_a_run_folder_is_refused(assets, monkeypatch):
    import os

    from tokencompose.errors import UserError
    from tokencompose.train import setup, train
    from tokencompose.train.resume import RunLock

    cfg = _cfg(assets, "locked")
    monkeypatch.setattr(setup, "load_models", lambda cfg: pytest.fail("models loaded despite the lock"))
    Path(cfg.run_dir).mkdir(parents=True)
    busy = rf"in use by another training process \(pid {os.getpid()}\)"
    # Another trainer holds the folder (flock is per open file, so the same process can stand in for it).
    with RunLock(cfg.run_dir), pytest.raises(UserError, match=busy):
        train(cfg)
    monkeypatch.undo()
    assert train(cfg).step == 3  # released: the folder is usable again


# --- 4. checkpoints are durable before and after the rename --------------------------------------------


def test_checkpoint_is_fsynced_before_and_after_the_rename(assets, monkeypatch):
    import os

    from tokencompose.train import checkpoint

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    run = _train_then(assets, "durable", 1)
    folder = str(run.run_dir / "checkpoints")
    rename = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2].endswith("step-00000001"))
    before = {e[1] for e in events[:rename] if e[0] == "fsync"}
    tmp = events[rename][1]
    assert f"{tmp}/unet/diffusion_pytorch_model.safetensors" in before
    assert f"{tmp}/optimizer.bin" in before and f"{tmp}/trainer_state.json" in before and tmp in before
    assert ("fsync", folder) in events[rename:]


# --- 5. unusable run folders and a full disk: one line, exit 2 -----------------------------------------


def _cli(cfg, tmp_path, capsys):
    from tokencompose.cli import main
    from tokencompose.config import dump_yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(dump_yaml(cfg))
    code = main(["train", str(path)])
    err = capsys.readouterr().err.strip()
    return code, err


def test_run_dir_that_is_a_file_is_a_one_line_error(assets, tmp_path, capsys, monkeypatch):
    from tokencompose.train import setup

    cfg = _cfg(assets, "a_file")
    open(cfg.run_dir, "w").close()
    monkeypatch.setattr(setup, "load_models", lambda cfg: pytest.fail("models loaded for an unusable run_dir"))
    code, err = _cli(cfg, tmp_path, capsys)
    assert code == 2 and "is a file" in err and str(cfg.run_dir) in err and len(err.splitlines()) == 1


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                    reason="root writes into read-only folders")  # fmt: skip
def test_read_only_run_dir_is_a_one_line_error(assets, tmp_path, capsys):
    cfg = _cfg(assets, "read_only")
    import os

    os.makedirs(cfg.run_dir)
    os.chmod(cfg.run_dir, 0o500)
    try:
        code, err = _cli(cfg, tmp_path, capsys)
    finally:
        os.chmod(cfg.run_dir, 0o700)
    assert code == 2 and "cannot be written" in err and len(err.splitlines()) == 1


def test_disk_full_during_a_checkpoint_is_one_line_and_leaves_the_previous_newest(
    assets, tmp_path, capsys, monkeypatch
):
    import errno

    from tokencompose.train import resume
    from tokencompose.train.checkpoint import list_checkpoints

    real = resume.save_train_state
    calls = [0]

    def full_on_second(folder, state):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / resume.TRAIN_STATE))
        return real(folder, state)

    monkeypatch.setattr(resume, "save_train_state", full_on_second)
    cfg = _cfg(assets, "disk_full")
    code, err = _cli(cfg, tmp_path, capsys)
    assert code == 2 and "No space left on device" in err and len(err.splitlines()) == 1
    found = list_checkpoints(Path(cfg.run_dir) / "checkpoints")
    assert [s for s, _ in found] == [1]
    assert not list((Path(cfg.run_dir) / "checkpoints").glob(".tmp-*"))


def test_disk_full_inside_torch_save_is_reported_as_no_space(assets, tmp_path, monkeypatch):
    """torch.save reports a failed write as a RuntimeError; with the disk full it becomes ENOSPC."""
    import errno
    from collections import namedtuple

    from tokencompose.train import checkpoint, resume

    def failing(folder, state):
        raise RuntimeError(
            "[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file: file write failed"
        )

    monkeypatch.setattr(resume, "save_train_state", failing)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage(1, 1, 0))
    with pytest.raises(OSError) as info:
        _train_then(assets, "disk_full_torch", 1)
    assert info.value.errno == errno.ENOSPC and "No space left on device" in str(info.value)


# --- 8. config mistakes: one line, exit 2, before anything loads --------------------------------------


def test_loss_layers_naming_no_layer_is_refused_before_the_model_loads(assets, tmp_path, capsys, monkeypatch):
    from tokencompose.train import setup

    cfg = _cfg(assets, "bad_layers", "loss.layers=[upp]")
    monkeypatch.setattr(setup, "load_models", lambda cfg: pytest.fail("models loaded for a bad loss.layers"))
    code, err = _cli(cfg, tmp_path, capsys)
    assert code == 2 and "loss.layers" in err and "'upp'" in err and len(err.splitlines()) == 1
    assert not Path(cfg.run_dir).exists()  # refused before the run folder was made


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        ("train:\n  max_steps: 3\nlog:\n  every: 1\ntrain:\n  seed: 1\n", "train", 5),
        ("train:\n  max_steps: 3\n  seed: 0\n  max_steps: 30\n", "train.max_steps", 4),
    ],
)
def test_duplicate_yaml_keys_are_a_config_error(tmp_path, capsys, text, key, line):
    from tokencompose.cli import main
    from tokencompose.config import ConfigError, load_config

    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"{path}, line {line}: key '{key}' appears twice"):
        load_config(path)
    assert main(["train", str(path)]) == 2
    [err] = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert f"'{key}' appears twice" in err and str(path) in err and len(err.splitlines()) == 1


def test_yaml_syntax_error_is_one_line_naming_file_and_line(tmp_path, capsys):
    from tokencompose.cli import main
    from tokencompose.config import ConfigError, load_config

    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  max_steps: 3\n  seed: [0, 1\nlog:\n  every: 1\n")
    with pytest.raises(ConfigError, match=rf"{path}, line \d+: not valid YAML"):
        load_config(path)
    assert main(["train", str(path)]) == 2
    [err] = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert str(path) in err and "line 4" in err and len(err.splitlines()) == 1
