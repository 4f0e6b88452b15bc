"""MultiGen prompt files, category lists and the seeded sampler."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tokencompose.evaluation.prompts import (
    article,
    categories,
    load_prompts,
    multigen_path,
    multigen_text,
    sample_prompts,
    save_prompts,
    vocabulary,
)

REPO = Path(__file__).resolve().parents[1]
OFFICIAL = REPO.parent / "shared" / "data" / "official"


@pytest.mark.parametrize("name", ["coco", "ade20k"])
def test_shipped_files_are_the_papers(name: str) -> None:
    prompts = load_prompts(name)
    assert len(prompts) == 1000 and all(len(p.categories) == 5 for p in prompts)
    assert [p.uid for p in prompts] == list(range(1000))
    official = OFFICIAL / multigen_path(name).name
    if official.is_file():  # shipped unchanged
        shipped = hashlib.sha256(multigen_path(name).read_bytes()).hexdigest()
        assert shipped == hashlib.sha256(official.read_bytes()).hexdigest()
    assert (multigen_path(name).parent / "NOTICE").is_file()


def test_category_lists() -> None:
    coco = categories("coco")
    assert len(coco) == 80 and len(set(coco)) == 80 and coco[0] == "person" and coco[-1] == "toothbrush"
    assert set(vocabulary(load_prompts("coco"))) == set(coco)
    ade = categories("ade20k")
    assert len(ade) == 150 and len(set(ade)) == 150
    ade_mg = categories("ade20k_multigen")
    assert len(ade_mg) == 100 and set(ade_mg) <= set(ade)
    assert len(categories("shapes")) == 24 and categories("shapes_attributes") == categories("shapes")
    assert len(categories("shapes_nouns")) == 6 and set(categories("shapes_nouns")) < set(categories("shapes"))


def test_articles_and_text() -> None:
    assert [article(w) for w in ["apple", "cup", "orange", "umbrella", "hour glass", "unicorn", "one"]] == [
        "an", "a", "an", "an", "an", "a", "a",
    ]  # fmt: skip
    assert multigen_text(["apple"]) == "a photo of an apple."
    assert multigen_text(["apple", "cup"]) == "a photo of an apple and a cup."
    assert multigen_text(["book", "cup", "elephant"]) == "a photo of a book, a cup, and an elephant."


def test_sampler_seeded_distinct_any_k(tmp_path: Path) -> None:
    coco = categories("coco")
    a = sample_prompts(coco, 50, num_objects=10, seed=1)
    assert a == sample_prompts(coco, 50, num_objects=10, seed=1)
    assert a != sample_prompts(coco, 50, num_objects=10, seed=2)
    assert all(len(set(p.categories)) == 10 and set(p.categories) <= set(coco) for p in a)
    assert "an apple" in " ".join(p.text for p in a) or all("apple" not in p.categories for p in a)
    with pytest.raises(ValueError):
        sample_prompts(coco, 1, num_objects=11)
    with pytest.raises(ValueError):
        sample_prompts(["x", "y"], 1, num_objects=3)
    save_prompts(a, tmp_path / "p.json")
    assert load_prompts(tmp_path / "p.json") == a
    row = json.loads((tmp_path / "p.json").read_text())[0]
    assert row["obj_1_attributes"] == [a[0].categories[0]] and row["num_objects"] == 10


def test_sampler_custom_text() -> None:
    p = sample_prompts(["red circle", "blue square", "green triangle"], 3, 2, seed=0, text_fn=" and ".join)
    assert all(" and " in x.text for x in p)
