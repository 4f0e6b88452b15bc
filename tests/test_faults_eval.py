"""Evaluation faults (#14): reuse only what this run would have made, verify images, check names early,
refuse empty report / compare inputs. Tiny models, the exact shapes detector, CPU, a few seconds each."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tokencompose.cli import main
from tokencompose.errors import UserError
from tokencompose.evaluation.generation import GenerationSettings, generate_images
from tokencompose.evaluation.prompts import sample_prompts
from tokencompose.evaluation.results import read_detections
from tokencompose.loading import ModelSettings, load_pipeline

GEN = ["--steps", "2", "--resolution", "64", "--images-per-prompt", "2", "--device", "cpu", "--batch-size", "4"]
SHAPES = ["--categories", "shapes", "--num-prompts", "3", "--num-objects", "2", "--detector", "shapes"]


def _mg(model_dir: Path, out: Path, *extra: str) -> list[str]:
    argv = ["evaluate", "multigen", "--model", str(model_dir), "--out", str(out)]
    return [*argv, *SHAPES, *GEN, "--bootstrap", "0", *extra]


def _error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


@pytest.fixture(scope="module")
def first_run(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished MultiGen run (prompt seed 0, vocabulary queries) that the tests below try to misuse."""
    out = tmp_path_factory.mktemp("mg")
    assert main(_mg(model_dir, out)) == 0
    return out


# --- 1. provenance: never reuse images or detections of another run ---------------------------------------------


def test_same_run_resumes_byte_identical(first_run: Path, model_dir: Path) -> None:
    before = _snapshot(first_run / "images")
    rows = (first_run / "detections.jsonl").read_text()
    assert main(_mg(model_dir, first_run)) == 0
    assert _snapshot(first_run / "images") == before and len(before) == 6
    assert (first_run / "detections.jsonl").read_text() == rows  # nothing detected twice


def test_other_prompt_seed_is_refused(
    first_run: Path, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    before = _snapshot(first_run / "images")
    results = (first_run / "results.json").read_text()
    prompts = (first_run / "prompts.json").read_text()
    # Same folder: its detections were asked for another vocabulary (refused before generating).
    assert main(_mg(model_dir, first_run, "--prompt-seed", "1")) == 2
    err = _error(capsys)
    assert f"{first_run} holds detections" in err and "vocabulary" in err and "new --out" in err
    # Fresh detections, but the old images: each image names its own prompt text.
    assert main(_mg(model_dir, tmp_path, "--prompt-seed", "1", "--images", str(first_run / "images"))) == 2
    err = _error(capsys)
    assert str(first_run / "images") in err and "prompt text" in err and "new --out" in err
    # Nothing of the first run was touched: images, results, and the prompts --rescore reads.
    assert _snapshot(first_run / "images") == before
    assert (first_run / "results.json").read_text() == results and (first_run / "prompts.json").read_text() == prompts


def test_other_query_mode_is_refused_before_generation(
    first_run: Path, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = _mg(model_dir, first_run, "--queries", "prompt", "--images", str(tmp_path / "fresh"))
    assert main(argv) == 2
    err = _error(capsys)
    assert str(first_run) in err and "queries" in err and "'vocabulary' there" in err
    assert not (tmp_path / "fresh").exists() or not list((tmp_path / "fresh").glob("*.png"))


def test_other_detector_is_refused(first_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tokencompose.evaluation.tiny_detectors import save_tiny_owl

    owl = save_tiny_owl(tmp_path / "owl")
    argv = ["evaluate", "multigen", "--out", str(first_run), *SHAPES, "--images-per-prompt", "2"]
    assert main([*argv, "--skip-generation", "--detector", str(owl), "--device", "cpu"]) == 2
    err = _error(capsys)
    assert f"{first_run} holds detections" in err and "detector is 'shapes' there" in err


def test_detections_of_other_images_are_refused(
    first_run: Path, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Same detector and prompts, but images from another seed in another folder: the stored rows don't fit."""
    other = tmp_path / "other_images"
    assert main(_mg(model_dir, tmp_path / "o", "--seed", "7", "--images", str(other))) == 0
    capsys.readouterr()
    argv = [*_mg(model_dir, first_run, "--images", str(other)), "--skip-generation"]
    assert main(argv) == 2
    err = _error(capsys)
    assert str(first_run) in err and "image is" in err


def test_other_generation_setting_is_refused(first_run: Path, model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(_mg(model_dir, first_run, "--guidance-scale", "3")) == 2
    err = _error(capsys)
    assert str(first_run / "images") in err and "guidance_scale is 7.5 there, 3.0 now" in err


def test_generate_other_prompt_texts_refused(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["generate", "--model", str(model_dir), "--out", str(tmp_path), *GEN]
    assert main([*base, "--prompt", "a red circle"]) == 0
    assert main([*base, "--prompt", "a blue square"]) == 2
    assert "prompt text is 'a red circle' there, 'a blue square' now" in _error(capsys)
    assert json.loads((tmp_path / "prompts.json").read_text())[0]["text"] == "a red circle"


def test_shards_record_provenance_independently(model_dir: Path, tmp_path: Path) -> None:
    pipe = load_pipeline(ModelSettings(model=str(model_dir), device="cpu"), scheduler="pndm")
    prompts = sample_prompts(["cat", "dog", "cup"], 2, num_objects=2, seed=0)
    settings = GenerationSettings(steps=2, resolution=64, images_per_prompt=2, seed=3)
    for shard in range(2):
        rep = generate_images(pipe, prompts, tmp_path, settings, shard=shard, num_shards=2, record={"model": "t"})
        assert len(rep.written) == 2
    again = generate_images(pipe, prompts, tmp_path, settings, record={"model": "t"})  # one process now
    assert again.written == [] and again.skipped == 4
    other = sample_prompts(["cat", "dog", "cup"], 2, num_objects=2, seed=1)
    with pytest.raises(UserError, match="prompt text"):
        generate_images(pipe, other, tmp_path, settings, shard=1, num_shards=2, record={"model": "t"})


# --- 2. broken images -------------------------------------------------------------------------------------------


def test_truncated_and_empty_images_are_regenerated(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    assert main(_mg(model_dir, out)) == 0
    images = out / "images"
    good = (images / "0_1.png").read_bytes()
    (images / "0_1.png").write_bytes(good[: len(good) // 2])
    (images / "1_0.png").write_bytes(b"")
    for f in out.glob("detections*.jsonl"):
        f.unlink()  # detect again too, so every image is read
    with caplog.at_level(logging.WARNING):
        assert main(_mg(model_dir, out)) == 0
    assert "0_1.png is broken" in caplog.text and "1_0.png is broken" in caplog.text
    assert (images / "0_1.png").read_bytes() == good  # same seed, same batch: the same bytes
    assert len(read_detections(out)) == 6


def test_unreadable_image_at_scoring_names_the_file(
    first_run: Path, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for p in (first_run / "images").glob("*"):
        (images / p.name).write_bytes(p.read_bytes())
    (images / "2_1.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # a header and nothing else
    argv = [*_mg(model_dir, tmp_path / "o", "--images", str(images)), "--skip-generation"]
    assert main(argv) == 2
    assert str(images / "2_1.png") in _error(capsys)


# --- 3. names checked before any image is made ------------------------------------------------------------------


def test_unknown_detector_refused_before_generation(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = _mg(model_dir, tmp_path, "--detector", "nonsense")
    assert main(argv) == 2
    assert "unknown detector 'nonsense'" in _error(capsys)
    assert not list(tmp_path.rglob("*.png"))
    assert main(_mg(model_dir, tmp_path, "--detector", str(tmp_path / "no_owl"))) == 2
    assert f"detector folder {tmp_path / 'no_owl'} does not exist" in _error(capsys)
    assert not list(tmp_path.rglob("*.png"))


def test_missing_model_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["generate", "--model", "/no/such/dir", "--out", str(tmp_path), "--prompt", "a cat", *GEN]
    assert main(argv) == 2
    assert "model folder /no/such/dir does not exist" in _error(capsys)


def test_bad_scheduler_lists_the_valid_names(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["generate", "--model", str(model_dir), "--out", str(tmp_path), "--prompt", "a cat", *GEN]
    assert main([*argv, "--scheduler", "pndmm"]) == 2
    err = _error(capsys)
    assert "generation.scheduler" in err and "'pndmm'" in err and "euler-ancestral" in err and "ddim" in err


def test_looks_like_path() -> None:
    from tokencompose.models import looks_like_path

    for path in ("/no/such/dir", "./m", "../m", "~/m", "runs/a/b"):
        assert looks_like_path(path), path
    for hub in ("google/owlv2-base-patch16", "CompVis/stable-diffusion-v1-4", "gpt2"):
        assert not looks_like_path(hub), hub


# --- 4. report / compare need real inputs -----------------------------------------------------------------------


def test_compare_refuses_missing_and_empty_inputs(first_run: Path, tmp_path: Path, capsys) -> None:
    good = str(first_run / "results.json")
    assert main(["compare", good, str(tmp_path / "missing.json")]) == 2
    assert f"{tmp_path / 'missing.json'} does not exist" in _error(capsys)
    (tmp_path / "empty.json").write_text("")
    assert main(["compare", good, str(tmp_path / "empty.json")]) == 2
    assert str(tmp_path / "empty.json") in _error(capsys)
    (tmp_path / "other.json").write_text('{"steps": 50}')
    assert main(["compare", str(tmp_path / "other.json")]) == 2
    assert "not a results file" in _error(capsys)


def test_report_refuses_missing_and_empty_inputs(first_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "r.html"
    assert main(["report", str(first_run), str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert f"{tmp_path / 'nope'} does not exist" in _error(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(out)]) == 2
    err = _error(capsys)
    assert "nothing to report" in err and str(tmp_path / "empty") in err
    assert not out.exists()
    assert main(["report", str(first_run), "--out", str(out)]) == 0 and out.is_file()
