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

    shapes = ["prepare", "shapes", "--num", "3", "--resolution", "32"]
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


# -- 3. drops: aspect mismatch, counted once, warned once, written into the run --------------------------


@pytest.fixture(scope="module")
def tok():
    from tokencompose.models import clip_tokenizer

    return clip_tokenizer()


def _scene(folder: Path, name: str = "a", w: int = 64, h: int = 64) -> R.Record:
    """An image with a red square at x 10..30, y 20..40, its mask, and a record naming it."""
    import numpy as np
    from PIL import Image

    img = np.full((h, w, 3), 235, np.uint8)
    img[20:40, 10:30] = (220, 30, 30)
    Image.fromarray(img).save(folder / f"{name}.png")
    mask = np.zeros((h, w), np.uint8)
    mask[20:40, 10:30] = 255
    Image.fromarray(mask).save(folder / f"{name}_mask.png")
    return R.Record(
        str(folder / f"{name}.png"), "a red square", [R.Phrase("red square", str(folder / f"{name}_mask.png"))]
    )


def _with_mask(rec: R.Record, mask: Path, box: R.Box | None = None) -> R.Record:
    return R.Record(rec.image, rec.caption, [R.Phrase("red square", str(mask), box)])


def test_mask_with_another_aspect_ratio_is_dropped_not_stretched(tmp_path, tok):
    from PIL import Image

    from tokencompose.data.dataset import TokenDataset

    rec = _scene(tmp_path)
    Image.new("L", (64, 32), 255).save(tmp_path / "wide.png")  # 2:1 mask for a 1:1 image
    s = TokenDataset([_with_mask(rec, tmp_path / "wide.png")], tok, image_size=32)[0]
    assert s["phrases"] == [] and s["dropped"] == [R.MASK_ASPECT_MISMATCH, R.NO_USABLE_PHRASE]


def test_a_substitute_record_is_not_counted_twice(tmp_path, tok):
    import torch

    from tokencompose.data.dataset import TokenDataset, collate

    good = _scene(tmp_path)
    good.phrases.append(R.Phrase("square", None))  # one null-mask drop of its own
    recs = [R.Record(str(tmp_path / "gone.png"), "x"), good]
    loader = torch.utils.data.DataLoader(TokenDataset(recs, tok, image_size=32), batch_size=1, collate_fn=collate)
    counter = R.DropCounter()
    for batch in loader:  # one epoch: record 1 is loaded twice (once in place of record 0)
        counter.update(batch)
    assert counter.as_dict() == {R.MISSING_IMAGE: 1, R.NULL_MASK: 1}


def test_each_kind_of_drop_warns_once(tmp_path, tok, caplog, monkeypatch):
    from tokencompose.data.dataset import TokenDataset

    monkeypatch.setattr(R, "_warned", set())
    rec = _scene(tmp_path)
    ds = TokenDataset([_with_mask(rec, tmp_path / f"gone{i}.png") for i in range(5)], tok, image_size=32)
    with caplog.at_level("WARNING"):
        drops = [r for i in range(5) for r in ds[i]["dropped"]]
    assert drops.count(R.MISSING_MASK) == 5
    warned = [r.getMessage() for r in caplog.records if R.MISSING_MASK in r.getMessage()]
    assert len(warned) == 1 and "gone0.png" in warned[0]


def test_drop_counts_are_in_the_metrics_and_the_run_summary(tmp_path):
    from tokencompose.config import load_config
    from tokencompose.data.shapes import make_shapes_dataset
    from tokencompose.train import train
    from train_util import config_dict, make_base

    recs = R.read_jsonl(make_shapes_dataset(tmp_path / "w", 4, size=64))
    recs[1] = R.Record(str(tmp_path / "gone.png"), recs[1].caption, recs[1].phrases)
    data = tmp_path / "list" / "metadata.jsonl"
    R.write_jsonl(data, recs)
    over = ["train.max_steps=1", "log.curves=false", "log.tensorboard=false", "data.shuffle=false"]
    result = train(load_config(config_dict(make_base(tmp_path), data, tmp_path / "run"), over))
    # One step of batch 2 is half an epoch: the drop of record 1 is in the run although no epoch ended.
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["data/dropped/missing_image"] == 1 and result.metrics["data/dropped/missing_image"] == 1
    assert json.loads((tmp_path / "run" / "data_drops.json").read_text()) == {"missing_image": 1}


# -- 4. validate at load: boxes, decompression bombs, FIFOs, runs of unreadable images -------------------


@pytest.mark.parametrize(
    "box", [(float("nan"), 20, 30, 40), (10, 20, float("inf"), 40), (30, 20, 10, 40), (10, 40, 30, 40)]
)
def test_bad_box_is_replaced_by_the_masks_box(tmp_path, tok, box):
    from tokencompose.data.dataset import TokenDataset, collate

    rec = _scene(tmp_path)
    s = TokenDataset([_with_mask(rec, Path(rec.phrases[0].mask), box)], tok, image_size=64)[0]
    assert s["dropped"] == [R.BAD_BOX] and s["phrases"] == ["red square"]
    assert s["box_valid"].all() and s["boxes"][0].tolist() == [10.0, 20.0, 30.0, 40.0]
    assert collate([s])["boxes"].isfinite().all()


def test_nan_box_in_a_jsonl_row_reaches_the_check(tmp_path, tok):
    from tokencompose.data.dataset import TokenDataset

    _scene(tmp_path)
    row = '{"file_name": "a.png", "text": "a red square", "attn_list": [["red square", "a_mask.png"]], '
    row += '"boxes": [[NaN, 0, 5, 5]]}'  # json.loads accepts NaN, so a row can carry one
    (tmp_path / "metadata.jsonl").write_text(row + "\n")
    assert TokenDataset(tmp_path / "metadata.jsonl", tok, image_size=32)[0]["dropped"] == [R.BAD_BOX]


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width x height`` pixels (no pixel data: a decompression-bomb probe)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.parametrize("side", [30000, 9000])  # past PIL's own guard; past ours (8192^2) only
def test_oversized_image_or_mask_is_a_drop(tmp_path, tok, side):
    from tokencompose.data.dataset import TokenDataset

    rec = _scene(tmp_path)
    big = _png_header(tmp_path / "big.png", side, side)
    ds = TokenDataset([R.Record(str(big), rec.caption, rec.phrases), _with_mask(rec, big)], tok, image_size=32)
    assert ds[0]["dropped"] == [R.IMAGE_TOO_LARGE] and ds[0]["index"] == 1
    assert ds[1]["dropped"] == [R.MASK_TOO_LARGE, R.NO_USABLE_PHRASE]


def test_fifo_mask_or_image_is_a_drop_not_a_hang(tmp_path, tok):
    import os
    import threading

    from tokencompose.data.dataset import TokenDataset

    rec = _scene(tmp_path)
    os.mkfifo(tmp_path / "pipe.png")
    ds = TokenDataset([_with_mask(rec, tmp_path / "pipe.png"), R.Record(str(tmp_path / "pipe.png"), "x")], tok, 32)
    got: list = []
    worker = threading.Thread(target=lambda: got.extend([ds[0]["dropped"], ds[1]["dropped"]]), daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "reading a FIFO blocked"
    assert got == [[R.MASK_NOT_A_FILE, R.NO_USABLE_PHRASE], [R.IMAGE_NOT_A_FILE]]


def test_a_long_run_of_unreadable_images_is_skipped(tmp_path, tok):
    from tokencompose.data.dataset import TokenDataset

    good = _scene(tmp_path)
    recs = [R.Record(str(tmp_path / f"gone{i}.png"), "x") for i in range(40)] + [good]
    ds = TokenDataset(recs, tok, image_size=32)
    assert ds[0]["index"] == 40 and ds[0]["dropped"] == [R.MISSING_IMAGE]
    assert ds[39]["index"] == 40  # the known-unusable ones are skipped, not reread
    with pytest.raises(UserError, match="none of the 40 records"):
        TokenDataset(recs[:40], tok, image_size=32)[5]


# -- 5. prepare official fails when it finds broken inputs -----------------------------------------------


def test_prepare_official_exits_2_with_a_summary_when_records_are_dropped(tmp_path, capsys):
    from tokencompose.cli import main

    _scene(tmp_path)
    row = {"file_name": "a.png", "text": "a red square", "attn_list": [["red square", "a_mask.png"]]}
    (tmp_path / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    assert main(["prepare", "official", "--data", str(tmp_path / "metadata.jsonl")]) == 0
    capsys.readouterr()
    _png_header(tmp_path / "bomb.png", 30000, 30000)
    rows = [row, {**row, "file_name": "gone.png"}, {**row, "file_name": "bomb.png"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["prepare", "official", "--data", str(tmp_path / "metadata.jsonl")]) == 2
    out, err = capsys.readouterr()
    counts = json.loads(out)
    assert counts["rows"] == 3 and counts[R.MISSING_IMAGE] == 1 and counts[R.IMAGE_TOO_LARGE] == 1
    assert len(err.strip().splitlines()) == 1 and "image_too_large=1, missing_image=1" in err
