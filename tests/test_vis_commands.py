"""``tokencompose visualize ...`` end to end on tiny random-init models saved in diffusers layout (CPU, offline)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tokencompose.cli import main

PROMPT = "An apple on a bench with a helicopter behind it"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tokencompose.models import tiny_components

    root = tmp_path_factory.mktemp("models")
    tiny_components(seed=0).save(root / "base")
    tuned = tiny_components(seed=1)
    tuned.save(root / "tuned")
    tuned.unet.save_pretrained(root / "ckpt" / "unet")  # a UNet-only checkpoint of base
    return root


@pytest.fixture(scope="module")
def lora_ckpt(models):
    """A LoRA checkpoint of the base (non-zero adapters), as the trainer writes it."""

    from tokencompose.families import get_family
    from tokencompose.models import load_components
    from tokencompose.train.lora import add_lora, save_lora
    from train_util import nonzero_lora_up

    unet = load_components(models / "base").unet
    add_lora(unet, rank=2, alpha=4.0, target_modules=["to_k", "to_v"])
    nonzero_lora_up(unet, fill=0.05)
    save_lora(unet, models / "lora", get_family("sd"))
    return models / "lora"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from tokencompose.data.shapes import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), 2, seed=0, size=64)


def _manifest(folder):
    return json.loads((folder / "figures.json").read_text())


def test_attention_from_prompt_is_deterministic(models, tmp_path, tiny):
    from tokencompose.visualize.make import attention_from_prompt

    args = ["visualize", "attention", PROMPT, "--model", str(models / "base"), "--steps", "2", "--dpi", "60"]
    assert main([*args, "--out", str(tmp_path / "a"), "--device", "cpu"]) == 0
    (entry,) = _manifest(tmp_path / "a")
    assert entry["kind"] == "attention" and entry["seed"] == 0 and len(entry["timesteps"]) == 2
    # The same weights (tiny seed 0) in memory, same seed: the same PNG bytes.
    again = attention_from_prompt(tiny, PROMPT, tmp_path / "b", steps=2, dpi=60, label="base")
    a = tmp_path / "a" / entry["file"]
    assert again.name == a.name and a.read_bytes() == again.read_bytes()
    with Image.open(a) as im:
        assert im.width > im.height > 60  # 11 panels in 2 rows of 6


def test_attention_timestep_range_and_resolutions(models, tiny):
    from tokencompose.visualize.capture import generate_with_attention

    image, maps, used = generate_with_attention(tiny, "a red circle", steps=4, t_range=(0, 500), device="cpu")
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert used and all(t <= 500 for t in used) and len(used) < 4
    assert sorted(maps) == [(1, 1), (2, 2), (4, 4), (8, 8)]  # mid + up blocks of the tiny UNet
    assert maps[(8, 8)].shape == (1, 77, 8, 8)
    assert maps[(8, 8)].sum(1).allclose(np.ones(1, dtype=np.float32).item() * maps[(8, 8)].new_ones(1, 8, 8))
    with pytest.raises(ValueError, match="timestep range"):
        generate_with_attention(tiny, "a red circle", steps=1, t_range=(2000, 3000), device="cpu")


def test_attention_of_an_image_and_caption_with_unet_checkpoint(models, tmp_path):
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "figs"
    rc = main(
        ["visualize", "attention", "a red circle and a blue square", "--checkpoint", str(models / "ckpt"), "--model",
         str(models / "base"), "--image", str(img), "--timesteps", "200,600", "--res", "4,8",
         "--words", "red circle,square", "--special", "--out", str(out), "--device", "cpu", "--dpi", "60"]
    )  # fmt: skip
    assert rc == 0
    (entry,) = _manifest(out)
    assert entry["caption"] == "a red circle and a blue square"
    assert (out / entry["file"]).is_file()


def test_attention_of_a_lora_checkpoint(models, lora_ckpt, tmp_path):
    """A LoRA checkpoint is drawn as the fused model (it used to fail with FileNotFoundError)."""
    out = tmp_path / "figs"
    common = [PROMPT, "--model", str(models / "base"), "--steps", "2", "--dpi", "60", "--device", "cpu"]
    assert main(["visualize", "attention", *common, "--checkpoint", str(lora_ckpt), "--out", str(out / "l")]) == 0
    assert main(["visualize", "attention", *common, "--out", str(out / "b")]) == 0
    (lora,), (base,) = _manifest(out / "l"), _manifest(out / "b")
    assert lora["title"].startswith("lora: ") and base["title"].startswith("base: ")
    assert (out / "l" / lora["file"]).read_bytes() != (out / "b" / base["file"]).read_bytes()


def test_bad_checkpoint_is_one_line_exit_2(models, tmp_path, capsys):
    rc = main(["visualize", "attention", PROMPT, "--model", str(models / "base"), "--checkpoint",
               str(tmp_path / "nope"), "--out", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "does not exist" in err and len(err.splitlines()) == 1


def test_masks_one_png_per_sample_with_scores(models, shapes, tmp_path):
    out = tmp_path / "masks"
    rc = main(
        ["visualize", "masks", "--data", str(shapes), "--model", str(models / "base"), "--checkpoint",
         f"tuned={models / 'ckpt'}", "--num", "2", "--out", str(out), "--device", "cpu", "--dpi", "60"]
    )  # fmt: skip
    assert rc == 0
    entries = _manifest(out)
    assert [e["file"] for e in entries] == ["masks_00000.png", "masks_00001.png"]
    from tokencompose.data.records import read_jsonl

    records = list(read_jsonl(shapes))
    for e, rec in zip(entries, records, strict=True):
        assert set(e["in_mask"]) == {"base", "tuned"}
        scores = e["in_mask"]["base"][: len(rec.phrases)]
        assert all(0.0 <= s <= 1.0 for s in scores)
        with Image.open(out / e["file"]) as im:
            assert im.height > 60 * 1.8 * len(rec.phrases)  # one row (1.8 in) per phrase


def test_grid_same_seeds_across_models(models, tmp_path, tiny):
    from tokencompose.visualize.capture import seed_images

    a = seed_images(tiny, "a red circle", [0, 1], steps=2, device="cpu")
    b = seed_images(tiny, "a red circle", [1], steps=2, device="cpu")
    # Per-image seeds: the same noise whatever the batch (kernels may round differently per batch size).
    assert np.abs(a[1].astype(int) - b[0].astype(int)).max() <= 2
    assert np.abs(a[0].astype(int) - a[1].astype(int)).mean() > 5
    out = tmp_path / "grid"
    rc = main(
        ["visualize", "grid", "--model", str(models / "base"), "--checkpoint", f"tuned={models / 'ckpt'}", "--prompt",
         "a red circle", "--seeds", "0,1", "--steps", "2", "--out", str(out), "--device", "cpu", "--dpi", "60"]
    )  # fmt: skip
    assert rc == 0
    (entry,) = _manifest(out)
    assert entry["kind"] == "grid" and (out / "grid.png").is_file()
    # The settings that drew it are kept with it.
    assert (
        entry["settings"]["seeds"] == [0, 1] and entry["settings"]["model"]["checkpoint"] == f"tuned={models / 'ckpt'}"
    )


def test_curves_from_run_folder(tmp_path):
    pytest.importorskip("tokencompose.train.curves")
    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {"step": s, "epoch": s // 10, "loss/total": 1.0 / (s + 1), "loss/denoise": 0.1, "loss/token": 0.5 - s / 100}
        for s in range(30)
    ]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["visualize", "curves", str(run)]) == 0
    assert (run / "loss_curves.png").is_file()
    assert _manifest(run)[0]["kind"] == "curves"


@pytest.mark.parametrize(
    "argv, words",
    [
        (["grid", "--prompt", "a cat", "--seeds", "zero"], "config key 'seeds[0]'"),
        (["grid", "--prompt", "a cat", "dpi=high"], "config key 'dpi'"),
        (["attention", "a cat", "--t-range", "1,2,3"], "two timesteps"),
        (["masks", "--data", "x.jsonl", "--no-base"], "no model to show"),
    ],
)
def test_bad_visualize_settings_are_one_line_exit_2(models, tmp_path, capsys, argv, words):
    rc = main(["visualize", *argv, "--model", str(models / "base"), "--out", str(tmp_path), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and words in err and len(err.splitlines()) == 1, err


def test_scheduler_reaches_the_sampler(models, tmp_path, tiny):
    from tokencompose.visualize.capture import sampling_pipeline

    assert type(sampling_pipeline(tiny).scheduler).__name__ == "DDIMScheduler"  # auto: SD's figure sampler
    assert type(sampling_pipeline(tiny, "dpm").scheduler).__name__ == "DPMSolverMultistepScheduler"
    drawn = {}
    for sampler in ("auto", "dpm"):
        out = tmp_path / sampler
        args = ["visualize", "attention", PROMPT, "--model", str(models / "base"), "--steps", "2", "--dpi", "60"]
        assert main([*args, "--scheduler", sampler, "--out", str(out), "--device", "cpu"]) == 0
        (entry,) = _manifest(out)
        assert entry["settings"]["scheduler"] == sampler
        drawn[sampler] = (out / entry["file"]).read_bytes()
    assert drawn["auto"] != drawn["dpm"]  # two steps of another solver: another image
