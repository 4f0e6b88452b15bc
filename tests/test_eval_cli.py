"""`tokencompose evaluate multigen|grounding`, `compare`, `generate` end to end on tiny models (CPU, offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokencompose.cli import main
from tokencompose.evaluation.results import read_detections

GEN = ["--steps", "2", "--resolution", "64", "--images-per-prompt", "2", "--device", "cpu", "--batch-size", "4"]


@pytest.fixture(scope="module")
def multigen_run(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mg")
    argv = ["evaluate", "multigen", "--model", str(model_dir), "--out", str(out), "--name", "tiny"]
    argv += ["--categories", "shapes", "--num-prompts", "3", "--num-objects", "2", "--detector", "shapes"]
    assert main(argv + GEN + ["--bootstrap", "50"]) == 0
    return out


def test_multigen_writes_images_detections_results(multigen_run: Path) -> None:
    res = json.loads((multigen_run / "results.json").read_text())
    assert res["kind"] == "multigen" and res["name"] == "tiny"
    assert len(res["scores"]["mg_percent"]) == 2 and len(res["scores"]["mg_ci95"]) == 2
    assert res["detector"]["id"] == "shapes" and res["threshold"] == 0.1
    assert res["prompts"]["sampler"]["num_objects"] == 2 and res["generation"]["steps"] == 2
    assert res["environment"]["torch"] and res["environment"]["diffusers"]
    assert len(list((multigen_run / "images").glob("*.png"))) == 6
    assert len(read_detections(multigen_run)) == 6


def test_rescore_needs_no_model_and_compare(multigen_run: Path, capsys: pytest.CaptureFixture) -> None:
    res = multigen_run / "results.json"
    assert main(["evaluate", "multigen", "--out", str(multigen_run), "--rescore", str(res), "--threshold", "2"]) == 0
    high = json.loads((multigen_run / "results_thr2.json").read_text())
    assert high["scores"]["mg_percent"] == [0.0, 0.0]  # no score exceeds 2
    assert high["generation"] == json.loads(res.read_text())["generation"]
    capsys.readouterr()
    table_json = multigen_run / "table.json"
    assert main(["compare", str(res), str(multigen_run / "results_thr2.json"), "--json", str(table_json)]) == 0
    text = capsys.readouterr().out
    assert "| model |" in text and "MG2" in text and "0.00 ± 0.00" in text
    assert len(json.loads(table_json.read_text())["rows"]) == 2


def test_multigen_with_owlv2_folder_on_existing_images(multigen_run: Path, tmp_path: Path) -> None:
    from tokencompose.evaluation.tiny_detectors import save_tiny_owl

    owl = save_tiny_owl(tmp_path / "owl")
    argv = ["evaluate", "multigen", "--out", str(tmp_path / "o"), "--images", str(multigen_run / "images")]
    argv += ["--categories", "shapes", "--num-prompts", "3", "--num-objects", "2", "--skip-generation"]
    argv += ["--images-per-prompt", "2", "--detector", str(owl), "--bootstrap", "0", "--device", "cpu"]
    assert main(argv) == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["detector"]["template"] == "a photo of a {category}" and res["detector"]["queries"] == "vocabulary"
    dets = read_detections(tmp_path / "o")
    assert len(dets) == 6 and "mg_ci95" not in res["scores"]


def test_grounding_command(model_dir: Path, tmp_path: Path) -> None:
    argv = ["evaluate", "grounding", "--model", str(model_dir), "--out", str(tmp_path), "--shapes", "2"]
    argv += ["--resolution", "64", "--timesteps", "300", "--device", "cpu", "--name", "tiny"]
    assert main(argv) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["kind"] == "grounding" and res["scores"]["num_images"] == 2
    assert len(res["scores"]["miou"]) == 9 and 0 <= res["scores"]["auroc"] <= 1


def test_generate_command(model_dir: Path, tmp_path: Path) -> None:
    argv = ["generate", "--model", str(model_dir), "--out", str(tmp_path), "--prompt", "a red circle"]
    assert main(argv + GEN) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["0_0.png", "0_1.png"]
