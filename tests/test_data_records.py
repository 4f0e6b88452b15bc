"""Records, the Source-A jsonl format, malformed lines and drop counting."""

from __future__ import annotations

import json

import pytest

from tokencompose.data import records as R
from tokencompose.data.dataset import JsonlIndex


def test_jsonl_roundtrip_relative_paths_and_boxes(tmp_path):
    recs = [
        R.Record(
            str(tmp_path / "img" / "a.png"),
            "a red circle and a blue square",
            [
                R.Phrase("red circle", str(tmp_path / "m" / "a0.png"), (1.0, 2.0, 3.5, 4.0)),
                R.Phrase("blue square", None, None),
            ],
        ),
        R.Record(str(tmp_path / "img" / "b.png"), "nothing here", []),
    ]
    path = tmp_path / "metadata.jsonl"
    assert R.write_jsonl(path, recs) == 2
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["file_name"] == "img/a.png"  # relative to the jsonl folder
    assert rows[0]["attn_list"] == [["red circle", "m/a0.png"], ["blue square", None]]
    assert rows[0]["boxes"] == [[1.0, 2.0, 3.5, 4.0], None]
    assert "boxes" not in rows[1]
    assert R.read_jsonl(path) == recs


def test_paper_rows_without_boxes_parse(tmp_path):
    line = '{"file_name": "x.jpg", "text": "A cat on a man.", "attn_list": [["cat", "seg/c.png"], ["man", null]]}'
    (tmp_path / "metadata.jsonl").write_text(line + "\n")
    (rec,) = R.read_jsonl(tmp_path / "metadata.jsonl")
    assert rec.image == str(tmp_path / "x.jpg")
    assert rec.phrases == [R.Phrase("cat", str(tmp_path / "seg/c.png"), None), R.Phrase("man", None, None)]


BAD_LINES = [
    '{"file_name": "a.png", "text": "ok", "attn_list": []}',  # 1: good
    '{"file_name": "b.png", "text": "broken"',  # 2: bad JSON
    "",  # 3: blank, ignored
    '{"text": "no file"}',  # 4: missing file_name
    '{"file_name": "c.png", "text": "x", "attn_list": [["x"]]}',  # 5: pair expected
    '{"file_name": "d.png", "text": "x", "attn_list": [["x", null]], "boxes": []}',  # 6: misaligned boxes
    "[1, 2]",  # 7: not an object
    '{"file_name": "e.png", "text": "fine", "attn_list": [["fine", null]]}',  # 8: good
]


def test_malformed_lines_reported_with_line_numbers(tmp_path, caplog):
    path = tmp_path / "metadata.jsonl"
    path.write_text("\n".join(BAD_LINES) + "\n")
    errors: list = []
    recs = R.read_jsonl(path, errors=errors)
    assert [r.caption for r in recs] == ["ok", "fine"]
    assert [n for n, _ in errors] == [2, 4, 5, 6, 7]
    assert "metadata.jsonl:5" in caplog.text
    index = JsonlIndex(path)  # the lazy index validates the same way, once
    assert len(index) == 2 and [n for n, _ in index.errors] == [2, 4, 5, 6, 7]
    assert index[1].caption == "fine"


def test_drop_counter_aggregates_batches_and_resets(caplog):
    counter = R.DropCounter({R.MALFORMED_LINE: 2})
    counter.update({"dropped": [R.NULL_MASK, R.NULL_MASK, R.MISSING_MASK]})
    counter.update([R.DUPLICATE_PHRASE])
    assert counter.as_dict() == {R.DUPLICATE_PHRASE: 1, R.MALFORMED_LINE: 2, R.MISSING_MASK: 1, R.NULL_MASK: 2}
    with caplog.at_level("INFO"):
        line = counter.report()
    assert "null_mask=2" in line and "null_mask=2" in caplog.text
    counter.reset()
    assert counter.as_dict() == {R.MALFORMED_LINE: 2}


@pytest.mark.parametrize("bad", [{"file_name": 3, "text": "x"}, {"file_name": "a", "text": "x", "boxes": [[1, 2, 3]]}])
def test_parse_row_rejects(bad):
    with pytest.raises(R.MalformedRow):
        R.parse_row(bad)
