"""`tokencompose evaluate fid` offline: a random-weights FID Inception (torch-fidelity's class), tiny image folders.

The oracle is an independent Fréchet distance (numpy means and covariances, scipy's ``sqrtm``); the library's own
``calculate_metrics`` on the same folders is the other reference.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch_fidelity")

from tokencompose.commands import eval_fid  # noqa: E402
from tokencompose.errors import UserError  # noqa: E402
from tokencompose.evaluation import fid_features as ff  # noqa: E402
from tokencompose.evaluation.fid import FidSettings, fid_scores, load_captions, reference_files, run_fid  # noqa: E402


def frechet_oracle(x: np.ndarray, y: np.ndarray) -> float:
    """||mu_x - mu_y||^2 + Tr(S_x + S_y - 2 sqrtm(S_x S_y)), in float64, with scipy's matrix square root.

    With fewer samples than dimensions the covariances are singular; then Tr sqrtm(S_x S_y) is taken exactly on
    a small matrix: S_x S_y = A_x^T (A_x A_y^T) A_y / c shares its non-zero eigenvalues with K K^T, where
    K = A_x A_y^T / sqrt(c), A the centred features and c = (n_x - 1)(n_y - 1).
    """
    from scipy import linalg

    x, y = x.astype(np.float64), y.astype(np.float64)
    mx, my = x.mean(axis=0), y.mean(axis=0)
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    if min(len(x), len(y)) > x.shape[1]:
        tr_covmean = np.trace(linalg.sqrtm(sx @ sy).real)
    else:
        k = (x - mx) @ (y - my).T / np.sqrt((len(x) - 1) * (len(y) - 1))
        tr_covmean = np.trace(linalg.sqrtm(k @ k.T).real)
    return float(((mx - my) ** 2).sum() + np.trace(sx) + np.trace(sy) - 2 * tr_covmean)


def write_images(folder: Path, n: int, seed: int, sizes: list[tuple[int, int]], tint: float = 0.0) -> Path:
    """``n`` random images (smooth colour fields plus noise) in ``folder``, sizes cycling through ``sizes``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        base = rng.uniform(0, 255, size=(1, 1, 3)) * (1 - tint) + 255 * tint
        ramp = np.linspace(0, rng.uniform(-80, 80), w)[None, :, None]
        img = np.clip(base + ramp + rng.normal(0, 30, size=(h, w, 3)), 0, 255).astype(np.uint8)
        ext = "jpg" if i % 3 == 2 else "png"
        Image.fromarray(img).save(folder / f"im{i:03d}.{ext}")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fid")
    return {
        "weights": ff.save_random_inception(root / "inception.pth", seed=0),
        "real": write_images(root / "real", 4, seed=1, sizes=[(80, 60), (64, 96), (72, 72)]),
        "gen": write_images(root / "gen", 4, seed=2, sizes=[(64, 64)], tint=0.3),
        "root": root,
    }


def cli(argv: list[str]) -> dict:
    """Parse ``argv`` with this command's own parser and run it; the results JSON."""
    parser = argparse.ArgumentParser()
    eval_fid.add_parser(parser.add_subparsers(dest="evaluation"))
    args = parser.parse_args(["fid", *argv])
    assert eval_fid.run(args) == 0
    out = Path(argv[argv.index("--out") + 1])
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def scored(data: dict[str, Path]) -> dict:
    root = data["root"]
    argv = ["--out", str(root / "out"), "--images", str(data["gen"]), "--reference", str(data["real"])]
    argv += ["--inception-weights", str(data["weights"]), "--cache", str(root / "cache"), "--device", "cpu"]
    return cli(argv + ["--save-features", str(root / "feats"), "--name", "tiny"])


def test_end_to_end_offline_writes_scores_features_provenance(scored: dict, data: dict[str, Path]) -> None:
    root = data["root"]
    s = scored["scores"]
    assert scored["kind"] == "fid" and scored["name"] == "tiny" and scored["counts"] == {"real": 4, "generated": 4}
    assert np.isfinite(s["fid"]) and s["fid"] > 0 and np.isfinite(s["kid_mean"]) and s["kid_std"] >= 0
    real, gen = np.load(root / "feats" / "real.npy"), np.load(root / "feats" / "generated.npy")
    assert real.shape == (4, 2048) and gen.shape == (4, 2048) and real.dtype == np.float32
    assert (root / "feats" / "generated.txt").read_text().split() == sorted(p.name for p in data["gen"].iterdir())
    ext = scored["extractor"]
    assert ext["weights_sha256"] == ff.file_sha256(data["weights"]) and ext["standard_weights"] is False
    assert ext["library"] == "torch-fidelity" and ext["version"] and ext["feature_layer"] == 2048
    assert scored["reference"]["cached"] is False and Path(scored["reference"]["cache"]).is_file()
    assert scored["model"] is None and scored["generation"] is None and scored["kid"]["subset_size"] == 4


def test_equals_the_library_own_fid_and_kid(scored: dict, data: dict[str, Path]) -> None:
    import torch_fidelity

    lib = torch_fidelity.calculate_metrics(
        input1=str(data["gen"]), input2=str(data["real"]), cuda=False, fid=True, kid=True, kid_subset_size=4,
        feature_extractor_weights_path=str(data["weights"]), samples_resize_and_crop=512, cache=False,
        save_cpu_ram=True, verbose=False,
    )  # fmt: skip
    assert scored["scores"]["fid"] == pytest.approx(lib["frechet_inception_distance"], rel=1e-6)
    assert scored["scores"]["kid_mean"] == pytest.approx(lib["kernel_inception_distance_mean"], rel=1e-6)
    assert scored["scores"]["kid_std"] == pytest.approx(lib["kernel_inception_distance_std"], rel=1e-6)


def test_fid_from_saved_features_recomputes_and_matches_a_scipy_frechet(scored: dict, data: dict[str, Path]) -> None:
    x, y = np.load(data["root"] / "feats" / "real.npy"), np.load(data["root"] / "feats" / "generated.npy")
    mu, sigma = ff.statistics(x)
    assert fid_scores({"features": x, "mu": mu, "sigma": sigma}, y)["fid"] == scored["scores"]["fid"]
    # 4 images in 2048 dimensions: singular covariances, whose ~2000 zero eigenvalues leave the library's
    # eigenvalue route float64 noise of ~1e-6 of Tr(S); the exact oracle agrees to that.
    assert abs(scored["scores"]["fid"] - frechet_oracle(x, y)) < 1e-5 * np.trace(sigma)


def test_frechet_of_full_rank_features_matches_scipy_sqrtm() -> None:
    # More samples than dimensions (64-d, the extractor's smallest layer; 2048-d would need > 2048 rows and a
    # 2048x2048 sqrtm, too slow here): full-rank covariances, where scipy's sqrtm and the library must agree.
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(64, 64)) / 8
    x = (rng.normal(size=(400, 64)) @ mix + 0.5).astype(np.float32)
    y = (rng.normal(size=(300, 64)) @ (mix + 0.05) + 0.6).astype(np.float32)
    mu, sigma = ff.statistics(x)
    real = {"features": x, "mu": mu, "sigma": sigma}
    fid = fid_scores(real, y, kid_subsets=5, kid_subset_size=100)["fid"]
    assert fid == pytest.approx(frechet_oracle(x, y), rel=1e-6) and fid > 1
    assert abs(fid_scores(real, x, kid_subsets=5, kid_subset_size=100)["fid"]) < 1e-9 * np.trace(sigma)
    assert abs(frechet_oracle(x, x)) < 1e-9 * np.trace(sigma)


def test_two_launched_processes_extract_their_shards_and_score_like_one(data: dict[str, Path]) -> None:
    """Under torchrun each process extracts every other image (reference and generated); process 0 merges."""
    from train_util import torchrun_cli

    root = data["root"]
    gen = write_images(root / "gen5", 5, seed=3, sizes=[(64, 64)], tint=0.2)  # odd: the shards differ in size
    argv = ["--images", str(gen), "--reference", str(data["real"]), "--inception-weights", str(data["weights"]),
            "--device", "cpu", "--kid-subset-size", "4"]  # fmt: skip
    one = cli([*argv, "--out", str(root / "one"), "--cache", str(root / "cache1"), "--save-features", str(root / "f1")])
    torchrun_cli(["evaluate", "fid", *argv, "--out", str(root / "two"), "--cache", str(root / "cache2"),
                  "--save-features", str(root / "f2")])  # fmt: skip
    two = json.loads((root / "two" / "results.json").read_text())
    assert two["extractor"]["processes"] == 2 and one["extractor"]["processes"] == 1
    assert two["reference"]["cached"] is False and two["counts"] == {"real": 4, "generated": 5}
    for name in ("real", "generated"):
        assert (root / "f2" / f"{name}.txt").read_text() == (root / "f1" / f"{name}.txt").read_text()
        np.testing.assert_allclose(np.load(root / "f2" / f"{name}.npy"), np.load(root / "f1" / f"{name}.npy"),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
    assert two["scores"]["fid"] == pytest.approx(one["scores"]["fid"], rel=1e-5)
    assert not any((root / "two" / "parts").iterdir())


def test_same_set_scores_zero_and_reuses_the_cached_reference(scored: dict, data: dict[str, Path]) -> None:
    root = data["root"]
    argv = ["--out", str(root / "self"), "--images", str(data["real"]), "--reference", str(data["real"])]
    argv += ["--inception-weights", str(data["weights"]), "--cache", str(root / "cache"), "--device", "cpu"]
    res = cli(argv)
    assert res["reference"]["cached"] is True and res["reference"]["sha256"] == scored["reference"]["sha256"]
    trace = float(np.trace(np.cov(np.load(root / "feats" / "real.npy"), rowvar=False)))
    # 4 images in 2048 dimensions: the singular covariance leaves float64 noise of ~1e-6 of its trace.
    assert abs(res["scores"]["fid"]) < 1e-5 * trace and abs(res["scores"]["fid"]) < 1e-4 * scored["scores"]["fid"]


def coco_captions(path: Path, num_images: int = 4, per_image: int = 5) -> Path:
    images = [{"id": 10 + i, "file_name": f"{10 + i:012d}.jpg"} for i in range(num_images)]
    anns = [{"id": 100 + 7 * k, "image_id": 10 + k // per_image, "caption": f" caption {k} "} for k in
            range(num_images * per_image)]  # fmt: skip
    path.write_text(json.dumps({"images": images, "annotations": anns[::-1]}))  # file order must not matter
    return path


def test_caption_sources_and_seeded_draw(tmp_path: Path) -> None:
    coco = coco_captions(tmp_path / "captions_val2017.json")
    a, info = load_captions(coco, num=6, seed=0)
    assert len(a) == 6 and info["format"] == "coco" and info["available"] == 20 and info["seed"] == 0
    assert a == load_captions(coco, num=6, seed=0)[0] and a != load_captions(coco, num=6, seed=1)[0]
    assert [c.uid for c in a] == sorted(c.uid for c in a) and all(c.text.startswith("caption") for c in a)
    assert all(c.image == f"{10 + (c.uid - 100) // 7 // 5:012d}.jpg" for c in a)
    assert len(load_captions(coco, num=0)[0]) == 20 and load_captions(coco, num=0)[1]["seed"] is None
    token = tmp_path / "results_20130124.token"
    token.write_text("1000.jpg#0\tA dog runs.\n1000.jpg#1\tA brown dog.\n\n2000.jpg#0\tTwo cats.\n")
    rows, info = load_captions(token, num=0)
    assert [(c.uid, c.image, c.text) for c in rows] == [(0, "1000.jpg", "A dog runs."), (1, "1000.jpg", "A brown dog."),
                                                        (2, "2000.jpg", "Two cats.")]  # fmt: skip
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(["a cat", {"caption": "a dog", "image": "x.png"}]))
    assert [(c.text, c.image) for c in load_captions(listed)[0]] == [("a cat", None), ("a dog", "x.png")]
    write_images(tmp_path / "ref", 3, seed=0, sizes=[(16, 16)])
    assert reference_files(tmp_path / "ref", load_captions(listed)[0][:1]) == ff.list_images(tmp_path / "ref")
    with pytest.raises(UserError, match="missing"):
        reference_files(tmp_path / "ref", rows)  # 1000.jpg is not there


def test_generates_from_coco_captions_then_scores(data: dict[str, Path], model_dir: Path, tmp_path: Path) -> None:
    coco = coco_captions(tmp_path / "captions.json", num_images=3, per_image=2)
    ref = tmp_path / "val2017"
    write_images(ref, 4, seed=5, sizes=[(40, 30)])
    for i, src in enumerate(sorted(ref.iterdir())):  # COCO's names for 3 images, one extra image never referenced
        src.rename(ref / (f"{10 + i:012d}.jpg" if i < 3 else "other.jpg"))
    argv = ["--out", str(tmp_path / "o"), "--model", str(model_dir), "--captions", str(coco), "--num-captions", "3"]
    argv += ["--reference", str(ref), "--inception-weights", str(data["weights"]), "--cache", str(tmp_path / "c")]
    argv += ["--steps", "2", "--resolution", "64", "--device", "cpu", "--resize", "64", "--feature-layer", "64"]
    res = cli(argv)
    names = sorted(p.name for p in (tmp_path / "o" / "images").glob("*.png"))
    sampled = json.loads((tmp_path / "o" / "captions.json").read_text())
    assert names == sorted(f"{row['uid']}_0.png" for row in sampled) and len(names) == 3
    assert res["counts"]["generated"] == 3 and res["counts"]["real"] == len({row["image"] for row in sampled})
    assert res["generation"]["steps"] == 2 and res["model"]["base"] == str(model_dir)
    assert res["captions"]["num"] == 3 and res["captions"]["saved"] == "captions.json"
    again = cli(argv)  # resumes: nothing generated, the reference from the cache
    assert again["scores"] == res["scores"] and again["reference"]["cached"] is True


def test_user_errors(data: dict[str, Path], tmp_path: Path) -> None:
    import torch

    base = {"out": str(tmp_path / "o"), "reference": str(data["real"]), "images": str(data["gen"])}
    with pytest.raises(UserError, match="do not exist"):
        run_fid(FidSettings(**base, inception_weights=str(tmp_path / "none.pth")))
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="do not fit"):
        ff.load_extractor(tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read"):
        ff.load_extractor(tmp_path / "junk.pth")
    with pytest.raises(UserError, match="--model .* or --images"):
        run_fid(
            FidSettings(out=str(tmp_path / "o"), reference=str(data["real"]), inception_weights=str(data["weights"]))
        )
    with pytest.raises(UserError, match="different sizes"):
        run_fid(
            FidSettings(
                **base, inception_weights=str(data["weights"]), resize=0, feature_layer=64, cache=str(tmp_path / "c")
            )
        )
