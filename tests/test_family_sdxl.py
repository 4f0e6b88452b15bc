"""The SDXL family on tiny random-init models: capture, conditioning, losses, tokenizers, dataset geometry, loading.

Every model here is built from the real diffusers/transformers SDXL classes at toy widths
(:meth:`tokencompose.families.sdxl.SDXL.tiny`); nothing is downloaded.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image, ImageOps

from tokencompose.attention import AttentionCapture, CaptureAttnProcessor, cross_attention_names, select_layers
from tokencompose.data import records as R
from tokencompose.data.dataset import TokenDataset, collate
from tokencompose.errors import UserError
from tokencompose.families import detect_family, family_of, get_family, resolve_family
from tokencompose.families.sdxl import add_time_ids
from tokencompose.masks import attention_sizes
from tokencompose.tokens import phrase_token_positions, text_token_ids
from tokencompose.train.step import Conditioner, LossWeights, NoiseSource, training_step

FAMILY = get_family("sdxl")
SIZE = 64  # pixels; 8x8 latents, cross-attention at 4x4 and 2x2


@pytest.fixture(scope="module")
def xl():
    """Tiny SDXL components, built once; frozen text encoders and VAE as in training (only the UNet learns)."""
    comps = FAMILY.tiny(seed=0)
    for part in (comps.vae, *comps.text_encoders):
        part.requires_grad_(False)
    return comps


@pytest.fixture(scope="module")
def xl_dir(xl, tmp_path_factory):
    """``xl`` saved in diffusers layout (no test steps an optimizer: its weights stay the saved ones)."""
    path = tmp_path_factory.mktemp("tiny_sdxl")
    xl.save(path)
    return path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from tokencompose.data.shapes import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("shapes_xl"), num=2, seed=0, size=SIZE)


def _cond(comps, captions, original=None, crop=None):
    """UNet kwargs of ``captions`` through the family (original sizes / crops ``[B, 2]`` or None)."""
    batch = dict(FAMILY.tokenize(comps, captions))
    if original is not None:
        batch["original_size"] = torch.tensor(original)
    if crop is not None:
        batch["crop_top_left"] = torch.tensor(crop)
    return FAMILY.encode(comps, batch, (SIZE, SIZE))


def _latents(comps, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    side = SIZE // comps.vae_scale_factor
    return torch.randn(b, 4, side, side, generator=g), torch.randint(0, 1000, (b,), generator=g)


def _supervised(unet, blocks):
    """Cross-attention names of the mid / up blocks counted from the UNet's config, not from select_layers."""
    c = unet.config
    per_level = list(c.transformer_layers_per_block)
    names = []
    for i, kind in enumerate(c.up_block_types):
        if "up" in blocks and kind.startswith("CrossAttn"):
            layers = per_level[::-1][i]
            names += [
                f"up_blocks.{i}.attentions.{a}.transformer_blocks.{k}.attn2"
                for a in range(c.layers_per_block + 1)
                for k in range(layers)
            ]
    if "mid" in blocks:
        names += [f"mid_block.attentions.0.transformer_blocks.{k}.attn2" for k in range(per_level[-1])]
    return names


# -- 1. capture installs on the chosen layers only --------------------------------------------------------
def test_capture_replaces_only_the_chosen_layers_and_restores_every_processor(xl):
    unet = xl.unet
    before = dict(unet.attn_processors)
    assert all(isinstance(p, AttnProcessor2_0) for p in before.values())  # stock SDPA everywhere
    chosen = select_layers(unet, ["mid", "up"])
    assert sorted(chosen) == sorted(_supervised(unet, ("mid", "up")))
    down = [n for n in cross_attention_names(unet) if n.startswith("down_blocks.")]
    assert down and not set(down) & set(chosen)  # SDXL's cross-attention down blocks exist and stay fused

    with AttentionCapture(unet, ["mid", "up"]) as cap:
        assert cap.names == chosen
        inside = unet.attn_processors
        assert inside.keys() == before.keys()
        capturing = {k for k, p in inside.items() if isinstance(p, CaptureAttnProcessor)}
        assert capturing == {f"{n}.processor" for n in chosen}
        assert all(inside[k] is before[k] for k in inside if k not in capturing)  # self-attn and down: untouched
        assert {inside[f"{n}.processor"].name for n in chosen} == set(chosen)
    after = unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


# -- 2. same output as the stock processors, with SDXL's added conditioning --------------------------------
@pytest.mark.parametrize("sdpa_output", [False, True])
def test_capture_output_equals_stock_with_sdxl_conditioning(xl, sdpa_output):
    captions = ["a red cube to the left of a blue sphere", "two green cones"]
    cond = _cond(xl, captions, original=[[480, 640], [1024, 768]], crop=[[0, 80], [128, 0]])
    assert set(cond) == {"encoder_hidden_states", "added_cond_kwargs"}
    x, t = _latents(xl, 2)
    with torch.no_grad():
        ref = xl.unet(x, t, **cond).sample
        with AttentionCapture(xl.unet, ["mid", "up"], sdpa_output=sdpa_output) as cap:
            out = xl.unet(x, t, **cond).sample
            maps = cap.maps
            sizes = {n: cap.size_of(n) for n in maps}
        # the micro-conditioning reaches the UNet: other time ids, another prediction
        other = dict(
            cond, added_cond_kwargs=dict(cond["added_cond_kwargs"], time_ids=add_time_ids(None, None, (SIZE, SIZE), 2))
        )
        moved = xl.unet(x, t, **other).sample
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(moved, ref, atol=1e-4)

    assert list(maps) == cap.names  # every chosen layer recorded, in model order
    assert set(sizes.values()) == {(2, 2), (4, 4)}
    for name, m in maps.items():
        h, w = sizes[name]
        heads = xl.unet.get_submodule(name).heads
        assert m.shape == (2, heads, h * w, 77) and m.dtype == torch.float32
        assert (m >= 0).all()
        torch.testing.assert_close(m.sum(-1), torch.ones(2, heads, h * w))
    # the maps follow the text: the two captions attend differently
    first = maps[cap.names[0]]
    assert not torch.allclose(first[0], first[1], atol=1e-4)


# -- 3. finite losses, gradients into the supervised layers' keys -----------------------------------------
def _step_grads(comps, batch, weights, layers, seed=7):
    """One training step (same noise for a given seed) and the to_k gradients of every cross-attention layer."""
    comps.unet.zero_grad(set_to_none=True)
    noise = NoiseSource(seed=seed, device=torch.device("cpu"))
    with AttentionCapture(comps.unet, layers) as cap:
        out = training_step(
            comps.unet, comps.vae, Conditioner(comps, SIZE), comps.scheduler, batch, weights, noise, cap
        )
        out.loss.backward()
        names = list(cap.names)
    grads = {}
    for n in cross_attention_names(comps.unet):
        g = comps.unet.get_submodule(n).to_k.weight.grad
        grads[n] = None if g is None else g.detach().clone()
    comps.unet.zero_grad(set_to_none=True)
    return out, names, grads


def test_training_step_losses_finite_and_reach_supervised_keys(xl, shapes):
    sizes = attention_sizes((SIZE, SIZE), xl.vae_scale_factor, len(xl.unet.config.block_out_channels))
    ds = TokenDataset(str(shapes), xl.tokenizer, SIZE, attention_sizes=sizes, **FAMILY.dataset_text(xl))
    batch = collate([ds[0], ds[1]])
    assert batch["input_ids_2"].shape == (2, 77) and batch["original_size"].shape == (2, 2)
    assert batch["token_valid"].any()

    out, names, grads = _step_grads(xl, batch, LossWeights(token=1e-3, pixel=5e-5), ["mid", "up"])
    assert {"denoise", "token", "pixel", "total"} <= set(out.terms)
    for key, value in out.terms.items():
        assert value.shape == (2,) and torch.isfinite(value).all(), key
    assert (out.terms["token"] > 0).all() and (out.terms["pixel"] > 0).all()
    assert torch.isfinite(out.loss)
    assert set(out.parts) >= {"token_2x2", "token_4x4", "pixel_2x2", "pixel_4x4"}
    for n in names:
        assert grads[n] is not None and torch.isfinite(grads[n]).all() and grads[n].abs().sum() > 0, n

    # Same noise, grounding off: the supervised keys' gradient is the denoising one alone. The grounding
    # part is ~10% of it here, float rounding ~1e-5 of it: differences are measured against the gradient.
    plain, _, plain_grads = _step_grads(xl, batch, LossWeights(), ["mid", "up"])
    torch.testing.assert_close(plain.terms["denoise"], out.terms["denoise"])  # same noise, same timesteps
    for n in names:
        assert _rel_diff(grads[n], plain_grads[n]) > 1e-2, n
    token_only, _, token_grads = _step_grads(xl, batch, LossWeights(token=1e-3), ["mid", "up"])
    assert "pixel" not in token_only.terms
    for n in names:  # the token term alone reaches every supervised key
        assert _rel_diff(token_grads[n], plain_grads[n]) > 1e-3, n

    # Supervising the mid block only: the grounding loss adds gradient to the mid keys, none to the up keys
    # (they come after the mid block, so no captured map depends on them).
    _, mid_names, mid_grads = _step_grads(xl, batch, LossWeights(token=1e-3, pixel=5e-5), ["mid"])
    assert mid_names == _supervised(xl.unet, ("mid",))
    for n in mid_names:
        assert _rel_diff(mid_grads[n], plain_grads[n]) > 1e-2, n
    for n in _supervised(xl.unet, ("up",)):
        assert _rel_diff(mid_grads[n], plain_grads[n]) < 1e-4, n


def _rel_diff(a, b):
    return float((a - b).abs().max() / b.abs().max())


# -- 4. one token index space for both tokenizers ---------------------------------------------------------
CAPTIONS = [
    ("a red cube to the left of a blue sphere.", ["red cube", "blue sphere"]),
    ("A xylophonist and a hippopotamus, eating spaghetti", ["xylophonist", "hippopotamus", "spaghetti"]),
    ("the cat-shaped teapot (green) sits on a rock'n'roll record", ["cat-shaped teapot", "rock'n'roll record"]),
    ("Two DOGS; three Cats... and one parrot?", ["dogs", "three cats", "parrot"]),
    ('a "vintage" car: 1960s-style, $5,000 & a tuk-tuk #2', ["vintage", "1960s-style", "tuk-tuk"]),
    (" ".join(["a tall tree"] * 30) + " and a small house", ["tall tree"]),  # truncated at 77
]


@pytest.mark.parametrize("caption,phrases", CAPTIONS)
def test_both_tokenizers_share_positions_and_ids(xl, caption, phrases):
    tok1, tok2 = xl.tokenizer, xl.tokenizer_2
    assert FAMILY.index_tokenizer(xl) is tok1
    ids = FAMILY.tokenize(xl, [caption])
    ids1, ids2 = ids["input_ids"][0], ids["input_ids_2"][0]
    assert ids1.shape == ids2.shape == (77,)
    real = _real(tok1, caption)
    assert torch.equal(real, _real(tok2, caption))
    assert torch.equal(ids1[real], ids2[real])  # same BPE, same positions
    assert ids1[real][0] == 49406 and ids1[real][-1] == 49407  # start ... end, the end inside the window
    assert (ids1[~real] == tok1.pad_token_id).all() and tok1.pad_token_id == 49407
    assert (ids2[~real] == tok2.pad_token_id).all() and tok2.pad_token_id == 0  # "!" pads the second

    multi = False
    for phrase in phrases:
        pos1 = phrase_token_positions(tok1, caption, phrase)
        pos2 = phrase_token_positions(tok2, caption, phrase)
        assert pos1 is not None and pos1 == pos2, phrase
        want = text_token_ids(tok1, phrase.lower())
        assert ids1[pos1].tolist() == want and ids2[pos2].tolist() == want  # the spans index both inputs
        multi |= len(phrase.split()) < len(pos1)
    if "xylophonist" in caption or "tuk-tuk" in caption:  # words of several BPE tokens really are covered
        assert multi


def _real(tok, caption):
    return torch.tensor(tok(caption, padding="max_length", max_length=77, truncation=True)["attention_mask"]).bool()


def test_exclamation_marks_read_as_padding_by_stock_tokenizer_2(xl):
    """Stock SDXL's tokenizer 2 (pad token "!") reads a caption's "!" as its pad id 0 (diffusers#4153).

    The family feeds encoder 2 exactly what the stock pipeline does; phrase spans stay tokenizer 1's, the
    maps' columns. A lone "!" keeps the positions (another id); "?!" (one BPE token for tokenizer 1)
    becomes two tokens for tokenizer 2 and shifts every later position by one.
    """
    from tokencompose.loading import pipeline_from_components

    tok1, tok2 = xl.tokenizer, xl.tokenizer_2
    pipe = pipeline_from_components(xl, xl.scheduler)
    for caption in ("a dog! a cat", "a parrot?! a cat"):
        ids = FAMILY.tokenize(xl, [caption])
        stock = pipe.tokenizer_2([caption], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        assert torch.equal(ids["input_ids_2"], stock.input_ids)
    lone1, lone2 = (FAMILY.tokenize(xl, ["a dog! a cat"])[k][0] for k in ("input_ids", "input_ids_2"))
    real = _real(tok1, "a dog! a cat")
    differ = (lone1 != lone2) & real
    assert differ.sum() == 1 and lone2[differ].item() == 0
    assert lone1[differ].item() == tok1.convert_tokens_to_ids("!</w>")  # the BPE's "!", as OpenCLIP reads it
    cat1 = phrase_token_positions(tok1, "a parrot?! a cat", "cat")
    cat2 = phrase_token_positions(tok2, "a parrot?! a cat", "cat")
    assert cat2 == [p + 1 for p in cat1]


# -- 5. conditioning equals stock diffusers ---------------------------------------------------------------
def test_encode_matches_stock_sdxl_pipeline(xl):
    from diffusers import StableDiffusionXLPipeline

    from tokencompose.loading import pipeline_from_components

    pipe = pipeline_from_components(xl, xl.scheduler)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    prompts = ["a red cube to the left of a blue sphere", "Two cats, one dog!"]
    original, crop = [[480, 640], [1024, 768]], [[0, 80], [128, 0]]
    cond = _cond(xl, prompts, original=original, crop=crop)
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    assert neg is None and neg_pooled is None
    d1, d2 = xl.text_encoder.config.hidden_size, xl.text_encoder_2.config.hidden_size
    assert cond["encoder_hidden_states"].shape == (2, 77, d1 + d2) == embeds.shape
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cond["added_cond_kwargs"]["text_embeds"], pooled, rtol=1e-6, atol=1e-6)

    proj = xl.text_encoder_2.config.projection_dim
    time_ids = cond["added_cond_kwargs"]["time_ids"]
    assert time_ids.shape == (2, 6) and time_ids.dtype == embeds.dtype
    for i in range(2):
        want = pipe._get_add_time_ids(
            tuple(original[i]), tuple(crop[i]), (SIZE, SIZE), embeds.dtype, text_encoder_projection_dim=proj
        )
        torch.testing.assert_close(time_ids[i : i + 1], want, rtol=0, atol=0)
    # no size/crop in the batch: what the pipeline uses when it generates at the training size
    plain = _cond(xl, prompts)["added_cond_kwargs"]["time_ids"]
    want = pipe._get_add_time_ids((SIZE, SIZE), (0, 0), (SIZE, SIZE), embeds.dtype, text_encoder_projection_dim=proj)
    torch.testing.assert_close(plain, want.expand(2, 6), rtol=0, atol=0)


# -- 6. the dataset's size / crop micro-conditioning -----------------------------------------------------
def _image(tmp_path, w, h):
    """A seeded noise image (any crop offset shows in its pixels) and a mask over its middle."""
    rng = np.random.default_rng(w * 1000 + h)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "im.png")
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return R.Record(str(tmp_path / "im.png"), "a noisy square", [R.Phrase("noisy square", str(tmp_path / "mask.png"))])


def _crop(im, left, top, s):
    px = np.asarray(im.crop((left, top, left + s, top + s)).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(px.copy()).permute(2, 0, 1) / 127.5 - 1.0


@pytest.mark.parametrize("w,h,s", [(96, 64, 42), (64, 100, 32)])
def test_dataset_reports_original_size_and_crop_that_match_its_pixels(xl, tmp_path, w, h, s):
    record = _image(tmp_path, w, h)
    ds = TokenDataset([record], xl.tokenizer, s, attention_sizes=[(s, s)], **FAMILY.dataset_text(xl), flip=True)
    # The paper's transform: shorter side to S, then a center crop of S x S.
    new_w, new_h = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
    resized = Image.open(record.image).convert("RGB").resize((new_w, new_h), Image.BILINEAR)
    mirrored = ImageOps.mirror(resized)

    seen = {}
    torch.manual_seed(0)
    for _ in range(16):
        sample = ds[0]
        assert sample["original_size"].tolist() == [h, w]  # (H, W) of the file
        top, left = sample["crop_top_left"].tolist()
        assert 0 <= top <= new_h - s and 0 <= left <= new_w - s
        assert abs(top - (new_h - s) / 2) <= 0.5 and abs(left - (new_w - s) / 2) <= 0.5  # centered
        # the reported crop is the crop the pixels come from: of the resized image, or of its mirror
        if torch.equal(sample["pixel_values"], _crop(resized, left, top, s)):
            seen["plain"] = (top, left)
        else:
            assert torch.equal(sample["pixel_values"], _crop(mirrored, left, top, s)), "crop_top_left is not the crop"
            seen["flipped"] = (top, left)
    assert set(seen) == {"plain", "flipped"}
    (top, left), (ftop, fleft) = seen["plain"], seen["flipped"]
    assert ftop == top and fleft == new_w - left - s  # the flip mirrors the left edge only
    if w > h:  # 96x64 at 42: margin 63 - 42 = 21 is odd, so the mirrored crop starts one pixel elsewhere
        assert (new_w - s) % 2 == 1 and fleft != left

    # through collate and the family: time ids (orig_h, orig_w, top, left, S, S) per sample
    plain_ds = TokenDataset([record], xl.tokenizer, s, attention_sizes=[(s, s)], **FAMILY.dataset_text(xl))
    batch = collate([plain_ds[0], plain_ds[0]])
    assert batch["original_size"].tolist() == [[h, w]] * 2 and batch["crop_top_left"].tolist() == [[top, left]] * 2
    time_ids = FAMILY.encode(xl, batch, (s, s))["added_cond_kwargs"]["time_ids"]
    assert time_ids.tolist() == [[h, w, top, left, s, s]] * 2
    assert torch.equal(batch["input_ids_2"], FAMILY.tokenize(xl, [record.caption] * 2)["input_ids_2"])


def test_a_phrase_the_two_tokenizers_place_differently_is_dropped(xl, tmp_path):
    """After "?!" tokenizer 2 (which reads "!" as its pad token) shifts every position by one: a phrase there
    has no column of its own in the concatenated context, so it is dropped and counted; one before it is kept."""
    base = _image(tmp_path, 64, 64)
    mask = base.phrases[0].mask
    record = R.Record(base.image, "a parrot?! a cat", [R.Phrase("parrot", mask), R.Phrase("cat", mask)])
    xl_ds = TokenDataset([record], xl.tokenizer, 32, attention_sizes=[(32, 32)], **FAMILY.dataset_text(xl))
    sample = xl_ds[0]
    assert sample["phrases"] == ["parrot"] and sample["dropped"] == [R.SPAN_DIFFERS]
    sd_ds = TokenDataset([record], xl.tokenizer, 32, attention_sizes=[(32, 32)])  # one tokenizer: nothing differs
    assert sd_ds[0]["phrases"] == ["parrot", "cat"] and sd_ds[0]["dropped"] == []


# -- 7. family detection ----------------------------------------------------------------------------------
def test_detect_family_from_folders_and_names(xl_dir, model_dir, tmp_path):
    assert json.loads((xl_dir / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    assert detect_family(xl_dir) == "sdxl" and detect_family(str(xl_dir)) == "sdxl"
    assert detect_family(model_dir) == "sd"
    assert detect_family("tiny") == "sd"
    assert resolve_family("auto", xl_dir).name == "sdxl"
    assert resolve_family("sd", xl_dir).name == "sd"  # a named family wins over the folder

    bare_xl = tmp_path / "bare_xl"  # no model_index.json: the parts tell
    for part in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        (bare_xl / part).mkdir(parents=True)
    assert detect_family(bare_xl) == "sdxl"
    bare_sd = tmp_path / "bare_sd"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (bare_sd / part).mkdir(parents=True)
    assert detect_family(bare_sd) == "sd"

    custom = tmp_path / "custom"  # an unknown pipeline class over an SDXL UNet
    (custom / "unet").mkdir(parents=True)
    (custom / "model_index.json").write_text(json.dumps({"_class_name": "MyPipeline"}))
    (custom / "unet" / "config.json").write_text(json.dumps({"addition_embed_type": "text_time"}))
    assert detect_family(custom) == "sdxl"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="family"):
        detect_family(empty)

    with pytest.raises(UserError, match="nope"):
        get_family("nope")
    assert get_family("sdxl") is FAMILY and family_of(SimpleNamespace(family="sdxl")) is FAMILY


# -- loading: a saved tiny SDXL runs as one --------------------------------------------------------------
def test_load_model_and_pipeline_of_a_saved_sdxl(xl, xl_dir):
    from diffusers import StableDiffusionXLPipeline

    from tokencompose.loading import ModelSettings, load_model, load_pipeline

    settings = ModelSettings(model=str(xl_dir), device="cpu")
    comps = load_model(settings)
    assert comps.family == "sdxl" and family_of(comps) is FAMILY
    assert comps.text_encoder_2 is not None and comps.tokenizer_2 is not None
    assert comps.tokenizer_2.pad_token == "!" and comps.unet.device.type == "cpu"
    for mine, theirs in (
        (comps.unet, xl.unet),
        (comps.text_encoder, xl.text_encoder),
        (comps.text_encoder_2, xl.text_encoder_2),
    ):
        want = theirs.state_dict()
        got = mine.state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)

    pipe = load_pipeline(settings)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    image = pipe(
        "a red cube to the left of a blue sphere",
        num_inference_steps=2,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, SIZE, SIZE, 3) and np.isfinite(image).all()
    assert image.min() >= 0.0 and image.max() <= 1.0 and image.std() > 0
