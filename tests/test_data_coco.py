"""Source B: COCO captions + instances -> Source A rows with real masks, on a tiny COCO the test writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tokencompose.data.records import read_jsonl
from train_util import RecordingBars

spacy = pytest.importorskip("spacy")
pytest.importorskip("pycocotools")

CATS = ["person", "dog", "teddy bear", "hot dog", "cell phone", "dining table", "skis"]


@pytest.fixture(scope="module")
def nlp():
    from tokencompose.data.coco import SPACY_MODEL

    return spacy.load(SPACY_MODEL, disable=["ner"])


def rect(x, y, w, h, cat, ann_id, image_id):
    poly = [x, y, x + w, y, x + w, y + h, x, y + h]
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": CATS.index(cat) + 1,
        "segmentation": [poly],
        "area": w * h,
        "bbox": [x, y, w, h],
        "iscrowd": 0,
    }


@pytest.fixture
def tiny_coco(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("1.jpg", "2.jpg"):
        Image.fromarray(np.full((40, 60, 3), 100, np.uint8)).save(images / name)
    inst = {
        "images": [
            {"id": 1, "file_name": "1.jpg", "width": 60, "height": 40},
            {"id": 2, "file_name": "2.jpg", "width": 60, "height": 40},
            {"id": 3, "file_name": "3.jpg", "width": 60, "height": 40},  # file missing
        ],
        "categories": [{"id": i + 1, "name": n, "supercategory": "x"} for i, n in enumerate(CATS)],
        "annotations": [
            rect(2, 2, 10, 10, "person", 1, 1),
            rect(30, 20, 8, 12, "person", 2, 1),  # two persons: one union mask
            rect(20, 5, 6, 6, "dog", 3, 1),
            rect(40, 2, 10, 8, "teddy bear", 4, 2),
            rect(5, 20, 12, 6, "hot dog", 5, 2),
        ],
    }
    caps = {
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "A street at night."},  # nothing matches
            {"id": 11, "image_id": 1, "caption": "Two men walk a puppy past a cat."},
            {"id": 12, "image_id": 1, "caption": "A man with a dog."},  # as many matches: the first wins
            {"id": 20, "image_id": 2, "caption": "A teddy bear eats hot dogs next to a cell phone."},
            {"id": 30, "image_id": 3, "caption": "A dog."},
        ]
    }
    (tmp_path / "instances.json").write_text(json.dumps(inst))
    (tmp_path / "captions.json").write_text(json.dumps(caps))
    return tmp_path


def test_noun_matching(nlp):
    from tokencompose.data.coco import match_nouns, name_table

    table = name_table(CATS)
    got = match_nouns(nlp("Two men and a teddy bear eat hot dogs by a cell phone and puppies on the table."), table)
    assert got == [
        ("men", "person"),
        ("teddy bear", "teddy bear"),
        ("hot dogs", "hot dog"),
        ("cell phone", "cell phone"),
        ("puppies", "dog"),
        ("table", "dining table"),
    ]
    assert match_nouns(nlp("A girl on skis."), table) == [("girl", "person"), ("skis", "skis")]
    assert match_nouns(nlp("A street with a tree."), table) == []


def test_prepare_coco_writes_source_a_with_real_masks(tiny_coco, nlp):
    from pycocotools.coco import COCO

    from tokencompose.data.coco import prepare_coco
    from tokencompose.data.official import load_mask

    path, stats = prepare_coco(
        tiny_coco / "captions.json", tiny_coco / "instances.json", tiny_coco / "images", tiny_coco / "out", nlp=nlp
    )
    assert stats["missing_image"] == 1 and stats["rows"] == 2
    recs = read_jsonl(path)
    assert [r.caption for r in recs] == ["Two men walk a puppy past a cat.", recs[1].caption]
    first = recs[0]
    assert [p.text for p in first.phrases] == ["men", "puppy"]  # "cat" is no category here
    coco = COCO(str(tiny_coco / "instances.json"))
    persons = coco.annToMask(coco.anns[1]) | coco.annToMask(coco.anns[2])
    assert np.array_equal(load_mask(first.phrases[0].mask), persons.astype(bool))
    assert first.phrases[0].box == (2.0, 2.0, 38.0, 32.0)  # union box
    second = {p.text: p for p in recs[1].phrases}
    assert set(second) == {"teddy bear", "hot dogs", "cell phone"}
    assert second["cell phone"].mask is None and second["hot dogs"].mask is not None  # no phone instance


def test_cli_prepare_coco_then_train_dataset(tiny_coco):
    from tokencompose.cli import main
    from tokencompose.data.dataset import TokenDataset, collate
    from tokencompose.models import clip_tokenizer

    argv = ["prepare", "coco", "--captions", str(tiny_coco / "captions.json")]
    argv += ["--instances", str(tiny_coco / "instances.json"), "--images", str(tiny_coco / "images")]
    assert main([*argv, "--out", str(tiny_coco / "o")]) == 0
    ds = TokenDataset(tiny_coco / "o" / "metadata.jsonl", clip_tokenizer(), image_size=32)
    batch = collate([ds[0], ds[1]])
    assert batch["phrases"] == [["men", "puppy"], ["teddy bear", "hot dogs"]]
    assert batch["box_valid"].all() and batch["dropped"] == ["null_mask"]


def test_prepare_coco_progress_bar_stays_off_a_terminal(tiny_coco, nlp, tmp_path, monkeypatch, capsys):
    from tokencompose.data.coco import prepare_coco

    recorder = RecordingBars()
    recorder.install(monkeypatch)
    prepare_coco(
        tiny_coco / "captions.json", tiny_coco / "instances.json", tiny_coco / "images", tmp_path / "out", nlp=nlp
    )
    [(kwargs, bar)] = recorder.bars
    assert kwargs["desc"] == "prepare coco" and kwargs["disable"] is None  # None: a bar on a terminal only
    assert bar.total == bar.n == 3  # every captioned image, the missing one included
    assert "prepare coco" not in capsys.readouterr().err  # pytest's stderr is no terminal
