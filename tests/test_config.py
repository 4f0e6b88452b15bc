"""Config schema, presets, extends, overrides and error messages."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from tokencompose.config import ConfigError, dump_yaml, load_config, preset_names, to_dict

PRESETS = preset_names()


def test_presets_exist():
    for name in ("sd14_coco", "sd14_coco_fast", "sd21_coco", "shapes_tiny"):
        assert name in PRESETS
    assert any(p.startswith("sd14_coco_") and "only" in p for p in PRESETS)  # ablations


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_round_trips(name, tmp_path):
    cfg = load_config(name)
    out = tmp_path / "c.yaml"
    out.write_text(dump_yaml(cfg))
    assert to_dict(load_config(out)) == to_dict(cfg)


def test_paper_recipe():
    c = load_config("sd14_coco")
    assert c.model.path == "CompVis/stable-diffusion-v1-4"
    assert c.data.image_size == 512
    assert (c.optim.lr, c.optim.betas, c.optim.weight_decay, c.optim.eps) == (5e-6, (0.9, 0.999), 1e-2, 1e-8)
    assert c.optim.warmup_steps == 0 and c.optim.max_grad_norm == 1.0
    assert c.train.batch_size * c.train.grad_accum == 4
    assert c.train.max_steps == 24000 and c.train.precision == "fp32" and c.train.lora.rank == 0
    assert (c.loss.token_weight, c.loss.pixel_weight, c.loss.layers) == (1e-3, 5e-5, ["mid", "up"])
    c21 = load_config("sd21_coco")
    assert (c21.data.image_size, c21.train.max_steps) == (768, 32000)
    assert c21.optim.lr == c.optim.lr  # inherited through extends
    fast = load_config("sd14_coco_fast")
    assert fast.train.precision == "bf16"
    seen = fast.train.batch_size * fast.train.grad_accum * fast.train.max_steps
    assert seen == c.train.batch_size * c.train.grad_accum * c.train.max_steps  # steps scaled with the batch


def test_ablation_presets():
    weights = {n: (load_config(n).loss.token_weight, load_config(n).loss.pixel_weight) for n in PRESETS}
    assert weights["sd14_coco_denoise_only"] == (0.0, 0.0)
    assert weights["sd14_coco_token_only"] == (1e-3, 0.0)
    assert weights["sd14_coco_pixel_only"] == (0.0, 5e-5)


def test_overrides_are_typed():
    c = load_config(
        "shapes_tiny",
        ["optim.lr=3e-4", "train.max_steps=7", "loss.layers=mid,up", "optim.betas=[0.8, 0.95]"]
        + ["train.lora.alpha=null"],
    )
    assert c.optim.lr == 3e-4 and isinstance(c.optim.lr, float)
    assert c.train.max_steps == 7 and c.loss.layers == ["mid", "up"] and c.optim.betas == (0.8, 0.95)
    assert c.train.lora.alpha is None
    assert load_config("shapes_tiny", ["train.ema.enabled=true"]).train.ema.enabled is True


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.batchsize=2", "train.batchsize"),
        ("trian.batch_size=2", "trian"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.batch_size=two", "train.batch_size"),
        ("train.precision=fp8", "train.precision"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("optim.lr=-1", "optim.lr"),
        ("train.grad_checkpointing=maybe", "train.grad_checkpointing"),
        ("loss.roi_weight=-0.1", "loss.roi_weight"),
        ("data.caption_dropout=1.0", "data.caption_dropout"),
        ("train.lora.rank.x=1", "train.lora.rank"),
        ("noequals", "noequals"),
    ],
)
def test_bad_override_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config("shapes_tiny", [override])
    assert err.value.key == key
    assert f"'{key}'" in str(err.value)


def test_unknown_key_in_file_and_suggestion(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("extends: shapes_tiny\ntrain:\n  max_step: 3\n")
    with pytest.raises(ConfigError, match=r"train\.max_step.*did you mean 'max_steps'"):
        load_config(f)


def test_extends_relative_path_and_merge(tmp_path):
    (tmp_path / "base.yaml").write_text("extends: shapes_tiny\ntrain:\n  max_steps: 11\n  seed: 5\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ntrain:\n  seed: 6\n")
    c = load_config(tmp_path / "child.yaml")
    assert (c.train.max_steps, c.train.seed, c.model.path) == (11, 6, "tiny")
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "loop.yaml")


def test_cross_field_checks():
    with pytest.raises(ConfigError, match=r"data\.flip"):
        load_config("shapes_tiny", ["data.flip=true", "data.latent_cache=/x"])
    with pytest.raises(ConfigError, match=r"train\.ema\.enabled"):
        load_config("shapes_lora", ["train.ema.enabled=true"])


def test_cli_bad_config_fails_before_any_model_is_loaded(monkeypatch, capsys):
    from tokencompose.cli import main
    from tokencompose.train import setup  # binds the model loaders at import: patch them where they are called

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the config was validated")

    monkeypatch.setattr(setup, "load_components", boom)
    monkeypatch.setattr(setup, "model_family", boom)  # tiny models are built by their family
    heavy_before = "tokencompose.train.loop" in sys.modules
    assert main(["train", "shapes_tiny", "train.nan_policy=ignore"]) == 2
    assert "train.nan_policy" in capsys.readouterr().err
    if not heavy_before:  # the training loop (and accelerate) was never even imported
        assert "tokencompose.train.loop" not in sys.modules


@dataclasses.dataclass
class _Inner:
    steps: int = 50
    images: int = 10


@dataclasses.dataclass
class _Outer:
    inner: _Inner = dataclasses.field(default_factory=lambda: _Inner(images=4))


def test_a_nested_block_given_in_part_keeps_its_parents_defaults():
    """A field declared with a non-default nested value keeps it for the keys not given (not the class's)."""
    from tokencompose.typed_data import build_dataclass

    assert build_dataclass(_Outer, {"inner": {"steps": 3}}).inner == _Inner(steps=3, images=4)
    assert build_dataclass(_Outer, {}).inner == _Inner(images=4)
