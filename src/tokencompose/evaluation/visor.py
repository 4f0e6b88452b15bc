"""VISOR (Gokhale et al., "Benchmarking Spatial Relationships in Text-to-Image Generation"): prompts and scoring.

The TokenCompose paper's "object accuracy" (Table 1: SD 1.4 29.86, TokenCompose 52.15) is VISOR's OA: the
percent of images of VISOR's two-object spatial prompts in which the detector finds **both** objects. SD 1.4's
29.86 is exactly the "SD" row of VISOR's own table, i.e. all 25,280 spatial prompts of its SR2D set, 4 images
each, OWL-ViT (``google/owlvit-base-patch32``) queried with "a photo of a {object}", box score > 0.1.

Prompts (SR2D, VISOR's ``create_spatial_phrases.py``): every unordered pair (A, B) of the 80 COCO categories
(in COCO id order) x the relations "to the left of", "to the right of", "above", "below" x both orders,
text ``"{a/an} A {relation} {a/an} B"`` (no final period). VISOR numbers the rows pair by pair: 8 spatial rows,
then two "A and B" rows, so the spatial row of pair ``p``, relation ``r``, order ``o`` has ``unique_id``
``10 p + 2 r + o``; 80 single-object rows follow. Its JSON rows are ``{"unique_id", "num_objects": 2,
"obj_1_attributes": [A], "obj_2_attributes": [B], "rel_type", "text"}``; only the spatial rows are scored.

Scoring rules (VISOR's ``visor.py`` and its notebook's detection step):

- only the prompt's two objects are queried; each box is labelled with its best query, kept when its score is
  **strictly** above the threshold (every such box, not only each class's best);
- an object is found when at least one kept box has its label; OA = percent of images with both found;
- the relation holds when **some** (A box, B box) pair of kept boxes satisfies it on box centroids, strictly
  (a tie is not a success): left ``x_A < x_B``, right ``x_A > x_B``, above ``y_A < y_B``, below ``y_A > y_B``
  (image coordinates: y grows downwards);
- VISOR_uncond = percent of all images with both found and the relation right; VISOR_cond = the same over the
  images with both found (so uncond = cond x OA / 100); VISOR_n = percent of prompts with at least ``n`` of
  their images right (denominator: every prompt, as ``visor.py``; its notebook divides by the prompts with one
  both-found image instead).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokencompose.atomic import atomic_write_text
from tokencompose.captions import article
from tokencompose.errors import UserError
from tokencompose.evaluation.prompts import Prompt
from tokencompose.evaluation.scoring import bootstrap_ci, image_key, mg_scores, ratio_bootstrap_ci

RELATIONS = ("to the left of", "to the right of", "above", "below")
SR2D_ROWS_PER_PAIR = 10  # 4 relations x 2 orders, then "A and B", "B and A"


@dataclass(frozen=True)
class VisorPrompt:
    """One spatial prompt: ``prompt.categories`` is (A, B) in the order of the text, ``relation`` one of RELATIONS."""

    prompt: Prompt
    relation: str


def visor_text(a: str, relation: str, b: str) -> str:
    """VISOR's sentence: ``"an apple to the left of a dog"`` (a/an by the noun's sound, no period)."""
    return f"{article(a)} {a} {relation} {article(b)} {b}"


def sr2d_prompts(category_list: Sequence[str]) -> list[VisorPrompt]:
    """Every spatial prompt of the categories, with VISOR's ``unique_id`` numbering.

    With the 80 COCO categories in COCO id order (``categories("coco")``) this is SR2D's spatial set: 25,280
    prompts, the same ids and texts as VISOR's ``text_spatial_rel_phrases.json``.
    """
    cats = list(dict.fromkeys(category_list))
    out = []
    for p, (s1, s2) in enumerate(itertools.combinations(cats, 2)):
        for r, rel in enumerate(RELATIONS):
            for o, (a, b) in enumerate(((s1, s2), (s2, s1))):
                uid = SR2D_ROWS_PER_PAIR * p + 2 * r + o
                out.append(VisorPrompt(Prompt(uid=uid, categories=(a, b), text=visor_text(a, rel, b)), rel))
    return out


def sample_visor_prompts(category_list: Sequence[str], num_prompts: int | None, seed: int = 0) -> list[VisorPrompt]:
    """``num_prompts`` prompts drawn without replacement from :func:`sr2d_prompts` (all when None), in id order.

    A sample keeps SR2D's ids and texts, so its images are comparable prompt by prompt with a full run;
    numpy's PCG64 with ``seed`` makes the draw the same on every platform.
    """
    full = sr2d_prompts(category_list)
    if num_prompts is None:
        return full
    if not 1 <= num_prompts <= len(full):
        raise UserError(f"num_prompts must be in 1..{len(full)} for these categories, got {num_prompts}")
    idx = np.random.default_rng(seed).choice(len(full), size=num_prompts, replace=False)
    return [full[i] for i in sorted(idx.tolist())]


def load_visor_prompts(path: str | Path) -> list[VisorPrompt]:
    """The spatial rows of a prompt file in VISOR's layout (``text_spatial_rel_phrases.json``), texts as they are.

    Rows of other kinds ("and", single objects) are skipped: VISOR scores only the spatial ones.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"VISOR prompt file {path} does not exist (pass text_spatial_rel_phrases.json or similar)")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
        out = [
            VisorPrompt(
                Prompt(
                    uid=int(row["unique_id"]),
                    categories=(row["obj_1_attributes"][0], row["obj_2_attributes"][0]),
                    text=row["text"],
                ),
                row["rel_type"],
            )
            for row in rows
            if row.get("rel_type") in RELATIONS and int(row.get("num_objects", 2)) == 2
        ]
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, IndexError, ValueError) as err:
        raise UserError(
            f"{path} is not a VISOR prompt file (rows with unique_id, obj_1_attributes, ...): {err!r}"
        ) from err
    if not out:
        raise UserError(f"{path} has no spatial rows (rel_type one of {', '.join(RELATIONS)})")
    uids = [v.prompt.uid for v in out]
    if len(set(uids)) != len(uids):
        raise UserError(f"{path}: duplicate unique_id values")
    return out


def save_visor_prompts(prompts: Sequence[VisorPrompt], path: str | Path) -> None:
    """Write prompts in VISOR's JSON layout (readable by :func:`load_visor_prompts` and by VISOR's scripts)."""
    rows = [
        {
            "unique_id": v.prompt.uid,
            "num_objects": 2,
            "obj_1_attributes": [v.prompt.categories[0]],
            "obj_2_attributes": [v.prompt.categories[1]],
            "rel_type": v.relation,
            "text": v.prompt.text,
        }
        for v in prompts
    ]
    atomic_write_text(path, json.dumps(rows, indent=2) + "\n")


def centroid(box: Sequence[float]) -> tuple[float, float]:
    """Centre ``(x, y)`` of a box ``[x0, y0, x1, y1]``."""
    return (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0


def relation_holds(
    relation: str, centroids_a: Sequence[tuple[float, float]], centroids_b: Sequence[tuple[float, float]]
) -> bool:
    """Whether some (A, B) pair of box centroids satisfies "A ``relation`` B", strictly (VISOR's rule)."""
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}: one of {RELATIONS}")
    for (xa, ya), (xb, yb) in itertools.product(centroids_a, centroids_b):
        dx, dy = xa - xb, ya - yb
        if {"to the left of": dx < 0, "to the right of": dx > 0, "above": dy < 0, "below": dy > 0}[relation]:
            return True
    return False


def judge_image(detection: Mapping[str, Any], prompt: VisorPrompt, threshold: float = 0.1) -> tuple[bool, bool, bool]:
    """One image: ``(A found, B found, relation right)``; right implies both found.

    ``detection``: ``{"classes": [...], "scores": [...], "boxes": [...]}``, one entry per box (a class may repeat).
    """
    a, b = prompt.prompt.categories
    kept = [
        (c, box)
        for c, s, box in zip(detection["classes"], detection["scores"], detection["boxes"], strict=True)
        if float(s) > threshold
    ]
    cents_a = [centroid(box) for c, box in kept if c == a]
    cents_b = [centroid(box) for c, box in kept if c == b]
    found_a, found_b = bool(cents_a), bool(cents_b)
    return found_a, found_b, found_a and found_b and relation_holds(prompt.relation, cents_a, cents_b)


@dataclass(frozen=True)
class VisorOutcomes:
    """Per (prompt, image) outcomes, bool arrays ``[P, N]`` (P prompts, N images each)."""

    found_a: np.ndarray
    found_b: np.ndarray
    correct: np.ndarray

    @property
    def both(self) -> np.ndarray:
        return self.found_a & self.found_b


def visor_outcomes(
    detections: Mapping[str, Mapping[str, Any]], prompts: Sequence[VisorPrompt], num_images: int, threshold: float = 0.1
) -> VisorOutcomes:
    """:func:`judge_image` of every ``"<uid>_<i>"`` image, i < ``num_images``; a missing one is an error, not a miss."""
    shape = (len(prompts), num_images)
    arrays = [np.zeros(shape, dtype=bool) for _ in range(3)]
    missing = []
    for row, vp in enumerate(prompts):
        for i in range(num_images):
            det = detections.get(image_key(vp.prompt.uid, i))
            if det is None:
                missing.append(image_key(vp.prompt.uid, i))
                continue
            for arr, value in zip(arrays, judge_image(det, vp, threshold), strict=True):
                arr[row, i] = value
    if missing:
        raise KeyError(f"{len(missing)} images have no detections, e.g. {missing[:5]}")
    return VisorOutcomes(*arrays)


def _percent(num: float, den: float) -> float | None:
    return 100.0 * num / den if den else None


def _ratio_ci(num: np.ndarray, den: np.ndarray, samples: int, seed: int, level: float = 0.95) -> list[float | None]:
    """Percentile bootstrap CI of ``100 sum(num) / sum(den)`` over prompts (``num``, ``den``: ``[P]`` per prompt).

    The resampled prompt indices are those of :func:`~tokencompose.evaluation.scoring.bootstrap_ci` with the same
    seed, so every interval of one results file comes from the same resamples. A resample without a both-found
    image has no VISOR_cond; ``[None, None]`` when none has one.
    """
    return ratio_bootstrap_ci(num, den, samples, level, seed, scale=100.0) or [None, None]


def _cond_std(correct: np.ndarray, both: np.ndarray) -> float | None:
    """Population std of VISOR_cond over the image-index subsets that have a both-found image (MultiGen's ±)."""
    per = [100.0 * c / b for c, b in zip(correct.sum(axis=0), both.sum(axis=0), strict=True) if b]
    return float(np.std(per)) if per else None


def score_visor(
    detections: Mapping[str, Mapping[str, Any]],
    prompts: Sequence[VisorPrompt],
    num_images: int,
    threshold: float = 0.1,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything a VISOR results file reports for one threshold (percent; ``None`` where undefined).

    ``object_accuracy`` (both found; the TokenCompose paper's "object accuracy"), ``object_accuracy_a`` / ``_b``,
    ``visor_uncond``, ``visor_cond``, ``visor_1`` .. ``visor_N``; ``*_std``: population std over the image-index
    subsets (MultiGen's ±); ``ci95``: percentile bootstrap over prompts; ``by_relation``: OA and VISOR per relation.
    """
    if not prompts:
        raise ValueError("no prompts to score")
    o = visor_outcomes(detections, prompts, num_images, threshold)
    both, correct = o.both, o.correct
    count = both.size
    per_prompt = correct.sum(axis=1)  # [P] right images per prompt
    out: dict[str, Any] = {
        "threshold": threshold,
        "num_prompts": len(prompts),
        "images_per_prompt": num_images,
        "num_images": count,
        "object_accuracy": _percent(both.sum(), count),
        "object_accuracy_a": _percent(o.found_a.sum(), count),
        "object_accuracy_b": _percent(o.found_b.sum(), count),
        "visor_uncond": _percent(correct.sum(), count),
        "visor_cond": _percent(correct.sum(), both.sum()),
    }
    for n in range(1, num_images + 1):
        out[f"visor_{n}"] = _percent((per_prompt >= n).sum(), len(prompts))
    # The per-index std of a mean over images is MultiGen's ± (mg_scores with k = 1 on a 0/1 array).
    out["object_accuracy_std"] = float(mg_scores(both.astype(np.int64), 1).std[0])
    out["visor_uncond_std"] = float(mg_scores(correct.astype(np.int64), 1).std[0])
    out["visor_cond_std"] = _cond_std(correct, both)
    out["by_relation"] = {}
    relations = np.array([vp.relation for vp in prompts])
    for rel in RELATIONS:
        sel = relations == rel
        if sel.any():
            out["by_relation"][rel] = {
                "num_prompts": int(sel.sum()),
                "object_accuracy": _percent(both[sel].sum(), both[sel].size),
                "visor_uncond": _percent(correct[sel].sum(), both[sel].size),
                "visor_cond": _percent(correct[sel].sum(), both[sel].sum()),
            }
    if bootstrap > 0:
        # bootstrap_ci resamples prompts; a [P, 1] array of per-prompt counts gives VISOR_1..N in one call.
        ci = {
            "object_accuracy": bootstrap_ci(both.astype(np.int64), 1, bootstrap, 0.95, seed)[0].tolist(),
            "visor_uncond": bootstrap_ci(correct.astype(np.int64), 1, bootstrap, 0.95, seed)[0].tolist(),
            "visor_cond": _ratio_ci(per_prompt, both.sum(axis=1), bootstrap, seed),
        }
        visor_n = bootstrap_ci(per_prompt[:, None], num_images, bootstrap, 0.95, seed)
        ci.update({f"visor_{n}": visor_n[n - 1].tolist() for n in range(1, num_images + 1)})
        out["ci95"] = ci
        out["bootstrap"] = {"samples": bootstrap, "seed": seed, "unit": "prompt"}
    return out
