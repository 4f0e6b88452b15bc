"""Data faults (issue #14): outputs complete or refused, bad inputs dropped with a counted reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokencompose.data import records as R
from tokencompose.data.outputs import COMPLETE, IN_PROGRESS, MARKER, read_marker
from tokencompose.errors import UserError


def _foreign_folder(path: Path) -> Path:
    """A user's folder with a training list of its own (what a typo in data.path points at)."""
    path.mkdir(parents=True)
    (path / "metadata.jsonl").write_text('{"file_name": "mine.png", "text": "mine", "attn_list": []}\n')
    (path / "notes.txt").write_text("keep me")
    return path


# -- 1. never write into a folder we did not create ---------------------------------------------------


def test_train_with_mistyped_data_path_refuses_to_render_into_a_foreign_folder(tmp_path, capsys):
    from tokencompose.cli import main

    folder = _foreign_folder(tmp_path / "D")
    before = (folder / "metadata.jsonl").read_bytes()
    argv = ["train", "shapes_tiny", f"run_dir={tmp_path / 'run'}", f"data.path={folder / 'metadata.json'}"]
    assert main([*argv, "data.shapes.num=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(folder) in err and "refusing" in err
    assert (folder / "metadata.jsonl").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["metadata.jsonl", "notes.txt"]


def test_prepare_shapes_reuses_its_own_render_and_refuses_others(tmp_path, capsys):
    from tokencompose.cli import main

    shapes = ["prepare", "shapes", "--num", "3", "--size", "32"]
    assert main([*shapes, "--out", str(_foreign_folder(tmp_path / "foreign"))]) == 2
    assert "foreign" in capsys.readouterr().err
    out = tmp_path / "world"
    assert main([*shapes, "--out", str(out)]) == 0
    image = next((out / "images").rglob("*.png"))
    stamp = image.stat().st_mtime_ns
    assert main([*shapes, "--out", str(out)]) == 0  # the same render: reused, nothing rewritten
    assert image.stat().st_mtime_ns == stamp and read_marker(out)["state"] == COMPLETE
    assert main([*shapes, "--out", str(out), "--seed", "1"]) == 2  # other settings: refused
    assert "seed" in capsys.readouterr().err
    assert len(R.read_jsonl(out / "metadata.jsonl")) == 3


def test_prepare_coco_refuses_a_foreign_folder_before_reading_anything(tmp_path):
    from tokencompose.data.coco import prepare_coco

    folder = _foreign_folder(tmp_path / "out")
    with pytest.raises(UserError, match="refusing"):
        prepare_coco(tmp_path / "nope.json", tmp_path / "nope.json", tmp_path, folder, nlp=object())
    assert (folder / "notes.txt").read_text() == "keep me"


# -- 2. interrupted multi-file outputs are detected and redone ------------------------------------------


def test_interrupted_shapes_render_leaves_no_training_list_and_is_redone(tmp_path, monkeypatch):
    from tokencompose.data import shapes as S

    real, calls = S.render_scene, [0]

    def dies_on_third(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt  # what Ctrl-C or a kill does halfway through
        return real(*args, **kwargs)

    monkeypatch.setattr(S, "render_scene", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        S.make_shapes_dataset(tmp_path / "w", 5, size=32)
    assert not (tmp_path / "w" / "metadata.jsonl").exists()  # the next run cannot train on 2 of 5 rows
    assert read_marker(tmp_path / "w")["state"] == IN_PROGRESS
    monkeypatch.setattr(S, "render_scene", real)
    path = S.make_shapes_dataset(tmp_path / "w", 5, size=32)
    assert len(R.read_jsonl(path)) == 5 and read_marker(tmp_path / "w")["rows"] == 5


def test_truncated_complete_render_is_redone_not_reused(tmp_path):
    from tokencompose.data.shapes import make_shapes_dataset

    path = make_shapes_dataset(tmp_path / "w", 4, size=32)
    path.write_text(path.read_text().splitlines(keepends=True)[0])  # e.g. a disk-full copy
    assert len(R.read_jsonl(make_shapes_dataset(tmp_path / "w", 4, size=32))) == 4


def test_render_from_before_markers_is_adopted(tmp_path):
    from tokencompose.data.shapes import make_shapes_dataset

    path = make_shapes_dataset(tmp_path / "w", 3, size=32)
    (tmp_path / "w" / MARKER).unlink()  # what older versions left: no marker, shapes.json written last
    stamp = path.stat().st_mtime_ns
    assert make_shapes_dataset(tmp_path / "w", 3, size=32) == path and path.stat().st_mtime_ns == stamp


def test_interrupted_latent_cache_is_not_usable_and_is_finished_on_rerun(tmp_path, monkeypatch):
    from test_data_latents import tiny_vae
    from tokencompose.data.latents import LatentCache, build_latent_cache
    from tokencompose.data.shapes import make_shapes_dataset

    data = make_shapes_dataset(tmp_path / "w", 4, size=32, max_objects=1)
    vae, calls = tiny_vae(), [0]
    real = type(vae).encode

    def dies_on_second(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    with pytest.raises(UserError, match="refusing"):
        build_latent_cache(vae, data, _foreign_folder(tmp_path / "foreign"), 32, batch_size=2)
    monkeypatch.setattr(type(vae), "encode", dies_on_second)
    fresh = tmp_path / "lc2"
    with pytest.raises(KeyboardInterrupt):
        build_latent_cache(vae, data, fresh, 32, batch_size=2)
    with pytest.raises(FileNotFoundError, match="interrupted"):
        LatentCache(fresh)
    monkeypatch.setattr(type(vae), "encode", real)
    LatentCache(build_latent_cache(vae, data, fresh, 32, batch_size=2)).check(image_size=32, records=data)
    with pytest.raises(UserError, match="other settings"):
        build_latent_cache(tiny_vae(seed=1), data, fresh, 32, batch_size=2)


def test_atomic_jsonl_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "metadata.jsonl"
    R.write_jsonl(path, [R.Record("a.png", "a")])

    def rows():
        yield R.Record("b.png", "b")
        raise RuntimeError("renderer crashed")

    with pytest.raises(RuntimeError):
        R.write_jsonl(path, rows())
    assert [r.caption for r in R.read_jsonl(path)] == ["a"] and sorted(p.name for p in tmp_path.iterdir()) == [
        "metadata.jsonl"
    ]
    assert json.loads(path.read_text())["file_name"] == "a.png"
