"""``prepare grounded``: phrases -> detector boxes -> segmenter masks, in the paper's format, resumable and sharded.

Tiny random-init Grounding DINO and SAM (built from configs, no download) run the real path; the shapes
world's exact detector with box-fill masks must give back the rendered boxes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokencompose.data.grounded import GroundedSettings, PhraseGrounding, assign_boxes, ground_images, query_key
from tokencompose.data.grounded_run import mask_names, prepare_grounded, seg_folders
from tokencompose.data.official import load_mask
from tokencompose.data.records import read_jsonl
from tokencompose.data.segmenters import BoxSegmenter
from tokencompose.errors import UserError
from tokencompose.sharding import ShardSettings

CAPTIONS = [
    ("a photo of a cat and a dog.", ["cat", "dog"]),
    ("a red circle and a blue square.", ["red circle", "blue square"]),
    ("a cup , a book and a kite.", ["cup", "book", "kite"]),
    ("a glass of wine.", ["glass", "wine"]),
]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from tokencompose.data.tiny_segmenters import save_tiny_sam
    from tokencompose.evaluation.tiny_detectors import save_tiny_grounding_dino

    root = tmp_path_factory.mktemp("models")
    return {"detector": save_tiny_grounding_dino(root / "gdino"), "segmenter": save_tiny_sam(root / "sam")}


def write_images(root: Path, n: int) -> Path:
    """``n`` noise images of two sizes (one non-square) + rows with given phrases; returns the rows file."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        h, w = (48, 64) if i % 3 else (64, 64)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"img_{i:03d}.jpg")
        text, phrases = CAPTIONS[i % len(CAPTIONS)]
        rows.append({"file_name": f"img_{i:03d}.jpg", "text": text, "attn_list": [[p, None] for p in phrases]})
    path = root / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def settings(rows: Path, out: Path, models: dict[str, Path], **kw) -> GroundedSettings:
    run = ShardSettings(
        batch_size=kw.pop("batch_size", 2), shard=kw.pop("shard", None), num_shards=kw.pop("num_shards", None)
    )
    return GroundedSettings(
        data=str(rows), out=str(out), detector=str(models["detector"]), segmenter=str(models["segmenter"]),
        device="cpu", run=run, qa=kw.pop("qa", False), **kw,
    )  # fmt: skip


def output_bytes(out: Path) -> dict[str, bytes]:
    """metadata.jsonl and every mask, by path relative to the output folder."""
    files = [out / "metadata.jsonl", *sorted((out / "seg").rglob("*.png"))]
    return {str(f.relative_to(out)): f.read_bytes() for f in files}


# --- the rule ------------------------------------------------------------------------------------------


def test_assign_boxes_keeps_boxes_above_both_thresholds_and_labels_them_by_argmax():
    logits = torch.logit(torch.tensor([[0.9, 0.2], [0.1, 0.3], [0.26, 0.24], [0.2, 0.2]]))
    idx, label, score = assign_boxes(logits, 0.25, 0.25)
    assert idx.tolist() == [0, 1, 2] and label.tolist() == [0, 1, 0]
    assert torch.allclose(score, torch.tensor([0.9, 0.3, 0.26]))
    idx, _, _ = assign_boxes(logits, 0.25, 0.5)  # the text threshold also bounds the best token
    assert idx.tolist() == [0]
    assert assign_boxes(torch.empty(0, 0), 0.25, 0.25)[0].numel() == 0


class FakeDetector:
    """Fixed candidates: the queries it was asked, and per image (logits, boxes)."""

    def __init__(self, found):
        self.found, self.asked = found, None

    def candidates(self, images, queries):
        self.asked = [list(q) for q in queries]
        return self.found


def test_ground_images_unions_boxes_per_phrase_and_maps_duplicates_and_case():
    image = Image.new("RGB", (20, 10))
    logit = lambda p: float(torch.logit(torch.tensor(p)))  # noqa: E731
    logits = torch.tensor([[logit(0.9), logit(0.1)], [logit(0.6), logit(0.2)], [logit(0.1), logit(0.2)]])
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [10.0, 5.0, 30.0, 12.0], [1.0, 1.0, 2.0, 2.0]])
    det = FakeDetector([(logits, boxes)])
    (result,) = ground_images(det, BoxSegmenter(), [image], [["Cat", "dog", "cat", "..."]], 0.25, 0.25)
    assert det.asked == [["cat", "dog"]]  # distinct, case-folded, punctuation-only phrases not asked
    cat = result[0]
    assert cat.detections == 2 and cat.score == pytest.approx(0.9)
    assert cat.box == (0.0, 0.0, 20.0, 10.0)  # union of both boxes, the second clipped to the image
    assert cat.mask.sum() == 16 + 10 * 5 and cat.mask[5:, 10:].all() and not cat.mask[5:, 4:10].any()
    assert result[2] is cat or (result[2].mask == cat.mask).all()
    assert result[1] == PhraseGrounding(None, None, None, 0) and result[3].mask is None  # nothing kept for dog
    assert query_key("  Hot   Dog ") == "hot dog" and query_key("!!") is None


def test_mask_names_follow_the_papers_layout_and_stay_unique():
    assert mask_names("seg/000000000142", ["chocolate spread", "Silk"]) == [
        "seg/000000000142/mask_000000000142_chocolate_spread.png",
        "seg/000000000142/mask_000000000142_Silk.png",
    ]
    names = mask_names("seg/x", ["a b", "a_b", "a b", "c/d"])
    assert names[0] == names[2] != names[1] and names[3] == "seg/x/mask_x_c_d.png"
    from tokencompose.data.grounded_run import InputRow

    rows = [InputRow(i, Path(f"d{i}/{n}"), "", None, f"d{i}/{n}") for i, n in enumerate(["a.jpg", "A.png", "b.jpg"])]
    assert seg_folders(rows) == ["seg/a", "seg/A__1", "seg/b"]


# --- the whole path on tiny real models ------------------------------------------------------------------


def test_tiny_grounding_dino_and_sam_write_the_papers_format(tmp_path, tiny_models):
    rows = write_images(tmp_path, 6)
    out = tmp_path / "out"
    report = prepare_grounded(settings(rows, out, tiny_models, box_threshold=0.3, text_threshold=0.3, qa=True))
    assert report.complete and report.rows == 6
    lines = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    given = [json.loads(x) for x in rows.read_text().splitlines()]
    for row, src in zip(lines, given, strict=True):  # input order, phrases exactly as given
        assert row["text"] == src["text"] and [p for p, _ in row["attn_list"]] == [p for p, _ in src["attn_list"]]
        assert (out / row["file_name"]).resolve() == (tmp_path / src["file_name"]).resolve()
        assert len(row["boxes"]) == len(row["scores"]) == len(row["detections"]) == len(row["attn_list"])
        for (_, mask), box, score, n in zip(
            row["attn_list"], row["boxes"], row["scores"], row["detections"], strict=True
        ):
            if mask is None:
                assert box is None and score is None
                continue
            assert not os.path.isabs(mask) and mask.startswith("seg/img_")
            m = load_mask(out / mask)
            with Image.open(out / row["file_name"]) as im:
                assert m.shape == (im.height, im.width) and m.any()
            assert score > 0.3 and n >= 1 and box[2] > box[0] and box[3] > box[1]
    assert sum(m is not None for r in lines for _, m in r["attn_list"]) > 0  # the path produced masks
    records = read_jsonl(out / "metadata.jsonl")  # training's reader takes it as it is
    assert len(records) == 6 and all(Path(r.image).is_file() for r in records)
    prov = [json.loads(x) for x in (out / "provenance.jsonl").read_text().splitlines()]
    assert [p["index"] for p in prov] == list(range(6))
    assert prov[0]["detector"] == str(tiny_models["detector"]) and prov[0]["box_threshold"] == 0.3
    assert (out / "qa.json").is_file() and (out / "contact_sheet.png").is_file()
    # a complete output with the same settings is reused; other settings are refused
    assert prepare_grounded(settings(rows, out, tiny_models, box_threshold=0.3, text_threshold=0.3, qa=True)).complete
    with pytest.raises(UserError, match="other settings"):
        prepare_grounded(settings(rows, out, tiny_models, box_threshold=0.5))


def test_nothing_above_the_threshold_gives_null_masks(tmp_path, tiny_models):
    from tokencompose.evaluation.detectors import load_detector

    rows = write_images(tmp_path, 3)
    given = [json.loads(x) for x in rows.read_text().splitlines()]
    images = [Image.open(tmp_path / r["file_name"]).convert("RGB") for r in given]
    queries = [[p for p, _ in r["attn_list"]] for r in given]
    found = load_detector(str(tiny_models["detector"]), batch_size=1).candidates(images, queries)
    best = max(float(torch.sigmoid(logits.max())) for logits, _ in found)  # the random model's best box score
    assert best < 1.0
    # halfway to 1: a margin far above float noise between batch compositions (the score's slope there is 1 - s)
    prepare_grounded(settings(rows, tmp_path / "out", tiny_models, box_threshold=(best + 1.0) / 2))
    lines = [json.loads(x) for x in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()]
    assert all(m is None for r in lines for _, m in r["attn_list"])
    assert all(d == 0 for r in lines for d in r["detections"])
    assert not (tmp_path / "out" / "seg").exists()
    prepare_grounded(settings(rows, tmp_path / "below", tiny_models, box_threshold=best - 1e-7))
    lines = [json.loads(x) for x in (tmp_path / "below" / "metadata.jsonl").read_text().splitlines()]
    assert sum(d for r in lines for d in r["detections"]) >= 1  # the best box alone passes just below it


def test_two_shards_merge_to_the_one_process_output(tmp_path, tiny_models):
    rows = write_images(tmp_path, 7)
    one = prepare_grounded(settings(rows, tmp_path / "one", tiny_models))
    first = prepare_grounded(settings(rows, tmp_path / "two", tiny_models, shard=0, num_shards=2))
    assert not first.complete and not (tmp_path / "two" / "metadata.jsonl").exists()
    second = prepare_grounded(settings(rows, tmp_path / "two", tiny_models, shard=1, num_shards=2))
    assert one.complete and second.complete
    assert output_bytes(tmp_path / "two") == output_bytes(tmp_path / "one")


def test_resume_after_kill_9_gives_byte_identical_output(tmp_path, tiny_models):
    rows = write_images(tmp_path, 24)
    cmd = [sys.executable, "-m", "tokencompose", "prepare", "grounded", "--data", str(rows), "--device", "cpu",
           "--detector", str(tiny_models["detector"]), "--segmenter", str(tiny_models["segmenter"]),
           "--batch-size", "1", "qa=false"]  # fmt: skip
    subprocess.run([*cmd, "--out", str(tmp_path / "whole")], check=True, capture_output=True)
    proc = subprocess.Popen(
        [*cmd, "--out", str(tmp_path / "killed")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    parts = tmp_path / "killed" / "parts"
    deadline = time.time() + 120
    while (
        time.time() < deadline and proc.poll() is None and len(list(parts.glob("*.json")) if parts.is_dir() else []) < 3
    ):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "killed" / "metadata.jsonl").exists()
    subprocess.run([*cmd, "--out", str(tmp_path / "killed")], check=True, capture_output=True)
    assert output_bytes(tmp_path / "killed") == output_bytes(tmp_path / "whole")


# --- the shapes world: the exact detector and box fill give back the rendered boxes ----------------------


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_shapes_world_exact_detector_reproduces_the_rendered_boxes(tmp_path):
    from tokencompose.data.shapes import make_shapes_dataset

    rendered = make_shapes_dataset(tmp_path / "shapes", 40, seed=11, size=128)
    rows = tmp_path / "rows.jsonl"  # the render's captions without its masks: phrases given, masks to find
    src = [json.loads(x) for x in rendered.read_text().splitlines()]
    rows.write_text("".join(json.dumps({"file_name": r["file_name"], "text": r["text"],
                                        "attn_list": [p for p, _ in r["attn_list"]]}) + "\n" for r in src))  # fmt: skip
    s = GroundedSettings(data=str(rows), images=str(tmp_path / "shapes"), out=str(tmp_path / "out"),
                         detector="shapes", segmenter="box", device="cpu", qa=False)  # fmt: skip
    assert prepare_grounded(s).complete
    truth = read_jsonl(rendered)
    got = read_jsonl(tmp_path / "out" / "metadata.jsonl")
    ious = [box_iou(t.box, g.box) if g.box else 0.0 for a, b in zip(truth, got, strict=True)
            for t, g in zip(a.phrases, b.phrases, strict=True)]  # fmt: skip
    assert len(ious) > 80 and min(ious) >= 0.95, sorted(ious)[:5]
    # training's dataset reads the output as it is: every phrase supervised, no drops
    from tokencompose.data.dataset import TokenDataset
    from tokencompose.models import clip_tokenizer

    ds = TokenDataset(tmp_path / "out" / "metadata.jsonl", clip_tokenizer(), image_size=64)
    sample = ds[0]
    assert not sample["dropped"] and sample["phrases"] == [p.text for p in truth[0].phrases]
    assert bool(sample["box_valid"].all())


def test_bad_inputs_are_one_line_errors(tmp_path, tiny_models):
    rows = write_images(tmp_path, 2)
    with pytest.raises(UserError, match="do not exist"):
        prepare_grounded(settings(tmp_path / "nope.jsonl", tmp_path / "o", tiny_models))
    with pytest.raises(UserError, match="box_threshold"):
        prepare_grounded(settings(rows, tmp_path / "o", tiny_models, box_threshold=1.5))
    with pytest.raises(UserError):
        prepare_grounded(GroundedSettings(data=str(rows), out=str(tmp_path / "o"), segmenter="box", detector="no such"))
    cmd = [
        sys.executable,
        "-m",
        "tokencompose",
        "prepare",
        "grounded",
        "--data",
        str(rows),
        "--out",
        str(tmp_path / "o"),
    ]
    proc = subprocess.run([*cmd, "--segmenter", "./missing-folder"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_the_papers_list_keeps_its_phrases_and_layout(tmp_path):
    from tokencompose.data.grounded_run import paper_list

    src = [json.loads(x) for x in paper_list().read_text().splitlines()[:3]]
    images = tmp_path / "train2017"
    images.mkdir()
    for row in src:
        Image.new("RGB", (40, 30), (235, 235, 235)).save(images / row["file_name"])
    s = GroundedSettings(data="paper", images=str(images), out=str(tmp_path / "out"), detector="shapes",
                         segmenter="box", device="cpu", limit=3)  # fmt: skip
    assert prepare_grounded(s).rows == 3
    got = [json.loads(x) for x in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()]
    assert [[p for p, _ in r["attn_list"]] for r in got] == [[p for p, _ in r["attn_list"]] for r in src]
    qa = json.loads((tmp_path / "out" / "qa.json").read_text())
    assert qa["null_rate"] == 1.0  # blank images: nothing found; the paper's own nulls are the reference
    paper_nulls = sum(m is None for r in src for _, m in r["attn_list"]) / sum(len(r["attn_list"]) for r in src)
    assert qa["reference"]["null_rate"] == pytest.approx(paper_nulls)
    with pytest.raises(UserError, match="needs --images"):
        prepare_grounded(GroundedSettings(data="paper", out=str(tmp_path / "o2"), detector="shapes", segmenter="box"))


def test_two_launched_processes_shard_and_merge_like_one(tmp_path):
    """Under torchrun / accelerate launch each process takes its rows; process 0 merges after the barrier."""
    from tokencompose.data.shapes import make_shapes_dataset
    from train_util import torchrun_cli

    rendered = make_shapes_dataset(tmp_path / "shapes", 9, seed=5, size=64)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"file_name": f"shapes/{r['file_name']}", "text": r["text"]}) + "\n"
                            for r in map(json.loads, rendered.read_text().splitlines())))  # fmt: skip
    args = ["prepare", "grounded", "--data", str(rows), "--detector", "shapes", "--segmenter", "box", "--phrases",
            "auto", "--device", "cpu", "--batch-size", "2"]  # fmt: skip
    spacy = pytest.importorskip("spacy")  # rows without phrases: spaCy picks them (in every process alike)
    del spacy
    from tokencompose.cli import main

    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    torchrun_cli([*args, "--out", str(tmp_path / "two")])
    prov = [json.loads(x) for x in (tmp_path / "two" / "provenance.jsonl").read_text().splitlines()]
    assert len(prov) == 9
    assert output_bytes(tmp_path / "two") == output_bytes(tmp_path / "one")
