"""SD3 and Flux end to end on tiny random-init models (CPU, offline): what the SDXL tests check, for the flow families.

A training step on a ragged batch (finite losses, gradients into the supervised blocks' projections, gradient
checkpointing changing nothing, both map normalisations, SD3's CLIP / T5 spans); a LoRA trained with each
preset loads in the stock pipeline as our loader's fused model (alpha != rank); ``export`` writes a folder
stock ``DiffusionPipeline`` runs; the layer probe has one row per text-attention block; ``generate``,
``evaluate grounding`` and the attention figure take SD3 / Flux models; SD3.5 loads and trains as ``sd3``.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel

from tokencompose.config import load_config
from tokencompose.families import detect_family, get_family
from tokencompose.families.flux import image_ids
from tokencompose.families.flux import supported as flux_supported
from train_util import make_base, make_data

NEEDS_FLUX = pytest.mark.skipif(not flux_supported(), reason="the flux family needs diffusers >= 0.31")
FAMILIES = ["sd3", pytest.param("flux", marks=NEEDS_FLUX)]
SIZE = 64  # pixels: 8x8 latents, a 4x4 grid of image tokens (patch 2)
PROJECTIONS = ("to_q", "to_k", "add_k_proj")
QUIET = ["log.curves=false", "log.tensorboard=false", "log.progress=false"]
LORA = ["train.lora.rank=4", "train.lora.alpha=8"]  # scale alpha / rank = 2: the export must fold it
PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


# -- shared set-up ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("flow")


@pytest.fixture(scope="module")
def data(root: Path) -> Path:
    return make_data(root, num=8)


@pytest.fixture(scope="module")
def tiny():
    """``tiny(name)``: the family's tiny components, built once; frozen text encoders and VAE (only the
    transformer learns). No test steps an optimizer on them."""
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            comps = get_family(name).tiny(seed=0)
            for part in (comps.vae, *comps.text_encoders):
                part.requires_grad_(False)
            cache[name] = comps
        return cache[name]

    return get


@pytest.fixture(scope="module")
def base(root: Path):
    """``base(name)``: the tiny model of a family saved in diffusers layout (what users point --model at)."""
    return lambda name: make_base(root, name)


def denoiser_output(model, seed: int = 0, batch: int = 2) -> torch.Tensor:
    """An SD3 or Flux transformer's output for seeded latents, text states, pooled embeddings and timesteps."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    kind = type(model).__name__
    pooled = torch.randn(batch, c.pooled_projection_dim, generator=g)
    text = torch.randn(batch, 12, c.joint_attention_dim, generator=g)
    with torch.no_grad():
        if kind.startswith("SD3"):
            x = torch.randn(batch, c.in_channels, 8, 8, generator=g)
            t = torch.linspace(100, 900, batch)
            return model(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t).sample
        x = torch.randn(batch, 16, c.in_channels, generator=g)  # 4x4 packed tokens
        kw = {"guidance": torch.full((batch,), 3.5)} if c.guidance_embeds else {}
        t = torch.linspace(0.1, 0.9, batch)  # Flux's timestep input is sigma in [0, 1]
        return model(
            hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t,
            img_ids=image_ids(8, 8), txt_ids=torch.zeros(12, 3), **kw,
        ).sample  # fmt: skip


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _generate(pipe) -> None:
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    image = pipe("a red circle", num_inference_steps=2, height=SIZE, width=SIZE, output_type="np", generator=g)
    image = image.images[0]
    assert image.shape == (SIZE, SIZE, 3) and bool(((image >= 0) & (image <= 1)).all())


# -- 1. the training step -------------------------------------------------------------------------------------


def _batch(comps, data: Path, name: str, text_spans: str = "clip") -> dict:
    """Samples 0 and 1 of the shapes data: 4 and 3 phrases (a ragged batch)."""
    from tokencompose.data.dataset import TokenDataset, collate

    fam = get_family(name)
    sizes = fam.map_sizes(comps, (SIZE, SIZE))
    ds = TokenDataset(str(data), fam.index_tokenizer(comps), SIZE, attention_sizes=sizes,
                      **fam.dataset_text(comps, text_spans))  # fmt: skip
    return collate([ds[0], ds[1]])


def _step(comps, batch, weights, layers, normalize="text", checkpointing=False, seed=7):
    """One training step and its backward (inside the capture); the supervised blocks' projection gradients
    ``{(block, projection): grad}`` and how often each supervised block ran forward."""
    from tokencompose.attention import AttentionCapture
    from tokencompose.train.step import Conditioner, NoiseSource, training_step

    unet = comps.unet
    unet.zero_grad(set_to_none=True)
    calls = dict.fromkeys(layers, 0)
    hooks = [
        unet.get_submodule(n).register_forward_pre_hook(lambda *_, n=n: calls.__setitem__(n, calls[n] + 1))
        for n in layers
    ]
    if checkpointing:
        unet.enable_gradient_checkpointing()
    try:
        noise = NoiseSource(seed=seed, device=torch.device("cpu"))
        with AttentionCapture(unet, layers, normalize=normalize) as cap:
            out = training_step(unet, comps.vae, Conditioner(comps, SIZE), comps.scheduler, batch, weights, noise, cap)
            out.loss.backward()
    finally:
        unet.disable_gradient_checkpointing()
        for h in hooks:
            h.remove()
    grads = {}
    for n in layers:
        attn = unet.get_submodule(n).attn
        for p in PROJECTIONS:
            g = getattr(attn, p).weight.grad
            grads[n, p] = None if g is None else g.detach().clone()
    unet.zero_grad(set_to_none=True)
    return out, grads, calls


@pytest.mark.parametrize("normalize", ["joint", "text"])
@pytest.mark.parametrize("name", FAMILIES)
def test_training_step_on_a_ragged_batch(name, normalize, tiny, data) -> None:
    from tokencompose.train.step import LossWeights

    comps = tiny(name)
    layers = list(get_family(name).default_layers)
    batch = _batch(comps, data, name)
    assert batch["token_valid"].any(-1).sum(-1).tolist() == [4, 3]  # ragged: 4 and 3 phrases
    weights = LossWeights(token=1e-3, pixel=5e-5)

    out, grads, calls = _step(comps, batch, weights, layers, normalize)
    assert set(out.terms) == {"denoise", "token", "pixel", "total"} and torch.isfinite(out.loss)
    for key, value in out.terms.items():
        assert value.shape == (2,) and torch.isfinite(value).all(), key
    assert (out.terms["token"] > 0).all() and (out.terms["pixel"] > 0).all()
    assert set(out.parts) == {"token_4x4", "pixel_4x4"}  # one map size: the 4x4 token grid
    assert all(c == 1 for c in calls.values()), calls
    for key, g in grads.items():
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, key

    # The grounding terms reach the supervised projections: same noise without them, other gradients.
    # Under "joint" every image key is in the softmax; under "text" the map is softmax(q_image k_text): the
    # last supervised block's image keys (to_k) reach no map, earlier blocks' reach the later blocks' maps.
    plain, plain_grads, _ = _step(comps, batch, LossWeights(), layers, normalize)
    torch.testing.assert_close(plain.terms["denoise"], out.terms["denoise"])  # same noise, same timesteps
    for key in grads:
        if normalize == "text" and key == (layers[-1], "to_k"):
            assert _rel_diff(grads[key], plain_grads[key]) < 1e-6, key
        else:
            assert _rel_diff(grads[key], plain_grads[key]) > 5e-5, key  # >= 2.6e-4 measured, rounding ~1e-7

    # Gradient checkpointing (the blocks recompute in backward: each runs twice) changes nothing.
    ck, ck_grads, ck_calls = _step(comps, batch, weights, layers, normalize, checkpointing=True)
    assert all(c == 2 for c in ck_calls.values()), ck_calls
    for key in out.terms:
        torch.testing.assert_close(ck.terms[key], out.terms[key], rtol=1e-6, atol=0)
    for key in grads:
        assert _rel_diff(ck_grads[key], grads[key]) < 1e-5, key


@pytest.mark.parametrize("name", FAMILIES)
def test_both_normalizations_give_finite_losses(name, tiny, data) -> None:
    from tokencompose.train.step import LossWeights

    comps = tiny(name)
    batch = _batch(comps, data, name)
    layers = list(get_family(name).default_layers)
    token = {}
    for normalize in ("joint", "text"):
        out, grads, _ = _step(comps, batch, LossWeights(token=1e-3, pixel=5e-5), layers, normalize=normalize)
        assert all(torch.isfinite(v).all() for v in out.terms.values()), normalize
        assert (out.terms["token"] > 0).all() and (out.terms["pixel"] > 0).all(), normalize
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), normalize
        token[normalize] = out.terms["token"]
    assert not torch.allclose(token["joint"], token["text"])  # the setting reached the maps


def test_sd3_text_spans_index_clip_t5_or_both(tiny, data) -> None:
    from tokencompose.train.step import LossWeights

    comps = tiny("sd3")
    layers = list(get_family("sd3").default_layers)
    for spans in ("clip", "t5", "both"):
        batch = _batch(comps, data, "sd3", spans)
        index, valid = batch["token_index"], batch["token_valid"]
        phrases = valid.any(-1)
        assert phrases.sum(-1).tolist() == [4, 3], spans
        clip = ((index < 77) & valid).any(-1)
        t5 = ((index >= 77) & (index < 77 + 256) & valid).any(-1)
        assert bool(((index >= 0) & (index < 77 + 256))[valid].all()), spans
        want = {"clip": (phrases, torch.zeros_like(phrases)), "t5": (torch.zeros_like(phrases), phrases),
                "both": (phrases, phrases)}[spans]  # fmt: skip
        assert torch.equal(clip, want[0]) and torch.equal(t5, want[1]), spans
        out, _, _ = _step(comps, batch, LossWeights(token=1e-3, pixel=5e-5), layers)
        assert all(torch.isfinite(v).all() for v in out.terms.values()) and (out.terms["token"] > 0).all(), spans
    # T5 spans are the phrase's own T5 tokens
    batch = _batch(comps, data, "sd3", "t5")
    pos = batch["token_index"][0, 0][batch["token_valid"][0, 0]] - 77
    ids = batch["input_ids_3"][0, pos]
    assert comps.tokenizer_3.decode(ids).strip() == batch["phrases"][0][0] == "green triangle"


# -- 2. a trained LoRA in the stock pipeline -----------------------------------------------------------------


@pytest.fixture(scope="module")
def lora(root: Path, data: Path, base):
    """``lora(name)``: two steps of the family's LoRA preset (rank 4, alpha 8) from the saved tiny base;
    ``(base, checkpoint, trained output, base output, LoRA target modules)``. The trained output is rebuilt as
    training sees the model (peft adapters with scale 2, the raw resume state), independently of the exported
    diffusers file."""
    from tokencompose.models import load_components
    from tokencompose.train import train
    from tokencompose.train.lora import add_lora, load_lora_state

    cache: dict[str, tuple] = {}

    def get(name: str):
        if name in cache:
            return cache[name]
        path = base(name)
        over = [f"model.path={path}", f"data.path={data}", f"run_dir={root / f'lora_{name}'}", "data.image_size=64",
                "data.num_workers=0", "train.precision=fp32", "train.grad_checkpointing=false",
                "train.batch_size=2", "train.max_steps=2", "checkpoint.every=2", "optim.lr=1e-2", *LORA,
                *QUIET]  # fmt: skip
        cfg = load_config(f"{name}_coco_lora", over)
        result = train(cfg)
        ckpt = result.checkpoint
        assert result.step == 2 and result.nan_skips == 0
        assert (ckpt / "pytorch_lora_weights.safetensors").is_file() and not (ckpt / "transformer").exists()
        rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert rows and all(torch.isfinite(torch.tensor(r["loss/total"])) for r in rows)
        assert rows[-1]["loss/token"] > 0 and rows[-1]["loss/pixel"] > 0
        model = load_components(path).unet
        before = denoiser_output(model)
        add_lora(model, rank=4, alpha=8.0, target_modules=cfg.train.lora.target_modules)
        load_lora_state(model, ckpt)
        cache[name] = (path, ckpt, denoiser_output(model), before, list(cfg.train.lora.target_modules))
        return cache[name]

    return get


@pytest.mark.parametrize("name", FAMILIES)
def test_stock_pipeline_reproduces_a_trained_lora(name, lora) -> None:
    import diffusers

    from tokencompose.loading import ModelSettings, load_model
    from tokencompose.models import load_components
    from tokencompose.train.lora import add_lora, load_lora_state

    path, ckpt, trained, before, targets = lora(name)
    assert _rel_diff(trained, before) > 1e-3, "the adapter barely changes the model: the check would be weak"
    # The same adapter at scale 1 (alpha = rank) is a clearly different model: an unfolded alpha would show.
    model = load_components(path).unet
    add_lora(model, rank=4, alpha=4.0, target_modules=targets)
    load_lora_state(model, ckpt)
    assert _rel_diff(denoiser_output(model), trained) > 1e-4

    pipe = getattr(diffusers, PIPELINES[name]).from_pretrained(str(path))
    pipe.load_lora_weights(str(ckpt))
    torch.testing.assert_close(denoiser_output(pipe.transformer), trained, rtol=1e-4, atol=1e-5)

    ours = load_model(ModelSettings(model=str(path), checkpoint=str(ckpt), device="cpu"))
    assert ours.family == name and type(ours.unet).__name__ == get_family(name).denoiser_class
    assert not any("lora" in n for n, _ in ours.unet.named_modules()), "the LoRA was not fused"
    torch.testing.assert_close(denoiser_output(ours.unet), trained, rtol=1e-4, atol=1e-5)
    _generate(pipe)


# -- 3. export ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep_lora", [False, True])
@pytest.mark.parametrize("name", FAMILIES)
def test_export_runs_in_stock_diffusers(name, keep_lora, lora, tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline

    from tokencompose.export import ExportSettings, export_pipeline

    path, ckpt, trained, before, _ = lora(name)
    out = export_pipeline(ExportSettings(model=str(path), checkpoint=str(ckpt), out=str(tmp_path / "x"),
                                         keep_lora=keep_lora))  # fmt: skip
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == PIPELINES[name]
    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert type(pipe).__name__ == PIPELINES[name]
    assert {p.dtype for p in (pipe.transformer, pipe.vae, *pipe.components.values()) if hasattr(p, "dtype")} == {
        torch.float32
    }
    if keep_lora:
        torch.testing.assert_close(denoiser_output(pipe.transformer), before)  # the base, untouched
        pipe.load_lora_weights(str(out))
    torch.testing.assert_close(denoiser_output(pipe.transformer), trained, rtol=1e-4, atol=1e-5)
    _generate(pipe)


# -- 4. the layer probe ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_probe_has_one_row_per_block_attention(name, base, tmp_path: Path) -> None:
    from tokencompose.evaluation.settings import ModelSettings
    from tokencompose.probe import ProbeSettings
    from tokencompose.probe.layers import run_probe

    out = tmp_path / "probe"
    s = ProbeSettings(out=str(out), model=ModelSettings(model=str(base(name)), device="cpu"), shapes=2,
                      resolution=SIZE, timesteps=[100, 700], batch_size=2)  # fmt: skip
    run_probe(s)
    result = json.loads((out / "probe.json").read_text())
    joint = [f"transformer_blocks.{i}.attn" for i in range(12 if name == "sd3" else 19)]
    single = [] if name == "sd3" else [f"single_transformer_blocks.{i}.attn" for i in range(2)]
    names = [r["name"] for r in result["layers"]]
    assert names == joint + single
    assert [r["block"] for r in result["layers"]] == ["joint"] * len(joint) + ["single"] * len(single)
    for r in result["layers"]:
        assert r["resolution"] == [4, 4], r["name"]
        assert set(r["cells"]) == {"100", "700", "mean"}
        assert all(0 <= c["miou"] <= 1 and 0 <= c["auroc"] <= 1 for c in r["cells"].values()), r
    assert result["num_images"] == 2
    assert (out / "probe_layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "probe.md").read_text()
    assert table.count("| `") == len(names)


# -- 5. generate, evaluate grounding, the attention figure ----------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_generate_with_the_default_sampler(name, base, tmp_path: Path) -> None:
    from PIL import Image

    from tokencompose.evaluation.run import run_generate
    from tokencompose.evaluation.settings import (
        GenerateSettings,
        GenerationSettings,
        ModelSettings,
        PromptSettings,
        ShardSettings,
    )

    out = tmp_path / "gen"
    s = GenerateSettings(
        out=str(out),
        model=ModelSettings(model=str(base(name)), device="cpu"),
        prompts=PromptSettings(texts=["a red circle", "a blue square and a green triangle"]),
        generation=GenerationSettings(steps=2, resolution=SIZE, images_per_prompt=1),
        run=ShardSettings(batch_size=2),
    )
    assert s.generation.scheduler == "auto"
    run_generate(s)
    assert sorted(p.name for p in out.glob("*.png")) == ["0_0.png", "1_0.png"]
    images = [Image.open(out / n) for n in ("0_0.png", "1_0.png")]
    assert all(im.size == (SIZE, SIZE) and im.mode == "RGB" for im in images)
    assert images[0].tobytes() != images[1].tobytes()
    assert json.loads((out / "generation.json").read_text())["scheduler"] == "default"


@pytest.mark.parametrize("name", FAMILIES)
def test_grounding_with_the_family_default_layers(name, base, tmp_path: Path) -> None:
    from tokencompose.evaluation.run import run_grounding
    from tokencompose.evaluation.settings import GroundingSettings, ModelSettings

    s = GroundingSettings(out=str(tmp_path / "g"), model=ModelSettings(model=str(base(name)), device="cpu"), shapes=2,
                          resolution=SIZE, timesteps=[300], name=f"tiny-{name}")  # fmt: skip
    res = run_grounding(s)
    saved = json.loads((tmp_path / "g" / "results.json").read_text())
    assert saved["kind"] == "grounding" and saved["scores"] == res["scores"]
    assert saved["layers"] == ",".join(get_family(name).default_layers)
    scores = saved["scores"]
    assert scores["num_images"] == 2 and scores["num_phrases"] > 0
    assert len(scores["miou"]) == 9 and all(0 <= m <= 1 for m in scores["miou"]) and 0 <= scores["auroc"] <= 1


@pytest.mark.parametrize("name", FAMILIES)
def test_attention_figure_lists_the_prompt_words(name, base, tiny, tmp_path: Path) -> None:
    from tokencompose.loading import ModelSettings
    from tokencompose.visualize.run import VisualizeSettings, run_visualize

    prompt = "a red circle and a blue square"
    out = tmp_path / "fig"
    s = VisualizeSettings(figure="attention", out=str(out), model=ModelSettings(model=str(base(name)), device="cpu"),
                          prompts=[prompt], steps=2, resolution=SIZE, dpi=40)  # fmt: skip
    (file,) = run_visualize(s)
    assert file.is_file() and file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (entry,) = json.loads((out / "figures.json").read_text())
    assert entry["kind"] == "attention" and entry["file"] == file.name and entry["prompt"] == prompt
    assert len(entry["timesteps"]) == 2
    words = entry["words"]
    assert [w["text"] for w in words] == prompt.split()
    # Each word sits at its own tokens' columns: CLIP counts the start token (SD3's index space), T5 has none
    # (Flux): decoding the caption's ids at the listed positions gives the word back.
    comps = tiny(name)
    fam = get_family(name)
    key = {"sd3": "input_ids", "flux": "input_ids_2"}[name]
    ids = fam.tokenize(comps, [prompt])[key][0]
    first = 1 if name == "sd3" else 0
    assert [w["positions"] for w in words] == [[first + i] for i in range(len(words))]
    tok = fam.index_tokenizer(comps)
    assert [tok.decode(ids[w["positions"]]).strip() for w in words] == prompt.split()


# -- 6. SD3.5 ---------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    "dual_attention_layers" not in inspect.signature(SD3Transformer2DModel.__init__).parameters,
    reason="SD3.5 options (dual attention, qk_norm) arrived in diffusers 0.31",
)
def test_sd35_loads_as_sd3_and_trains(root: Path, data: Path) -> None:
    import dataclasses

    from diffusers import SD3Transformer2DModel

    from tokencompose.attention import select_layers
    from tokencompose.models import load_components
    from tokencompose.train import train

    comps = get_family("sd3").tiny(seed=0)
    c = comps.unet.config
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=c.sample_size, patch_size=c.patch_size, in_channels=c.in_channels, out_channels=c.out_channels,
        num_layers=c.num_layers, attention_head_dim=c.attention_head_dim, num_attention_heads=c.num_attention_heads,
        joint_attention_dim=c.joint_attention_dim, caption_projection_dim=c.caption_projection_dim,
        pooled_projection_dim=c.pooled_projection_dim, pos_embed_max_size=c.pos_embed_max_size,
        dual_attention_layers=(0,), qk_norm="rms_norm",
    )  # fmt: skip
    path = root / "base_sd35"
    dataclasses.replace(comps, unet=transformer).save(path)
    assert detect_family(path) == "sd3"
    loaded = load_components(path).unet
    assert tuple(loaded.config.dual_attention_layers) == (0,) and loaded.config.qk_norm == "rms_norm"
    # the dual-attention block's image-only attn2 does not attend to text: only its joint attention is a layer
    assert select_layers(loaded, ["transformer_blocks.0"]) == ["transformer_blocks.0.attn"]
    assert loaded.transformer_blocks[0].attn2 is not None and loaded.transformer_blocks[9].attn.norm_q is not None

    over = [f"model.path={path}", f"data.path={data}", f"run_dir={root / 'sd35'}", "data.image_size=64",
            "data.num_workers=0", "train.precision=fp32", "train.grad_checkpointing=false", "train.batch_size=2",
            "train.max_steps=1", "checkpoint.every=1", "loss.pixel_weight=0",
            "loss.layers=[transformer_blocks.0,transformer_blocks.9]", *QUIET]  # fmt: skip
    result = train(load_config("sd3_coco_lora", over))
    assert result.step == 1 and result.nan_skips == 0
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(torch.isfinite(torch.tensor(r["loss/total"])) for r in rows)
    assert rows[-1]["loss/token"] > 0 and "loss/pixel" not in rows[-1]
