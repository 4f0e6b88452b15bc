"""A LoRA trained with alpha != rank is exported so that every loader runs the trained model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokencompose.models import load_components
from tokencompose.train.lora import LORA_WEIGHTS, add_lora, load_lora_state, save_lora


def _unet_out(unet, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    ctx = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), ctx).sample


@pytest.fixture(scope="module")
def trained_lora(model_dir: Path, tmp_path_factory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A tiny UNet with rank-4, alpha-16 adapters (scale 4) whose up matrices are non-zero, saved by us."""
    unet = load_components(model_dir).unet
    base = _unet_out(unet)
    add_lora(unet, rank=4, alpha=16.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:  # peft initialises B to zero: make the adapter do something
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    trained = _unet_out(unet)
    out = tmp_path_factory.mktemp("lora_ckpt")
    save_lora(unet, out)
    return out, base, trained


def test_the_adapter_changes_the_model(trained_lora) -> None:
    _, base, trained = trained_lora
    assert (trained - base).abs().max() > 1e-3


def test_stock_diffusers_reproduces_the_trained_model(trained_lora, model_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline

    path, _, trained = trained_lora
    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None)
    pipe.load_lora_weights(str(path / LORA_WEIGHTS))
    torch.testing.assert_close(_unet_out(pipe.unet), trained, rtol=1e-4, atol=1e-5)


def test_our_pipeline_reproduces_the_trained_model(trained_lora, model_dir: Path) -> None:
    from tokencompose.loading import ModelSettings, load_pipeline

    path, _, trained = trained_lora
    pipe = load_pipeline(ModelSettings(model=str(model_dir), checkpoint=str(path), device="cpu"))
    torch.testing.assert_close(_unet_out(pipe.unet), trained, rtol=1e-4, atol=1e-5)


def test_resume_state_keeps_the_raw_adapter(trained_lora, model_dir: Path) -> None:
    """The peft-format state (for resume) is unscaled: reloaded into alpha-16 adapters it is the same model."""
    path, _, trained = trained_lora
    unet = load_components(model_dir).unet
    add_lora(unet, rank=4, alpha=16.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    load_lora_state(unet, path)
    torch.testing.assert_close(_unet_out(unet), trained, rtol=1e-5, atol=1e-6)
