"""Generation on a tiny random-init SD pipeline: per-image seeds, batch independence, resume, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokencompose.errors import UserError
from tokencompose.evaluation.generation import (
    GenerationSettings,
    generate_images,
    image_seed,
    pending_jobs,
    save_png_atomic,
)
from tokencompose.evaluation.prompts import sample_prompts
from tokencompose.families import get_family
from tokencompose.loading import ModelSettings, base_scheduler_config, load_pipeline, make_scheduler
from tokencompose.models import tiny_components

SETTINGS = GenerationSettings(steps=2, resolution=64, images_per_prompt=2, seed=5)
PROMPTS = sample_prompts(["cat", "dog", "cup", "book"], 2, num_objects=2, seed=0)


@pytest.fixture(scope="module")
def pipe(model_dir: Path):
    return load_pipeline(ModelSettings(model=str(model_dir), device="cpu"), scheduler="pndm")


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int16)


def test_seeds_are_stable_and_distinct() -> None:
    assert image_seed(0, 1, 2) == image_seed(0, 1, 2)
    assert len({image_seed(0, u, i) for u in range(50) for i in range(10)}) == 500
    assert image_seed(0, 1, 2) != image_seed(1, 1, 2)


def test_default_preset_is_the_papers(model_dir: Path, pipe) -> None:
    s = GenerationSettings()
    assert (s.steps, s.guidance_scale, s.resolution, s.images_per_prompt) == (50, 7.5, None, 10)  # None: native
    assert s.scheduler == "auto" and get_family("sd").sampler == "pndm" and s.safety_checker is False
    assert type(pipe.scheduler).__name__ == "PNDMScheduler" and pipe.scheduler.config.skip_prk_steps
    assert pipe.safety_checker is None
    assert type(make_scheduler(base_scheduler_config(model_dir), "default")).__name__ == "DDPMScheduler"


def test_generate_resume_and_subset_identical(tmp_path: Path, pipe) -> None:
    out = tmp_path / "imgs"
    rep = generate_images(pipe, PROMPTS, out, SETTINGS, batch_size=3, record={"model": "tiny"})
    assert sorted(rep.written) == sorted(f"{p.uid}_{i}.png" for p in PROMPTS for i in range(2))
    first = {n: _pixels(out / n) for n in rep.written}
    assert not np.array_equal(first["0_0.png"], first["0_1.png"])  # own seed per image
    # Nothing left to do on a rerun.
    again = generate_images(pipe, PROMPTS, out, SETTINGS, batch_size=3, record={"model": "tiny"})
    assert again.written == [] and again.skipped == 4
    # Regenerate a subset one at a time: same pixels as in the batch of three.
    (out / "1_1.png").unlink()
    (out / "0_0.png").unlink()
    redo = generate_images(pipe, PROMPTS, out, SETTINGS, batch_size=1, record={"model": "tiny"})
    assert sorted(redo.written) == ["0_0.png", "1_1.png"]
    for n in redo.written:
        assert np.abs(_pixels(out / n) - first[n]).max() <= 1
    assert not list(out.glob(".*tmp"))
    assert json.loads((out / "generation.json").read_text())["steps"] == 2
    with pytest.raises(UserError, match="other settings"):
        generate_images(pipe, PROMPTS, out, GenerationSettings(steps=3, resolution=64, images_per_prompt=2))


def test_shards_are_disjoint_and_cover(tmp_path: Path) -> None:
    parts = [pending_jobs(PROMPTS, 3, tmp_path, s, 3)[0] for s in range(3)]
    keys = [(p.uid, i) for part in parts for p, i in part]
    assert len(keys) == len(set(keys)) == 6


def test_crash_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        save_png_atomic(Image.new("RGB", (8, 8)), tmp_path / "0_0.png")
    assert not (tmp_path / "0_0.png").exists()


def test_lora_checkpoint_changes_the_unet(tmp_path: Path, model_dir: Path, pipe) -> None:
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    comps = tiny_components(seed=0)
    comps.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for name, p in comps.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(comps.unet))
    lora_pipe = load_pipeline(ModelSettings(model=str(model_dir), checkpoint=str(tmp_path / "lora"), device="cpu"))
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    base_w = dict(pipe.unet.named_parameters())[name]
    lora_w = dict(lora_pipe.unet.named_parameters())[name]
    assert base_w.shape == lora_w.shape and not torch.allclose(base_w, lora_w)
    assert not any("lora" in n for n, _ in lora_pipe.unet.named_parameters())  # fused


def test_full_unet_override(tmp_path: Path, model_dir: Path, pipe) -> None:
    other = tiny_components(seed=1).unet
    other.save_pretrained(tmp_path / "ckpt" / "unet")
    p2 = load_pipeline(ModelSettings(model=str(model_dir), checkpoint=str(tmp_path / "ckpt"), device="cpu"))
    a = next(iter(p2.unet.parameters()))
    assert torch.equal(a, next(iter(other.parameters()))) and not torch.equal(a, next(iter(pipe.unet.parameters())))


def test_resolve_checkpoint_layouts(tmp_path: Path) -> None:
    from tokencompose.loading import resolve_checkpoint

    full, lora, ema = tmp_path / "full", tmp_path / "lora", tmp_path / "ema"
    (full / "unet").mkdir(parents=True)
    lora.mkdir()
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (ema / "unet_ema").mkdir(parents=True)
    assert resolve_checkpoint(full) == (full, None)
    assert resolve_checkpoint(lora) == (None, lora)
    assert resolve_checkpoint(ema, ema=True) == (ema / "unet_ema", None)
    with pytest.raises(UserError):
        resolve_checkpoint(full, ema=True)
    with pytest.raises(UserError):
        resolve_checkpoint(tmp_path / "nothing")
