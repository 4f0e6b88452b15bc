"""MultiGen scoring (pure): detector output -> MG_k, the paper's ±, bootstrap confidence intervals.

Rules, as the paper's ``gen_multigen_scores.py`` (checked against its outputs in the official fixtures):

- an image's detections are ``{"classes": [...], "scores": [...]}``, one entry per box (a class may repeat);
- a category of the prompt counts as found when any of its boxes scores **strictly** above the threshold;
  it counts once however many boxes it has; classes that are not in the prompt are ignored;
- MG_k = percent of all (prompt, image) pairs with at least k of the prompt's K categories found;
- ± = population standard deviation (``np.std``, ddof 0) of MG_k computed separately on each image-index
  subset (every prompt's image 0, every prompt's image 1, ...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tokencompose.evaluation.prompts import Prompt


def image_key(uid: int, index: int) -> str:
    """The paper's key of one generated image: ``"<unique_id>_<image_index>"``."""
    return f"{uid}_{index}"


def max_scores(detection: Mapping[str, Any]) -> dict[str, float]:
    """Best score per class of one image's detections.

    Accepts the paper's ``{"classes": [...], "scores": [...]}`` (one entry per box) or a plain
    ``{class: score}`` mapping (the shapes world's detector).
    """
    if "classes" in detection and "scores" in detection:
        best: dict[str, float] = {}
        for c, s in zip(detection["classes"], detection["scores"], strict=True):
            s = float(s)
            if s > best.get(c, -np.inf):
                best[c] = s
        return best
    return {str(c): float(s) for c, s in detection.items()}


def found_counts(
    detections: Mapping[str, Mapping[str, Any]],
    prompts: Sequence[Prompt],
    num_images: int,
    threshold: float = 0.1,
) -> np.ndarray:
    """Number of each prompt's categories found per image: int array ``[P, N]`` (P prompts, N images each).

    Every ``"<uid>_<i>"`` key for i < ``num_images`` must be present (a missing image is an error, not a miss).
    """
    counts = np.zeros((len(prompts), num_images), dtype=np.int64)
    missing = []
    for row, prompt in enumerate(prompts):
        wanted = set(prompt.categories)
        for i in range(num_images):
            det = detections.get(image_key(prompt.uid, i))
            if det is None:
                missing.append(image_key(prompt.uid, i))
                continue
            best = max_scores(det)
            counts[row, i] = sum(1 for c in wanted if best.get(c, -np.inf) > threshold)
    if missing:
        raise KeyError(f"{len(missing)} images have no detections, e.g. {missing[:5]}")
    return counts


@dataclass(frozen=True)
class MGScores:
    """``percent[k-1]`` = MG_k in percent; ``std[k-1]`` = the paper's ± (std over image-index subsets)."""

    percent: np.ndarray
    std: np.ndarray

    def as_dict(self) -> dict[str, list[float]]:
        return {"mg_percent": self.percent.tolist(), "mg_std": self.std.tolist()}


def mg_scores(counts: np.ndarray, max_k: int) -> MGScores:
    """MG_1..MG_max_k from ``counts [P, N]`` (categories found per prompt and image)."""
    ks = np.arange(1, max_k + 1)
    hits = counts[None, :, :] >= ks[:, None, None]  # [K, P, N]
    percent = hits.mean(axis=(1, 2)) * 100.0
    per_index = hits.mean(axis=1) * 100.0  # [K, N]: MG_k of each image-index subset
    return MGScores(percent=percent, std=per_index.std(axis=1))


def bootstrap_ci(
    counts: np.ndarray, max_k: int, num_samples: int = 1000, level: float = 0.95, seed: int = 0
) -> np.ndarray:
    """Percentile bootstrap CI of MG_k over prompts: ``[K, 2]`` (low, high) in percent.

    Prompts are resampled with replacement (the images of a prompt move together, since they share its
    difficulty); numpy's PCG64 with ``seed`` makes the interval reproducible.
    """
    ks = np.arange(1, max_k + 1)
    per_prompt = (counts[None, :, :] >= ks[:, None, None]).mean(axis=2) * 100.0  # [K, P]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, counts.shape[0], size=(num_samples, counts.shape[0]))
    boots = per_prompt[:, idx].mean(axis=2)  # [K, num_samples]
    return percentile_interval(boots, level)


def percentile_interval(boots: np.ndarray, level: float = 0.95) -> np.ndarray:
    """The central ``level`` interval of bootstrap statistics ``[..., S]`` (S resamples): ``[..., 2]`` (low, high)."""
    alpha = (1.0 - level) / 2.0
    return np.stack([np.quantile(boots, alpha, axis=-1), np.quantile(boots, 1.0 - alpha, axis=-1)], axis=-1)


def ratio_bootstrap_ci(
    num: np.ndarray, den: np.ndarray, num_samples: int = 1000, level: float = 0.95, seed: int = 0, scale: float = 1.0
) -> list[float] | None:
    """Percentile bootstrap CI of ``scale * sum(num) / sum(den)`` over clusters (``num``, ``den``: ``[C]`` per
    cluster; a prompt, an image). Clusters are resampled with replacement, indices drawn as
    :func:`bootstrap_ci` draws them with the same seed; a resample whose ``den`` sums to 0 has no ratio and is
    left out. None when every resample is.
    """
    idx = np.random.default_rng(seed).integers(0, len(num), size=(num_samples, len(num)))
    n, d = num[idx].sum(axis=1), den[idx].sum(axis=1)
    ratio = scale * n[d > 0] / d[d > 0]
    if ratio.size == 0:
        return None
    return percentile_interval(ratio, level).tolist()


def cluster_bootstrap_ci(
    values: np.ndarray, counts: np.ndarray, num_samples: int = 1000, level: float = 0.95, seed: int = 0
) -> list[float] | None:
    """Percentile bootstrap CI of the mean of ``values [M]`` whose items come in clusters of ``counts [C]``.

    ``values`` are in cluster order (``counts.sum() == M``). Clusters, not items, are resampled with replacement
    and each resample's statistic is its pooled mean ``sum(values) / sum(counts)``: the items of one cluster
    (say, the ordered phrase pairs of one image, which share its noise and layout) are not independent, and
    treating them as such understates the error. Empty clusters are dropped; None when none is left.
    """
    values, counts = np.asarray(values, dtype=float), np.asarray(counts, dtype=np.int64)
    if counts.sum() != values.size:
        raise ValueError(f"cluster counts sum to {counts.sum()}, but there are {values.size} values")
    sums = np.bincount(np.repeat(np.arange(counts.size), counts), weights=values, minlength=counts.size)
    keep = counts > 0
    sums, counts = sums[keep], counts[keep]
    if not counts.size:
        return None
    return ratio_bootstrap_ci(sums, counts, num_samples, level, seed)


def score_multigen(
    detections: Mapping[str, Mapping[str, Any]],
    prompts: Sequence[Prompt],
    num_images: int,
    threshold: float = 0.1,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything a results file reports for one threshold: MG_k, ±, 95% bootstrap CI, counts."""
    counts = found_counts(detections, prompts, num_images, threshold)
    max_k = max(len(p.categories) for p in prompts)
    scores = mg_scores(counts, max_k)
    out: dict[str, Any] = {
        "threshold": threshold,
        "num_prompts": len(prompts),
        "images_per_prompt": num_images,
        **scores.as_dict(),
    }
    if bootstrap > 0:
        out["mg_ci95"] = bootstrap_ci(counts, max_k, bootstrap, 0.95, seed).tolist()
        out["bootstrap"] = {"samples": bootstrap, "seed": seed, "unit": "prompt"}
    return out


# z quantiles of the power calculation: two-sided 5% test, 80% power (the usual design convention).
Z_ALPHA, Z_POWER = 1.959964, 0.841621


def paired_difference(
    counts_a: np.ndarray, counts_b: np.ndarray, max_k: int, num_samples: int = 1000, level: float = 0.95, seed: int = 0
) -> dict[str, list]:
    """MG_k of A minus MG_k of B on the same prompts and image seeds, with what the design can detect.

    ``counts_a``, ``counts_b``: ``[P, N]`` categories found per prompt and image, the same (prompt, seed) in
    both. Per prompt, ``d_p = MG_k(A, p) - MG_k(B, p)`` (percent); the difference is their mean, its standard
    error ``sd(d_p) / sqrt(P)`` (prompts are the independent unit: a prompt's images share its difficulty),
    its CI a paired percentile bootstrap over prompts. ``mde`` is the smallest true difference this many
    prompts detect with 80% power in a two-sided 5% test, ``(z_0.975 + z_0.8) * se``; ``prompts_for_5`` the
    prompts that would bring it to 5 points at the same per-prompt spread. Where the per-prompt differences have
    no spread (one prompt, or every prompt equal -- both arms on a floor) the spread says nothing about the
    design: ``se``, ``mde`` and ``prompts_for_5`` are None there, not 0.
    """
    if counts_a.shape != counts_b.shape:
        raise ValueError(f"paired counts differ in shape: {counts_a.shape} vs {counts_b.shape}")
    ks = np.arange(1, max_k + 1)
    per_prompt = [(c[None, :, :] >= ks[:, None, None]).mean(axis=2) * 100.0 for c in (counts_a, counts_b)]
    d = per_prompt[0] - per_prompt[1]  # [K, P]
    p = d.shape[1]
    se = d.std(axis=1, ddof=1) / np.sqrt(p) if p > 1 else np.full(max_k, np.nan)
    rng = np.random.default_rng(seed)
    boots = d[:, rng.integers(0, p, size=(num_samples, p))].mean(axis=2)  # [K, num_samples]
    ci = percentile_interval(boots, level)
    se = np.where(se > 0, se, np.nan)  # no spread: undefined, not a design that detects everything
    mde = (Z_ALPHA + Z_POWER) * se
    needed = np.ceil(p * (mde / 5.0) ** 2)
    return {
        "diff": d.mean(axis=1).tolist(),
        "ci95": ci.tolist(),
        "se": _finite_or_none(se),
        "mde": _finite_or_none(mde),
        "prompts_for_5": [int(x) if np.isfinite(x) else None for x in needed],
        "num_prompts": p,
    }


def pooled_difference(effects: list[dict[str, Any]]) -> dict[str, list]:
    """The mean of independent runs' paired differences (:func:`paired_difference`, same prompt count each).

    Runs are independent (their own training seeds, scenes and prompts), so the mean over R runs has standard
    error ``sqrt(sum_r se_r^2) / R``; CI ``mean +- z_0.975 se`` and MDE ``(z_0.975 + z_0.8) se`` as for one run.
    This is the error of sampling prompts and images given the trained models; the spread between training seeds
    is reported beside it (``std``), not folded in. A k where any run's ``se`` is undefined has None there.
    """
    if not effects:
        raise ValueError("no runs to pool")
    diff = np.array([e["diff"] for e in effects], dtype=float)  # [R, K]
    se_runs = np.array([[np.nan if v is None else v for v in e["se"]] for e in effects], dtype=float)
    r = diff.shape[0]
    se = np.sqrt((se_runs**2).sum(axis=0)) / r
    mean = diff.mean(axis=0)
    ci = np.stack([mean - Z_ALPHA * se, mean + Z_ALPHA * se], axis=1)
    return {
        "diff": mean.tolist(),
        "std": (diff.std(axis=0, ddof=1) if r > 1 else np.zeros_like(mean)).tolist(),
        "ci95": [[float(lo), float(hi)] if np.isfinite(lo) else None for lo, hi in ci],
        "se": _finite_or_none(se),
        "mde": _finite_or_none((Z_ALPHA + Z_POWER) * se),
        "runs": r,
    }


def _finite_or_none(values: np.ndarray) -> list[float | None]:
    """A list for JSON: NaN (undefined) becomes None, which strict JSON readers accept."""
    return [float(v) if np.isfinite(v) else None for v in values]
