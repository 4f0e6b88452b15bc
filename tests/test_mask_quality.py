"""`tokencompose evaluate masks`: grounded masks against COCO instances / another metadata.jsonl (CPU, no model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tokencompose.data.official import load_mask, save_mask
from tokencompose.data.records import Phrase, Record, read_jsonl, write_jsonl
from tokencompose.evaluation.mask_quality import MaskQualitySettings, box_iou, evaluate_mask_quality, mask_iou

H, W = 40, 60
CATS = ["person", "dog", "hot dog", "teddy bear"]


def test_mask_iou_and_box_iou() -> None:
    a = np.zeros((4, 4), bool)
    a[:2] = True  # 8 pixels
    b = np.zeros((4, 4), bool)
    b[1:3] = True  # 8 pixels, 4 shared
    assert mask_iou(a, b) == pytest.approx(4 / 12)
    assert mask_iou(a, a) == 1.0 and mask_iou(a, None) == 0.0 and mask_iou(None, a) == 0.0
    assert mask_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 0.0  # empty union
    with pytest.raises(ValueError):
        mask_iou(a, np.zeros((2, 2), bool))
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0 and box_iou(None, (0, 0, 1, 1)) == 0.0
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_word_lookup_without_spacy() -> None:
    from tokencompose.data.coco import lookup_category, name_table
    from tokencompose.evaluation.mask_quality import phrase_words

    table = name_table([*CATS, "bus", "knife", "skis", "cell phone"])

    def cat(text: str) -> str | None:
        found = lookup_category(phrase_words(text), table)
        return None if found is None else found[1]

    assert cat("two hot dogs") == "hot dog" and cat("a hot-dog") == "hot dog"  # multi-word names first
    assert cat("the dogs") == "dog" and cat("puppies") == "dog" and cat("a man") == "person"  # plural, synonym
    assert cat("men") == "person" and cat("Teddy Bears") == "teddy bear" and cat("buses") == "bus"
    assert cat("knives") == "knife" and cat("a pair of skis") == "skis" and cat("cell phones") == "cell phone"
    assert cat("a cat") is None and cat("") is None
    assert lookup_category(["hot", "dogs"], table) == (2, "hot dog")
    assert lookup_category(["big", "dogs"], table, lemma="dog") == (1, "dog")  # spaCy's lemma when given


def rect_poly(x: int, y: int, w: int, h: int) -> list[list[int]]:
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def rect_mask(x: int, y: int, w: int, h: int, shape: tuple[int, int] = (H, W)) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[y : y + h, x : x + w] = True
    return m


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (column-major runs, zeros first), as crowd annotations carry it."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"counts": counts, "size": [mask.shape[0], mask.shape[1]]}


def ann(ann_id: int, image_id: int, cat: str, x: int, y: int, w: int, h: int, crowd: bool = False) -> dict:
    seg = uncompressed_rle(rect_mask(x, y, w, h)) if crowd else rect_poly(x, y, w, h)
    return {
        "id": ann_id, "image_id": image_id, "category_id": CATS.index(cat) + 1, "segmentation": seg,
        "area": w * h, "bbox": [x, y, w, h], "iscrowd": int(crowd),
    }  # fmt: skip


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    inst = {
        "images": [
            {"id": 1, "file_name": "1.jpg", "width": W, "height": H},
            {"id": 2, "file_name": "2.jpg", "width": W, "height": H},
        ],
        "categories": [{"id": i + 1, "name": n, "supercategory": "x"} for i, n in enumerate(CATS)],
        "annotations": [
            ann(1, 1, "person", 2, 2, 10, 10),
            ann(2, 1, "person", 30, 20, 10, 10, crowd=True),  # a crowd region (RLE): part of the union
            ann(3, 1, "dog", 40, 5, 8, 6),
            ann(4, 2, "hot dog", 5, 20, 12, 6),
            ann(5, 2, "dog", 30, 10, 10, 10),
            ann(6, 2, "dog", 44, 24, 10, 10),
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(inst))
    return path


def grounded_dataset(folder: Path) -> Path:
    """Three rows in the paper's format: exact, shifted, null, resized and absent / unmatched phrases."""
    persons = rect_mask(2, 2, 10, 10) | rect_mask(30, 20, 10, 10)
    save_mask(folder / "m" / "1_man.png", persons)  # exact
    save_mask(folder / "m" / "1_dog.png", rect_mask(42, 5, 8, 6))  # shifted 2 px right: IoU 36 / 60
    save_mask(folder / "m" / "1_bear.png", rect_mask(0, 0, 5, 5))  # no teddy bear in image 1
    half = rect_mask(15, 5, 5, 5, (H // 2, W // 2)) | rect_mask(22, 12, 5, 5, (H // 2, W // 2))
    save_mask(folder / "m" / "2_dogs.png", half)  # exact, at half the size
    rows = [
        {
            "file_name": "images/1.jpg",
            "text": "A man with a dog, a cat and the teddy bear.",
            "attn_list": [["man", "m/1_man.png"], ["a dog", "m/1_dog.png"], ["cat", None],
                          ["the teddy bear", "m/1_bear.png"]],
            "boxes": [[2, 2, 40, 30], [42, 5, 50, 11], None, [0, 0, 5, 5]],
            "scores": [0.9, 0.8, None, 0.4],
        },
        {
            "file_name": "images/2.jpg",
            "text": "Two hot dogs and dogs.",
            "attn_list": [["Two hot dogs", None], ["dogs", "m/2_dogs.png"]],
            "boxes": [None, [15, 5, 27, 17]],  # half-size pixels too
            "scores": [None, 0.7],
        },
        {"file_name": "images/9.jpg", "text": "A dog.", "attn_list": [["dog", "m/1_dog.png"]]},  # not in COCO
    ]  # fmt: skip
    path = folder / "metadata.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_coco_reference_by_hand(coco: Path, tmp_path: Path) -> None:
    data = grounded_dataset(tmp_path / "grounded")
    res = evaluate_mask_quality(MaskQualitySettings(data=str(data), reference=str(coco), out=str(tmp_path / "o")))
    assert res["kind"] == "mask_quality" and res["inputs"]["reference_kind"] == "coco"
    cats = res["scores"]["categories"]
    assert list(cats) == ["dog", "hot dog", "person"]  # most phrases first, then by name
    assert cats["person"] == {"count": 1, "mask_iou": 1.0, "box_iou": 1.0, "misses": 0}
    # dog: the shifted mask (36 / 60 pixels, and the same for its box) and the resized exact one
    assert cats["dog"] == {"count": 2, "mask_iou": 0.8, "box_iou": 0.8, "misses": 0}
    assert cats["hot dog"] == {"count": 1, "mask_iou": 0.0, "box_iou": 0.0, "misses": 1}
    o = res["scores"]["overall"]
    assert o["phrases"] == 4 and o["categories"] == 3 and o["misses"] == 1
    assert o["mask_iou"] == pytest.approx((1 + 0.6 + 1 + 0) / 4) and o["box_iou"] == pytest.approx(0.65)
    assert o["mask_iou_categories"] == pytest.approx((1 + 0.8 + 0) / 3)
    c = res["counts"]
    assert c["rows"] == 3 and c["rows_without_reference"] == 1 and c["unmatched_phrases"] == 1
    assert c["absent_category"] == 1 and c["absent_category_grounded"] == 1 and c["resized_masks"] == 1
    on_disk = json.loads((tmp_path / "o" / "results.json").read_text())
    assert on_disk["scores"] == res["scores"] and on_disk["inputs"]["data"]["path"] == str(data.resolve())
    assert len(on_disk["inputs"]["reference"]["sha256"]) == 64 and on_disk["created"]
    md = (tmp_path / "o" / "results.md").read_text()
    assert "| dog | 2 | 0.8000 | 0.8000 | 0 |" in md and md.index("| dog |") < md.index("| person |")

    limited = evaluate_mask_quality(
        MaskQualitySettings(data=str(data), reference=str(coco), out=str(tmp_path / "o1"), limit=1)
    )
    assert limited["counts"]["rows"] == 1 and limited["scores"]["overall"]["phrases"] == 2


def erode(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    return out


def test_shapes_round_trip_and_one_eroded_mask(tmp_path: Path) -> None:
    from tokencompose.data.shapes import make_shapes_dataset

    ref = make_shapes_dataset(tmp_path / "shapes", 8)
    same = evaluate_mask_quality(MaskQualitySettings(data=str(ref), reference=str(ref), out=str(tmp_path / "o")))
    cats = same["scores"]["categories"]
    assert cats and all(c["mask_iou"] == 1.0 and c["box_iou"] == 1.0 and c["misses"] == 0 for c in cats.values())
    assert same["scores"]["overall"]["mask_iou"] == 1.0 and same["inputs"]["reference_kind"] == "metadata"
    assert same["counts"]["unmatched_phrases"] == 0 and same["counts"]["rows_without_reference"] == 0

    records = read_jsonl(ref)
    victim = records[0].phrases[0]
    eroded = tmp_path / "copy" / "eroded.png"
    save_mask(eroded, erode(load_mask(victim.mask)))
    records[0].phrases[0] = Phrase(victim.text, str(eroded), victim.box)
    copy = tmp_path / "copy" / "metadata.jsonl"
    write_jsonl(copy, [Record(r.image, r.caption, r.phrases) for r in records])
    res = evaluate_mask_quality(MaskQualitySettings(data=str(copy), reference=str(ref), out=str(tmp_path / "o2")))
    worse = {name for name, c in res["scores"]["categories"].items() if c["mask_iou"] < 1.0}
    assert worse == {victim.text}
    assert res["scores"]["categories"].keys() == cats.keys() and res["scores"]["overall"]["box_iou"] == 1.0


def test_cli_masks_writes_results_and_refuses_missing_reference(
    coco: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from tokencompose.cli import main

    data = grounded_dataset(tmp_path / "grounded")
    out = tmp_path / "out"
    assert main(["evaluate", "masks", "--data", str(data), "--reference", str(coco), "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["kind"] == "mask_quality"
    assert (out / "results.md").is_file()
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "4 phrases in 3 categories" in printed[0] and "1 unmatched" in printed[0]

    missing = tmp_path / "nope.json"
    assert main(["evaluate", "masks", "--data", str(data), "--reference", str(missing), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0] and "Traceback" not in err[0]


def test_prepare_coco_output_scores_one_against_its_instances(coco: Path, tmp_path: Path) -> None:
    """prepare coco's masks are the reference's own: the shared word rule maps every phrase back to its category."""
    spacy = pytest.importorskip("spacy")
    from PIL import Image

    from tokencompose.data.coco import SPACY_MODEL, prepare_coco

    images = tmp_path / "images"
    images.mkdir()
    for name in ("1.jpg", "2.jpg"):
        Image.fromarray(np.full((H, W, 3), 100, np.uint8)).save(images / name)
    caps = {
        "annotations": [
            {"id": 1, "image_id": 1, "caption": "Two men walk a puppy."},
            {"id": 2, "image_id": 2, "caption": "A dog eats hot dogs."},
        ]
    }
    (tmp_path / "captions.json").write_text(json.dumps(caps))
    path, _ = prepare_coco(
        tmp_path / "captions.json", coco, images, tmp_path / "prep", nlp=spacy.load(SPACY_MODEL, disable=["ner"])
    )
    res = evaluate_mask_quality(MaskQualitySettings(data=str(path), reference=str(coco), out=str(tmp_path / "o")))
    assert set(res["scores"]["categories"]) == {"person", "dog", "hot dog"}
    assert res["scores"]["overall"]["phrases"] == 4 and res["scores"]["overall"]["mask_iou"] == 1.0
    assert res["scores"]["overall"]["box_iou"] == 1.0 and res["counts"]["unmatched_phrases"] == 0
