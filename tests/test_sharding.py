"""``shard_map``: each launched process scores its items into a part file, process 0 merges them in item order.

The processes are played one after another with a stand-in for accelerate's state (its barrier a no-op): the
others first, process 0 last, as the barrier orders them. Real two-process launches are in the tests of the
commands that use it (FID, T2I-CompBench, CLIP score, the shapes world).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tokencompose.sharding import Shard, interleave, shard_map
from train_util import FakeLaunchState


def _launch(count: int, items: list, work, parts: Path, name: str = "rows") -> list:
    """Every process's return value, process 0's last (it reads the others' parts after the barrier)."""
    out = {}
    for index in [*range(1, count), 0]:
        shard = Shard(torch.device("cpu"), index, count, FakeLaunchState(index == 0))
        out[index] = shard_map(shard, items, work, parts, name)
    return [out[k] for k in range(count)]


@pytest.mark.parametrize("count", [2, 3, 5])
def test_lists_come_back_in_item_order_and_parts_are_removed(tmp_path, count):
    items = list(range(7))
    seen = []

    def work(part):
        seen.append(part)
        return [{"item": i, "square": i * i} for i in part]

    results = _launch(count, items, work, tmp_path / "parts")
    assert results[0] == [{"item": i, "square": i * i} for i in items]
    assert all(r is None for r in results[1:])
    assert sorted(i for part in seen for i in part) == items  # each item scored once
    assert [len(p) for p in seen if p] == [len(items[k::count]) for k in [*range(1, count), 0] if items[k::count]]
    assert list((tmp_path / "parts").iterdir()) == []


def test_arrays_merge_row_by_row_even_with_an_empty_shard(tmp_path):
    items = [f"im{i}.png" for i in range(3)]
    rows = {name: np.full(4, i, dtype=np.float32) for i, name in enumerate(items)}

    def work(part):
        return np.stack([rows[name] for name in part])

    merged = _launch(4, items, work, tmp_path / "parts")[0]  # shard 3 has no item
    assert merged.dtype == np.float32 and merged.shape == (3, 4)
    np.testing.assert_array_equal(merged, np.stack([rows[n] for n in items]))


def test_one_process_or_hand_picked_shards_do_all_the_work(tmp_path):
    def work(part):
        return [x + 1 for x in part]

    assert shard_map(Shard(torch.device("cpu"), 0, 1), [1, 2], work, tmp_path, "x") == [2, 3]
    # --shard 1 --num-shards 2 without a launch cannot wait for shard 0: whoever scores scores everything.
    assert shard_map(Shard(torch.device("cpu"), 1, 2), [1, 2, 3], work, tmp_path, "x") == [2, 3, 4]
    assert not tmp_path.joinpath("x-0-of-2.json").exists()


def test_interleave_refuses_parts_that_do_not_split_the_items():
    assert interleave([[0, 2], [1]], 3) == [0, 1, 2]
    with pytest.raises(RuntimeError, match="do not split"):
        interleave([[0, 2], [1, 3]], 3)


def test_a_missing_part_after_the_barrier_is_an_error_not_a_short_result(tmp_path):
    shard = Shard(torch.device("cpu"), 0, 2, FakeLaunchState(True))  # process 1 never wrote its part
    with pytest.raises(RuntimeError, match="missing"):
        shard_map(shard, [1, 2, 3], lambda part: list(part), tmp_path, "x")
