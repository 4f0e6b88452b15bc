"""The one durable atomic write: old content or new, never half; the rename itself is fsynced."""

from __future__ import annotations

import pytest

from tokencompose import atomic


def test_write_fsyncs_the_folder_after_the_rename(tmp_path, monkeypatch) -> None:
    synced = []
    monkeypatch.setattr(atomic, "fsync_path", lambda p: synced.append(p))
    atomic.write_json_atomic(tmp_path / "a.json", {"x": 1})
    assert (tmp_path / "a.json").read_text() == '{\n  "x": 1\n}\n'
    assert synced == [tmp_path]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path) -> None:
    path = tmp_path / "a.txt"
    atomic.atomic_write_text(path, "old")
    with pytest.raises(RuntimeError), atomic.atomic_writer(path) as f:
        f.write("new, half")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
