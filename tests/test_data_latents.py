"""Latent cache: same posterior as encoding, training batches carry it, stale caches are refused."""

from __future__ import annotations

import pytest
import torch

from tokencompose.data import records as R
from tokencompose.data.dataset import TokenDataset, collate, load_image
from tokencompose.data.latents import LatentCache, StaleCacheError, build_latent_cache, sample_latents
from train_util import RecordingBars


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    ).eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tokencompose.data.shapes import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), 5, seed=0, size=32, max_objects=2)


@pytest.fixture(scope="module")
def tok():
    from tokencompose.models import clip_tokenizer

    return clip_tokenizer()


@pytest.fixture(scope="module")
def cache(data, tmp_path_factory):
    return build_latent_cache(tiny_vae(), data, tmp_path_factory.mktemp("cache"), 32, batch_size=2)


def test_cache_holds_the_encoder_posterior(data, cache):
    vae, recs = tiny_vae(), R.read_jsonl(data)
    with torch.no_grad():
        dist = vae.encode(load_image(recs[3].image, 32)[0][None]).latent_dist
    mean, std, size = LatentCache(cache).get(3)
    assert size == (32, 32) and mean.shape == (4, 4, 4) and mean.dtype == torch.float32
    assert torch.allclose(mean, dist.mean[0], atol=2e-3, rtol=1e-3)  # fp16 storage
    assert torch.allclose(std, dist.std[0], atol=2e-3, rtol=1e-3)
    # Sampling from the cache is the encoder's sampling distribution.
    z = sample_latents(mean.expand(4000, -1, -1, -1), std.expand(4000, -1, -1, -1), torch.Generator().manual_seed(0))
    assert torch.allclose(z.mean(0), mean, atol=4 * std.max().item() / 60 + 1e-4)
    assert torch.allclose(z.std(0), std, rtol=0.08, atol=1e-4)


def test_dataset_batches_carry_latents_not_pixels(data, cache, tok):
    ds = TokenDataset(data, tok, image_size=32, latent_cache=cache)
    batch = collate([ds[0], ds[1]])
    assert "pixel_values" not in batch
    assert batch["latent_mean"].shape == batch["latent_std"].shape == (2, 4, 4, 4)
    plain = collate([TokenDataset(data, tok, image_size=32)[i] for i in (0, 1)])
    assert torch.equal(batch["masks"][(4, 4)], plain["masks"][(4, 4)]) and torch.equal(batch["boxes"], plain["boxes"])


def test_stale_caches_are_refused(data, cache, tok, tmp_path):
    c = LatentCache(cache)
    c.check(image_size=32, num_records=5, vae=tiny_vae(0), records=data)  # the right key passes
    with pytest.raises(StaleCacheError, match="another VAE"):
        c.check(vae=tiny_vae(1))
    with pytest.raises(StaleCacheError, match="resolution 32 != 64"):
        TokenDataset(data, tok, image_size=64, latent_cache=cache)
    recs = R.read_jsonl(data)
    with pytest.raises(StaleCacheError, match="record list"):
        TokenDataset(recs[::-1], tok, image_size=32, latent_cache=cache)
    with pytest.raises(StaleCacheError, match="5 cached records != 4"):
        TokenDataset(recs[:4], tok, image_size=32, latent_cache=cache)
    import shutil

    edited = tmp_path / "edited"
    shutil.copytree(R.read_jsonl(data)[0].image.rsplit("/", 1)[0], edited)  # the same names elsewhere: valid
    moved = [R.Record(str(edited / r.image.rsplit("/", 1)[1]), r.caption, r.phrases) for r in recs]
    c.check(records=moved)
    with open(moved[2].image, "ab") as f:  # an image replaced by another file under the same name
        f.write(b"\0" * 16)
    with pytest.raises(StaleCacheError, match="file sizes"):
        c.check(records=moved)
    with pytest.raises(ValueError, match="flip"):
        TokenDataset(data, tok, image_size=32, latent_cache=cache, flip=True)
    with pytest.raises(FileNotFoundError, match="not a latent cache"):
        LatentCache(tmp_path)


def test_unreadable_image_is_marked_and_substituted(data, tok, tmp_path):
    recs = R.read_jsonl(data)
    recs[1] = R.Record(str(tmp_path / "gone.png"), recs[1].caption, recs[1].phrases)
    out = build_latent_cache(tiny_vae(), recs, tmp_path / "c", 32)
    ds = TokenDataset(recs, tok, image_size=32, latent_cache=out)
    s = ds[1]
    assert s["index"] == 2 and s["dropped"] == [R.MISSING_LATENT]


def test_cli_prepare_latents(data, tmp_path, tok):
    from tokencompose.cli import main

    tiny_vae().save_pretrained(tmp_path / "model" / "vae")
    argv = ["prepare", "latents", "--model", str(tmp_path / "model"), "--data", str(data)]
    assert main([*argv, "--resolution", "32", "--out", str(tmp_path / "lc")]) == 0
    LatentCache(tmp_path / "lc").check(image_size=32, vae=tiny_vae(), records=data)


def test_progress_bar_counts_images_and_stays_off_a_terminal(data, tmp_path, monkeypatch, capsys):
    recorder = RecordingBars()
    recorder.install(monkeypatch)
    build_latent_cache(tiny_vae(), data, tmp_path / "c", 32, batch_size=2)
    [(kwargs, bar)] = recorder.bars
    assert kwargs["desc"] == "prepare latents" and kwargs["disable"] is None  # None: a bar on a terminal only
    assert (bar.total, bar.n) == (5, 5)
    assert "prepare latents" not in capsys.readouterr().err  # pytest's stderr is no terminal
