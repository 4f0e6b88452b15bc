"""VISOR (``evaluate visor``): SR2D prompts, the scoring rules on hand-built detections, the command end to end."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from tokencompose.errors import UserError
from tokencompose.evaluation.prompts import Prompt, categories
from tokencompose.evaluation.results import read_detections
from tokencompose.evaluation.visor import (
    RELATIONS,
    VisorPrompt,
    judge_image,
    load_visor_prompts,
    relation_holds,
    sample_visor_prompts,
    save_visor_prompts,
    score_visor,
    sr2d_prompts,
    visor_text,
)
from tokencompose.evaluation.visor_run import box_detections

# --- prompts ---------------------------------------------------------------------------------------------------


def test_sr2d_rebuilt_from_coco_matches_visor() -> None:
    prompts = sr2d_prompts(categories("coco"))
    assert len(prompts) == 80 * 79 // 2 * 8 == 25280  # SR2D's spatial rows
    by_uid = {v.prompt.uid: v for v in prompts}
    assert len(by_uid) == len(prompts)
    # The two rows VISOR's README shows (its ids index text_spatial_rel_phrases.json).
    assert by_uid[1103].prompt.text == "a kite to the right of a bicycle"
    assert by_uid[1103].prompt.categories == ("kite", "bicycle") and by_uid[1103].relation == "to the right of"
    assert by_uid[11036].prompt.text == "a cat below a bottle" and by_uid[11036].relation == "below"
    assert all(uid % 10 < 8 for uid in by_uid)  # rows 8 and 9 of each pair are VISOR's "and" prompts
    assert Counter(frozenset(v.prompt.categories) for v in prompts).most_common(1)[0][1] == 8
    assert Counter(v.relation for v in prompts) == {r: 25280 // 4 for r in RELATIONS}
    assert visor_text("apple", "above", "umbrella") == "an apple above an umbrella"


def test_sample_is_a_seeded_subset_with_sr2d_ids() -> None:
    cats = categories("coco")
    full = {v.prompt.uid: v for v in sr2d_prompts(cats)}
    a, b = sample_visor_prompts(cats, 50, seed=1), sample_visor_prompts(cats, 50, seed=1)
    assert a == b and len(a) == 50
    assert [v.prompt.uid for v in a] == sorted(v.prompt.uid for v in a)
    assert all(full[v.prompt.uid] == v for v in a)
    assert a != sample_visor_prompts(cats, 50, seed=2)
    with pytest.raises(UserError):
        sample_visor_prompts(["cat", "dog"], 9)  # 1 pair -> 8 prompts


def test_prompt_file_round_trip_keeps_only_spatial_rows(tmp_path: Path) -> None:
    spatial = sr2d_prompts(["cat", "dog", "cup"])
    path = tmp_path / "p.json"
    save_visor_prompts(spatial, path)
    rows = json.loads(path.read_text())
    rows.append({"unique_id": 90, "num_objects": 2, "obj_1_attributes": ["cat"], "obj_2_attributes": ["dog"],
                 "rel_type": "and", "text": "a cat and a dog"})  # fmt: skip
    rows.append({"unique_id": 91, "num_objects": 1, "obj_1_attributes": ["cat"], "obj_2_attributes": [None],
                 "rel_type": "single", "text": "a cat"})  # fmt: skip
    path.write_text(json.dumps(rows))
    assert load_visor_prompts(path) == spatial
    (tmp_path / "bad.json").write_text('[{"text": "x", "rel_type": "above"}]')
    with pytest.raises(UserError, match="not a VISOR prompt file"):
        load_visor_prompts(tmp_path / "bad.json")
    with pytest.raises(UserError, match="does not exist"):
        load_visor_prompts(tmp_path / "missing.json")


# --- scoring rules on hand-built detections ---------------------------------------------------------------------


def test_relation_is_strict_on_centroids_and_any_pair_counts() -> None:
    a, b = [(10.0, 50.0)], [(30.0, 20.0)]
    assert relation_holds("to the left of", a, b) and not relation_holds("to the right of", a, b)
    assert relation_holds("below", a, b) and not relation_holds("above", a, b)  # y grows downwards
    tie = [(10.0, 20.0)]
    assert not any(relation_holds(r, tie, tie) for r in RELATIONS)  # a tie is not a success
    # One A box left of one B box is enough, whatever the other boxes do.
    assert relation_holds("to the left of", [(90.0, 0.0), (5.0, 0.0)], [(50.0, 0.0)])
    assert not relation_holds("to the left of", [(90.0, 0.0), (60.0, 0.0)], [(50.0, 0.0)])


def _prompt(a: str = "cat", b: str = "dog", rel: str = "to the left of", uid: int = 0) -> VisorPrompt:
    return VisorPrompt(Prompt(uid, (a, b), visor_text(a, rel, b)), rel)


def test_judge_image_threshold_is_strict_and_ignores_other_classes() -> None:
    p = _prompt()
    det = {
        "classes": ["cat", "dog", "cat", "cup"],
        "scores": [0.5, 0.1, 0.3, 0.9],
        "boxes": [[0, 0, 10, 10], [50, 0, 60, 10], [70, 0, 80, 10], [90, 0, 99, 10]],
    }
    assert judge_image(det, p, 0.1) == (True, False, False)  # the dog box scores exactly 0.1: not above
    assert judge_image(det, p, 0.05) == (True, True, True)  # first cat (x=5) left of the dog (x=55)
    assert judge_image(det, _prompt(rel="to the right of"), 0.05) == (True, True, True)  # second cat (x=75)
    assert judge_image(det, _prompt(rel="to the right of"), 0.4) == (True, False, False)
    assert judge_image({"classes": [], "scores": [], "boxes": []}, p) == (False, False, False)


def _detection(found_a: bool, found_b: bool, correct: bool, rel: str, rng: np.random.Generator) -> dict:
    """Boxes that realise the given outcome for "cat REL dog", plus distractors that must not change it."""
    det: dict[str, list] = {"classes": [], "scores": [], "boxes": []}

    def add(cls: str, score: float, cx: float, cy: float) -> None:
        det["classes"].append(cls), det["scores"].append(score), det["boxes"].append([cx - 2, cy - 2, cx + 2, cy + 2])

    dx, dy = {"to the left of": (-20, 0), "to the right of": (20, 0), "above": (0, -20), "below": (0, 20)}[rel]
    sign = 1 if correct else -1  # the cat on the side the relation names, or on the opposite side
    add("cup", 0.95, 5, 5)  # not one of the prompt's objects
    if found_a:
        add("cat", float(rng.uniform(0.11, 1)), 50 + sign * dx, 50 + sign * dy)
    if found_b:
        add("dog", float(rng.uniform(0.11, 1)), 50, 50)
    add("cat", 0.05, 50 - sign * dx, 50 - sign * dy)  # below the threshold: must change nothing
    return det


def test_scores_match_counts_of_hand_built_outcomes() -> None:
    rng = np.random.default_rng(0)
    P, N = 12, 4
    prompts = [_prompt(rel=RELATIONS[i % 4], uid=i) for i in range(P)]
    fa, fb = rng.random((P, N)) < 0.7, rng.random((P, N)) < 0.6
    correct = fa & fb & (rng.random((P, N)) < 0.5)
    dets = {f"{i}_{j}": _detection(fa[i, j], fb[i, j], correct[i, j], prompts[i].relation, rng)
            for i in range(P) for j in range(N)}  # fmt: skip
    s = score_visor(dets, prompts, N, threshold=0.1, bootstrap=200)
    both = fa & fb
    assert s["object_accuracy"] == pytest.approx(100 * both.mean())
    assert s["object_accuracy_a"] == pytest.approx(100 * fa.mean())
    assert s["object_accuracy_b"] == pytest.approx(100 * fb.mean())
    assert s["visor_uncond"] == pytest.approx(100 * correct.mean())
    assert s["visor_cond"] == pytest.approx(100 * correct.sum() / both.sum())
    assert s["visor_uncond"] == pytest.approx(s["visor_cond"] * s["object_accuracy"] / 100)
    for n in range(1, N + 1):
        assert s[f"visor_{n}"] == pytest.approx(100 * (correct.sum(axis=1) >= n).mean())
    assert s["object_accuracy_std"] == pytest.approx(np.std(100 * both.mean(axis=0)))
    for key in ("object_accuracy", "visor_uncond", "visor_cond", "visor_1", "visor_4"):
        lo, hi = s["ci95"][key]
        assert lo <= s[key] + 1e-9 and s[key] - 1e-9 <= hi
    left = [i for i in range(P) if prompts[i].relation == "to the left of"]
    assert s["by_relation"]["to the left of"]["object_accuracy"] == pytest.approx(100 * both[left].mean())
    assert s["by_relation"]["to the left of"]["num_prompts"] == len(left)
    # No box above the threshold: nothing found, VISOR_cond undefined rather than a division by zero.
    none = score_visor(dets, prompts, N, threshold=1.0, bootstrap=0)
    assert none["object_accuracy"] == 0.0 and none["visor_cond"] is None and "ci95" not in none
    del dets["3_2"]
    with pytest.raises(KeyError, match="3_2"):
        score_visor(dets, prompts, N)


def test_box_detections_label_each_box_with_its_best_query() -> None:
    logits = torch.tensor([[2.0, -1.0], [-3.0, 0.5], [-5.0, -6.0]])
    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]])
    d = box_detections(logits, boxes, ["cat", "dog"], store_threshold=0.05)
    assert d["classes"] == ["cat", "dog"]  # sigmoid(-5) < 0.05: not stored
    assert d["scores"] == [
        round(float(torch.sigmoid(torch.tensor(2.0))), 6),
        round(float(torch.sigmoid(torch.tensor(0.5))), 6),
    ]
    assert d["boxes"][1] == [20.0, 0.0, 30.0, 10.0]


# --- the command, end to end on tiny random models --------------------------------------------------------------


def _main(argv: list[str]) -> int:
    from tokencompose.commands.eval_visor import add_parser, run

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="evaluation"))
    return run(parser.parse_args(["visor", *argv]))


@pytest.fixture(scope="module")
def visor_run(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokencompose.evaluation.tiny_detectors import save_tiny_owl

    root = tmp_path_factory.mktemp("visor")
    (root / "cats.txt").write_text("cat\ndog\ncup\n")
    owl = save_tiny_owl(root / "owlvit", version=1)
    argv = ["--model", str(model_dir), "--out", str(root / "out"), "--categories", str(root / "cats.txt")]
    argv += ["--num-prompts", "3", "--detector", str(owl), "--steps", "2", "--resolution", "64"]
    argv += ["--images-per-prompt", "2", "--device", "cpu", "--bootstrap", "50", "--name", "tiny"]
    assert _main(argv) == 0
    (root / "argv.json").write_text(json.dumps(argv))
    return root


def test_command_writes_images_boxes_and_scores(visor_run: Path) -> None:
    out = visor_run / "out"
    res = json.loads((out / "results.json").read_text())
    assert res["kind"] == "visor" and res["name"] == "tiny" and res["created"]
    assert res["detector"]["template"] == "a photo of a {category}" and res["detector"]["queries"] == "prompt"
    assert res["generation"]["images_per_prompt"] == 2 and res["prompts"]["num_prompts"] == 3
    s = res["scores"]
    assert {"object_accuracy", "visor_uncond", "visor_cond", "visor_1", "visor_2", "ci95"} <= set(s)
    assert len(list((out / "images").glob("*.png"))) == 6
    dets = read_detections(out)
    prompts = load_visor_prompts(out / "prompts.json")
    assert len(dets) == 6 and len(prompts) == 3
    # Every stored box is labelled with one of its prompt's two objects; scores recompute from the rows alone.
    by_uid = {v.prompt.uid: v for v in prompts}
    assert all(set(d["classes"]) <= set(by_uid[int(k.split("_")[0])].prompt.categories) for k, d in dets.items())
    both = [all(judge_image(d, by_uid[int(k.split("_")[0])], 0.1)[:2]) for k, d in dets.items()]
    assert s["object_accuracy"] == pytest.approx(100 * np.mean(both))
    assert json.loads((out / "detection.json").read_text())["protocol"] == "visor"


def test_rerun_reuses_everything_and_rescore_needs_no_model(visor_run: Path) -> None:
    out = visor_run / "out"
    lines = (out / "detections.jsonl").read_text().count("\n")
    assert _main(json.loads((visor_run / "argv.json").read_text())) == 0
    assert (out / "detections.jsonl").read_text().count("\n") == lines  # nothing detected twice
    res = out / "results.json"
    assert _main(["--out", str(out), "--rescore", str(res), "--threshold", "2", "--bootstrap", "0"]) == 0
    high = json.loads((out / "results_thr2.json").read_text())
    assert high["scores"]["object_accuracy"] == 0.0 and high["scores"]["visor_cond"] is None
    assert high["generation"] == json.loads(res.read_text())["generation"]
    assert _main(["--out", str(out), "--rescore", str(res), "--threshold", "0.1", "--bootstrap", "50"]) == 0
    same = json.loads((out / "results_thr0.1.json").read_text())
    assert same["scores"] == json.loads(res.read_text())["scores"]
    with pytest.raises(UserError, match="below the stored boxes"):
        _main(["--out", str(out), "--rescore", str(res), "--threshold", "0.01"])


def test_refusals_come_before_any_model(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="below the stored boxes"):
        _main(["--out", str(tmp_path), "--threshold", "0.01", "--skip-generation"])
    with pytest.raises(UserError, match="does not exist"):
        _main(["--out", str(tmp_path), "--prompts", str(tmp_path / "none.json"), "--skip-generation"])
    with pytest.raises(UserError, match="unknown category list"):
        _main(["--out", str(tmp_path), "--categories", "nope", "--skip-generation"])


def test_shards_add_up_to_the_single_run_and_other_settings_are_refused(visor_run: Path, tmp_path: Path) -> None:
    base = json.loads((visor_run / "argv.json").read_text())
    images = ["--images", str(visor_run / "out" / "images"), "--skip-generation"]
    sharded = [a if a != str(visor_run / "out") else str(tmp_path / "sharded") for a in base] + images
    assert _main(sharded + ["--shard", "1", "--num-shards", "2"]) == 0  # detects only its share, scores nothing
    assert not (tmp_path / "sharded" / "results.json").exists()
    assert _main(sharded + ["--shard", "0", "--num-shards", "2"]) == 0
    assert len(list((tmp_path / "sharded").glob("detections-*.jsonl"))) == 2
    one = json.loads((visor_run / "out" / "results.json").read_text())["scores"]
    assert json.loads((tmp_path / "sharded" / "results.json").read_text())["scores"] == one
    with pytest.raises(UserError, match="other settings"):
        _main(base + images + ["--query-template", "an image of a {category}"])
