"""SDXL end to end on tiny random-init models (CPU, offline): what the SD tests check, for the second family.

(Resume after kill -9 and two-process DDP are the SD tests, parametrized over the families.) Stock diffusers
loads a trained full UNet and a trained LoRA (alpha != rank) as the trained model, ``export`` writes a
folder stock ``DiffusionPipeline`` runs as ``StableDiffusionXLPipeline``, the layer probe has one row per
cross-attention layer, the SDXL presets run, and ``generate`` / ``evaluate grounding`` take an SDXL model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tokencompose.config import load_config
from train_util import config_dict, make_base, make_data

QUIET = ["log.curves=false", "log.tensorboard=false"]
LORA = ["train.lora.rank=4", "train.lora.alpha=8"]  # scale alpha / rank = 2: the export must fold it


def xl_unet_output(unet, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """An SDXL UNet's prediction for seeded latents, timesteps, text states, pooled embeddings and time ids."""
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g)
    text = torch.randn(batch, 77, c.cross_attention_dim, generator=g)
    pooled = torch.randn(batch, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim, generator=g)
    time_ids = torch.tensor([[96.0, 80.0, 8.0, 4.0, 64.0, 64.0]]).repeat(batch, 1)
    t = torch.linspace(10, 500, batch).long()
    added = {"text_embeds": pooled.to(unet.dtype), "time_ids": time_ids.to(unet.dtype)}
    with torch.no_grad():
        return unet(x.to(unet.dtype), t, text.to(unet.dtype), added_cond_kwargs=added).sample.float()


def _weights_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sdxl")


@pytest.fixture(scope="module")
def base(root: Path) -> Path:
    """The tiny SDXL model saved in diffusers layout: the base every test trains from or loads."""
    return make_base(root, "sdxl")


@pytest.fixture(scope="module")
def data(root: Path) -> Path:
    return make_data(root, num=8)


@pytest.fixture(scope="module")
def full_ckpt(base: Path, data: Path, root: Path) -> Path:
    """Two steps of full-UNet training from the tiny SDXL base; the step-2 checkpoint."""
    from tokencompose.train import train

    over = ["train.max_steps=2", "optim.lr=1e-3", *QUIET]
    result = train(load_config(config_dict(base, data, root / "full"), over))
    assert result.step == 2 and (result.checkpoint / "unet").is_dir()
    return result.checkpoint


@pytest.fixture(scope="module")
def lora_ckpt(base: Path, data: Path, root: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """Two steps of rank-4, alpha-8 LoRA training; the checkpoint, the trained model's output and the base's.

    The trained model's output is rebuilt as training sees it (peft adapters with scale 2 over the base,
    the raw resume state), independently of the exported diffusers file the loaders read.
    """
    from tokencompose.models import load_components
    from tokencompose.train import train
    from tokencompose.train.lora import add_lora, load_lora_state

    over = ["train.max_steps=2", "optim.lr=1e-2", *LORA, *QUIET]
    cfg = load_config(config_dict(base, data, root / "lora"), over)
    result = train(cfg)
    ckpt = result.checkpoint
    assert result.step == 2 and (ckpt / "pytorch_lora_weights.safetensors").is_file() and not (ckpt / "unet").exists()
    unet = load_components(base).unet
    before = xl_unet_output(unet)
    add_lora(unet, rank=4, alpha=8.0, target_modules=cfg.train.lora.target_modules)
    load_lora_state(unet, ckpt)
    return ckpt, xl_unet_output(unet), before


# Resume (kill -9) and 2-process DDP run for SDXL as for SD: tests/test_train_resume.py, tests/test_train_ddp.py
# (parametrized over the families).

# -- 3. stock diffusers loads what we trained ------------------------------------------------------------


def test_stock_diffusers_runs_a_trained_full_checkpoint(base: Path, full_ckpt: Path) -> None:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from tokencompose.loading import ModelSettings, load_model

    unet = UNet2DConditionModel.from_pretrained(str(full_ckpt / "unet"))
    pipe = StableDiffusionXLPipeline.from_pretrained(str(base), unet=unet)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np", generator=g).images[0]
    assert image.shape == (64, 64, 3) and bool(((image >= 0) & (image <= 1)).all())

    ours = load_model(ModelSettings(model=str(base), checkpoint=str(full_ckpt), device="cpu")).unet.state_dict()
    stock = unet.state_dict()
    assert _weights_equal(ours, stock)
    base_unet = UNet2DConditionModel.from_pretrained(str(base / "unet")).state_dict()
    assert not _weights_equal(base_unet, stock), "the checkpoint holds the untrained base"


def test_stock_diffusers_reproduces_a_trained_lora(base: Path, lora_ckpt) -> None:
    from diffusers import StableDiffusionXLPipeline

    from tokencompose.loading import ModelSettings, load_model
    from tokencompose.models import load_components
    from tokencompose.train.lora import add_lora, load_lora_state

    ckpt, trained, before = lora_ckpt
    assert (trained - before).abs().max() > 1e-2, "the adapter barely changes the model: the check would be weak"
    # The same adapter at scale 1 (alpha = rank) is a clearly different model: an unfolded alpha would show.
    unet = load_components(base).unet
    add_lora(unet, rank=4, alpha=4.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    load_lora_state(unet, ckpt)
    assert (xl_unet_output(unet) - trained).abs().max() > 1e-3

    pipe = StableDiffusionXLPipeline.from_pretrained(str(base))
    pipe.load_lora_weights(str(ckpt))
    torch.testing.assert_close(xl_unet_output(pipe.unet), trained, rtol=1e-4, atol=1e-5)

    ours = load_model(ModelSettings(model=str(base), checkpoint=str(ckpt), device="cpu"))
    assert type(ours.unet).__name__ == "UNet2DConditionModel" and ours.family == "sdxl"
    assert not any("lora" in n for n, _ in ours.unet.named_modules()), "the LoRA was not fused"
    torch.testing.assert_close(xl_unet_output(ours.unet), trained, rtol=1e-4, atol=1e-5)


# -- 4. export ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep_lora", [False, True])
def test_export_of_a_lora_checkpoint_runs_in_stock_diffusers(base: Path, lora_ckpt, tmp_path: Path, keep_lora) -> None:
    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

    from tokencompose.export import ExportSettings, export_pipeline

    ckpt, trained, before = lora_ckpt
    out = export_pipeline(ExportSettings(model=str(base), checkpoint=str(ckpt), out=str(tmp_path / "x"),
                                         keep_lora=keep_lora))  # fmt: skip
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert type(pipe) is StableDiffusionXLPipeline
    parts = (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    assert {p.dtype for p in parts} == {torch.float32}
    if keep_lora:
        torch.testing.assert_close(xl_unet_output(pipe.unet), before)  # the base, untouched
        pipe.load_lora_weights(str(out))
    torch.testing.assert_close(xl_unet_output(pipe.unet), trained, rtol=1e-4, atol=1e-5)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np", generator=g).images[0]
    assert image.shape == (64, 64, 3) and bool(torch.isfinite(torch.from_numpy(image)).all())


# -- 5. layer probe ----------------------------------------------------------------------------------------


def test_probe_has_one_row_per_cross_attention_layer(base: Path, tmp_path: Path) -> None:
    from tokencompose.attention import select_layers
    from tokencompose.cli import main
    from tokencompose.models import load_components
    from tokencompose.probe.layers import unet_order

    out = tmp_path / "probe"
    argv = ["probe", "layers", "--model", str(base), "--out", str(out), "--shapes", "2", "--resolution", "64",
            "--timesteps", "100,700", "--batch-size", "2", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((out / "probe.json").read_text())
    # every cross-attention layer of the UNet, in forward order (diffusers registers up_blocks before mid_block)
    expected = unet_order(select_layers(load_components(base).unet, ["down", "mid", "up"]))
    names = [r["name"] for r in result["layers"]]
    # SDXL's deeper blocks hold two transformer layers each: 2 + 4 down, 2 mid, 6 + 3 up.
    assert names == expected and len(names) == 17 and len(set(names)) == 17
    assert any(".transformer_blocks.1." in n for n in names)
    # Latents are 8x8 at 64 px: down_blocks.1 and up_blocks.1 see 4x4, the deepest blocks 2x2.
    res = {"down_blocks.1": [4, 4], "down_blocks.2": [2, 2], "mid_block": [2, 2], "up_blocks.0": [2, 2],
           "up_blocks.1": [4, 4]}  # fmt: skip
    for r in result["layers"]:
        assert r["resolution"] == res[r["name"].split(".attentions")[0]], r["name"]
        assert set(r["cells"]) == {"100", "700", "mean"}
        assert all(0 <= c["miou"] <= 1 and 0 <= c["auroc"] <= 1 for c in r["cells"].values()), r
    assert result["num_images"] == 2 and result["by_block"]["mid"]["layers"] == 2
    table = (out / "probe.md").read_text()
    assert table.count("| `") == 17 and all(f"`{n}`" in table for n in names)


# -- 6. presets --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["sdxl_coco", "sdxl_coco_lora"])
def test_sdxl_preset_runs_two_steps_on_cpu(preset: str, tmp_path: Path) -> None:
    from tokencompose.train import train

    run_dir = tmp_path / "run"
    overrides = ["model.path=tiny", "data.image_size=64", "train.precision=fp32", "train.grad_checkpointing=false",
                 f"run_dir={run_dir}", f"data.path={tmp_path / 'shapes' / 'metadata.jsonl'}", "data.shapes.num=8",
                 "data.num_workers=0", "train.batch_size=2", "train.max_steps=2", "checkpoint.every=2",
                 "log.progress=false", *QUIET]  # fmt: skip
    result = train(load_config(preset, overrides))
    assert result.step == 2 and result.nan_skips == 0
    assert result.checkpoint.name == "step-00000002"
    if preset == "sdxl_coco_lora":
        assert (result.checkpoint / "pytorch_lora_weights.safetensors").is_file()
        assert not (result.checkpoint / "unet").exists()
    else:
        assert (result.checkpoint / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["family"] == "sdxl" and saved["model"]["path"] == "tiny"
    assert saved["train"]["lora"]["rank"] == (128 if preset == "sdxl_coco_lora" else 0)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(torch.isfinite(torch.tensor(r["loss/total"])) for r in rows)
    assert rows[-1]["loss/token"] > 0 and rows[-1]["loss/pixel"] > 0  # the grounding losses ran on SDXL maps


# -- 7. generate and evaluate grounding ---------------------------------------------------------------------


def test_generate_takes_an_sdxl_model(base: Path, tmp_path: Path) -> None:
    from PIL import Image

    from tokencompose.evaluation.run import run_generate
    from tokencompose.evaluation.settings import (
        GenerateSettings,
        GenerationSettings,
        ModelSettings,
        PromptSettings,
        ShardSettings,
    )

    s = GenerateSettings(
        out=str(tmp_path / "gen"),
        model=ModelSettings(model=str(base), device="cpu"),
        prompts=PromptSettings(texts=["a red circle", "a blue square and a green triangle"]),
        generation=GenerationSettings(steps=2, resolution=64, images_per_prompt=2),
        run=ShardSettings(batch_size=4),
    )
    run_generate(s)
    out = tmp_path / "gen"
    assert sorted(p.name for p in out.glob("*.png")) == ["0_0.png", "0_1.png", "1_0.png", "1_1.png"]
    images = [Image.open(out / f"{u}_{i}.png") for u in (0, 1) for i in (0, 1)]
    assert all(im.size == (64, 64) and im.mode == "RGB" for im in images)
    assert images[0].tobytes() != images[1].tobytes()  # one seed per image
    saved = json.loads((out / "prompts.json").read_text())
    assert [p["text"] for p in saved] == ["a red circle", "a blue square and a green triangle"]


def test_grounding_takes_an_sdxl_model(base: Path, tmp_path: Path) -> None:
    from tokencompose.evaluation.run import run_grounding
    from tokencompose.evaluation.settings import GroundingSettings, ModelSettings

    s = GroundingSettings(out=str(tmp_path / "g"), model=ModelSettings(model=str(base), device="cpu"), shapes=2,
                          resolution=64, timesteps=[300], name="tiny-xl")  # fmt: skip
    res = run_grounding(s)
    saved = json.loads((tmp_path / "g" / "results.json").read_text())
    assert saved["kind"] == "grounding" and saved["name"] == "tiny-xl" and saved["scores"] == res["scores"]
    scores = saved["scores"]
    assert scores["num_images"] == 2 and scores["num_phrases"] > 0
    assert len(scores["miou"]) == 9 and all(0 <= m <= 1 for m in scores["miou"]) and 0 <= scores["auroc"] <= 1
