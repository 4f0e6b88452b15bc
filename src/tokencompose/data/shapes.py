"""Source C, the shapes world: rendered scenes of coloured geometric objects with exact masks and boxes.

A category is ``"<colour> <shape>"`` (default 6 colours x 4 shapes = 24). Scenes hold 1..K objects of
distinct categories, painted in order on a plain light-gray background; an object's mask is what
stays visible after the later ones are painted (occlusion respected), its box is that mask's box.
Placement limits keep scenes readable for the detector: every object keeps at least
``1 - max_occlusion`` of its pixels, its visible part is one piece, and objects of the same colour
never touch (they would merge into one colour region). Scene ``i`` of seed ``s`` depends on
``(s, i)`` only, so any subset can be re-rendered. Written in Source A's format (+ ``boxes``).

The exact detector :func:`detect_shapes` lives in :mod:`tokencompose.data.shapes_detect`, with the palette,
the shape names and :func:`shape_mask` it shares with the renderer (all re-exported here).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokencompose.captions import multigen_text
from tokencompose.data.official import save_mask
from tokencompose.data.outputs import atomic_write_text, claim_output_dir, count_lines, mark_complete, read_marker
from tokencompose.data.records import Phrase, Record, mask_box, write_jsonl
from tokencompose.data.shapes_detect import (
    COLORS,
    SHAPES,
    detect_shapes,
    label_components,
    shape_mask,
    split_category,
)
from tokencompose.errors import UserError

BACKGROUND: tuple[int, int, int] = (235, 235, 235)

TEMPLATES: tuple[str, ...] = ("multigen", "plain", "there_is", "image_of")


def categories(colors: Sequence[str] | None = None, shapes: Sequence[str] | None = None) -> list[str]:
    """Category names ``"<colour> <shape>"`` (colour-major order)."""
    return [f"{c} {s}" for c in (colors or list(COLORS)) for s in (shapes or SHAPES)]


# The worlds a base can be trained on (issue #20). ``attributes``: every colour in every shape (24 categories), so
# drawing "a red circle and a blue square" means binding each shape word to its colour word -- the failure a
# small base shows is the colour drawn in the other object's shape (attribute leakage). ``nouns``: each colour
# has one fixed shape (6 categories), so a category is an atomic thing like a COCO noun and nothing can leak
# between attribute words; what is left to fail is SD 1.4's way: objects left out or fused. Neighbouring hues
# get different shapes so that a colour drift does not also land on the right shape.
WORLDS: dict[str, tuple[str, ...]] = {
    "attributes": tuple(categories()),
    "nouns": ("red circle", "yellow square", "green triangle", "cyan cross", "blue circle", "purple square"),
}


def check_world(world: str) -> None:
    """A :class:`~tokencompose.errors.UserError` (one line, exit 2) unless ``world`` names one of :data:`WORLDS`."""
    if world not in WORLDS:
        raise UserError(f"world {world!r} is not a shapes world ({', '.join(WORLDS)})")


def world_categories(world: str) -> list[str]:
    """The categories of a named world (:data:`WORLDS`); :func:`check_world`'s one-line error for an unknown name."""
    check_world(world)
    return list(WORLDS[world])


@dataclass(frozen=True)
class ShapeObject:
    """One object: colour and shape names, centre (pixels) and the side of its bounding square."""

    color: str
    shape: str
    cx: float
    cy: float
    size: float

    @property
    def category(self) -> str:
        return f"{self.color} {self.shape}"


def render_scene(
    objects: Sequence[ShapeObject],
    size: int = 64,
    colors: dict[str, tuple[int, int, int]] | None = None,
    background: tuple[int, int, int] = BACKGROUND,
) -> tuple[np.ndarray, np.ndarray, list[tuple[float, float, float, float] | None]]:
    """Paint objects in order -> image uint8 ``[S, S, 3]``, visible masks bool ``[K, S, S]``, boxes.

    A box is ``(x0, y0, x1, y1)`` of the visible mask (exclusive max), or None if nothing is visible.
    """
    palette = colors or COLORS
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = background
    full = np.stack([shape_mask(o.shape, o.cx, o.cy, o.size, size, size) for o in objects]) if objects else None
    visible = np.zeros((len(objects), size, size), dtype=bool)
    for k, obj in enumerate(objects):
        image[full[k]] = palette[obj.color]
        visible[:k] &= ~full[k]
        visible[k] = full[k]
    boxes = [mask_box(m) for m in visible]
    return image, visible, boxes


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def sample_scene(
    rng: np.random.Generator,
    size: int = 64,
    min_objects: int = 1,
    max_objects: int = 4,
    colors: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
    min_scale: float = 0.2,
    max_scale: float = 0.42,
    max_occlusion: float = 0.1,
    tries: int = 60,
    world: Sequence[str] | None = None,
) -> list[ShapeObject]:
    """Random objects of distinct categories within the placement limits (see module docstring).

    ``world``: the categories to draw from (``"<colour> <shape>"`` names, e.g. ``WORLDS["nouns"]``); default
    every one of ``colors`` x ``shapes``.
    """
    if world is not None:
        cats = [split_category(name) for name in world]
    else:
        cats = [(c, s) for c in (colors or list(COLORS)) for s in (shapes or SHAPES)]
    k = int(rng.integers(min_objects, max_objects + 1))
    k = min(k, len(cats))
    while k >= 1:
        for _ in range(20):  # whole-scene restarts
            chosen = [cats[j] for j in rng.choice(len(cats), size=k, replace=False)]
            objects: list[ShapeObject] = []
            full: list[np.ndarray] = []
            for color, shape in chosen:
                for _ in range(tries):
                    side = float(rng.uniform(min_scale, max_scale) * size)
                    half = side / 2
                    cx, cy = (float(rng.uniform(half, size - half)) for _ in range(2))
                    m = shape_mask(shape, cx, cy, side, size, size)
                    cand_objects, cand_full = [*objects, ShapeObject(color, shape, cx, cy, side)], [*full, m]
                    if _valid(cand_objects, cand_full, max_occlusion):
                        objects, full = cand_objects, cand_full
                        break
                else:
                    break
            if len(objects) == k:
                return objects
        k -= 1  # too crowded for this many objects at this size: try fewer
    raise RuntimeError("could not place a single object; check min_scale/max_scale")


def _valid(objects: list[ShapeObject], full: list[np.ndarray], max_occlusion: float) -> bool:
    """Placement limits: visible fraction, one visible piece, no touching objects of the same colour."""
    later = np.zeros_like(full[0])
    visible = [None] * len(full)
    for k in range(len(full) - 1, -1, -1):
        visible[k] = full[k] & ~later
        later |= full[k]
    for k, m in enumerate(full):
        area = int(m.sum())
        if area == 0 or visible[k].sum() < (1.0 - max_occlusion) * area:
            return False
        if k < len(full) - 1 and label_components(visible[k])[1] != 1:
            return False
    new = objects[-1]
    grown = _dilate(_dilate(full[-1]))  # a gap of >= 2 px between same-coloured objects
    return all(not (o.color == new.color and (grown & full[j]).any()) for j, o in enumerate(objects[:-1]))


def multigen_caption(categories: Sequence[str]) -> str:
    """MultiGen's prompt: ``"a photo of a A, a B, and a C."`` (``"a photo of a A and a B."`` for two)."""
    return multigen_text(categories)


def _and_list(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" and {items[-1]}"


def caption(categories: Sequence[str], template: str) -> str:
    """A caption naming every category once, in the given order, with one of :data:`TEMPLATES`."""
    items = [f"a {c}" for c in categories]
    if template == "multigen":
        return multigen_caption(categories)
    if template == "plain":
        return f"{_and_list(items)} on a gray background."
    if template == "there_is":
        return f"there is {_and_list(items)} in the picture."
    if template == "image_of":
        return f"an image showing {_and_list(items)}."
    raise ValueError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")


def scene_record(seed: int, i: int, size: int = 64, templates: Sequence[str] = TEMPLATES, **scene_kw):
    """Scene ``i`` of ``seed``: ``(objects, caption, caption_order)``, deterministic in ``(seed, i)``."""
    rng = np.random.default_rng([seed, i])
    objects = sample_scene(rng, size=size, **scene_kw)
    order = [int(j) for j in rng.permutation(len(objects))]  # caption order independent of paint order
    template = templates[int(rng.integers(len(templates)))]
    return objects, caption([objects[j].category for j in order], template), order


def make_shapes_dataset(
    out: str | Path,
    num: int,
    seed: int = 0,
    size: int = 64,
    min_objects: int = 1,
    max_objects: int = 4,
    colors: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
    templates: Sequence[str] = TEMPLATES,
    max_occlusion: float = 0.1,
    min_scale: float = 0.2,
    max_scale: float = 0.42,
    world: str | None = None,
) -> Path:
    """Render ``num`` scenes into ``out`` (``images/``, ``masks/``, ``metadata.jsonl``, ``shapes.json``).

    Returns the path of ``metadata.jsonl``. Phrases are the category names, in caption order. ``world``: a
    named category set (:data:`WORLDS`) instead of every one of ``colors`` x ``shapes``.
    ``out`` is claimed with :func:`~tokencompose.data.outputs.claim_output_dir`: a completed render
    with the same settings is reused, an interrupted one is redone, anything else is refused with a
    :class:`~tokencompose.errors.UserError`. ``metadata.jsonl`` appears (atomically) only once every
    image and mask is written.
    """
    from PIL import Image

    out = Path(out)
    if world is not None and (colors or shapes):
        raise UserError("give a world or a subset of colours / shapes, not both (a world names its categories)")
    palette = {c: COLORS[c] for c in (colors or list(COLORS))}
    kw = dict(
        min_objects=min_objects,
        max_objects=max_objects,
        colors=list(palette),
        shapes=list(shapes or SHAPES),
        max_occlusion=max_occlusion,
        min_scale=min_scale,
        max_scale=max_scale,
    )
    if world is not None:  # only then in the record: renders made before worlds existed stay claimed
        kw["world"] = world_categories(world)
    meta = dict(seed=seed, num=num, size=size, background=BACKGROUND, templates=list(templates), **kw)
    meta["colors"] = palette  # names -> RGB, what the detector needs
    path = out / "metadata.jsonl"
    _adopt_legacy_render(out, meta)
    if claim_output_dir(out, SHAPES_COMMAND, meta, intact=lambda m: count_lines(path) == m.get("rows")) is not None:
        return path  # the same render is already there, complete

    def records():
        for i in range(num):
            objects, text, order = scene_record(seed, i, size, templates, **kw)
            image, visible, boxes = render_scene(objects, size, palette)
            shard = f"{i // 1000:04d}"
            img_path = out / "images" / shard / f"{i:07d}.png"
            img_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(img_path)
            phrases = []
            for j in order:
                name = objects[j].category
                mask_path = out / "masks" / shard / f"{i:07d}_{j}_{name.replace(' ', '_')}.png"
                save_mask(mask_path, visible[j])
                phrases.append(Phrase(name, str(mask_path.resolve()), boxes[j]))
            yield Record(str(img_path.resolve()), text, phrases)

    path.unlink(missing_ok=True)  # an interrupted redo must not leave the previous list in place
    atomic_write_text(out / "shapes.json", json.dumps(meta, indent=2))
    rows = write_jsonl(path, records())
    mark_complete(out, SHAPES_COMMAND, meta, rows=rows)
    return path


SHAPES_COMMAND = "prepare shapes"


def _adopt_legacy_render(out: Path, meta: dict) -> None:
    """Mark a render made before completion markers existed as complete when it provably is.

    Those versions wrote ``shapes.json`` after the whole ``metadata.jsonl``: matching settings plus
    the full row count mean the render finished.
    """
    if not out.is_dir() or read_marker(out) is not None:
        return
    try:
        old = json.loads((out / "shapes.json").read_text())
    except (OSError, ValueError):
        return
    if old == json.loads(json.dumps(meta)) and count_lines(out / "metadata.jsonl") == meta["num"]:
        mark_complete(out, SHAPES_COMMAND, meta, rows=meta["num"])


__all__ = [
    "BACKGROUND",
    "COLORS",
    "SHAPES",
    "TEMPLATES",
    "ShapeObject",
    "caption",
    "categories",
    "detect_shapes",
    "label_components",
    "make_shapes_dataset",
    "multigen_caption",
    "render_scene",
    "sample_scene",
    "scene_record",
    "shape_mask",
]
