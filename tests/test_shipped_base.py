"""The shapes-world bases shipped as package data: loadable, documented, and they draw what they are asked.

Each is skipped (with the reason) in a checkout where its weights have not been exported yet.
"""

from __future__ import annotations

import json

import pytest
import torch

from tokencompose.shipped import SHIPPED_BASES, shipped_base


@pytest.fixture(params=SHIPPED_BASES)
def base(request):
    """Each shipped base (skipped, with the reason, in a checkout where its weights have not been exported)."""
    found = shipped_base(request.param)
    if found is None:
        pytest.skip(f"no shapes-world base in src/tokencompose/assets/{request.param}")
    return found


def test_base_is_a_documented_diffusers_folder(base):
    from tokencompose.models import load_components
    from tokencompose.pretrain.recipe import PretrainConfig

    comps = load_components(base)
    assert comps.unet.dtype == torch.float32
    assert comps.unet.config.sample_size * comps.vae_scale_factor == 64
    assert len(comps.unet.config.block_out_channels) >= 3  # cross-attention at >= 3 resolutions
    recipe = json.loads((base / "recipe.json").read_text())
    assert set(recipe) == {f for f in PretrainConfig.__dataclass_fields__}
    card = (base / "README.md").read_text()
    for needed in ("MG1", "recipe", "CPU"):
        assert needed in card
    weights = sum(p.stat().st_size for p in base.rglob("*.safetensors"))
    assert weights < 20 * 2**20  # fp16, a few MB


def test_base_draws_single_objects_it_is_asked_for(base):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from tokencompose.data.shapes import detect_shapes

    # Stock loading with no dtype: every part must come up in one precision (the text encoder's config
    # once said float16 beside a float32 UNet, and generation failed on mixed dtypes).
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    from tokencompose.data.shapes import world_categories
    from tokencompose.pretrain.recipe import trained_world

    cats = {  # one category of each colour, in the world the base was trained on
        "attributes": ["red circle", "blue square", "green triangle", "yellow cross", "purple circle", "cyan square"],
        "nouns": world_categories("nouns"),
    }[trained_world(base)]
    g = [torch.Generator().manual_seed(i) for i in range(2 * len(cats))]
    prompts = [f"a photo of a {c}." for c in cats for _ in range(2)]
    images = pipe(prompts, num_inference_steps=20, guidance_scale=5.0, height=64, width=64, generator=g,
                  output_type="np").images  # fmt: skip
    found = [cats[i // 2] in {k for k, s in detect_shapes((img * 255).round().astype("uint8")).items() if s > 0.1}
             for i, img in enumerate(images)]  # fmt: skip
    # a random-init model finds ~0 of these; the model card reports the measured rate on more prompts
    assert sum(found) / len(found) >= 0.5, found


def test_base_loads_under_transformers_4_too(base):
    """Saved by transformers 5, laid out so that transformers 4 also reads it (see tests/test_models.py)."""
    from test_models import check_portable

    check_portable(base)


def test_a_model_setting_takes_a_shipped_bases_name(tmp_path, monkeypatch):
    from tokencompose.loading import ModelSettings

    for name in SHIPPED_BASES:
        folder = shipped_base(name)
        if folder is not None:
            assert ModelSettings(model=name).model == str(folder)  # what results record: the folder
    assert ModelSettings(model="org/some-model").model == "org/some-model"  # hub ids and folders unchanged
    monkeypatch.chdir(tmp_path)
    (tmp_path / SHIPPED_BASES[0]).mkdir()
    assert ModelSettings(model=SHIPPED_BASES[0]).model == SHIPPED_BASES[0]  # a local folder of that name wins
