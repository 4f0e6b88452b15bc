"""Shapes world: exact masks/boxes with occlusion, determinism, captions, the exact detector, the CLI."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image, ImageFilter

from tokencompose.data import shapes as S
from tokencompose.data.records import read_jsonl


def test_categories_default_palette():
    cats = S.categories()
    assert len(cats) >= 24 and "red circle" in cats and "cyan cross" in cats
    # Palette colours are far apart, so blur and colour drift stay nearest the right name.
    rgb = np.array(list(S.COLORS.values()), dtype=float)
    d = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + np.eye(len(rgb)) * 1e9
    assert d.min() > 120


def test_render_occlusion_masks_and_boxes_are_exact():
    objs = [S.ShapeObject("red", "square", 20, 20, 24), S.ShapeObject("blue", "circle", 30, 30, 20)]
    img, vis, boxes = S.render_scene(objs, 48)
    full_red = S.shape_mask("square", 20, 20, 24, 48, 48)
    assert not (vis[0] & vis[1]).any()  # a pixel belongs to one object at most
    assert np.array_equal(vis[0], full_red & ~vis[1])  # the later object hides the earlier one
    assert (img[vis[0]] == S.COLORS["red"]).all() and (img[vis[1]] == S.COLORS["blue"]).all()
    assert (img[~(vis[0] | vis[1])] == S.BACKGROUND).all()
    ys, xs = np.nonzero(vis[1])
    assert boxes[1] == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_scenes_respect_placement_limits():
    for i in range(30):
        objs, text, order = S.scene_record(3, i, 64, max_objects=5)
        _, vis, _ = S.render_scene(objs, 64)
        assert 1 <= len(objs) <= 5 and len({o.category for o in objs}) == len(objs)
        for k, o in enumerate(objs):
            full = S.shape_mask(o.shape, o.cx, o.cy, o.size, 64, 64)
            assert vis[k].sum() >= 0.9 * full.sum()
            assert o.category in text
        assert sorted(order) == list(range(len(objs)))


def test_captions():
    assert S.multigen_caption(["red circle", "blue square", "green triangle"]) == (
        "a photo of a red circle, a blue square, and a green triangle."
    )
    assert S.multigen_caption(["red circle"]) == "a photo of a red circle."
    assert (
        S.caption(["red circle", "blue cross"], "there_is") == "there is a red circle and a blue cross in the picture."
    )
    templates = {S.scene_record(0, i, 64)[1].split()[0] for i in range(40)}
    assert len(templates) >= 3  # several templates are used


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "shapes.json":
            h.update(p.relative_to(folder).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_dataset_is_deterministic_for_a_seed(tmp_path):
    a = S.make_shapes_dataset(tmp_path / "a", 6, seed=7)
    b = S.make_shapes_dataset(tmp_path / "b", 6, seed=7)
    c = S.make_shapes_dataset(tmp_path / "c", 6, seed=8)
    assert _digest(a.parent) == _digest(b.parent) != _digest(c.parent)
    # Scene i does not depend on how many scenes are made.
    d = S.make_shapes_dataset(tmp_path / "d", 3, seed=7)
    assert read_jsonl(d)[2].caption == read_jsonl(a)[2].caption


def test_written_masks_match_render(tmp_path):
    from tokencompose.data.official import load_mask

    path = S.make_shapes_dataset(tmp_path, 4, seed=1, size=128)
    for i, rec in enumerate(read_jsonl(path)):
        objs, text, order = S.scene_record(1, i, 128)
        img, vis, boxes = S.render_scene(objs, 128)
        assert rec.caption == text and np.array_equal(np.asarray(Image.open(rec.image)), img)
        for ph, j in zip(rec.phrases, order, strict=True):
            assert ph.text == objs[j].category and ph.box == boxes[j]
            assert np.array_equal(load_mask(ph.mask), vis[j])


def _precision_recall(images_and_truth, transform=None, threshold=0.1):
    tp = fp = fn = 0
    for img, truth in images_and_truth:
        found = S.detect_shapes(transform(img) if transform else img)
        assert all(0.0 <= s <= 1.0 for s in found.values())
        pred = {c for c, s in found.items() if s >= threshold}
        tp, fp, fn = tp + len(pred & truth), fp + len(pred - truth), fn + len(truth - pred)
    return tp / max(tp + fp, 1), tp / max(tp + fn, 1)


@pytest.fixture(scope="module")
def rendered():
    out = []
    for i in range(60):
        objs, _, _ = S.scene_record(11, i, 64, max_objects=5)
        img, vis, _ = S.render_scene(objs, 64)
        out.append((img, {o.category for o in objs}))
    return out


def test_detector_exact_on_clean_renders(rendered):
    assert _precision_recall(rendered) == (1.0, 1.0)
    objs, _, _ = S.scene_record(12, 0, 128)
    img, _, _ = S.render_scene(objs, 128)
    assert set(S.detect_shapes(Image.fromarray(img))) == {o.category for o in objs}  # PIL input, 128 px


def test_detector_visibility_threshold():
    objs = [S.ShapeObject("red", "square", 20, 20, 20), S.ShapeObject("green", "circle", 50, 50, 3)]
    img, vis, _ = S.render_scene(objs, 64)
    assert vis[1].sum() < 12
    assert set(S.detect_shapes(img)) == {"red square"}  # below the threshold: not visibly present
    assert S.detect_shapes(np.full((64, 64, 3), 235, np.uint8)) == {}


def test_detector_meaningful_on_blurry_noisy_images(rendered):
    """Stand-in for a small model's output: blur, noise and colour drift."""

    def degrade(img):
        blurred = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float32)
        rng = np.random.default_rng(int(img.sum()) % 1000)
        noisy = blurred * 0.92 + 10 + rng.normal(0, 8, img.shape)
        return np.clip(noisy, 0, 255).astype(np.uint8)

    precision, recall = _precision_recall(rendered, degrade)
    assert precision >= 0.95 and recall >= 0.9


def test_label_components():
    m = np.zeros((8, 8), bool)
    m[0:2, 0:2] = m[5:8, 5:8] = m[0, 7] = True
    m[2:5, 1] = True  # joins nothing diagonally
    labels, n = S.label_components(m)
    assert n == 3 and labels[0, 0] == labels[4, 1] and labels[0, 0] != labels[6, 6] != labels[0, 7]
    assert (labels[~m] == -1).all()


def test_cli_prepare_shapes(tmp_path):
    from tokencompose.cli import main

    assert main(["prepare", "shapes", "--out", str(tmp_path), "--num", "5", "--seed", "2", "--resolution", "64"]) == 0
    recs = read_jsonl(tmp_path / "metadata.jsonl")
    assert len(recs) == 5 and all(r.phrases and all(p.box for p in r.phrases) for r in recs)
    assert Image.open(recs[0].image).size == (64, 64)
    assert main(["prepare", "shapes", "--out", str(tmp_path / "n"), "--num", "5", "--world", "nouns"]) == 0
    assert {p.text for r in read_jsonl(tmp_path / "n" / "metadata.jsonl") for p in r.phrases} <= set(S.WORLDS["nouns"])
    assert main(["prepare", "shapes", "--out", str(tmp_path / "m"), "--world", "nouns", "--colors", "red,blue"]) == 2


def test_nouns_world_scenes_hold_only_its_categories_and_attributes_world_is_the_default(tmp_path):
    nouns = S.world_categories("nouns")
    colors = [c.split(" ")[0] for c in nouns]
    assert len(nouns) == 6 and len(set(colors)) == 6  # one fixed shape per colour
    seen = set()
    for i in range(40):
        objects, text, _ = S.scene_record(3, i, world=nouns, max_objects=3)
        seen |= {o.category for o in objects}
        assert all(o.category in nouns and o.category in text for o in objects)
    assert seen == set(nouns)
    # The default world named explicitly draws the very scenes of the default (renders made before worlds exist).
    a = S.make_shapes_dataset(tmp_path / "a", 4, seed=5)
    b = S.make_shapes_dataset(tmp_path / "b", 4, seed=5, world="attributes")
    assert [r.caption for r in read_jsonl(a)] == [r.caption for r in read_jsonl(b)]
    c = S.make_shapes_dataset(tmp_path / "c", 8, seed=5, world="nouns")
    assert {p.text for r in read_jsonl(c) for p in r.phrases} <= set(nouns)
    from tokencompose.errors import UserError

    with pytest.raises(UserError, match="'animals' is not a shapes world"):  # the commands' one-line error
        S.world_categories("animals")
