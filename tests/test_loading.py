"""The one loader: base + checkpoint (full, EMA, LoRA) + dtype + device, and its one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokencompose.errors import UserError
from tokencompose.families import get_family
from tokencompose.loading import ModelSettings, load_model, load_pipeline, resolve_checkpoint
from tokencompose.models import load_components
from tokencompose.train.lora import add_lora, save_lora
from train_util import nonzero_lora_up, unet_output


@pytest.fixture(scope="module")
def ckpts(model_dir: Path, tmp_path_factory):
    root = tmp_path_factory.mktemp("loading")
    unet = load_components(model_dir).unet
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01)
    unet.save_pretrained(root / "full" / "unet")
    unet.save_pretrained(root / "full" / "unet_ema")
    full = unet_output(unet)
    unet = load_components(model_dir).unet
    add_lora(unet, rank=2, alpha=4.0, target_modules=["to_q", "to_v"])
    nonzero_lora_up(unet, fill=0.02)
    save_lora(unet, root / "lora", get_family("sd"))
    return root, full, unet_output(unet)


def test_full_ema_and_lora_checkpoints_load_as_the_trained_unet(model_dir, ckpts) -> None:
    root, full, lora = ckpts
    for ckpt, ema, expected in [
        (root / "full", False, full),
        (root / "full", True, full),
        (root / "lora", False, lora),
    ]:
        comps = load_model(ModelSettings(model=str(model_dir), checkpoint=str(ckpt), ema=ema, device="cpu"))
        torch.testing.assert_close(unet_output(comps.unet), expected, rtol=1e-4, atol=1e-5)
        assert not any("lora" in n for n, _ in comps.unet.named_parameters())


def test_pipeline_dtype_and_scheduler(model_dir) -> None:
    pipe = load_pipeline(ModelSettings(model=str(model_dir), device="cpu", dtype="bf16"), scheduler="ddim")
    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.bfloat16
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"


@pytest.mark.parametrize(
    "settings, scheduler, words",
    [
        ({"model": "/no/such/model"}, "default", "does not exist"),
        ({"checkpoint": "/no/such/ckpt"}, "default", "does not exist"),
        ({}, "nonsense", "unknown scheduler"),
        ({"device": "gpu7"}, "default", "unknown device"),
    ],
)
def test_bad_settings_are_one_line_user_errors(model_dir, settings, scheduler, words, monkeypatch) -> None:
    kw = {"model": str(model_dir), "device": "cpu", **settings}
    with pytest.raises(UserError, match=words):
        load_pipeline(ModelSettings(**kw), scheduler=scheduler)


def test_checkpoint_without_ema_or_weights(tmp_path) -> None:
    with pytest.raises(UserError, match="unet_ema"):
        resolve_checkpoint(tmp_path, ema=True)
    with pytest.raises(UserError, match="neither"):
        resolve_checkpoint(tmp_path)
