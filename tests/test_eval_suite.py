"""``evaluate suite``: a preset's metrics over seeds in Table 1's layout, offline on tiny and shipped models."""

from __future__ import annotations

import json
import statistics
from importlib import resources
from pathlib import Path

import pytest

from tokencompose.errors import UserError
from tokencompose.evaluation.paper_table import PAPER_ROWS
from tokencompose.evaluation.suite import SuiteSettings, aggregate, run_suite, selected_metrics, suite_markdown
from tokencompose.loading import ModelSettings

BASE = Path(str(resources.files("tokencompose") / "assets" / "shapes_base"))


def test_aggregate_keeps_one_seeds_own_spread_and_takes_mean_std_over_several():
    one = aggregate([{"a": (10.0, 2.0), "b": (1.0, None)}])
    assert one == {"a": (10.0, 2.0), "b": (1.0, None)}
    two = aggregate([{"a": (10.0, 2.0)}, {"a": (14.0, 1.0)}, {"a": (12.0, 5.0)}])
    assert two["a"] == (pytest.approx(12.0), pytest.approx(statistics.stdev([10.0, 14.0, 12.0])))


def test_metrics_are_checked_before_anything_runs():
    s = SuiteSettings(out="x", preset="paper")
    with pytest.raises(UserError, match="inception_weights"):  # FID inputs are local files the user must give
        selected_metrics(s)
    assert selected_metrics(SuiteSettings(out="x", metrics=["latency", "visor"])) == ["visor", "latency"]
    with pytest.raises(UserError, match="not in preset"):
        selected_metrics(SuiteSettings(out="x", preset="shapes", metrics=["fid_coco"]))


def test_shapes_preset_over_two_seeds_matches_its_runs(tmp_path):
    base = ModelSettings(model=str(BASE), device="cpu")
    s = SuiteSettings(out=str(tmp_path / "suite"), name="base", preset="shapes", seeds=[0, 1], model=base,
                      metrics=["multigen_shapes", "shapes_attribute"], num_prompts=2, images_per_prompt=1,
                      steps=2)  # fmt: skip
    record = run_suite(s)
    stored = json.loads((tmp_path / "suite" / "suite.json").read_text())
    assert stored["kind"] == "suite" and stored["seeds"] == [0, 1] and record["cells"] == stored["cells"]
    # every cell is the mean over the seeds' own results files
    mg = [
        json.loads((tmp_path / "suite" / f"seed_{k}" / "multigen_shapes" / "results.json").read_text()) for k in (0, 1)
    ]
    assert stored["cells"]["shapes_mg2"][0] == pytest.approx(statistics.fmean(r["scores"]["mg_percent"][1] for r in mg))
    at = [
        json.loads((tmp_path / "suite" / f"seed_{k}" / "shapes_attribute" / "results.json").read_text()) for k in (0, 1)
    ]
    binding = [r["scores"]["attribute"]["binding_score"] for r in at]
    assert stored["cells"]["attribute_binding"][0] == pytest.approx(statistics.fmean(binding))
    table = (tmp_path / "suite" / "table.md").read_text()
    assert "| base |" in table and "mean ± std over seeds" in table and "Colour binding" in table


def test_paper_preset_on_a_tiny_model_writes_table_1_with_the_papers_rows(tmp_path, model_dir):
    from tokencompose.cli import main
    from tokencompose.evaluation.tiny_detectors import save_tiny_owl

    owl = save_tiny_owl(tmp_path / "owl")
    out = tmp_path / "suite"
    argv = ["evaluate", "suite", "--model", str(model_dir), "--out", str(out), "--name", "tiny", "--device", "cpu",
            "--metrics", "multigen_coco,latency", "--num-prompts", "2", "--images-per-prompt", "2", "--steps", "2",
            f"multigen_detector={owl}", "latency_repeats=2"]  # fmt: skip
    assert main(argv) == 0
    stored = json.loads((out / "suite.json").read_text())
    mg = json.loads((out / "seed_0" / "multigen_coco" / "results.json").read_text())["scores"]
    assert stored["cells"]["coco_mg3"] == [mg["mg_percent"][2], mg["mg_std"][2]]
    assert stored["cells"]["latency"][0] > 0 and "fid_coco" not in stored["cells"]
    table = (out / "table.md").read_text()
    assert "| SD 1.4 (paper) | 29.86 |" in table and "| tiny |" in table and "FID (COCO)" in table
    assert table == suite_markdown([stored])
    assert PAPER_ROWS["TokenCompose (paper)"]["coco_mg2"] == (98.08, 0.40)


def test_compare_puts_several_suites_side_by_side_with_the_papers_rows(tmp_path):
    from tokencompose.evaluation.results import compare, load_result, markdown_table

    paths = []
    for name, acc in (("ours A", 31.5), ("ours B", 48.25)):
        record = {"kind": "suite", "name": name, "preset": "paper", "seeds": [0, 1],
                  "cells": {"object_accuracy": [acc, 1.5], "latency": [7.6, 0.2]}}  # fmt: skip
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(record))
        paths.append(path)
    table = markdown_table(compare([load_result(p) for p in paths]))
    lines = table.splitlines()
    assert sum(line.startswith("| SD 1.4 (paper) |") for line in lines) == 1  # one reference block
    assert "| ours A | 31.50 ± 1.50 |" in table and "| ours B | 48.25 ± 1.50 |" in table
    assert "mean ± std over seeds" in table
