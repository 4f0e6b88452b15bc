"""Exact shapes-world VISOR and colour-binding scores: rendered scenes with known answers, prompts, a model run."""

from __future__ import annotations

import argparse
import json

import pytest
from PIL import Image

from tokencompose.data.shapes import ShapeObject, detect_shapes, render_scene
from tokencompose.errors import UserError
from tokencompose.evaluation.generation import image_name
from tokencompose.evaluation.prompts import Prompt
from tokencompose.evaluation.shapes_exact import (
    attribute_prompts,
    attribute_verdict,
    relation_of,
    score_attribute,
    score_folder,
    score_spatial,
    spatial_prompts,
    spatial_text,
    task_prompts,
)
from tokencompose.evaluation.visor import RELATIONS, centroid, relation_holds

LEFT, RIGHT, TOP, BOTTOM, MID = 16.0, 48.0, 16.0, 48.0, 32.0


def _obj(category: str, cx: float, cy: float, size: float = 18.0) -> ShapeObject:
    color, shape = category.split(" ")
    return ShapeObject(color, shape, cx, cy, size)


def _write(folder, uid: int, index: int, objects: list[ShapeObject]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    image, _, _ = render_scene(objects, size=64)
    Image.fromarray(image).save(folder / image_name(uid, index))


def _spatial(uid: int, a: str, relation: str, b: str) -> Prompt:
    return Prompt(uid=uid, categories=(a, b), text=spatial_text(a, relation, b))


def _attribute(uid: int, a: str, b: str) -> Prompt:
    return Prompt(uid=uid, categories=(a, b), text=f"a {a} and a {b}")


# ---------------------------------------------------------------- the relation rule


@pytest.mark.parametrize(
    ("relation", "a_center", "b_center", "expected"),
    [
        ("to the left of", (10, 30), (40, 30), True),
        ("to the left of", (40, 30), (10, 30), False),
        ("to the right of", (40, 30), (10, 30), True),
        ("to the right of", (10, 30), (40, 30), False),
        ("above", (30, 10), (30, 40), True),  # image y grows downwards
        ("above", (30, 40), (30, 10), False),
        ("below", (30, 40), (30, 10), True),
        ("below", (30, 10), (30, 40), False),
        ("to the left of", (30, 10), (30, 40), False),  # equal x: no left/right relation (strict)
        ("above", (10, 30), (40, 30), False),  # equal y: neither above nor below
    ],
)
def test_relation_holds_compares_box_centroids(relation, a_center, b_center, expected):
    def box(c, half):  # boxes of different sizes around the centre: only centroids matter
        return (c[0] - half, c[1] - half, c[0] + half, c[1] + half)

    assert relation_holds(relation, [centroid(box(a_center, 3))], [centroid(box(b_center, 9))]) is expected


def test_relation_holds_uses_the_centre_not_an_edge():
    wide = (0, 0, 60, 10)  # centre x 30, left edge 0
    small = (20, 0, 24, 10)  # centre x 22
    left = "to the left of"
    assert relation_holds(left, [centroid(small)], [centroid(wide)])
    assert not relation_holds(left, [centroid(wide)], [centroid(small)])


def test_unknown_relation_is_refused():
    with pytest.raises(ValueError, match="unknown relation"):
        relation_holds("behind", [(0.5, 0.5)], [(2.5, 2.5)])


# ---------------------------------------------------------------- rendered scenes, known answers


def test_spatial_scores_of_rendered_scenes(tmp_path):
    p0 = _spatial(0, "red circle", "to the left of", "blue square")
    p1 = _spatial(1, "green triangle", "above", "yellow cross")
    p2 = _spatial(2, "purple square", "below", "cyan circle")
    scenes = {
        (0, 0): [_obj("red circle", LEFT, MID), _obj("blue square", RIGHT, MID)],  # right
        (0, 1): [_obj("red circle", RIGHT, MID), _obj("blue square", LEFT, MID)],  # mirrored: wrong relation
        (1, 0): [_obj("green triangle", MID, TOP), _obj("yellow cross", MID, BOTTOM)],  # right
        (1, 1): [_obj("green triangle", MID, TOP)],  # the cross is missing
        (2, 0): [_obj("cyan circle", LEFT, TOP), _obj("purple square", RIGHT, BOTTOM)],  # right (diagonal)
        (2, 1): [_obj("red circle", LEFT, TOP), _obj("blue square", RIGHT, BOTTOM)],  # neither named object
    }
    for (uid, i), objects in scenes.items():
        _write(tmp_path, uid, i, objects)
    s = score_folder(tmp_path, [p0, p1, p2], 2, "spatial")
    # both found in 4 of 6 images, relation right in 3 of them; A found in 5, B in 4
    assert s["object_accuracy"] == pytest.approx(100 * 4 / 6)
    assert s["object_accuracy_a"] == pytest.approx(100 * 5 / 6)
    assert s["object_accuracy_b"] == pytest.approx(100 * 4 / 6)
    assert s["visor_uncond"] == pytest.approx(100 * 3 / 6)
    assert s["visor_cond"] == pytest.approx(100 * 3 / 4)
    assert s["visor_n"] == pytest.approx([100.0, 0.0])  # every prompt has exactly one right image
    assert s["per_relation"]["to the left of"] == {"images": 2, "object_accuracy": 100.0, "visor_uncond": 50.0,
                                                   "visor_cond": 50.0}  # fmt: skip
    assert s["per_relation"]["above"]["object_accuracy"] == 50.0 and s["per_relation"]["above"]["visor_cond"] == 100.0
    assert "to the right of" not in s["per_relation"]


def test_object_accuracy_of_a_and_b_count_separately(tmp_path):
    p = _spatial(0, "red circle", "to the right of", "blue square")
    _write(tmp_path, 0, 0, [_obj("red circle", LEFT, MID)])  # only A
    _write(tmp_path, 0, 1, [_obj("blue square", LEFT, MID)])  # only B
    _write(tmp_path, 0, 2, [_obj("red square", LEFT, MID), _obj("blue circle", RIGHT, MID)])  # colours swapped
    s = score_folder(tmp_path, [p], 3, "spatial")
    assert s["object_accuracy_a"] == pytest.approx(100 / 3) and s["object_accuracy_b"] == pytest.approx(100 / 3)
    assert s["object_accuracy"] == 0.0 and s["visor_uncond"] == 0.0
    assert s["visor_cond"] is None  # undefined without an image holding both
    assert s["visor_n"] == [0.0, 0.0, 0.0]


def test_attribute_scores_of_rendered_scenes(tmp_path):
    p = _attribute(0, "red circle", "blue square")
    scenes = [
        [_obj("red circle", LEFT, MID), _obj("blue square", RIGHT, MID)],  # bound right
        [_obj("blue circle", LEFT, MID), _obj("red square", RIGHT, MID)],  # colours swapped
        [_obj("red circle", LEFT, MID)],  # the square is missing
        [_obj("red circle", LEFT, MID), _obj("green square", RIGHT, MID)],  # wrong colour, not the other phrase's
    ]
    for i, objects in enumerate(scenes):
        _write(tmp_path, 0, i, objects)
    s = score_folder(tmp_path, [p], 4, "attribute")
    assert s["binding_score"] == pytest.approx(1 / 4)
    assert s["phrase_accuracy"] == pytest.approx(4 / 8)  # 2 + 0 + 1 + 1 of 8 phrases
    assert s["wrong_color_rate"] == pytest.approx(3 / 8)
    assert s["missing_rate"] == pytest.approx(1 / 8)
    assert s["swap_rate"] == pytest.approx(1 / 4)
    assert s["phrase_accuracy"] + s["wrong_color_rate"] + s["missing_rate"] == pytest.approx(1.0)


def test_attribute_verdict_per_scene():
    image, _, _ = render_scene([_obj("blue circle", LEFT, MID), _obj("red square", RIGHT, MID)], size=64)
    _, regions = detect_shapes(image, return_regions=True)
    assert attribute_verdict(regions, ["red circle", "blue square"]) == {
        "phrases": ["wrong_color", "wrong_color"],
        "swapped": True,
    }
    assert attribute_verdict(regions, ["blue circle", "red square"]) == {"phrases": ["correct"] * 2, "swapped": False}
    assert attribute_verdict(regions, ["green triangle", "red square"])["phrases"] == ["missing", "correct"]


# ---------------------------------------------------------------- pure scoring from detections


def _region(category: str, box: tuple[float, float, float, float], score: float = 0.9) -> dict:
    return {"category": category, "score": score, "box": list(box), "area": 10}


def test_spatial_any_pair_rule_and_threshold():
    p = _spatial(0, "red circle", "to the left of", "blue square")
    dets = {
        # two red circles, one of them left of the square: VISOR counts the image as right
        "0_0": [
            _region("red circle", (40, 0, 50, 10)),
            _region("red circle", (0, 0, 10, 10)),
            _region("blue square", (20, 0, 30, 10)),
        ],  # fmt: skip
        # the only correct A region scores below the threshold: it does not count
        "0_1": [_region("red circle", (0, 0, 10, 10), score=0.05), _region("blue square", (20, 0, 30, 10))],
    }
    s = score_spatial(dets, [p], 2, threshold=0.1)
    assert s["visor_uncond"] == 50.0 and s["object_accuracy"] == 50.0 and s["visor_cond"] == 100.0
    assert score_spatial(dets, [p], 2, threshold=0.01)["visor_uncond"] == 100.0


def test_scoring_refuses_missing_images():
    p = _attribute(0, "red circle", "blue square")
    with pytest.raises(ValueError, match="no detections"):
        score_attribute({"0_0": []}, [p], 2)
    with pytest.raises(UserError, match="missing"):
        score_folder("/nonexistent-folder", [p], 1, "attribute")


# ---------------------------------------------------------------- prompt sets


def test_spatial_prompts_are_seeded_balanced_and_parse_back():
    prompts = spatial_prompts(40, seed=3)
    assert prompts == spatial_prompts(40, seed=3)
    assert prompts != spatial_prompts(40, seed=4)
    assert [p.uid for p in prompts] == list(range(40))
    relations = [relation_of(p) for p in prompts]
    assert all(relations.count(r) == 10 for r in RELATIONS)
    for p in prompts:
        a, b = p.categories
        assert a != b and p.text.startswith(f"a {a} ") and p.text.endswith(f" a {b}")
    with pytest.raises(UserError):
        relation_of(Prompt(uid=0, categories=("red circle", "blue square"), text="a red circle near a blue square"))


def test_attribute_prompts_differ_in_colour_and_shape():
    prompts = attribute_prompts(50, seed=1)
    assert prompts == attribute_prompts(50, seed=1)
    for p in prompts:
        (ca, sa), (cb, sb) = (c.split(" ") for c in p.categories)
        assert ca != cb and sa != sb
        assert p.text == f"a {p.categories[0]} and a {p.categories[1]}"
    assert len({p.categories for p in prompts}) > 40  # drawn, not one pair repeated


# ---------------------------------------------------------------- end to end with a model, and the CLI


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """The shipped shapes base if this checkout has it, else a tiny random model in diffusers layout."""
    from tokencompose.shipped import shipped_base

    base = shipped_base()
    if base is not None:
        return base
    from tokencompose.models import tiny_components

    path = tmp_path_factory.mktemp("tiny_base")
    tiny_components(seed=0).save(path)
    return path


@pytest.fixture(scope="module")
def finished_run(base_model, tmp_path_factory):
    from tokencompose.evaluation.shapes_exact_run import ShapesExactSettings, run_shapes_exact
    from tokencompose.loading import ModelSettings
    from tokencompose.typed_data import load_settings

    out = tmp_path_factory.mktemp("shapes_exact") / "run"
    settings = load_settings(
        ShapesExactSettings,
        {"out": str(out), "num_prompts": 2, "model": {"model": str(base_model), "device": "cpu"},
         "generation": {"steps": 2, "images_per_prompt": 2, "resolution": 64}, "run": {"batch_size": 4}},
    )  # fmt: skip
    assert isinstance(settings.model, ModelSettings) and settings.generation.guidance_scale == 5.0
    return out, settings, run_shapes_exact(settings)


def test_run_writes_results_with_provenance(finished_run):
    out, settings, result = finished_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["kind"] == "shapes_exact" and on_disk["scores"] == result["scores"]
    assert set(on_disk["scores"]) == {"spatial", "attribute"}
    sp, at = on_disk["scores"]["spatial"], on_disk["scores"]["attribute"]
    assert sp["num_prompts"] == 2 and sp["images_per_prompt"] == 2 and len(sp["visor_n"]) == 2
    assert 0.0 <= sp["object_accuracy"] <= 100.0 and 0.0 <= at["binding_score"] <= 1.0
    assert on_disk["model"]["base"] == settings.model.model and on_disk["detector"]["id"] == "shapes"
    for task in ("spatial", "attribute"):
        assert len(list((out / task).glob("*_*.png"))) == 4
        assert on_disk["generation"][task]["steps"] == 2
        assert on_disk["prompts"][task]["saved"] == f"{task}/prompts.json"
        assert (out / task / "prompts.json").is_file() and (out / task / "detections.json").is_file()
    assert (out / "settings.json").is_file()


def test_scores_are_those_of_the_images(finished_run):
    from tokencompose.evaluation.prompts import load_prompts

    out, _, result = finished_run
    for task in ("spatial", "attribute"):
        prompts = load_prompts(out / task / "prompts.json")
        assert score_folder(out / task, prompts, 2, task) == result["scores"][task]


def test_rerun_resumes_and_cli_scores_without_a_model(finished_run, capsys):
    from tokencompose.commands import eval_shapes
    from tokencompose.evaluation.shapes_exact_run import run_shapes_exact

    out, settings, result = finished_run
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/*.png")}
    again = run_shapes_exact(settings)
    assert again["scores"] == result["scores"]
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*.png")} == stamps  # nothing regenerated

    parser = argparse.ArgumentParser()
    eval_shapes.add_parser(parser.add_subparsers(dest="evaluation"))
    args = parser.parse_args(["shapes", "--out", str(out), "--skip-generation", "--num-prompts", "2",
                              "--images-per-prompt", "2", "--tasks", "attribute"])  # fmt: skip
    assert eval_shapes.run(args) == 0
    assert "attribute binding" in capsys.readouterr().out
    scored = json.loads((out / "results.json").read_text())
    assert scored["scores"] == {"attribute": result["scores"]["attribute"]} and scored["model"] is None


def test_the_world_setting_picks_the_prompts_categories():
    from tokencompose.data.shapes import world_categories

    nouns = world_categories("nouns")
    for task in ("spatial", "objects"):
        prompts = task_prompts(task, 12, 0, nouns)
        assert all(set(p.categories) <= set(nouns) for p in prompts)
        assert task_prompts(task, 12, 0, world_categories("attributes")) == task_prompts(task, 12, 0)


def test_bad_settings_are_user_errors(tmp_path):
    from tokencompose.evaluation.shapes_exact_run import ShapesExactSettings, run_shapes_exact

    for bad in ({"tasks": ["colour"]}, {"num_prompts": 0}, {"threshold": 1.5}, {"world": "animals"}):
        with pytest.raises(UserError):
            run_shapes_exact(ShapesExactSettings(out=str(tmp_path / "x"), **bad))
    with pytest.raises(UserError, match="missing"):
        run_shapes_exact(ShapesExactSettings(out=str(tmp_path / "empty"), skip_generation=True, num_prompts=1))


def test_manual_shards_score_once_every_image_is_there(base_model, tmp_path):
    from tokencompose.evaluation.shapes_exact_run import ShapesExactSettings, run_shapes_exact
    from tokencompose.typed_data import load_settings

    def settings(**kw):
        data = {
            "out": str(tmp_path / "run"),
            "num_prompts": 1,
            "tasks": ["attribute"],
            "model": {"model": str(base_model), "device": "cpu"},
            "generation": {"steps": 2, "images_per_prompt": 2},
        }
        return load_settings(ShapesExactSettings, {**data, **kw})

    assert run_shapes_exact(settings(run={"shard": 0, "num_shards": 2})) == {}  # image 1 is shard 1's
    assert sorted(p.name for p in (tmp_path / "run" / "attribute").glob("*.png")) == ["0_0.png"]
    assert run_shapes_exact(settings(run={"shard": 1, "num_shards": 2})) == {}  # not process 0: never scores
    result = run_shapes_exact(settings(skip_generation=True))
    assert result["scores"]["attribute"]["num_prompts"] == 1 and result["scores"]["attribute"]["images_per_prompt"] == 2


def test_launched_processes_detect_their_shards_and_score_like_one(finished_run, tmp_path, monkeypatch):
    """Two launched processes (played in turn) detect every other image; process 0's scores equal one's."""
    import dataclasses
    import shutil

    from tokencompose.evaluation.shapes_exact_run import run_shapes_exact
    from train_util import play_launch

    out, settings, result = finished_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    again = dataclasses.replace(settings, out=str(copy), skip_generation=True)
    results = play_launch(monkeypatch, 2, lambda: run_shapes_exact(again))
    assert results[1] == {} and results[0]["scores"] == result["scores"]
    for task in ("spatial", "attribute"):
        assert json.loads((copy / task / "detections.json").read_text()) == json.loads(
            (out / task / "detections.json").read_text()
        )
