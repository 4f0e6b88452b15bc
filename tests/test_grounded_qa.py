"""Grounded-mask QA (``tokencompose.data.grounded_qa``) on a folder built by hand, and its report section.

The folder: three rows and one broken line.

- row 0, ``img0.png`` 10x10: ``dog`` (15 px mask: area 0.15, box, score 0.9, 2 detections), ``cat`` (null, 0);
- row 1, ``img1.png`` 20x10: ``bus`` (50 px: 0.25, score 0.5, 1 detection), ``tree`` (mask file missing,
  score 0.7, 3), ``person`` (empty mask: 0.0, score 0.3, 5);
- row 2, ``img2.png`` (not an image), the paper's format (no boxes/scores/detections): ``dog`` (full
  mask: 1.0), ``Cat `` (null; the same phrase as ``cat`` once case and spaces are ignored);
- line 3: not JSON.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tokencompose.data import grounded_qa as G
from tokencompose.data import grounded_sheet as S
from tokencompose.data.official import save_mask
from tokencompose.errors import UserError
from tokencompose.visualize.report import build_report, collect

SEG = "seg/{0}/mask_{0}_{1}.png"


def _mask(out: Path, stem: str, phrase: str, shape: tuple[int, int], pixels: int) -> str:
    m = np.zeros(shape, bool)
    m.flat[:pixels] = True
    rel = SEG.format(stem, phrase)
    save_mask(out / rel, m)
    return rel


def _rows(out: Path) -> list[dict]:
    rng = np.random.default_rng(0)
    for stem, (w, h) in (("img0", (10, 10)), ("img1", (20, 10))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(out / f"{stem}.png")
    (out / "img2.png").write_bytes(b"not a png")
    return [
        {
            "file_name": "img0.png",
            "text": "a dog and a cat",
            "attn_list": [["dog", _mask(out, "img0", "dog", (10, 10), 15)], ["cat", None]],
            "boxes": [[1, 1, 6, 5], None],
            "scores": [0.9, None],
            "detections": [2, 0],
        },
        {
            "file_name": "img1.png",
            "text": "a bus, a tree and a person",
            "attn_list": [
                ["bus", _mask(out, "img1", "bus", (10, 20), 50)],
                ["tree", SEG.format("img1", "tree")],  # never written: a missing mask file
                ["person", _mask(out, "img1", "person", (10, 20), 0)],
            ],
            "boxes": [[0, 0, 10, 5], [2, 2, 4, 4], [1, 1, 2, 2]],
            "scores": [0.5, 0.7, 0.3],
            "detections": [1, 3, 5],
        },
        {
            "file_name": "img2.png",
            "text": "a dog and a Cat",
            "attn_list": [["dog", _mask(out, "img2", "dog", (10, 10), 100)], ["Cat ", None]],
        },
    ]


# The input list: same rows by index, other nulls (and one extra row past ours).
REFERENCE = [
    {"file_name": "img0.png", "text": "", "attn_list": [["dog", "a.png"], ["cat", "b.png"]]},
    {
        "file_name": "img1.jpg",  # another name: counted as a mismatch, still compared by index
        "text": "",
        "attn_list": [["person", None], ["bus", "c.png"], ["tree", "d.png"], ["kite", None]],
    },
    {"file_name": "elsewhere/img2.png", "text": "", "attn_list": [["cat", None]]},
    {"file_name": "img3.png", "text": "", "attn_list": [["x", None]]},  # against our broken line
    {"file_name": "img4.png", "text": "", "attn_list": [["y", "e.png"]]},  # past our end
]


@pytest.fixture()
def folder(tmp_path) -> Path:
    out = tmp_path / "grounded"
    out.mkdir()
    lines = [json.dumps(r) for r in _rows(out)] + ["{broken"]
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "reference.jsonl").write_text("".join(json.dumps(r) + "\n" for r in REFERENCE))
    return out


def test_summary_numbers_by_hand(folder):
    s = G.qa_summary(G.JsonlRows(folder / "metadata.jsonl"), folder)
    assert s["kind"] == "grounded_qa"
    assert (s["rows"], s["malformed_rows"], s["phrases"]) == (3, 1, 7)
    assert (s["phrases_with_mask"], s["null_phrases"]) == (5, 2)
    assert s["null_rate"] == pytest.approx(2 / 7)
    assert s["mask_errors"] == {"missing_mask": 1}
    area = s["area"]  # 0.15, 0.25, 0.0 (empty), 1.0 (full: the last bin holds 1.0)
    assert area["count"] == 4 and area["empty"] == 1
    assert area["mean"] == pytest.approx(1.4 / 4) and area["median"] == pytest.approx(0.2)
    assert area["counts"] == [1, 1, 1, 0, 0, 0, 0, 0, 0, 1]
    assert area["edges"] == pytest.approx(np.linspace(0, 1, 11).tolist())
    assert s["detections"] == {"rows": 2, "phrases": 5, "histogram": {"0": 1, "1": 1, "2": 1, "3+": 2}}
    sc = s["scores"]
    assert sc["rows"] == 2 and sc["count"] == 4 and sc["mean"] == pytest.approx(0.6)
    q = sc["quantiles"]
    assert (q["0"], q["0.25"], q["0.5"], q["1"]) == pytest.approx((0.3, 0.45, 0.6, 0.9))
    assert s["boxes"] == {"rows": 2, "phrases": 4}
    assert s["top_nulls"] == [{"phrase": "cat", "nulls": 2, "total": 2}]
    assert s["reference"] is None
    json.dumps(s)  # plain JSON


def test_reference_agreement_by_hand(folder):
    rows = list(G.JsonlRows(folder / "metadata.jsonl"))  # the broken line reads as None and keeps its index
    assert len(rows) == 4 and rows[3] is None
    s = G.qa_summary(rows, folder, REFERENCE)
    ref = s["reference"]
    # compared: rows 0-2 (row 3 is our broken line, row 4 is past our end)
    assert ref["rows_compared"] == 3 and ref["reference_only_rows"] == 1 and ref["file_name_mismatches"] == 1
    assert ref["phrases"] == 7 and ref["null_rate"] == pytest.approx(3 / 7)  # person, kite, cat
    assert ref["ours_phrases"] == 7 and ref["ours_null_rate"] == pytest.approx(2 / 7)
    # matched: dog, cat | person, bus, tree | cat~"Cat "; our row 2 "dog" and their "kite" have no partner
    assert ref["matched_phrases"] == 6
    assert (ref["both_mask"], ref["both_null"], ref["only_ours_null"], ref["only_reference_null"]) == (3, 1, 1, 1)
    assert ref["agreement"] == pytest.approx(4 / 6)
    assert (ref["unmatched_ours"], ref["unmatched_reference"]) == (1, 1)
    assert ref["top_only_ours_null"] == [{"phrase": "cat", "nulls": 1, "total": 2}]
    assert ref["top_only_reference_null"] == [{"phrase": "person", "nulls": 1, "total": 1}]


def test_old_format_and_empty_folders_give_absent_stats(tmp_path):
    rows = [{"file_name": "a.png", "text": "t", "attn_list": [["cat", None], ["dog", None]]}]
    s = G.qa_summary(rows, tmp_path)
    assert s["detections"] is None and s["scores"] is None and s["boxes"] is None
    assert s["null_rate"] == 1.0 and s["area"]["count"] == 0 and s["area"]["mean"] is None
    empty = G.qa_summary([], tmp_path, [])
    assert empty["rows"] == 0 and empty["null_rate"] is None and empty["reference"]["agreement"] is None
    for summary in (s, empty):  # nothing to draw is drawn as such, not raised
        png = S.draw_qa(summary, tmp_path / "qa.png")
        assert Image.open(png).size == S.QA_SIZE
    sheet = S.contact_sheet([], tmp_path, tmp_path / "sheet.png")
    Image.open(sheet).verify()


def _png_ok(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_write_qa_writes_json_and_figures(folder, tmp_path):
    s = G.write_qa(folder, tmp_path / "reference.jsonl", seed=3)
    on_disk = json.loads((folder / "qa.json").read_text())
    assert on_disk == json.loads(json.dumps(s))
    assert on_disk["rows"] == 3 and on_disk["reference"]["agreement"] == pytest.approx(4 / 6)
    assert on_disk["figures"] == {"qa": "qa.png", "contact_sheet": "contact_sheet.png", "seed": 3}
    assert _png_ok(folder / "qa.png") == S.QA_SIZE
    # 4 lines (the broken one too) -> a 2 x 2 grid of cells
    cell_w = 256 + 2 * S.PAD_PX
    cell_h = S.TITLE_PX + 256 + S.LEGEND_LINES * S.LINE_PX + 2 * S.PAD_PX
    assert _png_ok(folder / "contact_sheet.png") == (2 * cell_w, 2 * cell_h)
    assert not list(folder.glob(".*.tmp"))  # atomic writes leave no temporaries
    with pytest.raises(UserError, match="does not exist"):
        G.write_qa(tmp_path / "nowhere")
    with pytest.raises(UserError, match="reference list"):
        G.write_qa(folder, tmp_path / "nope.jsonl")


def test_contact_sheet_is_seeded(folder, tmp_path):
    rows = G.JsonlRows(folder / "metadata.jsonl")
    a = S.contact_sheet(rows, folder, tmp_path / "a.png", n=2, seed=0, tile=64).read_bytes()
    b = S.contact_sheet(rows, folder, tmp_path / "b.png", n=2, seed=0, tile=64).read_bytes()
    c = S.contact_sheet(rows, folder, tmp_path / "c.png", n=2, seed=1, tile=64).read_bytes()
    assert a == b and a != c
    listed = list(rows)  # a list draws the same rows as the lazy file
    assert S.contact_sheet(listed, folder, tmp_path / "d.png", n=2, seed=0, tile=64).read_bytes() == a
    assert _png_ok(tmp_path / "a.png") == (2 * (64 + 2 * S.PAD_PX), 64 + S.TITLE_PX + S.LEGEND_LINES * S.LINE_PX + 12)


def test_contact_sheet_survives_missing_images_and_masks(tmp_path):
    rows = [
        {"file_name": "nope.png", "text": "", "attn_list": [["a", "nope_mask.png"]]},
        {"file_name": str(tmp_path), "text": "", "attn_list": [["a", None]]},  # a folder, not an image
        "not a row",
        {"text": "no file name", "attn_list": []},
    ]
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "bad_mask.png").write_bytes(b"junk")
    rows.append(
        {
            "file_name": "ok.png",
            "text": "",
            "attn_list": [["m", "bad_mask.png"], ["n", "gone.png"], ["o", None]] + [[f"p{i}", None] for i in range(6)],
            "boxes": [[0, 0, 4, 4], [float("nan"), 0, 1, 1], None] + [None] * 6,
            "scores": [0.5, "high", None] + [None] * 6,
            "detections": [1, True, 0] + [0] * 6,
        }
    )
    png = S.contact_sheet(rows, tmp_path, tmp_path / "sheet.png", n=16, tile=48)
    assert _png_ok(png)[0] == 3 * (48 + 2 * S.PAD_PX)  # 5 rows -> 3 columns
    s = G.qa_summary(rows, tmp_path)
    assert s["malformed_rows"] == 1 and s["mask_errors"] == {"missing_mask": 2, "unreadable_mask": 1}


def test_report_has_grounded_section(folder, tmp_path):
    G.write_qa(folder, tmp_path / "reference.jsonl")
    # a copy below a data folder's seg/ (100k folders in a real one) is never searched
    (folder / "seg" / "img0" / "qa.json").write_text((folder / "qa.json").read_text())
    got = collect([tmp_path])  # found by searching the parent, like any other input
    assert [(name, path) for name, path, _ in got.grounded] == [("grounded", folder)]
    page = build_report([tmp_path], tmp_path / "r.html").read_text()
    assert '<section id="grounded"><h2>Grounded masks</h2>' in page
    section = page.split('<section id="grounded">')[1].split("</section>")[0]
    imgs = re.findall(r'<img [^>]*src="([^"]+)"', section)
    assert len(imgs) == 2 and all(s.startswith("data:image/png;base64,") for s in imgs)
    for text in ("28.6%", "42.9%", "66.7%", "0.350", "0.200", "1 / 1 / 1 / 2", "missing mask 1"):
        assert text in section, text
    assert "of 6 phrases" in section


def test_report_grounded_only_old_format_and_omitted(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "", "attn_list": [["a", None]]}))
    G.write_qa(out)
    (out / "contact_sheet.png").unlink()  # a figure gone: the section shows what is left
    page = build_report([out], tmp_path / "r.html").read_text()
    section = page.split('<section id="grounded">')[1].split("</section>")[0]
    assert len(re.findall(r"<img ", section)) == 1 and "100.0%" in section
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "qa.json").write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(UserError, match="nothing to report"):
        build_report([tmp_path / "run"], tmp_path / "r2.html")
