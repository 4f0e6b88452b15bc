"""TokenDataset + collate: the batch contract, crop/flip alignment, bad input, workers, lazy index."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokencompose.data import records as R
from tokencompose.data.dataset import TokenDataset, collate
from tokencompose.masks import masks_at_resolutions
from tokencompose.tokens import phrase_token_positions

RED, BLUE = (220, 30, 30), (30, 60, 220)
OFFICIAL = "/work/shared/data/official/coco_gsam_train_metadata.jsonl"


@pytest.fixture(scope="module")
def tok():
    from tokencompose.models import clip_tokenizer

    return clip_tokenizer()


def scene(tmp_path, name: str, w: int = 96, h: int = 64):
    """Image with a red box at x 10..30, y 20..40 and a blue box at x 60..90, y 5..25, plus gray masks."""
    img = np.full((h, w, 3), 235, np.uint8)
    img[20:40, 10:30], img[5:25, 60:90] = RED, BLUE
    Image.fromarray(img).save(tmp_path / f"{name}.png")
    red, blue = np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint8)
    red[20:40, 10:30], blue[5:25, 60:90] = 255, 255
    Image.fromarray(red).save(tmp_path / f"{name}_red.png")
    Image.fromarray(blue).save(tmp_path / f"{name}_blue.png")
    return img


def rec(tmp_path, name, caption="a red box and a blue box", phrases=None):
    phrases = phrases or [("red box", f"{name}_red.png"), ("blue box", f"{name}_blue.png")]
    return R.Record(
        str(tmp_path / f"{name}.png"),
        caption,
        [R.Phrase(t, None if m is None else str(tmp_path / m), None) for t, m in phrases],
    )


def test_collate_contract(tmp_path, tok):
    scene(tmp_path, "a")
    scene(tmp_path, "b", w=64, h=64)
    recs = [rec(tmp_path, "a"), rec(tmp_path, "b", "the blue box", [("blue box", "b_blue.png")])]
    ds = TokenDataset(recs, tok, image_size=32)
    batch = collate([ds[0], ds[1]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"].min() >= -1.0 and batch["pixel_values"].max() <= 1.0
    assert batch["input_ids"].shape == (2, 77) and batch["input_ids"].dtype == torch.long
    assert batch["token_index"].shape == (2, 2, 2) and batch["token_valid"].dtype == torch.bool
    expected = phrase_token_positions(tok, "a red box and a blue box", "blue box")
    assert batch["token_index"][0, 1].tolist() == expected
    assert batch["token_valid"][1].tolist() == [[True, True], [False, False]]  # P padded
    assert set(batch["masks"]) == {(4, 4), (2, 2), (1, 1)}  # S/8 .. S/32; S/64 would be empty
    assert batch["masks"][(4, 4)].shape == (2, 2, 16) and not batch["masks"][(4, 4)][1, 1].any()
    assert batch["boxes"].shape == (2, 2, 4) and batch["box_valid"].tolist() == [[True, True], [True, False]]
    assert batch["phrases"] == [["red box", "blue box"], ["blue box"]]
    assert batch["captions"][1] == "the blue box" and batch["index"].tolist() == [0, 1]
    assert batch["dropped"] == []


def test_crop_aligns_image_masks_and_boxes(tmp_path, tok):
    """96x64 -> resize shorter side to 32 (48x32) -> center crop 32 (8 px off the left): all aligned."""
    scene(tmp_path, "a")
    ds = TokenDataset([rec(tmp_path, "a")], tok, image_size=32, attention_sizes=[(32, 32), (8, 8)])
    s = ds[0]
    px = ((s["pixel_values"].permute(1, 2, 0) + 1) * 127.5).numpy()
    red_px = np.linalg.norm(px - np.array(RED), axis=-1) < 40
    red_mask = s["masks"][(32, 32)][0].reshape(32, 32).numpy()
    assert (red_px == red_mask).mean() > 0.97  # only resampled edge pixels may disagree
    # Red box x 10..30, y 20..40 at scale 0.5, minus the 8-px crop: x 0..7, y 10..20.
    assert s["boxes"][0].tolist() == pytest.approx([0.0, 10.0, 7.0, 20.0])
    # Lower resolutions follow the core's rule from the crop-resolution mask.
    again = masks_at_resolutions(torch.from_numpy(red_mask)[None], [(8, 8)])[(8, 8)][0]
    assert torch.equal(s["masks"][(8, 8)][0], again)


def test_pixels_match_torchvision_resize_center_crop(tmp_path, tok):
    from torchvision import transforms

    scene(tmp_path, "a", w=80, h=120)
    ds = TokenDataset([rec(tmp_path, "a")], tok, image_size=48)
    ref = transforms.Compose([transforms.Resize(48), transforms.CenterCrop(48), transforms.ToTensor()])
    expect = ref(Image.open(tmp_path / "a.png").convert("RGB")) * 2 - 1
    assert torch.allclose(ds[0]["pixel_values"], expect, atol=1e-5)


def test_flip_moves_image_masks_and_boxes_together(tmp_path, tok):
    scene(tmp_path, "a", w=64, h=64)
    ds = TokenDataset([rec(tmp_path, "a")], tok, image_size=64, attention_sizes=[(64, 64)], flip=True)
    plain = TokenDataset([rec(tmp_path, "a")], tok, image_size=64, attention_sizes=[(64, 64)])[0]
    torch.manual_seed(0)
    flipped = [ds[0] for _ in range(8)]
    flips = [not torch.equal(f["pixel_values"], plain["pixel_values"]) for f in flipped]
    assert any(flips) and not all(flips)
    f = flipped[flips.index(True)]
    assert torch.equal(f["pixel_values"], plain["pixel_values"].flip(-1))
    assert torch.equal(f["masks"][(64, 64)].reshape(2, 64, 64), plain["masks"][(64, 64)].reshape(2, 64, 64).flip(-1))
    assert f["boxes"][0].tolist() == [64 - 30, 20, 64 - 10, 40]


def test_caption_dropout_trains_the_empty_caption_without_phrases(tmp_path, tok):
    from tokencompose.train.data import SeededSamples

    scene(tmp_path, "a", w=64, h=64)
    kw = dict(image_size=64, attention_sizes=[(64, 64)], flip=True)
    plain = SeededSamples(TokenDataset([rec(tmp_path, "a")], tok, **kw), seed=3)
    dropping = SeededSamples(TokenDataset([rec(tmp_path, "a")], tok, caption_dropout=0.5, **kw), seed=3)
    empty = tok("", padding="max_length", max_length=77, truncation=True)["input_ids"]
    dropped = 0
    for key in range(16):  # epochs 0..15 of the one record
        a, b = plain[key], dropping[key]
        assert torch.equal(a["pixel_values"], b["pixel_values"])  # drawn after the flip: the flips stay the same
        if b["caption"] == "":
            dropped += 1
            assert b["input_ids"].tolist() == empty and b["positions"] == [] and b["phrases"] == []
            assert b["dropped"] == []  # the design's choice, not a data problem
        else:
            assert torch.equal(a["input_ids"], b["input_ids"]) and a["positions"] == b["positions"]
        again = dropping[key]  # (seed, epoch, index) decides: a resumed run draws the same
        assert again["caption"] == b["caption"]
    assert 0 < dropped < 16
    batch = collate([dropping[k] for k in range(16)])
    assert batch["token_valid"][[c == "" for c in batch["captions"]]].sum() == 0  # no supervised phrase there


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "L16"])
def test_mask_file_formats(tmp_path, tok, mode):
    """Gray, RGB or RGBA (as matplotlib saves) masks: first channel, scaled by its max, binarised."""
    scene(tmp_path, "a", w=64, h=64)
    m = np.zeros((64, 64), np.float32)
    m[20:40, 10:30] = 1.0
    if mode == "RGBA":  # matplotlib's imsave with a gray colormap: first channel carries the mask
        import matplotlib.pyplot as plt

        plt.imsave(tmp_path / "m.png", m, cmap="gray")
    elif mode == "L16":
        Image.fromarray((m * 7).astype(np.uint8)).save(tmp_path / "m.png")  # low max: scaled by its max
    else:
        Image.fromarray((m * 255).astype(np.uint8)).convert(mode).save(tmp_path / "m.png")
    r = rec(tmp_path, "a", "a red box", [("red box", "m.png")])
    s = TokenDataset([r], tok, image_size=64, attention_sizes=[(64, 64)])[0]
    assert torch.equal(s["masks"][(64, 64)][0].reshape(64, 64), torch.from_numpy(m > 0))


def test_mask_of_another_size_is_resized_to_the_image(tmp_path, tok):
    scene(tmp_path, "a", w=64, h=64)
    half = np.zeros((32, 32), np.uint8)
    half[10:20, 5:15] = 255  # the red box at half scale
    Image.fromarray(half).save(tmp_path / "small.png")
    r = rec(tmp_path, "a", "a red box", [("red box", "small.png")])
    s = TokenDataset([r], tok, image_size=64, attention_sizes=[(64, 64)])[0]
    assert s["dropped"] == [R.MASK_RESIZED]
    expect = np.zeros((64, 64), bool)
    expect[20:40, 10:30] = True
    assert torch.equal(s["masks"][(64, 64)][0].reshape(64, 64), torch.from_numpy(expect))


def test_bad_input_is_dropped_by_reason_never_crashes(tmp_path, tok):
    scene(tmp_path, "a", w=64, h=64)
    (tmp_path / "garbage.png").write_bytes(b"not a png")
    long_caption = "a red box and " + "very " * 80 + "blue box"
    recs = [
        rec(tmp_path, "missing"),  # 0: no image -> substituted by record 1
        rec(
            tmp_path,
            "a",
            phrases=[
                ("red box", "a_red.png"),
                ("red box", "a_red.png"),  # duplicate
                ("green box", "a_red.png"),  # not in caption
                ("blue box", None),  # null mask
                ("box", "nope.png"),  # missing mask file
                ("red", "garbage.png"),  # unreadable mask
            ],
        ),
        rec(tmp_path, "a", long_caption),  # 2: "blue box" lies beyond the 77-token window
        rec(tmp_path, "a", "an empty room", [("room", None)]),  # 3: no usable phrase
    ]
    recs.append(R.Record(str(tmp_path / "garbage.png"), "x", []))  # 4: unreadable image -> wraps to 0 -> 1
    ds = TokenDataset(recs, tok, image_size=32)
    s0 = ds[0]
    # Record 1 stands in for record 0: only record 0's drop is reported here; record 1's own drops
    # are reported when it is loaded as itself (each drop counted once per epoch).
    assert s0["index"] == 1 and s0["dropped"] == [R.MISSING_IMAGE]
    assert s0["phrases"] == ["red box"]
    assert sorted(ds[1]["dropped"]) == sorted(
        [R.DUPLICATE_PHRASE, R.PHRASE_NOT_IN_CAPTION, R.NULL_MASK, R.MISSING_MASK, R.UNREADABLE_MASK]
    )
    s2 = ds[2]
    assert s2["phrases"] == ["red box"] and s2["dropped"] == [R.BEYOND_TOKEN_WINDOW]
    s3 = ds[3]
    assert s3["phrases"] == [] and s3["dropped"] == [R.NULL_MASK, R.NO_USABLE_PHRASE]
    assert ds[4]["dropped"] == [R.UNREADABLE_IMAGE] and ds[4]["index"] == 1  # skips 0, known unusable
    batch = collate([s3, ds[3]])  # a batch where nobody has a phrase: P >= 1, all invalid
    assert batch["token_index"].shape[1] == 1 and not batch["token_valid"].any()
    assert not batch["box_valid"].any() and batch["masks"][(4, 4)].shape == (2, 1, 16)


def test_object_cropped_away_is_dropped_not_supervised(tmp_path, tok):
    scene(tmp_path, "a", w=128, h=32)  # center crop keeps x 48..80: the red box (10..30) is gone
    ds = TokenDataset([rec(tmp_path, "a")], tok, image_size=32)
    s = ds[0]
    assert s["phrases"] == ["blue box"] and s["dropped"] == [R.EMPTY_MASK]


def test_dataloader_workers_carry_drop_reasons(tmp_path, tok):
    scene(tmp_path, "a", w=64, h=64)
    rows = [
        {"file_name": "a.png", "text": "a red box", "attn_list": [["red box", "a_red.png"], ["blue box", None]]},
        {"file_name": "a.png", "text": "a blue box", "attn_list": [["blue box", "a_blue.png"]]},
    ]
    lines = [json.dumps(r) for r in rows] + ["{oops"]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    ds = TokenDataset(tmp_path / "metadata.jsonl", tok, image_size=32)
    assert len(ds) == 2 and ds.drop_counts() == {R.MALFORMED_LINE: 1}
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate)
    counter = R.DropCounter(ds.drop_counts())
    for batch in loader:
        counter.update(batch)
    assert counter.as_dict() == {R.MALFORMED_LINE: 1, R.NULL_MASK: 1}


def test_index_is_compact(tmp_path, tok):
    scene(tmp_path, "a", w=64, h=64)
    row = json.dumps({"file_name": "a.png", "text": "a red box", "attn_list": [["red box", "a_red.png"]]})
    (tmp_path / "metadata.jsonl").write_text((row + "\n") * 5000)
    ds = TokenDataset(tmp_path / "metadata.jsonl", tok, image_size=32)
    assert len(ds) == 5000 and ds.source.offsets.nbytes == 8 * 5000
    # What workers receive: offsets, not parsed rows (tokenizers excluded, they are shared anyway).
    state = dict(ds.__dict__, tokenizer=None, text_inputs=None, spans=None)
    assert len(pickle.dumps(state)) < 60_000
    assert ds[4999]["phrases"] == ["red box"]


def test_paper_training_list_captions(tmp_path, tok):
    """The paper's own rows (first 40) with masks we draw: every kept phrase sits in its caption."""
    rows = [json.loads(x) for x in Path(OFFICIAL).read_text().splitlines()[:40]]
    Image.fromarray(np.full((48, 64, 3), 128, np.uint8)).save(tmp_path / "img.png")
    mask = np.zeros((48, 64, 4), np.uint8)
    mask[10:30, 10:40] = 255  # RGBA, as the paper's matplotlib masks
    Image.fromarray(mask, "RGBA").save(tmp_path / "mask.png")
    for r in rows:
        r["file_name"] = "img.png"
        r["attn_list"] = [[p, None if m is None else "mask.png"] for p, m in r["attn_list"]]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = TokenDataset(tmp_path / "metadata.jsonl", tok, image_size=32)
    batch = collate([ds[i] for i in range(len(ds))])
    n_masked = sum(1 for r in rows for _, m in r["attn_list"] if m is not None)
    kept = sum(len(p) for p in batch["phrases"])
    assert kept > 0.9 * n_masked  # a few duplicates ("Plate"/"plate") may drop, nothing else
    assert set(batch["dropped"]) <= {R.NULL_MASK, R.DUPLICATE_PHRASE, R.PHRASE_NOT_IN_CAPTION}
    for i, phrases in enumerate(batch["phrases"]):
        for j, phrase in enumerate(phrases):
            ids = batch["input_ids"][i, batch["token_index"][i, j][batch["token_valid"][i, j]]]
            assert tok.decode(ids).replace(" ", "") == phrase.lower().replace(" ", "")
