"""Detectors through transformers on tiny random-init OWLv2 / OWL-ViT / Grounding DINO folders (offline)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokencompose.evaluation.detectors import (
    GroundingDinoDetector,
    OwlDetector,
    detector_kind,
    load_detector,
    reduce_boxes,
)
from tokencompose.evaluation.tiny_detectors import save_tiny_grounding_dino, save_tiny_owl


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in range(3)]


@pytest.fixture(scope="module")
def owl2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_owl(tmp_path_factory.mktemp("owlv2"), version=2)


def test_reduce_boxes_argmax_then_max() -> None:
    probs = torch.logit(torch.tensor([[0.9, 0.8], [0.3, 0.2], [0.1, 0.7]]))  # box 0 -> cat, box 1 -> cat, box 2 -> dog
    boxes = torch.arange(12.0).reshape(3, 4)
    out = reduce_boxes(probs, boxes, ["cat", "dog"])
    assert dict(zip(out["classes"], out["scores"], strict=True)) == pytest.approx({"cat": 0.9, "dog": 0.7})
    assert out["boxes"][out["classes"].index("dog")] == [8.0, 9.0, 10.0, 11.0]


def test_owlv2_matches_transformers_postprocess(owl2: Path, images: list[Image.Image]) -> None:
    det = load_detector(owl2)
    assert isinstance(det, OwlDetector) and detector_kind(owl2) == "owlv2"
    queries = [["cat", "dog", "cup"]] * len(images)
    ours = det.detect(images, queries)
    # Reference: transformers' own post-processing at threshold 0, reduced to the best box per class.
    texts = [[f"a photo of a {c}" for c in q] for q in queries]
    inputs = det.processor(text=texts, images=images, return_tensors="pt", padding="max_length", truncation=True)
    with torch.no_grad():
        raw = det.model(**inputs)
    post = getattr(det.processor, "post_process_grounded_object_detection", None)  # newer transformers
    post = post or det.processor.post_process_object_detection
    ref = post(raw, threshold=0.0, target_sizes=[(48, 48)] * 3)
    for o, r in zip(ours, ref, strict=True):
        best: dict[str, float] = {}
        for lab, s in zip(r["labels"].tolist(), r["scores"].tolist(), strict=True):
            best[queries[0][lab]] = max(best.get(queries[0][lab], 0.0), s)
        assert dict(zip(o["classes"], o["scores"], strict=True)) == pytest.approx(best, abs=1e-5)
        assert all(len(b) == 4 for b in o["boxes"])


def test_owl_batching_and_ragged_queries(owl2: Path, images: list[Image.Image]) -> None:
    queries = [["cat"], ["cat", "dog", "cup"], ["book", "kite"]]
    batched = OwlDetector(owl2, batch_size=3).detect(images, queries)
    single = OwlDetector(owl2, batch_size=1).detect(images, queries)
    for b, s, q in zip(batched, single, queries, strict=True):
        assert set(b["classes"]) <= set(q)  # padding queries never win a box
        assert b["classes"] == s["classes"]
        np.testing.assert_allclose(b["scores"], s["scores"], atol=1e-5)


def test_owlvit_loads_and_detects(tmp_path: Path, images: list[Image.Image]) -> None:
    det = load_detector(save_tiny_owl(tmp_path, version=1))
    out = det.detect(images[:2], [["cat", "dog"], ["cup"]])
    assert det.model.config.model_type == "owlvit"
    assert set(out[0]["classes"]) <= {"cat", "dog"} and out[1]["classes"] == ["cup"]
    assert all(0.0 <= s <= 1.0 for o in out for s in o["scores"])


def test_grounding_dino_spans_groups_and_batching(tmp_path: Path, images: list[Image.Image]) -> None:
    # max_text_len 8 forces the categories of one image into several texts.
    det = load_detector(save_tiny_grounding_dino(tmp_path, max_text_len=8), batch_size=2)
    assert isinstance(det, GroundingDinoDetector)
    cats = ["cat", "dog", "wine glass", "red circle", "book"]
    assert len(det._spans(cats)) > 1
    ids = det.processor.tokenizer("cat. wine glass.").input_ids
    assert det._token_spans(ids, ["cat", "wine glass"]) == [(1, 2), (3, 5)]
    queries = [cats, ["cup"], ["kite", "dog"]]
    out = det.detect(images, queries)
    assert [set(o["classes"]) <= set(q) for o, q in zip(out, queries, strict=True)] == [True] * 3
    assert out[1]["classes"] == ["cup"]
    one = GroundingDinoDetector(det.name, batch_size=1).detect(images, queries)
    for a, b in zip(out, one, strict=True):
        assert a["classes"] == b["classes"]
        np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-4)
