"""The shapes world's error taxonomy: what each asked object of a multi-object prompt became in the image."""

from __future__ import annotations

import pytest
from PIL import Image

from tokencompose.data.shapes import ShapeObject, render_scene
from tokencompose.evaluation.generation import image_name
from tokencompose.evaluation.prompts import Prompt
from tokencompose.evaluation.shapes_errors import OUTCOMES, object_outcomes, object_prompts, score_objects
from tokencompose.evaluation.shapes_exact import score_folder, split_category


def _region(category: str, score: float = 0.9) -> dict:
    return {"category": category, "score": score, "box": [0.0, 0.0, 8.0, 8.0], "area": 40}


def _outcomes(asked: list[str], drawn: list[str], **kw) -> list[str]:
    return object_outcomes(asked, [_region(c) for c in drawn], **kw)["objects"]


# ---------------------------------------------------------------- the rule on hand-built regions


def test_each_outcome_on_hand_built_regions():
    assert _outcomes(["red circle", "blue square"], ["red circle", "blue square"]) == ["correct", "correct"]
    assert _outcomes(["red circle", "blue square"], ["red circle"]) == ["correct", "missing"]
    assert _outcomes(["red circle", "blue square"], ["red triangle", "blue square"]) == ["wrong_shape", "correct"]
    assert _outcomes(["red circle", "blue square"], ["green circle", "blue square"]) == ["wrong_colour", "correct"]
    # One blob with the colour of one object and the shape of the other: the first keeps it, the second fused.
    assert _outcomes(["red circle", "blue square"], ["red square"]) == ["wrong_shape", "merged"]
    assert _outcomes(["red circle", "blue square"], []) == ["missing", "missing"]


def test_a_region_explains_one_object_only_and_leftovers_are_extra():
    # Both asked circles could read the one green circle by shape; the first takes it, the second is fused in it.
    assert _outcomes(["red circle", "blue circle"], ["green circle"]) == ["wrong_colour", "merged"]
    asked = ["red circle", "blue square", "green cross"]
    out = object_outcomes(asked, [_region(c) for c in ("red triangle", "yellow cross", "purple circle", "cyan square")])
    assert out["objects"] == ["wrong_shape", "wrong_colour", "wrong_colour"]
    assert out["extra"] == 1  # the purple circle explains no asked object


def test_a_wrong_shape_borrowed_from_another_asked_object_is_leaked():
    asked = ["red circle", "blue square", "green cross"]
    leak = object_outcomes(asked, [_region(c) for c in ("red square", "blue square", "green cross")])
    assert leak["objects"] == ["wrong_shape", "correct", "correct"] and leak["leaked_shapes"] == 1
    own = object_outcomes(asked, [_region(c) for c in ("red triangle", "blue square", "green cross")])
    assert own["objects"][0] == "wrong_shape" and own["leaked_shapes"] == 0  # a shape nobody asked for
    assert object_outcomes(asked, [_region("red circle")])["leaked_shapes"] == 0


def test_regions_at_or_below_the_threshold_do_not_count():
    regions = [_region("red circle", 0.1), _region("blue square", 0.11)]
    assert object_outcomes(["red circle", "blue square"], regions, threshold=0.1)["objects"] == ["missing", "correct"]


def test_prompts_cycle_k_and_use_distinct_colours_and_shapes():
    prompts = object_prompts(40, seed=3)
    assert [len(p.categories) for p in prompts[:8]] == [1, 2, 3, 4, 1, 2, 3, 4]
    for p in prompts:
        colors, shapes = zip(*(split_category(c) for c in p.categories), strict=True)
        assert len(set(colors)) == len(colors) and len(set(shapes)) == len(shapes)
        assert p.text.startswith("a photo of ") and all(c in p.text for c in p.categories)
    assert object_prompts(40, seed=3) == prompts and object_prompts(40, seed=4) != prompts
    with pytest.raises(ValueError):
        object_prompts(4, max_objects=5)  # only 4 shapes


def test_prompts_of_the_nouns_world_name_only_its_categories():
    from tokencompose.data.shapes import world_categories

    nouns = world_categories("nouns")
    prompts = object_prompts(40, seed=3, categories=nouns)
    assert [len(p.categories) for p in prompts[:4]] == [1, 2, 3, 4]
    for p in prompts:
        assert set(p.categories) <= set(nouns)
        shapes = [split_category(c)[1] for c in p.categories]
        assert len(set(shapes)) == len(shapes)  # each region stays attributable by shape too
    # Naming the default world gives the default prompts (one draw rule for both).
    assert object_prompts(12, seed=3, categories=world_categories("attributes")) == object_prompts(12, seed=3)


# ---------------------------------------------------------------- rendered scenes read back by the exact detector


def _obj(category: str, cx: float, cy: float, size: float = 18.0) -> ShapeObject:
    color, shape = category.split(" ")
    return ShapeObject(color, shape, cx, cy, size)


def test_taxonomy_of_rendered_scenes(tmp_path):
    one = Prompt(0, ("red circle",), "a photo of a red circle.")
    two = Prompt(1, ("red circle", "blue square"), "a photo of a red circle and a blue square.")
    scenes = {
        (0, 0): [_obj("red circle", 32, 32)],  # right
        (0, 1): [_obj("blue circle", 32, 32)],  # wrong colour
        (1, 0): [_obj("red circle", 16, 32), _obj("blue square", 48, 32)],  # right
        (1, 1): [_obj("red square", 32, 32, 24)],  # one blob: red (the circle's colour), square (the square's shape)
    }
    for (uid, i), objects in scenes.items():
        image, _, _ = render_scene(objects, size=64)
        Image.fromarray(image).save(tmp_path / image_name(uid, i))
    s = score_folder(tmp_path, [one, two], 2, "objects")
    assert s["single_object_accuracy"] == 50.0
    assert s["by_k"]["1"]["rates"] == {"correct": 0.5, "wrong_shape": 0.0, "wrong_colour": 0.5, "merged": 0.0,
                                       "missing": 0.0}  # fmt: skip
    k2 = s["by_k"]["2"]
    assert k2["all_correct"] == 50.0 and k2["objects"] == 4
    assert k2["rates"]["correct"] == 0.5 and k2["rates"]["wrong_shape"] == 0.25 and k2["rates"]["merged"] == 0.25
    assert k2["failure_shares"]["merged"] == 0.5 and k2["dominant_failure"] == "wrong_shape"  # ties: list order
    assert s["multi"] == k2 and sum(k2["rates"].values()) == pytest.approx(1.0)
    assert set(k2["rates"]) == set(OUTCOMES)


def test_images_without_detections_are_an_error():
    with pytest.raises(ValueError, match="no detections"):
        score_objects({}, [Prompt(0, ("red circle",), "a photo of a red circle.")], 1)
