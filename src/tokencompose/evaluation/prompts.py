"""MultiGen prompts: the paper's prompt files, shipped category lists, and a seeded sampler for new sets.

A prompt names K categories: "a photo of a A, a B, a C, a D, and a E." The paper's files are read and
written in their own JSON layout (``unique_id``, ``num_objects``, ``obj_<i>_attributes``, ``text``) and are
used exactly as they are (their "a orange" included), so scores stay comparable with the paper. New sets
from :func:`sample_prompts` use the correct article.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from tokencompose.atomic import atomic_write_text
from tokencompose.captions import article, multigen_text  # noqa: F401  (re-exported: part of this module's API)
from tokencompose.data import shapes

MULTIGEN_FILES = {"coco": "multigen_coco_5_1k.json", "ade20k": "multigen_ade20k_5_1k.json"}
CATEGORY_FILES = {"coco": "coco80.txt", "ade20k": "ade20k150.txt"}
MAX_OBJECTS = 10


@dataclass(frozen=True)
class Prompt:
    """One MultiGen prompt: its id (the paper's ``unique_id``), the K category names, the text."""

    uid: int
    categories: tuple[str, ...]
    text: str


def _asset(*parts: str) -> Path:
    root = resources.files("tokencompose").joinpath("assets", *parts)
    return Path(str(root))


def multigen_path(name: str) -> Path:
    """Path of a shipped prompt file (``"coco"`` or ``"ade20k"``) or of any existing file."""
    if name in MULTIGEN_FILES:
        return _asset("multigen", MULTIGEN_FILES[name])
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"no prompt set {name!r}: use one of {sorted(MULTIGEN_FILES)} or a JSON file path")
    return path


def load_prompts(name: str | Path) -> list[Prompt]:
    """Read a prompt set in the paper's JSON layout: a shipped name (``coco``, ``ade20k``) or a path."""
    rows = json.loads(multigen_path(str(name)).read_text())
    prompts = []
    for row in rows:
        k = int(row["num_objects"])
        # Each obj_<i>_attributes is a one-element list in the paper's files; the first entry is the category.
        cats = tuple(row[f"obj_{i}_attributes"][0] for i in range(1, k + 1))
        prompts.append(Prompt(uid=int(row["unique_id"]), categories=cats, text=row["text"]))
    uids = [p.uid for p in prompts]
    if len(set(uids)) != len(uids):
        raise ValueError(f"{name}: duplicate unique_id values")
    return prompts


def save_prompts(prompts: Sequence[Prompt], path: str | Path) -> None:
    """Write prompts in the paper's JSON layout (readable by the paper's scripts and by :func:`load_prompts`)."""
    rows = []
    for p in prompts:
        row: dict = {"unique_id": p.uid, "num_objects": len(p.categories)}
        for i, c in enumerate(p.categories, 1):
            row[f"obj_{i}_attributes"] = [c]
        row["text"] = p.text
        rows.append(row)
    atomic_write_text(path, json.dumps(rows, indent=4) + "\n")


def categories(name: str) -> list[str]:
    """A category list: ``coco`` (80), ``ade20k`` (150), ``coco_multigen`` / ``ade20k_multigen`` (the
    categories the paper's prompt file uses, sorted), ``shapes`` (the shapes world's ``attributes`` categories),
    ``shapes_nouns`` (its ``nouns`` world), or a text file path (one name a line)."""
    if name in CATEGORY_FILES:
        return _read_lines(_asset("categories", CATEGORY_FILES[name]))
    if name.endswith("_multigen") and name[: -len("_multigen")] in MULTIGEN_FILES:
        return vocabulary(load_prompts(name[: -len("_multigen")]))
    if name == "shapes":
        return shapes.categories()
    if name.startswith("shapes_") and name[len("shapes_") :] in shapes.WORLDS:
        return shapes.world_categories(name[len("shapes_") :])
    path = Path(name)
    if path.is_file():
        return _read_lines(path)
    raise ValueError(f"unknown category list {name!r}")


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def vocabulary(prompts: Sequence[Prompt]) -> list[str]:
    """Sorted union of the categories of a prompt set (what a detector is queried with in ``vocabulary`` mode)."""
    return sorted({c for p in prompts for c in p.categories})


def sample_prompts(
    category_list: Sequence[str],
    num_prompts: int,
    num_objects: int = 5,
    seed: int = 0,
    text_fn: Callable[[Sequence[str]], str] = multigen_text,
) -> list[Prompt]:
    """Draw ``num_prompts`` prompts of ``num_objects`` distinct categories each (MG-N, N <= 10), seeded.

    numpy's PCG64 generator keeps the draw identical across platforms and Python versions. ``text_fn``
    turns the categories into the sentence (the shapes world passes its own caption function).
    """
    cats = list(dict.fromkeys(category_list))  # de-duplicate, keep order
    if not 1 <= num_objects <= MAX_OBJECTS:
        raise ValueError(f"num_objects must be in 1..{MAX_OBJECTS}, got {num_objects}")
    if num_objects > len(cats):
        raise ValueError(f"cannot draw {num_objects} distinct categories from {len(cats)}")
    rng = np.random.default_rng(seed)
    prompts = []
    for uid in range(num_prompts):
        idx = rng.choice(len(cats), size=num_objects, replace=False)
        chosen = tuple(cats[i] for i in idx)
        prompts.append(Prompt(uid=uid, categories=chosen, text=text_fn(chosen)))
    return prompts


@dataclass
class PromptSettings:
    """Where the prompts come from: the paper's files, a JSON file, a sampler, or texts."""

    prompts: str | None = None
    """``coco`` | ``ade20k`` (the paper's MultiGen files) | a prompt JSON file; default ``coco``."""
    categories: str | None = None
    """Sample new prompts from ``coco`` | ``ade20k`` | ``shapes`` | ``shapes_nouns`` | a text file of categories."""
    num_prompts: int = 100
    """With ``categories``: how many prompts."""
    num_objects: int = 5
    """With ``categories``: K categories a prompt (at most 10)."""
    prompt_seed: int = 0
    """With ``categories``: the sampler's seed."""
    limit: int | None = None
    """Use only the first N prompts (smoke runs)."""
    texts: list[str] = field(default_factory=list)
    """Prompt texts given directly (``generate --prompt``)."""


def resolve_prompts(settings: PromptSettings) -> tuple[list[Prompt], dict[str, Any]]:
    """The prompt list ``settings`` name and a record of where it came from (file + digest, or sampler)."""
    if settings.texts:
        prompts = [Prompt(uid=i, categories=(), text=t) for i, t in enumerate(settings.texts)]
        info: dict[str, Any] = {"name": "command-line"}
    elif settings.categories:
        cats = categories(settings.categories)
        text_fn = multigen_text
        if settings.categories == "shapes":
            text_fn = shapes.multigen_caption  # the captions the shapes world trains on
        prompts = sample_prompts(
            cats, settings.num_prompts, settings.num_objects, settings.prompt_seed, text_fn=text_fn
        )
        info = {
            "name": f"sampled:{settings.categories}",
            "sampler": {
                "categories": settings.categories,
                "num_categories": len(cats),
                "num_prompts": settings.num_prompts,
                "num_objects": settings.num_objects,
                "seed": settings.prompt_seed,
            },
        }
    else:
        name = settings.prompts or "coco"
        prompts = load_prompts(name)
        info = {"name": name, "file": str(multigen_path(name))}
    if settings.limit:
        prompts = prompts[: settings.limit]
        info["limit"] = settings.limit
    info["num_prompts"] = len(prompts)
    return prompts, info
