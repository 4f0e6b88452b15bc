"""End-to-end training on a tiny random-init model: outputs, checkpoint formats, loss terms, precision."""

from __future__ import annotations

import json

import pytest
import torch

from tokencompose.config import load_config
from train_util import config_dict, load_unet_weights, make_base, make_data


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return root, make_base(root), make_data(root, num=8)


def _count_capture_calls(monkeypatch) -> list[int]:
    """Count calls of the capturing attention processor (the only thing that materialises maps)."""
    from tokencompose import attention

    calls = [0]
    original = attention.CaptureAttnProcessor.__call__

    def counting(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(attention.CaptureAttnProcessor, "__call__", counting)
    return calls


@pytest.fixture(scope="module")
def full_run(assets):
    """3 optimizer steps x 2 accumulated micro-batches, with EMA; shared by the output checks below."""
    from tokencompose.train import train

    root, base, data = assets
    cfg = load_config(config_dict(base, data, root / "run_full"), ["train.grad_accum=2", "train.ema.enabled=true"])
    with pytest.MonkeyPatch.context() as mp:
        calls = _count_capture_calls(mp)
        result = train(cfg)
    return cfg, result, calls[0]


def test_run_writes_loadable_diffusers_checkpoint(assets, full_run):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    _, base, _ = assets
    cfg, result, _ = full_run
    assert result.step == 3 and result.nan_skips == 0
    assert result.checkpoint is not None and result.checkpoint.name == "step-00000003"
    names = sorted(p.name for p in (result.run_dir / "checkpoints").iterdir())
    assert names == ["step-00000002", "step-00000003"]  # every 2 + the final step, keep_last 2
    unet = UNet2DConditionModel.from_pretrained(result.checkpoint / "unet")
    pipe = StableDiffusionPipeline.from_pretrained(base, unet=unet, safety_checker=None, requires_safety_checker=False)
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and bool(torch.isfinite(torch.as_tensor(image)).all())
    trained, initial = load_unet_weights(result.checkpoint), load_unet_weights(base)
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)  # it did train
    ema = UNet2DConditionModel.from_pretrained(result.checkpoint / "unet_ema")
    ema_w = dict(ema.state_dict())
    assert any(not torch.equal(ema_w[k], trained[k]) for k in trained)


def test_run_folder_logs(full_run):
    cfg, result, _ = full_run
    run = result.run_dir
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss/total", "loss/denoise", "loss/token", "loss/pixel", "loss/token_8x8", "loss/pixel_4x4", "lr",
                "grad_norm", "samples_per_s", "peak_mem_gib", "epoch"):  # fmt: skip
        assert key in rows[-1], key
    r = rows[-1]
    weighted = r["loss/denoise"] + 1e-3 * r["loss/token"] + 5e-5 * r["loss/pixel"]
    assert r["loss/total"] == pytest.approx(weighted, rel=1e-5)
    assert r["lr"] == cfg.optim.lr
    assert load_config(run / "config.yaml") == cfg
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["precision"]["used"] == "fp32"
    assert manifest["packages"]["torch"] and manifest["effective_batch"] == 4
    assert (run / "loss_curves.png").stat().st_size > 1000
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_grounding_run_captures_attention(full_run):
    assert full_run[2] > 0


def test_denoise_only_installs_no_capture(assets, monkeypatch):
    from tokencompose.train import train

    root, base, data = assets
    cfg = load_config(
        config_dict(base, data, root / "run_denoise"),
        ["loss.token_weight=0", "loss.pixel_weight=0", "train.max_steps=2", "log.curves=false"],
    )
    calls = _count_capture_calls(monkeypatch)
    result = train(cfg)
    assert calls[0] == 0
    row = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert "loss/denoise" in row and "loss/token" not in row and "loss/pixel" not in row


def test_bf16_with_gradient_checkpointing(assets):
    from tokencompose.train import train

    root, base, data = assets
    cfg = load_config(
        config_dict(base, data, root / "run_bf16"),
        ["train.precision=bf16", "train.grad_checkpointing=true", "train.max_steps=2", "log.curves=false"],
    )
    result = train(cfg)
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["precision"]["used"] == "bf16"
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in rows)
    weights = load_unet_weights(result.checkpoint)
    assert all(v.dtype == torch.float32 for v in weights.values())  # fp32 master weights


def test_lora_checkpoint_loads_into_stock_pipeline(assets):
    from diffusers import StableDiffusionPipeline

    from tokencompose.train import train

    root, base, data = assets
    cfg = load_config(
        config_dict(base, data, root / "run_lora"),
        ["train.lora.rank=4", "optim.lr=1e-2", "train.max_steps=2", "log.curves=false"],
    )
    result = train(cfg)
    assert (result.checkpoint / "pytorch_lora_weights.safetensors").is_file()
    assert not (result.checkpoint / "unet").exists()
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        before = pipe.unet(x, t, ctx).sample
        pipe.load_lora_weights(result.checkpoint)
        after = pipe.unet(x, t, ctx).sample
    assert not torch.allclose(before, after)  # the trained adapters are active


def test_worker_processes_do_not_change_results(assets):
    from tokencompose.train import train

    root, base, data = assets
    over = ["data.flip=true", "train.max_steps=2", "log.curves=false", "log.tensorboard=false"]
    runs = [
        train(load_config(config_dict(base, data, root / f"workers{w}"), [*over, f"data.num_workers={w}"]))
        for w in (0, 2)
    ]
    a, b = (load_unet_weights(r.checkpoint) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)  # flips are seeded per (seed, epoch, index), not per worker


def test_shapes_preset_renders_its_data_and_trains(tmp_path):
    """The shapes preset as shipped (model `tiny`, data rendered on first use), shortened."""
    from tokencompose.train import train

    over = [f"run_dir={tmp_path / 'run'}", f"data.path={tmp_path / 'world' / 'metadata.jsonl'}", "data.shapes.num=4"]
    over += ["train.batch_size=2", "train.max_steps=1", "model.prediction_type=v_prediction", "log.curves=false"]
    result = train(load_config("shapes_tiny", over))
    assert (tmp_path / "world" / "metadata.jsonl").is_file()
    assert result.step == 1 and (result.checkpoint / "unet" / "config.json").is_file()


def test_roi_alignment_term_trains_and_is_saved(assets):
    from tokencompose.roi import RoiAlignmentHead
    from tokencompose.train import train

    root, base, data = assets
    over = ["loss.roi_weight=0.1", "loss.roi_embed_dim=16", "train.max_steps=2", "optim.lr=1e-2", "log.curves=false"]
    result = train(load_config(config_dict(base, data, root / "run_roi"), over))
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss/roi"] > 0 for r in rows)
    r = rows[-1]
    weighted = r["loss/denoise"] + 1e-3 * r["loss/token"] + 5e-5 * r["loss/pixel"] + 0.1 * r["loss/roi"]
    assert r["loss/total"] == pytest.approx(weighted, rel=1e-5)
    tau_keys = [k for k in r if k.endswith("roi_tau")]
    assert tau_keys and 0.01 <= r[tau_keys[0]] <= 1.0  # the learned temperature is logged, within its clamp
    head = RoiAlignmentHead.load(result.checkpoint)
    assert head.config["embed_dim"] == 16 and head.block == "up_blocks.2"


def test_latent_cache_replaces_the_vae_encoder(assets, monkeypatch):
    from diffusers import AutoencoderKL

    from tokencompose.data.latents import StaleCacheError, build_latent_cache
    from tokencompose.models import load_components, tiny_components
    from tokencompose.train import train

    root, base, data = assets
    cache = build_latent_cache(load_components(base).vae, str(data), root / "latents", image_size=64)
    other = build_latent_cache(tiny_components(seed=1).vae, str(data), root / "latents_other", image_size=64)

    def no_encoder(*a, **k):
        raise AssertionError("the VAE encoder ran although latents are cached")

    monkeypatch.setattr(AutoencoderKL, "encode", no_encoder)
    over = ["train.max_steps=1", "log.curves=false", "log.tensorboard=false"]
    result = train(load_config(config_dict(base, data, root / "run_cache"), [*over, f"data.latent_cache={cache}"]))
    assert result.step == 1
    with pytest.raises(StaleCacheError, match="another VAE"):
        train(load_config(config_dict(base, data, root / "run_stale"), [*over, f"data.latent_cache={other}"]))


def test_capturing_only_the_supervised_columns_gives_the_same_run(assets, monkeypatch):
    import tokencompose.train.step as step_module
    from tokencompose.train import train

    widths: list[int] = []
    real = step_module.grounding_losses

    def spy(maps, *args, **kwargs):
        widths.append(next(iter(maps.values()))[0].shape[-1])
        return real(maps, *args, **kwargs)

    monkeypatch.setattr(step_module, "grounding_losses", spy)
    root, base, data = assets
    over = ["train.max_steps=2", "log.every=1", "log.curves=false", "loss.token_weight=1e-2", "loss.pixel_weight=1e-3"]
    runs = {}
    variants = {
        "false": ["loss.capture_columns=false"],
        "true": ["loss.capture_columns=true"],
        "sdpa": ["loss.capture_columns=true", "loss.capture_sdpa_output=true"],  # outputs from SDPA too
    }
    for name, flags in variants.items():
        result = train(load_config(config_dict(base, data, root / f"run_cols_{name}"), [*over, *flags]))
        runs[name] = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    for variant in ("true", "sdpa"):
        for full, sub in zip(runs["false"], runs[variant], strict=True):
            for key in ("loss/token", "loss/pixel", "loss/total"):
                assert sub[key] == pytest.approx(full[key], rel=1e-5), (variant, key)
    assert widths[:2] == [77, 77] and all(w < 77 for w in widths[2:])  # later runs kept only their columns
