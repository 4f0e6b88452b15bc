"""The rectified-flow families (SD3, Flux) on tiny random-init models: conditioning equal to the stock
pipelines', the flow objective's formulas, latent packing, phrase spans in each text index space."""

from __future__ import annotations

import pytest
import torch

from tokencompose.families import detect_family, get_family
from tokencompose.families.flow import shifted_sigma
from tokencompose.families.flux import image_ids, pack, unpack
from tokencompose.families.flux import supported as flux_supported
from tokencompose.loading import pipeline_from_components
from tokencompose.tokens import phrase_token_positions

CAPTIONS = ["a red circle and a blue square", "a cat sitting on a wooden bench next to a dog"]


@pytest.fixture(scope="module")
def sd3():
    return get_family("sd3").tiny(seed=0)


@pytest.fixture(scope="module")
def flux():
    if not flux_supported():
        pytest.skip("the flux family needs diffusers >= 0.31")
    return get_family("flux").tiny(seed=0)


def test_sd3_conditioning_equals_the_stock_pipeline(sd3):
    fam = get_family("sd3")
    pipe = pipeline_from_components(sd3, sd3.scheduler)
    with torch.no_grad():  # as the family encodes (SDPA picks other kernels with autograd on)
        embeds, _, pooled, _ = pipe.encode_prompt(
            CAPTIONS, CAPTIONS, CAPTIONS, device="cpu", do_classifier_free_guidance=False, max_sequence_length=256
        )
    cond = fam.encode(sd3, fam.tokenize(sd3, CAPTIONS), (64, 64))
    assert cond["encoder_hidden_states"].shape == (2, 77 + 256, sd3.text_encoder_3.config.d_model)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cond["pooled_projections"], pooled, rtol=1e-5, atol=1e-6)
    # the CLIP half is zero-padded up to T5's width, as SD3 does
    clip_width = sd3.text_encoder.config.hidden_size + sd3.text_encoder_2.config.hidden_size
    assert torch.all(cond["encoder_hidden_states"][:, :77, clip_width:] == 0)


def test_flux_conditioning_equals_the_stock_pipeline(flux):
    fam = get_family("flux")
    pipe = pipeline_from_components(flux, flux.scheduler)
    with torch.no_grad():  # as the family encodes (SDPA picks other kernels with autograd on)
        embeds, pooled, text_ids = pipe.encode_prompt(CAPTIONS, CAPTIONS, device="cpu", max_sequence_length=512)
    cond = fam.encode(flux, fam.tokenize(flux, CAPTIONS), (64, 64))
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cond["pooled_projections"], pooled, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cond["txt_ids"], text_ids.float())
    assert cond["guidance"].shape == (2,)  # the tiny Flux embeds guidance, as FLUX.1-dev


def test_flux_packing_equals_the_pipeline(flux):
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 8, 6)
    packed = pack(x)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 2, 16, 8, 6), rtol=0, atol=0)
    assert torch.equal(unpack(packed, 8, 6), x)
    want = FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32)
    assert torch.equal(image_ids(8, 6), want)


def test_flow_noising_and_target():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from tokencompose.train.step import NoiseSource

    fam = get_family("sd3")
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    x0 = torch.randn(4, 16, 8, 8)
    noisy, t, eps = fam.noise_latents(sched, x0, NoiseSource(seed=3, device=torch.device("cpu")))
    sigma = t / 1000
    assert torch.all((sigma > 0) & (sigma <= 1))
    torch.testing.assert_close(noisy, (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps)
    assert torch.equal(fam.target(sched, x0, eps, t), eps - x0)
    # the draws: one normal per sample for sigma (logit-normal, shifted), then the noise
    g = NoiseSource(seed=3, device=torch.device("cpu"))
    u = torch.sigmoid(g.randn((4,), torch.device("cpu")))
    torch.testing.assert_close(sigma, 3 * u / (1 + 2 * u))
    assert torch.equal(eps, g.randn((4, 16, 8, 8), torch.device("cpu")))
    # noisy_at a fixed level is the same straight path without shift
    n2, t2 = fam.noisy_at(sched, x0, eps, torch.tensor([250, 250, 500, 1000]))
    torch.testing.assert_close(n2[0], 0.75 * x0[0] + 0.25 * eps[0])
    assert torch.equal(n2[3], eps[3]) and torch.equal(t2, torch.tensor([250.0, 250.0, 500.0, 1000.0]))


def test_dynamic_shift_follows_the_image_token_count(flux):
    cfg = flux.scheduler.config
    u = torch.tensor([0.5])
    # mu = base_shift at base_image_seq_len, max_shift at max_image_seq_len; sigma(0.5) = e^mu / (e^mu + 1)
    small, large = shifted_sigma(u, cfg, 256), shifted_sigma(u, cfg, 4096)
    torch.testing.assert_close(small, torch.sigmoid(torch.tensor([0.5])))
    torch.testing.assert_close(large, torch.sigmoid(torch.tensor([1.15])))
    assert float(large) > float(small)  # more tokens, more noise


def test_sd3_spans_in_clip_t5_or_both(sd3):
    fam = get_family("sd3")
    caption, phrase = CAPTIONS[1], "wooden bench"
    clip = phrase_token_positions(sd3.tokenizer, caption, phrase)
    t5 = phrase_token_positions(sd3.tokenizer_3, caption, phrase, method="offsets")
    assert clip == [6, 7] and t5 is not None
    assert fam.span_finder(sd3, "clip")(caption, phrase) == (clip, None)
    assert fam.span_finder(sd3, "t5")(caption, phrase) == ([77 + p for p in t5], None)
    assert fam.span_finder(sd3, "both")(caption, phrase) == (clip + [77 + p for p in t5], None)
    ids = fam.tokenize(sd3, [caption])["input_ids_3"][0]
    assert sd3.tokenizer_3.decode(ids[t5]).strip() == phrase
    assert fam.span_finder(sd3, "both")(caption, "zebra")[0] is None


def test_flux_spans_are_t5_positions(flux):
    fam = get_family("flux")
    caption = CAPTIONS[0]
    pos, reason = fam.span_finder(flux)(caption, "blue square")
    assert reason is None and pos == phrase_token_positions(flux.tokenizer_2, caption, "blue square", method="offsets")
    ids = fam.tokenize(flux, [caption])["input_ids_2"][0]
    assert flux.tokenizer_2.decode(ids[pos]).strip() == "blue square"


@pytest.mark.parametrize(
    "name",
    [
        "sd3",
        pytest.param("flux", marks=pytest.mark.skipif(not flux_supported(), reason="flux needs diffusers >= 0.31")),
    ],
)
def test_saved_tiny_model_loads_and_generates_in_stock_diffusers(name, tmp_path):
    from diffusers import DiffusionPipeline

    from tokencompose.loading import ModelSettings, load_model

    comps = get_family(name).tiny(seed=0)
    comps.save(tmp_path / name)
    assert detect_family(tmp_path / name) == name
    loaded = load_model(ModelSettings(model=str(tmp_path / name), device="cpu"))
    assert loaded.family == name
    for (k, v), (k2, v2) in zip(comps.unet.state_dict().items(), loaded.unet.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / name))
    assert type(pipe).__name__ == get_family(name).pipeline_classes[0]
    image = pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
