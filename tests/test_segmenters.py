"""Box-prompted segmenters: the exact box fill, and SAM / SAM-HQ / SAM 2 on tiny random-init folders (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokencompose.data import segmenters as S
from tokencompose.data.segmenters import (
    PAPER_SEGMENTER,
    BoxSegmenter,
    SamSegmenter,
    box_mask,
    check_segmenter_name,
    load_segmenter,
    segmenter_kind,
)
from tokencompose.data.tiny_segmenters import TINY_SAM_KINDS, save_tiny_sam, tiny_sam_kinds
from tokencompose.errors import UserError

# ---------------------------------------------------------------------------------------------- box fill


def _bbox(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def test_box_mask_integer_box_is_exact_and_inverts_the_bounding_box() -> None:
    m = box_mask((1, 2, 4, 5), height=6, width=7)
    ref = np.zeros((6, 7), dtype=bool)
    ref[2:5, 1:4] = True
    assert m.dtype == bool and m.shape == (6, 7)
    np.testing.assert_array_equal(m, ref)
    assert _bbox(m) == (1.0, 2.0, 4.0, 5.0)


def test_box_mask_fractional_box_takes_the_pixels_whose_centres_are_inside() -> None:
    # Centres are at k + 0.5; the box is [x0, x1) x [y0, y1).
    m = box_mask((0.5, 0.4, 2.5, 2.6), height=4, width=4)
    ref = np.zeros((4, 4), dtype=bool)
    ref[0:3, 0:2] = True  # x centres 0.5, 1.5 (2.5 is the exclusive max); y centres 0.5, 1.5, 2.5
    np.testing.assert_array_equal(m, ref)
    m = box_mask((0.51, 1.2, 3.9, 1.7), height=4, width=4)
    ref = np.zeros((4, 4), dtype=bool)
    ref[1, 1:4] = True  # x centres 1.5, 2.5, 3.5; y centre 1.5 only
    np.testing.assert_array_equal(m, ref)
    assert not box_mask((1.6, 1.6, 2.4, 2.4), 4, 4).any()  # no centre inside


def test_box_mask_is_clipped_to_the_image_and_empty_for_bad_boxes() -> None:
    m = box_mask((-3.0, -2.0, 100.0, 3.0), height=4, width=5)
    ref = np.zeros((4, 5), dtype=bool)
    ref[0:3] = True
    np.testing.assert_array_equal(m, ref)
    assert not box_mask((10, 10, 20, 20), 4, 5).any()  # outside
    assert not box_mask((3, 1, 1, 3), 4, 5).any()  # x1 < x0
    assert not box_mask((float("nan"), 0, 3, 3), 4, 5).any()


def test_box_segmenter_fills_every_box_at_each_images_size() -> None:
    seg = load_segmenter("box")
    assert isinstance(seg, BoxSegmenter)
    assert (seg.name, seg.kind, seg.resolved_revision) == ("box", "box", None)
    assert segmenter_kind("box") == "box"
    images = [Image.new("RGB", (7, 5)), Image.new("RGB", (4, 9)), Image.new("RGB", (3, 3))]
    boxes = [[(0, 0, 2, 2), (1.5, 0.2, 9.0, 4.7)], [], [(0, 0, 3, 3)]]
    out = seg.segment(images, boxes)
    assert [m.shape for m in out] == [(2, 5, 7), (0, 9, 4), (1, 3, 3)]
    assert all(m.dtype == bool for m in out)
    for masks, img, bxs in zip(out, images, boxes, strict=True):
        for m, b in zip(masks, bxs, strict=True):
            np.testing.assert_array_equal(m, box_mask(b, img.height, img.width))
    assert out[2].all()
    with pytest.raises(ValueError, match="2 images but 1 box lists"):
        seg.segment(images[:2], boxes[:1])


# -------------------------------------------------------------------------------------- names and kinds


def _one_line_user_error(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_check_segmenter_name() -> None:
    check_segmenter_name("box")
    check_segmenter_name(PAPER_SEGMENTER)  # offline: only the form of a hub id is checked
    check_segmenter_name("facebook/sam-vit-base")
    with pytest.raises(UserError, match="unknown segmenter 'not a name'") as e:
        check_segmenter_name("not a name")
    assert PAPER_SEGMENTER in _one_line_user_error(e)
    with pytest.raises(UserError, match="does not exist") as e:
        check_segmenter_name("./no/such/folder")
    _one_line_user_error(e)


def test_paper_segmenter_is_sam_hq_vit_huge() -> None:
    assert PAPER_SEGMENTER == "syscv-community/sam-hq-vit-huge"
    assert S.BACKENDS["sam_hq"].model == "SamHQModel"


def test_segmenter_kind_errors_are_one_line_user_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="has no config.json") as e:
        segmenter_kind(empty)
    _one_line_user_error(e)

    other = tmp_path / "owl"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "owlv2"}))
    with pytest.raises(UserError, match="unsupported segmenter model type 'owlv2'") as e:
        segmenter_kind(other)
    _one_line_user_error(e)
    with pytest.raises(UserError, match="unsupported segmenter model type"):
        load_segmenter(other)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="could not be loaded") as e:
        segmenter_kind(broken)
    _one_line_user_error(e)

    # A model type whose classes this transformers lacks (SAM-HQ before 4.52, SAM 2 before 4.56).
    sam = tmp_path / "sam"
    sam.mkdir()
    (sam / "config.json").write_text(json.dumps({"model_type": "sam"}))
    assert segmenter_kind(sam) == "sam"
    future = S._Backend("sam", "SamModelFromTheFuture", "SamProcessor", "99.1")
    monkeypatch.setitem(S.BACKENDS, "sam", future)
    with pytest.raises(UserError, match=r"needs transformers >= 99\.1 .*SamModelFromTheFuture") as e:
        segmenter_kind(sam)
    _one_line_user_error(e)
    with pytest.raises(UserError, match="needs transformers >= 99.1"):
        load_segmenter(sam)


# ------------------------------------------------------------------------------------ SAM / SAM-HQ / SAM 2

KIND_OF = {"sam": "sam", "sam_hq": "sam_hq", "sam2": "sam2", "sam2_video": "sam2"}


@pytest.fixture(scope="module", params=TINY_SAM_KINDS)
def tiny_sam(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """(tiny kind, folder) for every SAM kind; skipped where the installed transformers lacks the class."""
    kind = request.param
    if kind not in tiny_sam_kinds():
        import transformers

        since = S.BACKENDS[kind].since
        pytest.skip(f"{kind} needs transformers >= {since}; this is {transformers.__version__}")
    return kind, save_tiny_sam(tmp_path_factory.mktemp(kind), kind=kind)


@pytest.fixture(scope="module")
def scene() -> tuple[list[Image.Image], list[list[tuple[float, float, float, float]]]]:
    """A wide, a square and a tall image with 3, 1 and 2 boxes (box lists differ: padding is exercised),
    and a box-less image."""
    rng = np.random.default_rng(0)
    sizes = [(70, 40), (64, 64), (30, 52), (20, 30)]  # (width, height)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    images[2] = images[2].convert("L")  # not RGB: converted
    boxes = [
        [(5.0, 5.0, 30.0, 30.0), (0.0, 0.0, 70.0, 40.0), (10.5, 2.25, 20.0, 38.0)],
        [(1.0, 1.0, 50.0, 60.0)],
        [(2.0, 3.0, 28.0, 50.0), (-4.0, 10.0, 12.0, 60.0)],  # reaching outside the image
        [],
    ]
    return images, boxes


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Logits equal to 1e-4 of their scale (random weights give tiny logits), masks equal wherever the
    logit is farther from 0 than that."""
    assert a.shape == b.shape
    if b.numel() == 0:
        return
    tol = 1e-4 * float(b.abs().max()) + 1e-12
    torch.testing.assert_close(a, b, rtol=0, atol=tol)
    sure = b.abs() > tol
    assert torch.equal((a > 0)[sure], (b > 0)[sure])


def test_sam_masks_have_each_images_size(tiny_sam, scene) -> None:
    kind, folder = tiny_sam
    images, boxes = scene
    assert segmenter_kind(folder) == KIND_OF[kind]
    seg = load_segmenter(folder)
    assert isinstance(seg, SamSegmenter)
    assert (seg.kind, seg.name, seg.resolved_revision) == (KIND_OF[kind], str(folder), None)
    out = seg.segment(images, boxes)
    assert [m.shape for m in out] == [(3, 40, 70), (1, 64, 64), (2, 52, 30), (0, 30, 20)]
    assert all(isinstance(m, np.ndarray) and m.dtype == bool for m in out)
    assert seg.segment([], []) == []


@pytest.mark.filterwarnings("ignore:.*point_pad_value")  # SamHQProcessor 4.52-4.57 warns about its own kwarg
def test_sam_matches_transformers_one_call_usage(tiny_sam, scene) -> None:
    """Encoder batched, decoder per image, boxes padded and cut: the same logits as transformers' documented
    use (processor -> model(pixel_values, input_boxes, multimask_output=False) -> post_process_masks), so the
    masks land where transformers puts them on non-square images too (padding cropped, original size)."""
    _, folder = tiny_sam
    images, boxes = scene
    seg = load_segmenter(folder, batch_size=4)
    ours = seg.logits(images, boxes)
    for img, bxs, got in zip(images, boxes, ours, strict=True):
        if not bxs:
            assert got.shape == (0, img.height, img.width)
            continue
        inputs = seg.processor(images=[img.convert("RGB")], input_boxes=[[list(b) for b in bxs]], return_tensors="pt")
        inputs["input_boxes"] = inputs["input_boxes"].float()
        with torch.no_grad():
            out = seg.model(**inputs, multimask_output=False)
        extra = [] if seg.kind == "sam2" else [inputs["reshaped_input_sizes"]]
        ref = seg.processor.post_process_masks(out.pred_masks, inputs["original_sizes"], *extra, binarize=False)
        _close(got, ref[0][:, 0].float())
        assert got.shape == (len(bxs), img.height, img.width)


def test_sam_batched_equals_one_image_at_a_time(tiny_sam, scene) -> None:
    _, folder = tiny_sam
    images, boxes = scene
    one = load_segmenter(folder, batch_size=1)
    two = load_segmenter(folder, batch_size=2)
    for a, b in zip(two.logits(images, boxes), one.logits(images, boxes), strict=True):
        _close(a, b)  # SAM / SAM-HQ are bit-identical on CPU; SAM 2's encoder differs by ~1e-11
    for a, b in zip(two.segment(images, boxes), one.segment(images, boxes), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype == bool


def test_sam_images_without_boxes_skip_the_model(tiny_sam, scene, monkeypatch: pytest.MonkeyPatch) -> None:
    _, folder = tiny_sam
    images, boxes = scene
    seg = load_segmenter(folder, batch_size=2)
    seen = []
    encode = seg.model.get_image_embeddings
    monkeypatch.setattr(seg.model, "get_image_embeddings", lambda pv, *a, **k: seen.append(len(pv)) or encode(pv))
    out = seg.segment([images[3], images[0], images[3], images[1]], [[], boxes[0], [], boxes[1]])
    assert seen == [2]  # the two images with boxes, in one encoder batch
    assert [m.shape for m in out] == [(0, 30, 20), (3, 40, 70), (0, 30, 20), (1, 64, 64)]
    seen.clear()
    assert [m.shape for m in seg.segment(images[3:], [[]])] == [(0, 30, 20)] and seen == []


def test_sam_loads_in_bfloat16_on_cpu(tiny_sam, scene) -> None:
    _, folder = tiny_sam
    images, boxes = scene
    seg = load_segmenter(folder, dtype=torch.bfloat16, batch_size=2)
    assert seg.model.dtype == torch.bfloat16
    out = seg.segment(images, boxes)
    assert [m.shape for m in out] == [(3, 40, 70), (1, 64, 64), (2, 52, 30), (0, 30, 20)]
    assert all(m.dtype == bool for m in out)


def test_sam_batch_size_must_be_positive(tmp_path: Path) -> None:
    folder = save_tiny_sam(tmp_path / "sam", kind="sam")
    with pytest.raises(UserError, match="batch size must be at least 1"):
        load_segmenter(folder, batch_size=0)
