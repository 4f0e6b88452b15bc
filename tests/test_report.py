"""``tokencompose report``: one self-contained HTML page (content checks; headless-chromium screenshot if present)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tokencompose.cli import main
from tokencompose.errors import UserError
from tokencompose.visualize import figures
from tokencompose.visualize.make import add_to_manifest
from tokencompose.visualize.report import build_report, collect, flatten

CHROMIUM = Path("/usr/bin/chromium")


def _img(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report")
    run = root / "run"
    (run / "checkpoints" / "step_10").mkdir(parents=True)
    (run / "checkpoints" / "step_10" / "attention_should_not_be_found.png").write_bytes(b"x")
    (run / "config.yaml").write_text(
        "model:\n  base: /models/sd14\nloss:\n  token_weight: 0.001\n  pixel_weight: 5.0e-05\ntrain:\n  lr: 5.0e-06\n"
    )
    rows = [
        {"step": s, "epoch": s // 5, "loss/total": 1 / (s + 1), "loss/denoise": 0.1 + 0.01 * s, "loss/token": 0.5}
        for s in range(20)
    ]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")

    ev = root / "eval"
    (ev / "images").mkdir(parents=True)
    (ev / "images" / "grid_of_generated.png").write_bytes(b"not an image to embed")
    multigen = {
        "kind": "multigen",
        "name": "tokencompose",
        "prompts": {"name": "coco"},
        "detector": {"id": "owlv2"},
        "threshold": 0.1,
        "scores": {
            "threshold": 0.1,
            "num_prompts": 10,
            "images_per_prompt": 4,
            "mg_percent": [100.0, 98.08, 76.16, 28.81, 3.28],
            "mg_std": [0.0, 0.5, 1.25, 2.0, 0.75],
            "mg_ci95": [[100.0, 100.0], [96.1, 99.2], [70.0, 81.5], [22.0, 35.0], [1.0, 6.0]],
        },
    }
    (ev / "multigen.json").write_text(json.dumps(multigen))
    grounding = {
        "kind": "grounding",
        "model": {"base": "/models/sd14", "unet": "run/checkpoints/step_10"},
        "scores": {"thresholds": [0.1, 0.5, 0.9], "miou": [0.2, 0.4321, 0.1], "auroc": 0.8123, "num_phrases": 7},
    }
    (ev / "grounding.json").write_text(json.dumps(grounding))
    (ev / "generation.json").write_text(json.dumps({"steps": 50}))  # not a result: ignored
    (ev / "broken.json").write_text("{")

    figs = root / "figs"
    att = figures.save_png(
        figures.attention_figure(_img(0), ["cat", "bottle"], np.random.rand(2, 32, 32)), figs / "a.png", 50
    )
    add_to_manifest(figs, "attention", att, "An apple on a bench <b>")
    masks = np.zeros((1, 32, 32), bool)
    masks[0, 8:24, 8:24] = True
    m = figures.mask_figure(_img(1), ["cat"], masks, {"base": np.random.rand(1, 32, 32)})
    add_to_manifest(figs, "masks", figures.save_png(m, figs / "m.png", 50), "a cat")
    g = figures.grid_figure({"base": [_img(2)], "tuned": [_img(3)]}, ["a cat (seed 0)"])
    figures.save_png(g, figs / "grid_loose.png", 50)  # no manifest entry: found by its prefix
    return {"root": root, "run": run, "eval": ev, "figs": figs}


def _html(inputs, tmp_path, *keys) -> str:
    out = build_report([inputs[k] for k in keys], tmp_path / "r.html")
    return out.read_text()


def test_report_has_every_section_and_embeds_images(inputs, tmp_path):
    pytest.importorskip("tokencompose.train.curves")
    page = _html(inputs, tmp_path, "run", "eval", "figs")
    for sec in ("config", "curves", "multigen", "grounding", "attention", "masks", "grid"):
        assert f'<section id="{sec}">' in page, sec
    # loss curves (1) + attention + masks + loose grid = 4 images, all inline PNGs
    imgs = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(imgs) == 4 and all(s.startswith("data:image/png;base64,") for s in imgs)
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', page)
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert "98.08 ± 0.50" in page and "95% CI [70.00, 81.50]" in page and "owlv2" in page
    assert "0.4321" in page and "0.8123" in page
    assert "loss.token_weight" in page and "0.001" in page
    assert "An apple on a bench &lt;b&gt;" in page  # titles are escaped
    assert "Omitted" not in page


def test_report_notes_missing_sections(inputs, tmp_path):
    page = _html(inputs, tmp_path, "eval")
    assert '<section id="multigen">' in page and '<section id="attention">' not in page
    assert "Omitted — Attention maps" in page and "Omitted — Configuration" in page
    assert "data:image/png" not in page  # eval/images/* are not figures


def test_report_survives_missing_and_broken_inputs(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{not json}\n")
    (tmp_path / "run" / "config.yaml").write_text("a: [unclosed\n")
    with pytest.raises(UserError, match="nope does not exist"):
        build_report([tmp_path / "run", tmp_path / "nope"], tmp_path / "r.html")
    page = build_report([tmp_path / "run"], tmp_path / "r.html").read_text()
    assert "unreadable config" in page
    assert "<section id=" in page  # the notes section at least


def test_collect_finds_manifest_and_prefixed_pngs_only(inputs):
    got = collect([inputs["root"]])
    kinds = sorted(k for k, _, _ in got.figures)
    assert kinds == ["attention", "grid", "masks"]
    assert [r["kind"] for r in got.results] == ["grounding", "multigen"]
    assert len(got.configs) == 1 and len(got.metrics) == 1


def test_flatten_dotted_names():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1, 2], "e": {}}


def test_report_cli(inputs, tmp_path):
    out = tmp_path / "sub" / "report.html"
    assert main(["report", str(inputs["eval"]), str(inputs["figs"]), "--out", str(out), "--title", "My run"]) == 0
    page = out.read_text()
    assert "<title>My run</title>" in page and '<section id="grid">' in page


@pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(inputs, tmp_path):
    from PIL import Image

    page = build_report([inputs["eval"], inputs["figs"]], tmp_path / "r.html")
    shot = tmp_path / "shot.png"
    cmd = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
        "--hide-scrollbars", "--window-size=1200,1600", f"--screenshot={shot}", page.resolve().as_uri(),
    ]  # fmt: skip
    try:
        subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    except subprocess.TimeoutExpired:
        pytest.skip("chromium did not finish in time")
    finally:
        shutil.rmtree(tmp_path / "profile", ignore_errors=True)
    if not shot.exists():
        pytest.skip("chromium produced no screenshot in this environment")
    arr = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert arr.shape == (1600, 1200)
    non_white = (arr < 240).mean()
    assert non_white > 0.02, f"screenshot is blank ({non_white:.4f} non-white)"
    assert arr.std() > 10
