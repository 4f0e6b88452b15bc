"""Exact spatial-relation and attribute-binding scores on the shapes world (no learned detector).

The shapes world knows every object's colour, shape and position, and its exact detector
(:func:`tokencompose.data.shapes_detect.detect_shapes`) reads them back from an image, so two benchmarks
that need a learned model on real images have an exact version here:

**Spatial relations (VISOR, Gokhale et al. 2022, microsoft/VISOR).** A prompt is
``"a {A} {relation} a {B}"`` with A and B distinct categories and ``relation`` one of
:data:`RELATIONS` (the benchmark's SR2D wording, no final period). Per image, as VISOR's
``text2image_realtime_evaluate.ipynb`` (``process_detection``) and ``visor.py``:

- an object is detected when a region of its category scores strictly above the threshold (0.1 as VISOR);
- the relation holds when **some** pair (a region of A, a region of B) satisfies it, judged on box centroids
  ``((x0 + x1) / 2, (y0 + y1) / 2)`` with strict inequalities and image coordinates (y grows downwards):
  left ``xA < xB``, right ``xA > xB``, above ``yA < yB``, below ``yA > yB`` (the one rule of
  :func:`tokencompose.evaluation.visor.relation_holds`);
- OA = percent of images with both objects detected (``object_accuracy_a`` / ``_b``: each alone);
  VISOR_uncond = percent of all images with both detected and the relation right; VISOR_cond = the same
  percent among images with both detected (None when there are none); VISOR_k = percent of prompts with at
  least k such images (``visor_n[k - 1]``, k = 1..images per prompt; VISOR uses 4 images, k = 1..4).

**Attribute binding, colour (T2I-CompBench, Huang et al. 2023).** A prompt names two objects of distinct
colours and distinct shapes: ``"a red circle and a blue square"``. T2I-CompBench's BLIP-VQA score asks one
question per noun phrase and multiplies the per-phrase probabilities of "yes" (``BLIPvqa_eval/BLIP_vqa.py``);
the exact version multiplies per-phrase indicators (the phrase's colour-and-shape object is detected), so an
image scores 1 only when **every** phrase is right, and ``binding_score`` is the mean over images in [0, 1]
(T2I-CompBench's scale). Each phrase is also classified as ``correct`` | ``wrong_color`` (its object is absent
but its shape is there in another colour: the exact detector tells a blue circle from a red one) |
``missing`` (its shape is absent in every colour); an image is ``swapped`` when a phrase's object is absent
and its shape is there in the colour of another phrase of the prompt (the attribute went to the wrong
object). Rates over phrases: ``phrase_accuracy``, ``wrong_color_rate``, ``missing_rate`` (they sum to 1);
over images: ``swap_rate``.

**Objects** (the error taxonomy of multi-object prompts: correct / wrong shape / wrong colour / merged /
missing per asked object, per K) lives in :mod:`tokencompose.evaluation.shapes_errors`.

Scoring is pure given detections (``{"<uid>_<index>": [region, ...]}``, regions as ``detect_shapes`` returns
them); :func:`score_folder` detects a folder of generated images first, :func:`run_shapes_exact` (in
:mod:`tokencompose.evaluation.shapes_exact_run`) generates them with a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tokencompose.captions import article
from tokencompose.data.shapes_detect import split_category
from tokencompose.errors import UserError
from tokencompose.evaluation.generation import image_name
from tokencompose.evaluation.prompts import Prompt
from tokencompose.evaluation.scoring import image_key
from tokencompose.evaluation.visor import RELATIONS, centroid, relation_holds
from tokencompose.evaluation.visor import visor_text as spatial_text

TASKS = ("spatial", "attribute", "objects")  # objects: the error taxonomy (shapes_errors)
Box = Sequence[float]
Region = Mapping[str, Any]


def relation_of(prompt: Prompt) -> str:
    """The relation (a key of :data:`RELATIONS`) a spatial prompt's text names between its two categories."""
    if len(prompt.categories) != 2:
        raise UserError(f"spatial prompt {prompt.uid} names {len(prompt.categories)} categories, not 2")
    a, b = prompt.categories
    found = [r for r in RELATIONS if prompt.text == spatial_text(a, r, b)]
    if len(found) != 1:
        raise UserError(f"prompt {prompt.uid} ({prompt.text!r}) is not 'a {a} <relation> a {b}' with a VISOR relation")
    return found[0]


def spatial_prompts(num_prompts: int, seed: int = 0, categories: Sequence[str] | None = None) -> list[Prompt]:
    """``num_prompts`` VISOR-style prompts over shapes-world categories, seeded (numpy PCG64).

    Relations cycle through :data:`RELATIONS` (prompt ``uid`` gets ``uid % 4``), so they are balanced; the
    ordered pair (A, B) of distinct categories is drawn uniformly. ``Prompt.categories`` is ``(A, B)``.
    """
    from tokencompose.data.shapes import categories as shapes_categories

    cats = list(dict.fromkeys(categories or shapes_categories()))
    if len(cats) < 2:
        raise ValueError("spatial prompts need at least 2 categories")
    rng = np.random.default_rng(seed)
    prompts = []
    for uid in range(num_prompts):
        i, j = (int(k) for k in rng.choice(len(cats), size=2, replace=False))
        relation = RELATIONS[uid % len(RELATIONS)]
        prompts.append(Prompt(uid=uid, categories=(cats[i], cats[j]), text=spatial_text(cats[i], relation, cats[j])))
    return prompts


def attribute_prompts(num_prompts: int, seed: int = 0, categories: Sequence[str] | None = None) -> list[Prompt]:
    """``num_prompts`` colour-binding prompts, seeded: two objects of distinct colours **and** distinct shapes.

    ``"a red circle and a blue square"`` (T2I-CompBench's colour wording). Distinct shapes keep a binding
    error unambiguous (which object took which colour); distinct colours make a swap possible. The first
    category is drawn uniformly, the second uniformly among those differing in both colour and shape.
    """
    from tokencompose.data.shapes import categories as shapes_categories

    cats = list(dict.fromkeys(categories or shapes_categories()))
    parts = [split_category(c) for c in cats]
    rng = np.random.default_rng(seed)
    prompts = []
    for uid in range(num_prompts):
        i = int(rng.integers(len(cats)))
        others = [k for k, (c, s) in enumerate(parts) if c != parts[i][0] and s != parts[i][1]]
        if not others:
            raise ValueError("attribute prompts need categories of at least 2 colours and 2 shapes")
        j = others[int(rng.integers(len(others)))]
        a, b = cats[i], cats[j]
        prompts.append(Prompt(uid=uid, categories=(a, b), text=f"{article(a)} {a} and {article(b)} {b}"))
    return prompts


def task_prompts(task: str, num_prompts: int, seed: int = 0, categories: Sequence[str] | None = None) -> list[Prompt]:
    """The prompt set of one task (``spatial`` | ``attribute`` | ``objects``) over a shapes world's categories.

    ``categories``: the world's (e.g. ``world_categories("nouns")``); default every colour in every shape.
    """
    if task == "spatial":
        return spatial_prompts(num_prompts, seed, categories)
    if task == "attribute":
        return attribute_prompts(num_prompts, seed, categories)
    if task == "objects":
        from tokencompose.evaluation.shapes_errors import object_prompts

        return object_prompts(num_prompts, seed, categories=categories)
    raise UserError(f"unknown shapes task {task!r}: use {' or '.join(TASKS)}")


def _kept(regions: Sequence[Region], threshold: float) -> list[Region]:
    return [r for r in regions if float(r["score"]) > threshold]  # strictly above, as VISOR and MultiGen


def _image_regions(detections: Mapping[str, Sequence[Region]], prompts: Sequence[Prompt], n: int) -> list[list]:
    """Per prompt, its ``n`` images' regions; a missing image is an error (not a miss)."""
    missing = [image_key(p.uid, i) for p in prompts for i in range(n) if image_key(p.uid, i) not in detections]
    if missing:
        raise ValueError(f"{len(missing)} images have no detections, e.g. {missing[:3]}")
    return [[list(detections[image_key(p.uid, i)]) for i in range(n)] for p in prompts]


def spatial_verdict(regions: Sequence[Region], a: str, b: str, relation: str, threshold: float = 0.1) -> dict:
    """One image of ``"a {a} {relation} a {b}"``: ``{"found_a", "found_b", "relation"}`` (bools).

    ``relation`` is True only when both are found and some (A region, B region) pair satisfies
    :func:`relation_holds` (VISOR: "at least one of the bbox pairs should follow the relationship").
    """
    kept = _kept(regions, threshold)
    boxes_a = [r["box"] for r in kept if r["category"] == a]
    boxes_b = [r["box"] for r in kept if r["category"] == b]
    ok = relation_holds(relation, [centroid(x) for x in boxes_a], [centroid(x) for x in boxes_b])
    return {"found_a": bool(boxes_a), "found_b": bool(boxes_b), "relation": ok}


def _percent(num: float, den: float) -> float | None:
    return float(100.0 * num / den) if den else None


def score_spatial(
    detections: Mapping[str, Sequence[Region]],
    prompts: Sequence[Prompt],
    images_per_prompt: int,
    threshold: float = 0.1,
) -> dict[str, Any]:
    """VISOR scores (percent) of a spatial prompt set from per-image regions; see the module docstring."""
    n = images_per_prompt
    per = _image_regions(detections, prompts, n)
    verdicts = [[spatial_verdict(r, *p.categories, relation_of(p), threshold) for r in rows]
                for p, rows in zip(prompts, per, strict=True)]  # fmt: skip
    a = np.array([[v["found_a"] for v in row] for row in verdicts], dtype=bool).reshape(len(prompts), n)
    b = np.array([[v["found_b"] for v in row] for row in verdicts], dtype=bool).reshape(len(prompts), n)
    rel = np.array([[v["relation"] for v in row] for row in verdicts], dtype=bool).reshape(len(prompts), n)
    both = a & b
    per_prompt = rel.sum(axis=1)  # images with both objects and the relation right
    total = both.size

    def summary(rows: np.ndarray) -> dict[str, Any]:
        return {
            "images": int(both[rows].size),
            "object_accuracy": _percent(both[rows].sum(), both[rows].size),
            "visor_uncond": _percent(rel[rows].sum(), rel[rows].size),
            "visor_cond": _percent(rel[rows].sum(), both[rows].sum()),
        }

    rels = np.array([relation_of(p) for p in prompts])
    return {
        "num_prompts": len(prompts),
        "images_per_prompt": n,
        "threshold": threshold,
        "object_accuracy": _percent(both.sum(), total),
        "object_accuracy_a": _percent(a.sum(), total),
        "object_accuracy_b": _percent(b.sum(), total),
        "visor_uncond": _percent(rel.sum(), total),
        "visor_cond": _percent(rel.sum(), both.sum()),
        "visor_n": [_percent((per_prompt >= k).sum(), len(prompts)) for k in range(1, n + 1)],
        "per_relation": {r: summary(rels == r) for r in RELATIONS if (rels == r).any()},
    }


def attribute_verdict(regions: Sequence[Region], phrases: Sequence[str], threshold: float = 0.1) -> dict:
    """One image of a colour-binding prompt: ``{"phrases": [status per phrase], "swapped": bool}``.

    A phrase's status is ``correct`` (its colour-and-shape object is detected), ``wrong_color`` (absent, but
    its shape is there in another colour) or ``missing`` (its shape is in no colour). ``swapped``: some
    phrase's object is absent and its shape is there in another phrase's colour.
    """
    found = {split_category(r["category"]) for r in _kept(regions, threshold)}
    wanted = [split_category(p) for p in phrases]
    statuses, swapped = [], False
    for color, shape in wanted:
        if (color, shape) in found:
            statuses.append("correct")
            continue
        colors_there = {c for c, s in found if s == shape}
        statuses.append("wrong_color" if colors_there else "missing")
        swapped |= any(c in colors_there for c, _ in wanted if c != color)
    return {"phrases": statuses, "swapped": swapped}


def score_attribute(
    detections: Mapping[str, Sequence[Region]],
    prompts: Sequence[Prompt],
    images_per_prompt: int,
    threshold: float = 0.1,
) -> dict[str, Any]:
    """Exact colour-binding scores (fractions in [0, 1]) of a prompt set; see the module docstring."""
    per = _image_regions(detections, prompts, images_per_prompt)
    verdicts = [
        attribute_verdict(r, p.categories, threshold) for p, rows in zip(prompts, per, strict=True) for r in rows
    ]
    statuses = [s for v in verdicts for s in v["phrases"]]
    images, phrases = len(verdicts), len(statuses)

    def rate(status: str) -> float | None:
        return statuses.count(status) / phrases if phrases else None

    # T2I-CompBench: the product of the per-phrase answers, averaged over images.
    bound = [all(s == "correct" for s in v["phrases"]) for v in verdicts]

    return {
        "num_prompts": len(prompts),
        "images_per_prompt": images_per_prompt,
        "threshold": threshold,
        "binding_score": sum(bound) / images if images else None,
        "phrase_accuracy": rate("correct"),
        "wrong_color_rate": rate("wrong_color"),
        "missing_rate": rate("missing"),
        "swap_rate": sum(v["swapped"] for v in verdicts) / images if images else None,
    }


def detect_image(path: Path) -> list[dict]:
    """Exact-detector regions of one image: ``[{"category", "score", "box": [x0, y0, x1, y1], "area"}, ...]``.

    A missing or unreadable image is a :class:`UserError` naming it.
    """
    from PIL import Image

    from tokencompose.data.shapes import detect_shapes

    if not path.is_file():
        raise UserError(f"image {path} is missing: generate it first (run without --skip-generation)")
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(f"image {path} cannot be read ({err}): delete it and generate it again") from err
    _, regions = detect_shapes(rgb, return_regions=True)
    return [{**r, "box": [float(v) for v in r["box"]]} for r in regions]


def detect_images(folder: str | Path, prompts: Sequence[Prompt], images_per_prompt: int) -> dict[str, list[dict]]:
    """:func:`detect_image` of every ``<uid>_<index>.png`` of ``prompts`` in ``folder``, keyed ``"<uid>_<index>"``."""
    folder = Path(folder)
    return {image_key(p.uid, i): detect_image(folder / image_name(p.uid, i))
            for p in prompts for i in range(images_per_prompt)}  # fmt: skip


def score_detections(
    task: str, detections: Mapping[str, Sequence[Region]], prompts: Sequence[Prompt], n: int, threshold: float = 0.1
) -> dict[str, Any]:
    """:func:`score_spatial`, :func:`score_attribute` or the error taxonomy (``objects``), by ``task``."""
    if task == "spatial":
        return score_spatial(detections, prompts, n, threshold)
    if task == "attribute":
        return score_attribute(detections, prompts, n, threshold)
    if task == "objects":
        from tokencompose.evaluation.shapes_errors import score_objects

        return score_objects(detections, prompts, n, threshold)
    raise UserError(f"unknown shapes task {task!r}: use {' or '.join(TASKS)}")


def score_folder(
    folder: str | Path, prompts: Sequence[Prompt], images_per_prompt: int, task: str, threshold: float = 0.1
) -> dict[str, Any]:
    """Detect a folder of generated images (``<uid>_<index>.png``) and score it: no model needed."""
    return score_detections(task, detect_images(folder, prompts, images_per_prompt), prompts, images_per_prompt,
                            threshold)  # fmt: skip
