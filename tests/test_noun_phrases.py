"""Noun phrases picked from a caption (the paper's rule with spaCy's tagger), and their agreement measure."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tokencompose.data.noun_phrases import (
    doc_noun_phrases,
    load_nlp,
    noun_phrases,
    noun_phrases_batch,
    phrase_agreement,
)
from tokencompose.errors import UserError
from tokencompose.tokens import find_phrase_chars

BENCH = Path(__file__).resolve().parents[1] / "bench" / "noun_phrase_agreement.py"

CAPTIONS = {
    # caption: our phrases, in caption order
    "Plate with a piece of bread, dark chocolate spread, bananas and a carton of Silk.": [
        "Plate",
        "piece",
        "bread",
        "chocolate spread",
        "bananas",
        "carton",
        "Silk",
    ],
    "A man in a white t-shirt holds a ping pong paddle.": ["man", "t-shirt", "ping pong paddle"],
    "A bicycle in front of a double-decker bus and Big Ben in London.": [
        "bicycle",
        "front",
        "double-decker bus",
        "Big Ben",
        "London",
    ],
    "The Eiffel Tower seen from the Seine river at night.": ["Eiffel Tower", "Seine river", "night"],
    # "remote" is an adjective to both taggers: the paper's list has "controls" here too
    "A cat sitting on a couch with two remote controls.": ["cat", "couch", "controls"],
    "A young boy eats a doughnut top with heart-shaped candies.": ["boy", "doughnut top", "candies"],
    "A close-up of a yellow banana on a table.": ["close-up", "banana", "table"],
    "Pasta salad with tomatoes, broccoli,beans and sausage in a bowl.": [
        "Pasta salad",
        "tomatoes",
        "broccoli",
        "beans",
        "sausage",
        "bowl",
    ],
    "Dr. Pepper, a sandwich and some fries on a tray": ["Dr. Pepper", "sandwich", "fries", "tray"],
    "a lady eating a sandwich  chips and a bottle of water": ["lady", "sandwich  chips", "bottle", "water"],
    "A dog chases a cat and another dog and a cat.": ["dog", "cat"],
    "": [],
    "   ": [],
}


@pytest.fixture(scope="module")
def nlp():
    pytest.importorskip("spacy", reason="spaCy is not installed (pip install -e '.[grounded]')")
    from tokencompose.data.coco import SPACY_MODEL

    if importlib.util.find_spec(SPACY_MODEL) is None:
        pytest.skip(f"spaCy model {SPACY_MODEL} is not installed (pip install -e '.[grounded]')")
    return load_nlp()


@pytest.mark.parametrize("caption", list(CAPTIONS))
def test_noun_phrases(nlp, caption):
    phrases = noun_phrases(caption, nlp)
    assert phrases == CAPTIONS[caption]
    for phrase in phrases:  # the caption's own text: the token-span rule finds it
        assert phrase in caption
        assert find_phrase_chars(caption, phrase) is not None


def test_batch_matches_single(nlp):
    captions = list(CAPTIONS)
    assert noun_phrases_batch(captions, nlp, batch_size=3) == [noun_phrases(c, nlp) for c in captions]


def test_plain_tokens_is_the_rule_on_spacy_tokens(nlp):
    """Without the word rules, hyphens and extra spaces cut runs (what the module's rules fix)."""
    assert doc_noun_phrases(nlp("A double-decker bus near a t-shirt."), plain_tokens=True) == [
        "decker bus",
        "t",
        "shirt",
    ]
    assert doc_noun_phrases(nlp("A heart-shaped cake."), plain_tokens=True) == ["heart", "cake"]
    assert doc_noun_phrases(nlp("a sandwich  chips"), plain_tokens=True) == ["sandwich", "chips"]


def test_phrase_agreement_counts(nlp):
    rows = [
        ("A dog chases a cat and another dog.", ["cat", "dog"]),  # ours: dog, cat -> equal as sets
        ("A teddy bear on a bed.", ["bear", "bed", "bed"]),  # ours: teddy bear, bed; "bed" counts once
        ("A Dog with a ball and a leash.", ["dog", "ball", "leash", "collar"]),  # ours: Dog, ball, leash
    ]
    assert [noun_phrases(c, nlp) for c, _ in rows] == [
        ["dog", "cat"],
        ["teddy bear", "bed"],
        ["Dog", "ball", "leash"],
    ]
    r = phrase_agreement(rows, nlp)
    # reference 2 + 2 + 4 = 8, ours 2 + 2 + 3 = 7, matched 2 + 1 + 2 = 5, case-insensitive 2 + 1 + 3 = 6
    assert (r["rows"], r["reference"], r["ours"], r["matched"], r["matched_ci"]) == (3, 8, 7, 5, 6)
    assert r["precision"] == pytest.approx(5 / 7)
    assert r["recall"] == pytest.approx(5 / 8)
    assert r["f1"] == pytest.approx(2 * 5 / (8 + 7))
    assert r["precision_ci"] == pytest.approx(6 / 7)
    assert r["recall_ci"] == pytest.approx(6 / 8)
    assert r["f1_ci"] == pytest.approx(2 * 6 / (8 + 7))
    assert r["rows_equal"] == pytest.approx(1 / 3) and r["rows_equal_count"] == 1
    assert sorted(r["misses"]) == [["bear", 1], ["collar", 1], ["dog", 1]]
    assert sorted(r["extras"]) == [["Dog", 1], ["teddy bear", 1]]


def test_phrase_agreement_empty(nlp):
    r = phrase_agreement([], nlp)
    assert (r["rows"], r["reference"], r["ours"], r["f1"], r["rows_equal"]) == (0, 0, 0, 0.0, 0.0)


def test_load_nlp_missing_model():
    pytest.importorskip("spacy", reason="spaCy is not installed")
    with pytest.raises(UserError, match=r'not installed .*pip install -e "\.\[grounded\]"') as info:
        load_nlp("no_such_spacy_model_xyz")
    assert "\n" not in str(info.value) and "no_such_spacy_model_xyz" in str(info.value)


def test_load_nlp_without_tagger(tmp_path):
    spacy = pytest.importorskip("spacy", reason="spaCy is not installed")
    spacy.blank("en").to_disk(tmp_path / "blank")
    with pytest.raises(UserError, match="has no tagger"):
        load_nlp(str(tmp_path / "blank"))


def test_load_nlp_without_spacy(monkeypatch):
    monkeypatch.setitem(sys.modules, "spacy", None)  # import spacy -> ImportError
    with pytest.raises(UserError, match=r'spaCy is not installed .*pip install -e "\.\[grounded\]"'):
        load_nlp()


def test_bench_runs_on_a_tiny_list(nlp, tmp_path, capsys):
    """bench/noun_phrase_agreement.py on two rows in the paper's format (so the script cannot rot)."""
    data = tmp_path / "metadata.jsonl"
    rows = [
        {"file_name": "a.jpg", "text": "A teddy bear on a bed.", "attn_list": [["bear", "m.png"], ["bed", None]]},
        {"file_name": "b.jpg", "text": "A double-decker bus.", "attn_list": [["double-decker bus", None]]},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = importlib.util.spec_from_file_location("noun_phrase_agreement", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "out.json"
    result = bench.main(["--data", str(data), "--json", str(out)])
    assert json.loads(out.read_text())["ours"] == result["ours"]
    assert (result["ours"]["reference"], result["ours"]["ours"], result["ours"]["matched"]) == (3, 3, 2)
    assert (result["plain"]["ours"], result["plain"]["matched"]) == (3, 1)  # "decker bus" without the word rule
    assert result["substring_misses"] == 0 and result["token_rule_misses"] == []
    assert "rows equal 1/2" in capsys.readouterr().out
