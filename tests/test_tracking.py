"""Tracking through Accelerate's trackers: TensorBoard events, config as hparams and text, sample grids,
other trackers, tracker and launcher-precision mistakes refused before any model loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tokencompose.config import ConfigError, load_config
from tokencompose.errors import UserError
from train_util import config_dict, make_base, make_data, single_thread

LOSSES = ("loss/total", "loss/denoise", "loss/token", "loss/pixel")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    single_thread()
    root = tmp_path_factory.mktemp("tracking")
    return root, make_base(root), make_data(root, num=8)


def _run(assets, name: str, overrides: list[str]):
    from tokencompose.train import train

    root, base, data = assets
    cfg = load_config(config_dict(base, data, root / name), ["log.curves=false", *overrides])
    return train(cfg)


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sampled(assets):
    """3 steps, checkpoints at 2 and 3, a 2-image sample grid at each (2 DDIM steps)."""
    return _run(assets, "run_sampled", ["log.samples=2", "log.sample_steps=2"])


def test_scalars_match_metrics_jsonl(sampled):
    acc = _events(sampled.run_dir / "tensorboard")
    rows = _rows(sampled.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]  # metrics.jsonl as before
    for key in (*LOSSES, "lr", "grad_norm", "samples_per_s", "nan_skips"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [1, 2, 3], key
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6), key
    assert "epoch" not in acc.Tags()["scalars"]  # in metrics.jsonl only


def test_config_goes_in_as_text_and_hparams(assets, sampled):
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = _events(sampled.run_dir / "tensorboard")
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "token_weight: 0.001" in text and text.startswith("```yaml")
    prompts = acc.Tensors("samples/prompts/text_summary")[0].tensor_proto.string_val[0].decode()
    captions = [json.loads(line)["text"] for line in assets[2].read_text().splitlines()[:2]]
    assert prompts == f"1. {captions[0]}\n2. {captions[1]}"  # the first training captions
    # add_hparams writes its summary to a sub-folder of the log dir
    [sub] = [p for p in (sampled.run_dir / "tensorboard").iterdir() if list(p.glob("events.out.tfevents.*"))]
    content = _events(sub).PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["optim.lr"].number_value == pytest.approx(1e-4)
    assert hparams["loss.layers"].string_value == "mid,up"  # lists flattened to strings
    assert hparams["train.ema.enabled"].bool_value is False
    assert hparams["model.revision"].string_value == "None"


def test_sample_grid_at_each_checkpoint(sampled):
    acc = _events(sampled.run_dir / "tensorboard")
    images = acc.Images("samples")
    assert [i.step for i in images] == [2, 3]
    assert (images[0].width, images[0].height) == (2 * 64, 64)  # 2 prompts side by side at 64 px
    assert images[0].encoded_image_string != images[1].encoded_image_string  # the weights moved


def test_samples_do_not_disturb_training(assets, sampled):
    """Same losses without trackers: the capture's processors, train mode and RNG are restored."""
    plain = _run(assets, "run_plain", ["log.tensorboard=false"])
    assert not (plain.run_dir / "tensorboard").exists()
    for a, b in zip(_rows(sampled.run_dir), _rows(plain.run_dir), strict=True):
        assert {k: a[k] for k in LOSSES} == {k: b[k] for k in LOSSES}


def test_resume_purges_events_past_the_checkpoint(assets):
    """A run killed after logging step 3 but before checkpointing it: the rerun replaces step 3's events."""
    first = _run(assets, "run_resume", ["train.max_steps=3", "checkpoint.every=2"])
    shutil.rmtree(first.run_dir / "checkpoints" / "step-00000003")
    again = _run(assets, "run_resume", ["train.max_steps=3", "checkpoint.every=2", "optim.lr=1e-2"])
    acc = _events(again.run_dir / "tensorboard")
    assert [e.step for e in acc.Scalars("loss/total")] == [1, 2, 3]
    assert [e.value for e in acc.Scalars("lr")] == pytest.approx([1e-4, 1e-4, 1e-2])  # step 3: the rerun's
    assert [r["lr"] for r in _rows(again.run_dir)] == pytest.approx([1e-4, 1e-4, 1e-2])


class _FakeTracker:
    """Stands in for an installed wandb: records what Accelerate hands it."""

    name = "wandb"
    requires_logging_directory = False
    main_process_only = True
    seen: list[tuple] = []

    def __init__(self, run_name: str, **kwargs) -> None:
        self.seen.append(("init", run_name, kwargs))

    @property
    def tracker(self):
        return self

    def start(self) -> None:
        pass

    def store_init_configuration(self, values: dict) -> None:
        self.seen.append(("config", values))

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.seen.append(("log", step, values))

    def log_images(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.seen.append(("images", step, {k: [im.size for im in v] for k, v in values.items()}))

    def finish(self) -> None:
        self.seen.append(("finish",))


def test_other_tracker_gets_config_scalars_and_images(assets, monkeypatch):
    from accelerate import tracking
    from accelerate.utils import LoggerType

    monkeypatch.setitem(tracking.LOGGER_TYPE_TO_CLASS, "wandb", _FakeTracker)
    monkeypatch.setattr(tracking, "_available_trackers", [LoggerType.WANDB])
    monkeypatch.setattr(_FakeTracker, "seen", [])
    result = _run(assets, "run_fake", ["log.trackers=[wandb]", "log.tensorboard=false", "log.samples=1",
                                       "log.sample_steps=1", "train.max_steps=2"])  # fmt: skip
    seen = _FakeTracker.seen
    assert seen[0] == ("init", "tokencompose", {"name": result.run_dir.name})
    assert seen[1][0] == "config" and seen[1][1]["optim.lr"] == pytest.approx(1e-4)
    logged = [(s[1], s[2]["loss/total"]) for s in seen if s[0] == "log"]
    assert logged == [(r["step"], pytest.approx(r["loss/total"])) for r in _rows(result.run_dir)]
    assert [s[1:] for s in seen if s[0] == "images"] == [(2, {"samples": [(64, 64)]})]
    assert seen[-1] == ("finish",)
    assert not (result.run_dir / "tensorboard").exists()


def _no_model_loads(monkeypatch):
    from tokencompose.train import setup

    def refuse(cfg):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(setup, "load_models", refuse)


def test_unknown_or_missing_tracker_refused_before_loading(assets, monkeypatch):
    from accelerate import tracking

    _no_model_loads(monkeypatch)
    with pytest.raises(ConfigError, match="log.trackers.*unknown tracker 'tensorbord'"):
        _run(assets, "run_bad", ["log.trackers=[tensorbord]"])
    monkeypatch.setattr(tracking, "_available_trackers", [])
    with pytest.raises(ConfigError, match=r"log.trackers.*mlflow is not installed \(pip install mlflow\)"):
        _run(assets, "run_bad", ["log.trackers=[mlflow]"])
    with pytest.raises(ConfigError, match="log.trackers.*log.tensorboard"):
        load_config(config_dict(*assets[1:], assets[0] / "run_bad"), ["log.trackers=[tensorboard]"])


def test_launcher_precision_differing_from_config_refused(assets, monkeypatch):
    from tokencompose.train.setup import check_launcher_precision

    _no_model_loads(monkeypatch)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    with pytest.raises(UserError, match="train.precision=fp32: set train.precision=bf16, or launch with "
                                        "--mixed_precision no") as err:  # fmt: skip
        _run(assets, "run_bad", [])
    assert "\n" not in str(err.value)
    check_launcher_precision("bf16")  # agreeing: fine
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(UserError, match="train.precision=bf16: launch with --mixed_precision bf16"):
        check_launcher_precision("bf16")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # accelerate launch's default: not a request
    check_launcher_precision("bf16")


def test_flat_hparams():
    from tokencompose.train.tracking import flat_hparams

    flat = flat_hparams({"a": {"b": 1, "c": [1, 2], "d": None, "e": {"f": True}}, "g": (0.9, 0.99), "h": "x"})
    assert flat == {"a.b": 1, "a.c": "1,2", "a.d": "None", "a.e.f": True, "g": "0.9,0.99", "h": "x"}
