"""A LoRA trained with alpha != rank is exported so that every loader runs the trained model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokencompose.families import get_family
from tokencompose.models import load_components
from tokencompose.train.lora import LORA_WEIGHTS, add_lora, load_lora_state, save_lora
from train_util import nonzero_lora_up, unet_output


@pytest.fixture(scope="module")
def trained_lora(model_dir: Path, tmp_path_factory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A tiny UNet with rank-4, alpha-16 adapters (scale 4) whose up matrices are non-zero, saved by us."""
    unet = load_components(model_dir).unet
    base = unet_output(unet, batch=2, seed=1)
    add_lora(unet, rank=4, alpha=16.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    nonzero_lora_up(unet, seed=3)  # peft initialises B to zero: make the adapter do something
    trained = unet_output(unet, batch=2, seed=1)
    out = tmp_path_factory.mktemp("lora_ckpt")
    save_lora(unet, out, get_family("sd"))
    return out, base, trained


def test_the_adapter_changes_the_model(trained_lora) -> None:
    _, base, trained = trained_lora
    assert (trained - base).abs().max() > 1e-3


def test_stock_diffusers_reproduces_the_trained_model(trained_lora, model_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline

    path, _, trained = trained_lora
    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None)
    pipe.load_lora_weights(str(path / LORA_WEIGHTS))
    torch.testing.assert_close(unet_output(pipe.unet, batch=2, seed=1), trained, rtol=1e-4, atol=1e-5)


def test_our_pipeline_reproduces_the_trained_model(trained_lora, model_dir: Path) -> None:
    from tokencompose.loading import ModelSettings, load_pipeline

    path, _, trained = trained_lora
    pipe = load_pipeline(ModelSettings(model=str(model_dir), checkpoint=str(path), device="cpu"))
    torch.testing.assert_close(unet_output(pipe.unet, batch=2, seed=1), trained, rtol=1e-4, atol=1e-5)


def test_resume_state_keeps_the_raw_adapter(trained_lora, model_dir: Path) -> None:
    """The peft-format state (for resume) is unscaled: reloaded into alpha-16 adapters it is the same model."""
    path, _, trained = trained_lora
    unet = load_components(model_dir).unet
    add_lora(unet, rank=4, alpha=16.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    load_lora_state(unet, path)
    torch.testing.assert_close(unet_output(unet, batch=2, seed=1), trained, rtol=1e-5, atol=1e-6)
