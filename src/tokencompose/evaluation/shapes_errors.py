"""What went wrong with each object of a multi-object prompt on the shapes world: the error taxonomy.

MultiGen counts how many of a prompt's objects an image shows; it does not say what the model drew instead.
SD 1.4's characteristic failure, the one TokenCompose targets, is objects left out or fused into one
(Rassin et al. 2023, "Linguistic Binding in Diffusion Models"; Chefer et al. 2023, "Attend-and-Excite":
"catastrophic neglect"), not objects drawn with the wrong attributes. Whether a shapes-world base fails the
same way decides whether the demo's experiment can answer the paper's question (issue #20), so the exact
detector's regions are read back per asked object.

**Prompts** (task ``objects``): K distinct categories of a world with distinct colours **and** distinct shapes,
so every region can only belong to one asked object by colour and to one by shape; K cycles through
``1..max_objects`` (prompt ``uid`` gets ``K = 1 + uid % max_objects``, at most 4: there are 4 shapes), the
categories drawn uniformly (numpy PCG64, seeded), MultiGen's caption ``"a photo of a A, a B, and a C."``. In the
``nouns`` world (one shape per colour) "wrong shape" is a drawing error, not a binding one.

**Outcome of each asked object** (regions scoring strictly above the threshold; each region explains at
most one asked object; objects taken in prompt order within each pass, passes in this order):

1. ``correct``: a region of its colour and its shape;
2. ``wrong_shape``: an unexplained region of its colour (in another shape);
3. ``wrong_colour``: an unexplained region of its shape (in another colour);
4. ``merged``: no region of its own, but a region that explains another asked object carries its colour or
   its shape (two objects drawn as one blob with attributes of both);
5. ``missing``: none of these: neither its colour nor its shape is anywhere in the image.

Regions left unexplained are ``extra`` objects (drawn but not asked for). A wrong shape that is another asked
object's shape is counted as *leaked* (``wrong_shape_leaked``: their share of the wrong shapes): the shape word of
one phrase drawn in the colour of another, attribute leakage rather than a badly drawn object. Per K: the percent
of images with every object correct (the exact version of MG_K), each outcome's share of the asked objects (they
sum to 1), each failure's share of the failures, and the dominant failure. K = 1's accuracy is the "single-object
prompts right" figure of the base's model card.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tokencompose.evaluation.prompts import Prompt
from tokencompose.evaluation.shapes_exact import split_category

OUTCOMES = ("correct", "wrong_shape", "wrong_colour", "merged", "missing")
FAILURES = OUTCOMES[1:]
Region = Mapping[str, Any]


def object_prompts(
    num_prompts: int, seed: int = 0, max_objects: int = 4, categories: Sequence[str] | None = None
) -> list[Prompt]:
    """``num_prompts`` prompts of K = ``1 + uid % max_objects`` objects of distinct colours and shapes, seeded.

    ``categories``: the world's (default every colour in every shape). K colours and K shapes are drawn without
    replacement and paired in order; a draw whose pairs are not all categories of the world is drawn again (in
    the default world every draw is one, so its prompts do not depend on this rule).
    """
    from tokencompose.data.shapes import categories as all_categories
    from tokencompose.data.shapes import multigen_caption

    cats = list(dict.fromkeys(categories or all_categories()))
    parts = [split_category(c) for c in cats]
    colors, shapes = list(dict.fromkeys(c for c, _ in parts)), list(dict.fromkeys(s for _, s in parts))
    if not 1 <= max_objects <= min(len(colors), len(shapes)):
        raise ValueError(f"max_objects must be in 1..{min(len(colors), len(shapes))}, got {max_objects}")
    rng = np.random.default_rng(seed)
    prompts = []
    for uid in range(num_prompts):
        k = 1 + uid % max_objects
        for _ in range(10_000):
            cs = rng.choice(len(colors), size=k, replace=False)
            ss = rng.choice(len(shapes), size=k, replace=False)
            drawn = tuple(f"{colors[int(c)]} {shapes[int(s)]}" for c, s in zip(cs, ss, strict=True))
            if all(c in cats for c in drawn):
                break
        else:
            raise ValueError(f"the categories hold no {k} objects of distinct colours and shapes")
        prompts.append(Prompt(uid=uid, categories=drawn, text=multigen_caption(drawn)))
    return prompts


def object_outcomes(asked: Sequence[str], regions: Sequence[Region], threshold: float = 0.1) -> dict[str, Any]:
    """One image: ``{"objects": [outcome per asked category], "extra": unexplained regions}`` (rules above)."""
    kept = [split_category(r["category"]) for r in regions if float(r["score"]) > threshold]
    wanted = [split_category(c) for c in asked]
    owner: list[int | None] = [None] * len(kept)  # which asked object each region explains
    outcome: list[str | None] = [None] * len(wanted)

    def claim(label: str, fits: Any) -> None:
        for j, obj in enumerate(wanted):
            if outcome[j] is not None:
                continue
            free = [i for i, reg in enumerate(kept) if owner[i] is None and fits(obj, reg)]
            if free:
                owner[free[0]], outcome[j] = j, label

    claim("correct", lambda o, r: o == r)
    claim("wrong_shape", lambda o, r: o[0] == r[0])
    claim("wrong_colour", lambda o, r: o[1] == r[1])
    for j, (color, shape) in enumerate(wanted):
        if outcome[j] is None:
            fused = any(
                k is not None and (reg[0] == color or reg[1] == shape) for reg, k in zip(kept, owner, strict=True)
            )
            outcome[j] = "merged" if fused else "missing"
    # A wrong shape that is another asked object's shape: attribute leakage between the prompt's phrases.
    leaked = sum(
        outcome[k] == "wrong_shape" and any(reg[1] == o[1] for i, o in enumerate(wanted) if i != k)
        for reg, k in zip(kept, owner, strict=True)
        if k is not None
    )
    return {"objects": outcome, "extra": sum(k is None for k in owner), "leaked_shapes": leaked}


def score_objects(
    detections: Mapping[str, Sequence[Region]], prompts: Sequence[Prompt], images_per_prompt: int,
    threshold: float = 0.1,
) -> dict[str, Any]:  # fmt: skip
    """The taxonomy of a prompt set, per K (``by_k["<K>"]``) and over all multi-object prompts (``multi``)."""
    from tokencompose.evaluation.scoring import image_key

    missing = [image_key(p.uid, i) for p in prompts for i in range(images_per_prompt)
               if image_key(p.uid, i) not in detections]  # fmt: skip
    if missing:
        raise ValueError(f"{len(missing)} images have no detections, e.g. {missing[:3]}")
    verdicts: dict[int, list[dict[str, Any]]] = {}
    for p in prompts:
        for i in range(images_per_prompt):
            verdicts.setdefault(len(p.categories), []).append(
                object_outcomes(p.categories, detections[image_key(p.uid, i)], threshold)
            )
    by_k = {str(k): _summary(v) for k, v in sorted(verdicts.items())}
    multi = [v for k, vs in verdicts.items() if k > 1 for v in vs]
    single = by_k.get("1")
    return {
        "num_prompts": len(prompts),
        "images_per_prompt": images_per_prompt,
        "threshold": threshold,
        "single_object_accuracy": single["all_correct"] if single else None,
        "by_k": by_k,
        "multi": _summary(multi) if multi else None,
    }


def _summary(verdicts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Percent of images all correct, outcome rates over objects, failure shares, dominant failure, extras."""
    outcomes = [o for v in verdicts for o in v["objects"]]
    failures = [o for o in outcomes if o != "correct"]
    shares = {f: failures.count(f) / len(failures) for f in FAILURES} if failures else None
    return {
        "images": len(verdicts),
        "objects": len(outcomes),
        "all_correct": 100.0 * sum(all(o == "correct" for o in v["objects"]) for v in verdicts) / len(verdicts),
        "rates": {o: outcomes.count(o) / len(outcomes) for o in OUTCOMES},
        "failure_shares": shares,
        "dominant_failure": max(FAILURES, key=lambda f: (shares[f], -FAILURES.index(f))) if shares else None,
        "extra_per_image": sum(v["extra"] for v in verdicts) / len(verdicts),
        "wrong_shape_leaked": sum(v["leaked_shapes"] for v in verdicts) / wrong
        if (wrong := outcomes.count("wrong_shape"))
        else None,
    }
