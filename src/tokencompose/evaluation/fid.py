"""``tokencompose evaluate fid``: FID and KID of generated images against real ones (the paper's Table 1).

The paper reports FID on COCO (10k random val2017 captions, one image each, against the real val2017 images:
SD 1.4 20.88, TokenCompose 20.19) and on Flickr30K (TokenCompose 71.13). Here: captions (a COCO captions
JSON, a Flickr30K-style ``image<TAB>caption`` text file, a plain text or JSON list) are sampled with a seed,
images are generated through the same resumable, sharded, provenance-checked step as MultiGen
(:func:`tokencompose.evaluation.run._generate`), or an existing folder is scored (``--images``, no model);
the reference is a folder of real images, restricted to the sampled captions' images when they name them.

Library: **torch-fidelity** (features: :mod:`tokencompose.evaluation.fid_features`; FID and KID: its own
``fid_statistics_to_metric`` and ``kid_features_to_metric``). Why: its Inception is the TensorFlow FID network
ported bit-exactly and takes a local weights file (``feature_extractor_weights_path``), so it runs offline;
torchmetrics' FID wraps this same class (one more layer, no folder API to check against); clean-fid resizes
differently (its own PIL bicubic rule), so its numbers differ from the TF / torch-fidelity FID most papers
report. Our number equals ``torch_fidelity.calculate_metrics`` on the same folders with
``samples_resize_and_crop=resize`` (tested).

FID = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)) over the Inception pool3 (2048-d) features;
KID = the unbiased MMD^2 with the cubic polynomial kernel, mean and std over random subsets (torch-fidelity's
defaults: 100 subsets of 1,000, seed 2020). ``--save-features DIR`` writes ``real.npy`` and ``generated.npy``
(float32, one row per image, in the order of ``real.txt`` / ``generated.txt``), from which anyone can
recompute the number. Reference features and statistics are cached once per (images, weights, layer,
resize) under ``--cache``, so the second model scored against the same reference reuses them.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokencompose.atomic import atomic_write_text, write_json_atomic
from tokencompose.errors import UserError
from tokencompose.evaluation import fid_features as ff
from tokencompose.evaluation.generation import GenerationSettings, image_name
from tokencompose.evaluation.prompts import Prompt
from tokencompose.loading import ModelSettings
from tokencompose.sharding import Shard, ShardSettings

log = logging.getLogger(__name__)

CAPTIONS_FILE = "captions.json"  # the sampled captions of a run, beside its results


@dataclass
class FidGenerationSettings(GenerationSettings):
    """Generation for FID: the paper's sampler settings, one image per caption."""

    images_per_prompt: int = 1
    """Images per caption (the paper: one, 10k images for 10k captions)."""


def default_cache() -> str:
    """``$XDG_CACHE_HOME/tokencompose/fid`` (``~/.cache/...``): shared by every run on this machine."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(root) / "tokencompose" / "fid")


@dataclass
class FidSettings:
    """``tokencompose evaluate fid``: FID / KID of generated (or given) images against a reference folder."""

    out: str = ""
    """Output folder (``images/``, ``captions.json``, ``results.json``)."""
    name: str | None = None
    """Label of this model in comparison tables."""
    inception_weights: str = ""
    """Local file of the FID Inception's weights (torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``)."""
    reference: str | None = None
    """Folder of real images (COCO val2017, Flickr30K images, or any folder)."""
    captions: str | None = None
    """Captions to generate from: a COCO captions JSON, a text file (``caption`` or ``image<TAB>caption`` a line,
    Flickr30K's ``image.jpg#n<TAB>caption`` too) or a JSON list (strings, or objects with ``caption``, ``image``)."""
    num_captions: int = 10000
    """Captions sampled without replacement (the paper: 10k random COCO val2017 captions); 0: all."""
    caption_seed: int = 0
    """Seed of that sample."""
    images: str | None = None
    """Image folder: without ``--model``, every image in it is scored; with it, images are generated there
    (default ``OUT/images``)."""
    cache: str | None = None
    """Folder of cached reference features and statistics (default ``~/.cache/tokencompose/fid``)."""
    save_features: str | None = None
    """Also write ``real.npy`` and ``generated.npy`` (one row per image) and their file lists here."""
    feature_layer: int = 2048
    """Inception features: 2048 (pool3, the standard FID) | 768 | 192 | 64 (for sets smaller than 2048 images,
    whose 2048-d covariance is singular)."""
    resize: int = 512
    """Shorter side resized to this and centre-cropped before the extractor's own resize to 299 (the generated
    size of SD 1.x); 0: images as they are (all one size)."""
    batch_size: int = 64
    """Images per extractor call."""
    kid_subsets: int = 100
    """KID: number of random subsets."""
    kid_subset_size: int = 1000
    """KID: images per subset (capped at the smaller set's size)."""
    kid_seed: int = 2020
    """KID: seed of the subset draw (torch-fidelity's default)."""
    model: ModelSettings = field(default_factory=ModelSettings)
    generation: FidGenerationSettings = field(default_factory=FidGenerationSettings)
    run: ShardSettings = field(default_factory=ShardSettings)


@dataclass(frozen=True)
class Caption:
    """One caption to generate from: its id (a COCO annotation id, else its row), text, and real image if named."""

    uid: int
    text: str
    image: str | None = None


def _read_caption_rows(path: Path) -> tuple[list[Caption], str]:
    """Every caption of a COCO captions JSON, a JSON list, or a text file; and the format's name."""
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"captions file {path} is not JSON ({err})") from err
        if isinstance(data, dict) and "annotations" in data:  # COCO: captions_val2017.json
            names = {im["id"]: im["file_name"] for im in data.get("images", [])}
            anns = sorted(data["annotations"], key=lambda a: a["id"])
            return [Caption(int(a["id"]), a["caption"].strip(), names.get(a["image_id"])) for a in anns], "coco"
        if isinstance(data, list):
            rows = []
            for i, row in enumerate(data):
                if isinstance(row, str):
                    rows.append(Caption(i, row.strip()))
                elif isinstance(row, dict) and isinstance(row.get("caption"), str):
                    rows.append(Caption(i, row["caption"].strip(), row.get("image")))
                else:
                    raise UserError(f"{path}: row {i} is neither a string nor an object with a 'caption'")
            return rows, "json"
        raise UserError(f"{path} is neither a COCO captions file nor a JSON list of captions")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        image, sep, text = line.partition("\t")
        # Flickr30K's results_20130124.token: "<image>.jpg#<n>\t<caption>".
        rows.append(Caption(len(rows), text.strip(), image.split("#")[0]) if sep else Caption(len(rows), line.strip()))
    return rows, "text"


def load_captions(source: str | Path, num: int = 10000, seed: int = 0) -> tuple[list[Caption], dict[str, Any]]:
    """``num`` captions of ``source`` drawn without replacement (numpy PCG64, ``seed``), in file order; 0: all.

    Returns the captions and a record of the draw (file, its sha256, format, how many there were and were kept).
    """
    path = Path(source)
    if not path.is_file():
        raise UserError(f"captions file {path} does not exist")
    rows, kind = _read_caption_rows(path)
    if not rows:
        raise UserError(f"no captions in {path}")
    available = len(rows)
    if 0 < num < available:
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), size=num, replace=False))
        rows = [rows[i] for i in keep]
    info = {"source": str(path), "sha256": ff.file_sha256(path), "format": kind, "available": available,
            "num": len(rows), "seed": seed if 0 < num < available else None}  # fmt: skip
    return rows, info


def fid_scores(
    real: dict[str, np.ndarray], generated: np.ndarray, kid_subsets: int = 100, kid_subset_size: int = 1000,
    kid_seed: int = 2020,
) -> dict[str, Any]:  # fmt: skip
    """FID and KID by torch-fidelity's own functions.

    ``real``: ``features`` ``[N, D]``, ``mu`` ``[D]``, ``sigma`` ``[D, D]`` (:func:`fid_features.statistics`);
    ``generated``: ``[M, D]`` features. Returns ``fid``, ``kid_mean``, ``kid_std`` and the KID subset size used.
    """
    import torch
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    mu, sigma = ff.statistics(generated)
    fid = fid_statistics_to_metric({"mu": real["mu"], "sigma": real["sigma"]}, {"mu": mu, "sigma": sigma}, False)
    size = min(kid_subset_size, len(real["features"]), len(generated))
    if size < 2:
        raise UserError("KID needs at least 2 images on each side")
    # input1 = generated, input2 = reference: torch-fidelity's order, so its subset draw is the same.
    kid = kid_features_to_metric(
        torch.from_numpy(generated), torch.from_numpy(real["features"]), kid_subsets=kid_subsets,
        kid_subset_size=size, rng_seed=kid_seed, verbose=False,
    )  # fmt: skip
    return {
        "fid": float(fid["frechet_inception_distance"]),
        "kid_mean": float(kid["kernel_inception_distance_mean"]),
        "kid_std": float(kid["kernel_inception_distance_std"]),
        "kid_subset_size": size,
        "kid_subsets": kid_subsets,
    }


def reference_files(folder: str | Path, captions: list[Caption] | None) -> list[Path]:
    """The real images: the sampled captions' own images when every caption names one, else the whole folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"reference folder {folder} does not exist")
    if not captions or any(c.image is None for c in captions):
        return ff.list_images(folder)
    files = sorted({folder / str(c.image) for c in captions})
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{len(missing)} images of the sampled captions are missing in {folder}, e.g. {missing[:3]}")
    return files


def features_of(files: list[Path], extractor: Any, s: FidSettings, shard: Shard, name: str) -> np.ndarray | None:
    """``[N, D]`` features of ``files`` in order, split over a launch's processes (None on processes other than 0)."""
    from tokencompose.sharding import progress_bar, shard_map

    def work(part: list[Path]) -> np.ndarray:
        return ff.extract_features(extractor, part, s.resize, s.batch_size, progress_bar(name, "image"))

    return shard_map(shard, files, work, Path(s.out) / "parts", name)


def reference_statistics(
    files: list[Path], extractor: Any, s: FidSettings, weights_sha256: str, shard: Shard
) -> tuple[dict[str, np.ndarray] | None, dict[str, Any]]:
    """Features and statistics of the reference images, from the cache or computed once (over every process)
    and cached by process 0; ``(None, info)`` on the other processes when computed."""
    digest = ff.images_digest(files)
    key = ff.reference_key(digest, weights_sha256, str(s.feature_layer), s.resize)
    cache = Path(s.cache or default_cache())
    info = {"folder": str(s.reference), "num_images": len(files), "sha256": digest, "cache": str(cache / f"{key}.npz")}
    stored = ff.load_reference(cache, key)
    if stored is not None and len(stored["features"]) == len(files):
        log.info("reference statistics from the cache: %s", info["cache"])
        return stored, {**info, "cached": True}
    features = features_of(files, extractor, s, shard, "reference")
    if features is None:
        return None, info
    record = {**info, "weights_sha256": weights_sha256, "feature_layer": s.feature_layer, "resize": s.resize,
              "library": ff.LIBRARY, "version": ff.library_version(), "files": [f.name for f in files]}  # fmt: skip
    return ff.save_reference(cache, key, features, record), {**info, "cached": False}


def _save_features(folder: Path, real: np.ndarray, generated: np.ndarray, real_files: list, gen_files: list) -> None:
    """``real.npy`` / ``generated.npy`` (float32, a row per image) and ``real.txt`` / ``generated.txt`` (row order)."""
    import io

    from tokencompose.atomic import atomic_write_bytes

    for name, array, files in (("real", real, real_files), ("generated", generated, gen_files)):
        buf = io.BytesIO()
        np.save(buf, np.asarray(array, dtype=np.float32))
        atomic_write_bytes(folder / f"{name}.npy", buf.getvalue())
        atomic_write_text(folder / f"{name}.txt", "".join(f"{f}\n" for f in files))


def run_fid(settings: FidSettings) -> dict[str, Any]:
    """Sample captions, generate (or take ``images``), extract features, score; returns (and writes) the results.

    Under ``accelerate launch`` every process generates its shard of the images and extracts the features of
    its shard of the reference and generated images; process 0 merges them in file order, scores and returns
    the results (the others return ``{}``). Shards picked by hand (``--shard``) only generate; shard 0 scores.
    """
    from tokencompose.evaluation.results import now_iso, package_versions
    from tokencompose.evaluation.run import SETTINGS_FILE, _generate, model_record, save_settings
    from tokencompose.sharding import resolve_shard

    s = settings
    if not s.out:
        raise UserError("evaluate fid needs --out")
    if not s.inception_weights:
        raise UserError("evaluate fid needs --inception-weights (a local .pth of the FID Inception; no download)")
    if not s.reference:
        raise UserError("evaluate fid needs --reference (a folder of real images)")
    if s.feature_layer not in (64, 192, 768, 2048):
        raise UserError(f"--feature-layer must be 64, 192, 768 or 2048, got {s.feature_layer}")
    generate = bool(s.model.model)
    if not generate and not s.images:
        raise UserError("evaluate fid needs --model (to generate) or --images (a folder of images to score)")
    if generate and not s.captions:
        raise UserError("generating needs --captions (a COCO captions JSON, a text or JSON list)")
    if not Path(s.inception_weights).is_file():
        raise UserError(f"Inception weights {s.inception_weights} do not exist (pass a local .pth file)")
    out = Path(s.out)
    image_dir = Path(s.images or out / "images")
    captions, captions_info = (load_captions(s.captions, s.num_captions, s.caption_seed) if s.captions
                               else (None, None))  # fmt: skip
    ref_files = reference_files(s.reference, captions)  # refused before hours of generation
    shard = resolve_shard(s.model.device, s.run)
    out.mkdir(parents=True, exist_ok=True)
    if generate:
        assert captions is not None
        prompts = [Prompt(uid=c.uid, categories=(), text=c.text) for c in captions]
        _generate(s.model, prompts, s.generation, s.run, image_dir, shard)
        shard.wait()
        if shard.state is None and shard.index != 0:
            return {}
        n = s.generation.images_per_prompt
        gen_files = sorted((image_dir / image_name(p.uid, i) for p in prompts for i in range(n)), key=lambda p: p.name)
        missing = [f.name for f in gen_files if not f.is_file()]
        if missing:
            raise UserError(f"{len(missing)} generated images missing in {image_dir}, e.g. {missing[:3]}")
    else:
        if shard.state is None and shard.index != 0:
            return {}
        gen_files = ff.list_images(image_dir)
    weights_sha256 = ff.file_sha256(s.inception_weights)
    extractor = ff.load_extractor(s.inception_weights, str(s.feature_layer), shard.device)
    real, ref_info = reference_statistics(ref_files, extractor, s, weights_sha256, shard)
    generated = features_of(gen_files, extractor, s, shard, "generated")
    if real is None or generated is None or not shard.main:
        return {}
    if captions is not None:
        rows = [{"uid": c.uid, "caption": c.text, "image": c.image} for c in captions]
        write_json_atomic(out / CAPTIONS_FILE, rows)
        captions_info = {**(captions_info or {}), "saved": CAPTIONS_FILE}
    if min(len(generated), len(real["features"])) <= s.feature_layer:
        log.warning("fewer images than feature dimensions (%d): the covariance is singular and FID biased high; "
                    "the paper's sets have 10,000 images", s.feature_layer)  # fmt: skip
    scores = fid_scores(real, generated, s.kid_subsets, s.kid_subset_size, s.kid_seed)
    kid = {"subsets": scores.pop("kid_subsets"), "subset_size": scores.pop("kid_subset_size"), "seed": s.kid_seed,
           "kernel": "polynomial, degree 3, gamma 1/D, coef0 1"}  # fmt: skip
    if s.save_features:
        _save_features(Path(s.save_features), real["features"], generated, [f.name for f in ref_files],
                       [f.name for f in gen_files])  # fmt: skip
    gen_file = image_dir / "generation.json"
    result = {
        "kind": "fid",
        "name": s.name,
        "model": model_record(s.model) if generate else None,
        "captions": captions_info,
        "generation": json.loads(gen_file.read_text()) if gen_file.is_file() else None,
        "images": str(image_dir),
        "reference": ref_info,
        "counts": {"real": int(len(real["features"])), "generated": int(len(generated))},
        "extractor": {
            "library": ff.LIBRARY,
            "version": ff.library_version(),
            "class": "FeatureExtractorInceptionV3",
            "weights": str(s.inception_weights),
            "weights_sha256": weights_sha256,
            "standard_weights": weights_sha256.startswith(ff.STANDARD_WEIGHTS_PREFIX),
            "feature_layer": s.feature_layer,
            "resize": s.resize,
            "device": str(shard.device),
            "processes": shard.count if shard.state is not None else 1,
        },
        "kid": kid,
        "scores": scores,
        "features": str(s.save_features) if s.save_features else None,
        "settings": SETTINGS_FILE,
        "environment": {**package_versions(), ff.LIBRARY: ff.library_version()},
        "created": now_iso(),
    }
    save_settings(out, s)
    write_json_atomic(out / "results.json", result)
    return result
