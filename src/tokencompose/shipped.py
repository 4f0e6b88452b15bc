"""The base models shipped as package data (``assets/<name>``), found by name.

Every command that takes a model (``--model``, ``demo base=``) accepts these names as well as a folder or a hub
id; a local folder of the same name wins.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from tokencompose.errors import UserError

# The demo's default first: the nouns-world base with a word-wise text encoder, whose multi-object failures are
# missing objects and whose phrases' attention lands on their own objects, as SD 1.4's do. ``shapes_nouns16`` is
# the same world with a two-layer text encoder (phrases not grounded); ``shapes_base`` is what the commands that
# default to a shipped base use (``evaluate shapes``).
SHIPPED_BASES = ("shapes_nouns16_wordwise", "shapes_nouns16", "shapes_base")


def shipped_base(name: str = "shapes_base") -> Path | None:
    """A base model shipped as package data (``assets/<name>``, one of :data:`SHIPPED_BASES`), or None if absent."""
    folder = resources.files("tokencompose") / "assets" / name
    with resources.as_file(folder) as real:
        real = Path(real)
        return real if (real / "model_index.json").is_file() else None


def resolve_shipped(model: str) -> str:
    """A shipped base's name -> its folder (when no local path has that name); anything else unchanged.

    A shipped name whose weights this install lacks is a :class:`UserError`, not a hub id to try offline.
    """
    if model in SHIPPED_BASES and not Path(model).exists():
        found = shipped_base(model)
        if found is None:
            raise UserError(f"the shipped base {model} is not in this install (its weights were not exported)")
        return str(found)
    return model
