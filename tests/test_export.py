"""``tokencompose export``: stock diffusers loads the folder (no tokencompose, no dtype) and runs our model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokencompose.cli import main
from tokencompose.families import get_family
from tokencompose.models import load_components
from tokencompose.train.lora import add_lora, save_lora
from train_util import nonzero_lora_up, unet_output

# Loads the folder with stock diffusers only, checks one dtype throughout, generates one small image.
STOCK = """
import sys
import torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
if len(sys.argv) > 2:
    pipe.load_lora_weights(sys.argv[1])
assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
image = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
assert image.shape == (32, 32, 3)
assert not any(m.startswith("tokencompose") for m in sys.modules)
print("ok")
"""


def _stock(folder: Path, lora: bool = False) -> None:
    argv = [sys.executable, "-c", STOCK, str(folder)] + (["lora"] if lora else [])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


@pytest.fixture(scope="module")
def checkpoints(model_dir: Path, tmp_path_factory) -> dict[str, tuple[Path, torch.Tensor]]:
    """A full-UNet checkpoint and a LoRA checkpoint (alpha 8, rank 2) of the tiny model, with their outputs."""
    root = tmp_path_factory.mktemp("ckpts")
    unet = load_components(model_dir).unet
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    unet.save_pretrained(root / "full" / "unet")
    full = unet_output(unet)
    unet = load_components(model_dir).unet
    add_lora(unet, rank=2, alpha=8.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    nonzero_lora_up(unet)
    save_lora(unet, root / "lora", get_family("sd"))
    return {"full": (root / "full", full), "lora": (root / "lora", unet_output(unet))}


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_export_loads_in_stock_diffusers_and_is_the_trained_model(checkpoints, model_dir, tmp_path, kind) -> None:
    from diffusers import DiffusionPipeline

    ckpt, expected = checkpoints[kind]
    out = tmp_path / "exported"
    assert main(["export", "--model", str(model_dir), "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    pipe = DiffusionPipeline.from_pretrained(str(out))
    torch.testing.assert_close(unet_output(pipe.unet), expected, rtol=1e-4, atol=1e-5)
    _stock(out)


def test_export_keep_lora_puts_the_adapter_beside_the_base(checkpoints, model_dir, tmp_path) -> None:
    from diffusers import DiffusionPipeline

    ckpt, expected = checkpoints["lora"]
    out = tmp_path / "exported"
    assert main(["export", "--model", str(model_dir), "--checkpoint", str(ckpt), "--out", str(out), "--keep-lora"]) == 0
    pipe = DiffusionPipeline.from_pretrained(str(out))
    base = load_components(model_dir).unet
    torch.testing.assert_close(unet_output(pipe.unet), unet_output(base))  # untouched base
    pipe.load_lora_weights(str(out))
    torch.testing.assert_close(unet_output(pipe.unet), expected, rtol=1e-4, atol=1e-5)
    _stock(out, lora=True)


def test_export_refuses_a_non_empty_folder(checkpoints, model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "exported"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    rc = main(["export", "--model", str(model_dir), "--checkpoint", str(checkpoints["full"][0]), "--out", str(out)])
    assert rc == 2 and (out / "mine.txt").read_text() == "keep me"
    assert "not empty" in capsys.readouterr().err
