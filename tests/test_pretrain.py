"""The base-model recipe runs end to end on a miniature scale, resumes, and exports a loadable pipeline."""

from __future__ import annotations

import json

import pytest
import torch

from tokencompose.config import ConfigError
from tokencompose.pretrain.recipe import load_pretrain_config, pretrain

MINI = [
    "arch.vae_channels=[8,8]",
    "arch.unet_channels=[16,16]",
    "arch.text_hidden=16",
    "arch.text_layers=1",
    "arch.heads=2",
    "arch.image_size=32",
    "vae_steps=2",
    "vae_batch=2",
    "unet_steps=3",
    "unet_batch=2",
    "checkpoint_every=2",
]


def test_recipe_config_rejects_bad_keys():
    with pytest.raises(ConfigError, match="unet_stepz"):
        load_pretrain_config(None, ["unet_stepz=3"])
    with pytest.raises(ConfigError, match="vae_steps"):
        load_pretrain_config(None, ["vae_steps=many"])
    cfg = load_pretrain_config(None, MINI)
    assert cfg.arch.unet_channels == (16, 16) and cfg.unet_steps == 3


def test_device_is_checked_before_training(tmp_path, monkeypatch):
    from tokencompose.errors import UserError

    with pytest.raises(UserError, match="not a torch device"):
        pretrain(load_pretrain_config(None, [*MINI, "device=gpu0"]), tmp_path / "a")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no GPU"):
        pretrain(load_pretrain_config(None, [*MINI, "device=cuda"]), tmp_path / "b")
    assert load_pretrain_config(None, MINI).device == "auto"  # a GPU when there is one
    with pytest.raises(UserError, match="not a shapes world"):
        pretrain(load_pretrain_config(None, [*MINI, "world=animals"]), tmp_path / "c")


def test_nouns_world_batches_name_only_its_categories():
    from tokencompose.data.shapes import world_categories
    from tokencompose.pretrain.recipe import _stream_batch

    cfg = load_pretrain_config(None, [*MINI, "world=nouns"])
    x, captions = _stream_batch(cfg, 0, 8, 0)
    nouns = world_categories("nouns")
    others = [c for c in world_categories("attributes") if c not in nouns]
    assert x.shape[0] == 8 and all(any(n in t for n in nouns) for t in captions)
    assert not any(o in t for t in captions for o in others)


def test_pretrain_mini_end_to_end_and_resume(tmp_path):
    from diffusers import StableDiffusionPipeline

    cfg = load_pretrain_config(None, MINI)
    out = pretrain(cfg, tmp_path / "work")
    from tokencompose.models import load_components

    comps = load_components(out)
    assert comps.unet.dtype == comps.text_encoder.dtype == torch.float32  # stored fp16, loaded fp32
    pipe = StableDiffusionPipeline.from_pretrained(
        out, safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32
    )
    assert pipe.unet.config.block_out_channels == [16, 16]
    assert pipe.vae.config.scaling_factor != 0.18215  # measured on our latents, not SD's constant
    img = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert img.shape == (1, 32, 32, 3)
    # a longer recipe resumes from the saved state instead of starting over
    state = torch.load(tmp_path / "work" / "diffusion_state.pt", weights_only=True)  # plain values only
    assert state["step"] == 3


def test_shipped_recipe_file_is_the_code_default():
    from importlib import resources

    from tokencompose.pretrain.recipe import PretrainConfig

    path = resources.files("tokencompose") / "configs" / "pretrain" / "shapes_base.yaml"
    assert load_pretrain_config(str(path)) == PretrainConfig()


def test_worker_processes_render_the_same_batches(tmp_path):
    """Rendering ahead in worker processes changes nothing: scene i depends on (seed, i) only."""
    from safetensors.torch import load_file

    weights = []
    for workers in (0, 2):
        out = pretrain(load_pretrain_config(None, [*MINI, f"workers={workers}", "device=cpu"]), tmp_path / str(workers))
        weights.append(load_file(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_work_folder_is_not_resumed_with_another_recipe(tmp_path):
    """Resuming with another seed or size would mix two recipes in one model; only run-length fields may change."""
    from tokencompose.errors import UserError

    work = tmp_path / "work"
    pretrain(load_pretrain_config(None, MINI), work)
    for bad, key in (("seed=1", "seed"), ("arch.unet_channels=[8,8]", "arch"), ("unet_lr=1e-3", "unet_lr")):
        with pytest.raises(UserError, match=key):
            pretrain(load_pretrain_config(None, [*MINI, bad]), work)
    # a longer stage 2 (and a VAE length once the VAE is done) resumes: the recipe's documented extension
    pretrain(load_pretrain_config(None, [*MINI, "unet_steps=4", "vae_steps=3", "checkpoint_every=1"]), work)
    assert torch.load(work / "diffusion_state.pt", weights_only=True)["step"] == 4
    assert json.loads((work / "diffusion" / "progress.json").read_text())["step"] == 4
    with pytest.raises(UserError, match="unet_steps >= 4"):  # an earlier step's EMA is gone: refused, not relabelled
        pretrain(load_pretrain_config(None, [*MINI, "unet_steps=3"]), work)
