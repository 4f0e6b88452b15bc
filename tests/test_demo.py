"""`tokencompose demo --smoke` runs every stage on a tiny base and writes a report that says what happened."""

from __future__ import annotations

import json

import pytest

from tokencompose.cli import main


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from tokencompose.models import tiny_components

    root = tmp_path_factory.mktemp("demo")
    tiny_components(seed=0).save(root / "base")
    # A base trained on the nouns world says so in its recipe; the demo's scenes and prompts follow it.
    (root / "base" / "recipe.json").write_text(json.dumps({"world": "nouns"}))
    code = main(["demo", "--smoke", "--out", str(root / "out"), "--base", str(root / "base")])
    return code, root / "out"


def test_smoke_demo_writes_every_stage(smoke_run):
    code, out = smoke_run
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["table"]) == {"base", "control", "tokencompose"}
    for name in ("base", "control", "tokencompose"):
        row = summary["table"][name]
        assert len(row["mg"]) == 5 and all(0 <= v <= 100 for v in row["mg"])
        assert 0 <= row["miou"] <= 1 and 0 <= row["auroc"] <= 1 and -1 <= row["map_corr"] <= 1
        assert 0 <= row["specificity"] <= 1
        lo, hi = row["specificity_ci"]
        assert lo <= row["specificity"] <= hi
    # control and TokenCompose trained the same steps from the same base; only the loss differs
    import yaml

    c = yaml.safe_load((out / "runs" / "control" / "config.yaml").read_text())
    t = yaml.safe_load((out / "runs" / "tokencompose" / "config.yaml").read_text())
    assert c["loss"]["token_weight"] == 0 and c["loss"]["pixel_weight"] == 0
    assert t["loss"]["token_weight"] > 0 and t["loss"]["pixel_weight"] > 0
    assert c["train"] == t["train"] and c["data"] == t["data"]


def test_the_demo_uses_the_world_its_base_was_trained_on(smoke_run):
    from tokencompose.data.records import read_jsonl
    from tokencompose.data.shapes import world_categories
    from tokencompose.evaluation.prompts import load_prompts

    _, out = smoke_run
    nouns = set(world_categories("nouns"))
    assert json.loads((out / "summary.json").read_text())["world"] == "nouns"
    assert all({p.text for p in r.phrases} <= nouns for r in read_jsonl(out / "data" / "train" / "metadata.jsonl"))
    assert all(set(p.categories) <= nouns for p in load_prompts(out / "prompts.json"))
    for task in ("spatial", "attribute"):
        assert all(
            set(p.categories) <= nouns for p in load_prompts(out / "eval" / "base" / "exact" / task / "prompts.json")
        )
    grounding = (out / "eval" / "base" / "grounding" / "results.json").read_text()
    assert '"world": "nouns"' in grounding


def test_figure_prompts_name_their_worlds_categories():
    from tokencompose.data.shapes import WORLDS
    from tokencompose.demo import FIGURE_PROMPTS

    assert set(FIGURE_PROMPTS) == set(WORLDS)
    for world, prompts in FIGURE_PROMPTS.items():
        named = {c for p in prompts for c in WORLDS["attributes"] if f" {c}" in p}
        assert named and named <= set(WORLDS[world]), world


def test_smoke_report_contents(smoke_run):
    _, out = smoke_run
    page = (out / "report.html").read_text()
    summary = json.loads((out / "summary.json").read_text())
    import html

    assert html.escape(summary["verdict"]) in page
    for section in (
        "What happened",
        "MultiGen",
        "Attention grounding",
        "Attention maps",
        "Masks vs attention",
        "Image grids",
    ):
        assert section in page, section
    assert page.count("data:image/png;base64,") >= 5
    assert "http://" not in page and "https://" not in page
    # the powered protocol: the paired difference per MG_k with its CI, and what the design can detect
    effect = summary["diff"]
    assert len(effect["diff"]) == len(effect["ci95"]) == len(summary["mde"]) == 5
    assert all(lo <= d <= hi for d, (lo, hi) in zip(effect["diff"], effect["ci95"], strict=True))
    assert "The effect" in page and "minimum detectable effect" in page and "TokenCompose − control" in page
    # each paired difference is the difference of its two arms' MG_k (same prompts, same number of images)
    mg = {name: row["mg"] for name, row in summary["table"].items()}
    for key, reference in (("diff", "control"), ("diff_base", "base")):
        got = summary[key]["diff"]
        assert got == pytest.approx([t - r for t, r in zip(mg["tokencompose"], mg[reference], strict=True)], abs=1e-6)
    assert "TokenCompose − base" in page and "TokenCompose - base: MG2" in summary["verdict"]
    lo, hi = summary["table"]["tokencompose"]["specificity_ci"]  # each arm's specificity shows its CI
    assert f'<span class="ci">[{lo:.3f}, {hi:.3f}]</span>' in page
    # the exact shapes-world scores of every arm
    for name in ("base", "control", "tokencompose"):
        assert {"spatial", "binding"} <= set(summary["table"][name])
    assert "colour binding" in page and "phrase-map correlation" in page and "Specificity" in page


def test_smoke_rerun_resumes_without_redoing_work(smoke_run):
    code, out = smoke_run
    stamp = (out / "eval" / "base" / "multigen" / "results.json").stat().st_mtime_ns
    assert main(["demo", "--smoke", "--out", str(out), "--base", str(out.parent / "base")]) == 0
    assert (out / "eval" / "base" / "multigen" / "results.json").stat().st_mtime_ns == stamp


def test_bad_demo_setting_names_the_key(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "stepz=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "stepz" in err and len(err.splitlines()) == 1


def test_demo_refuses_a_folder_of_another_run(smoke_run, capsys):
    """Another seed in the same folder would resume the old arms and report them as the new run's."""
    _, out = smoke_run
    rc = main(["demo", "--smoke", "--out", str(out), "--base", str(out.parent / "base"), "seed=7"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "seed 11 there, 7 now" in err and len(err.splitlines()) == 1


def test_demo_refuses_a_foreign_non_empty_folder(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "--smoke", "--out", str(tmp_path)]) == 2
    assert "holds no demo run" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine" and len(list(tmp_path.iterdir())) == 1


def test_an_unknown_world_is_refused_in_one_line(tmp_path, capsys):
    assert main(["demo", "--smoke", "--out", str(tmp_path / "d"), "world=animals"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a shapes world" in err and len(err.splitlines()) == 1


def test_demo_settings_are_typed(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "steps=many"]) == 2
    assert "config key 'steps': expected an integer" in capsys.readouterr().err


def test_a_base_is_a_folder_or_a_shipped_bases_name(tmp_path):
    from tokencompose.demo import resolve_base
    from tokencompose.errors import UserError
    from tokencompose.shipped import shipped_base

    default = "shapes_nouns16_wordwise"
    assert resolve_base(None) == shipped_base(default) and resolve_base(str(tmp_path)) == tmp_path
    for name in (default, "shapes_nouns16"):
        found = shipped_base(name)
        if found is None:
            with pytest.raises(UserError, match="not in this install"):
                resolve_base(name)
        else:
            assert resolve_base(name) == found
