"""MultiGen scoring: the paper's oracle (official fixtures), edge rules, bootstrap CI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tokencompose.evaluation.prompts import Prompt, load_prompts
from tokencompose.evaluation.scoring import (
    bootstrap_ci,
    cluster_bootstrap_ci,
    found_counts,
    max_scores,
    mg_scores,
    score_multigen,
)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("TOKENCOMPOSE_FIXTURES", REPO.parent / "shared" / "fixtures" / "official"))
ORACLE_FILES = sorted(FIXTURES.glob("multigen_*.json"))


@pytest.mark.parametrize(
    "path",
    ORACLE_FILES
    or [pytest.param(None, marks=pytest.mark.skip(reason=f"no multigen_*.json oracle files under {FIXTURES}"))],
    ids=lambda p: p.name if p else "absent",
)
def test_matches_paper_oracle(path: Path) -> None:
    case = json.loads(path.read_text())
    prompts = load_prompts("coco")  # the oracle scored the shipped COCO prompt file
    counts = found_counts(case["results"], prompts, case["img_per_prompt"], case["threshold"])
    scores = mg_scores(counts, 5)
    np.testing.assert_allclose(scores.percent, case["mg_percent"], atol=1e-4)
    np.testing.assert_allclose(scores.std, case["mg_std"], atol=1e-4)


def _prompt(uid: int, cats: tuple[str, ...]) -> Prompt:
    return Prompt(uid, cats, "x")


def test_rules_strict_threshold_count_once_ignore_others() -> None:
    prompts = [_prompt(0, ("cat", "dog", "cup"))]
    dets = {
        # cat twice (counts once), dog exactly at the threshold (not counted), car not in the prompt.
        "0_0": {"classes": ["cat", "cat", "dog", "car", "car"], "scores": [0.5, 0.9, 0.1, 0.9, 0.9]},
        "0_1": {"cat": 0.11, "dog": 0.2, "cup": 0.3},  # plain mapping form
    }
    counts = found_counts(dets, prompts, 2, threshold=0.1)
    assert counts.tolist() == [[1, 3]]
    assert found_counts(dets, prompts, 2, threshold=0.095).tolist() == [[2, 3]]
    assert max_scores(dets["0_0"]) == {"cat": 0.9, "dog": 0.1, "car": 0.9}


def test_missing_image_is_an_error() -> None:
    with pytest.raises(KeyError, match="0_1"):
        found_counts({"0_0": {}}, [_prompt(0, ("cat",))], 2)


def test_mg_and_std_by_hand() -> None:
    # 2 prompts x 2 image indices, K = 2.
    counts = np.array([[2, 0], [1, 1]])
    s = mg_scores(counts, 2)
    np.testing.assert_allclose(s.percent, [75.0, 25.0])
    # index 0: MG1 = 100, MG2 = 50; index 1: MG1 = 50, MG2 = 0 -> population std 25, 25.
    np.testing.assert_allclose(s.std, [25.0, 25.0])


def test_bootstrap_ci_contains_estimate_and_is_seeded() -> None:
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 6, size=(200, 10))
    ci = bootstrap_ci(counts, 5, num_samples=500, seed=3)
    est = mg_scores(counts, 5).percent
    assert ci.shape == (5, 2)
    assert np.all(ci[:, 0] <= est + 1e-9) and np.all(est <= ci[:, 1] + 1e-9)
    assert np.all(ci[:, 1] - ci[:, 0] > 0)
    np.testing.assert_array_equal(ci, bootstrap_ci(counts, 5, num_samples=500, seed=3))
    # Constant data has a zero-width interval.
    np.testing.assert_allclose(bootstrap_ci(np.full((20, 3), 5), 5, 100)[:, 0], 100.0)


def test_score_multigen_record() -> None:
    prompts = [_prompt(0, ("a", "b")), _prompt(7, ("c", "d"))]
    dets = {"0_0": {"a": 0.5}, "7_0": {"c": 0.5, "d": 0.9}}
    out = score_multigen(dets, prompts, 1, bootstrap=50)
    assert out["mg_percent"] == [100.0, 50.0]
    assert len(out["mg_ci95"]) == 2 and out["num_prompts"] == 2


def test_paired_difference_matches_hand_computation_and_its_power_arithmetic():
    import numpy as np

    from tokencompose.evaluation.scoring import Z_ALPHA, Z_POWER, paired_difference

    a = np.array([[2, 2], [1, 2], [0, 1], [2, 0]])  # [P=4 prompts, N=2 images]: categories found
    b = np.array([[2, 1], [1, 1], [0, 0], [1, 0]])
    out = paired_difference(a, b, max_k=2, num_samples=2000, seed=1)
    # MG2 per prompt: A 100, 50, 0, 50; B 50, 0, 0, 0 -> d = 50, 50, 0, 50
    d = np.array([50.0, 50.0, 0.0, 50.0])
    assert out["diff"][1] == pytest.approx(d.mean())
    assert out["se"][1] == pytest.approx(d.std(ddof=1) / 2.0)
    assert out["mde"][1] == pytest.approx((Z_ALPHA + Z_POWER) * d.std(ddof=1) / 2.0)
    assert out["prompts_for_5"][1] == int(np.ceil(4 * (out["mde"][1] / 5.0) ** 2))
    lo, hi = out["ci95"][1]
    assert 0.0 <= lo <= d.mean() <= hi <= 50.0  # bootstrap means of d lie within its range
    # MG1: A finds >= 1 in 6 of 8 images, B in 5 of 8 -> +12.5 points
    assert out["diff"][0] == pytest.approx(12.5)
    same = paired_difference(a, a, max_k=2)
    assert same["diff"] == [0.0, 0.0] and same["ci95"][1] == [0.0, 0.0]
    # no spread between prompts (both arms equal, or on a floor): the MDE is undefined, not 0
    assert same["mde"] == [None, None] and same["se"] == [None, None] and same["prompts_for_5"] == [None, None]
    assert paired_difference(a[:1], b[:1], max_k=2)["mde"] == [None, None]  # one prompt
    with pytest.raises(ValueError, match="shape"):
        paired_difference(a, b[:3], max_k=2)


def test_pooled_difference_of_independent_runs():
    import numpy as np

    from tokencompose.evaluation.scoring import Z_ALPHA, Z_POWER, paired_difference, pooled_difference

    runs = [{"diff": [1.0, 4.0], "se": [0.5, 2.0]}, {"diff": [3.0, 10.0], "se": [None, 3.0]}]
    out = pooled_difference(runs)
    assert out["diff"] == pytest.approx([2.0, 7.0]) and out["std"][1] == pytest.approx(np.std([4.0, 10.0], ddof=1))
    se = np.sqrt(2.0**2 + 3.0**2) / 2  # the mean of two independent estimates
    assert out["se"][1] == pytest.approx(se) and out["mde"][1] == pytest.approx((Z_ALPHA + Z_POWER) * se)
    assert out["ci95"][1] == pytest.approx([7.0 - Z_ALPHA * se, 7.0 + Z_ALPHA * se])
    assert out["se"][0] is None and out["ci95"][0] is None and out["runs"] == 2  # one run without spread there
    # R runs of equal precision: the MDE shrinks by sqrt(R); one run pools to itself
    rng = np.random.default_rng(0)
    one = paired_difference(rng.integers(0, 3, (40, 4)), rng.integers(0, 3, (40, 4)), max_k=2)
    assert pooled_difference([one])["mde"] == pytest.approx(one["mde"])
    assert pooled_difference([one] * 3)["mde"] == pytest.approx([m / np.sqrt(3) for m in one["mde"]])
    with pytest.raises(ValueError):
        pooled_difference([])


def test_cluster_bootstrap_ci_resamples_clusters_not_items() -> None:
    rng = np.random.default_rng(3)
    # 400 independent 0/1 items, one per cluster: the normal-approximation interval, +- 1.96 sqrt(p(1-p)/n).
    flips = (rng.random(400) < 0.7).astype(float)
    lo, hi = cluster_bootstrap_ci(flips, np.ones(400, dtype=int), num_samples=4000)
    half = 1.959964 * np.sqrt(flips.mean() * (1 - flips.mean()) / 400)
    assert lo < flips.mean() < hi and (hi - lo) / 2 == pytest.approx(half, rel=0.15)
    # The same number of items in 40 clusters of 10 equal items: as wide as 40 independent items, not 400.
    per_cluster = (rng.random(40) < 0.7).astype(float)
    values, counts = np.repeat(per_cluster, 10), np.full(40, 10)
    lo, hi = cluster_bootstrap_ci(values, counts, num_samples=4000)
    naive = 1.959964 * np.sqrt(values.mean() * (1 - values.mean()) / values.size)
    assert lo < values.mean() < hi and (hi - lo) / 2 > 2.5 * naive
    # Seeded; empty clusters drop out.
    assert cluster_bootstrap_ci(values, counts, seed=1) == cluster_bootstrap_ci(values, counts, seed=1)
    assert cluster_bootstrap_ci(values, counts, seed=1) == cluster_bootstrap_ci(
        values, np.insert(counts, [0, 20], 0), seed=1
    )
    assert cluster_bootstrap_ci(np.array([]), np.array([0, 0])) is None
    with pytest.raises(ValueError, match="sum to"):
        cluster_bootstrap_ci(np.ones(3), np.array([1, 1]))
