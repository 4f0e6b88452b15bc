"""Architecture families: one module each (``sd``, ``sdxl``, ``sd3``, ``flux``); the rest of the package asks them.

``family: auto`` reads a pipeline folder's ``model_index.json`` (its ``_class_name``), or, for a folder
without one, the parts it holds (``text_encoder_2/`` and a UNet with ``text_time`` embeddings are SDXL).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokencompose.errors import UserError
from tokencompose.families.base import Family
from tokencompose.families.flux import Flux
from tokencompose.families.sd import SD
from tokencompose.families.sd3 import SD3
from tokencompose.families.sdxl import SDXL

FAMILIES: dict[str, Family] = {f.name: f for f in (SD(), SDXL(), SD3(), Flux())}
NAMES = ("auto", *FAMILIES)

__all__ = ["FAMILIES", "NAMES", "Family", "denoiser_of", "detect_family", "family_of", "family_of_pipeline",
           "get_family", "resolve_family"]  # fmt: skip


def get_family(name: str) -> Family:
    """The family called ``name`` (``sd`` | ``sdxl`` | ``sd3`` | ``flux``)."""
    if name not in FAMILIES:
        raise UserError(f"unknown model family {name!r}: use one of {', '.join(NAMES)}")
    return FAMILIES[name]


def family_of(comps: Any) -> Family:
    """The family of loaded :class:`~tokencompose.models.Components`."""
    return get_family(comps.family)


def family_of_pipeline(pipe: Any) -> Family:
    """The family whose pipeline class ``pipe`` is."""
    name = type(pipe).__name__
    for family in FAMILIES.values():
        if name in family.pipeline_classes:
            return family
    raise ValueError(f"no model family runs a {name}")


def denoiser_of(pipe: Any) -> Any:
    """The pipeline's denoiser (``pipe.unet`` or ``pipe.transformer``)."""
    return getattr(pipe, family_of_pipeline(pipe).denoiser_folder)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def detect_family(model: str | Path, revision: str | None = None) -> str:
    """The family of a pipeline folder or hub id, from its ``model_index.json`` (or, lacking one, its parts)."""
    from tokencompose.models import looks_like_path

    if str(model) == "tiny":
        return "sd"
    path = Path(str(model)).expanduser()
    if not path.exists() and looks_like_path(model):
        raise UserError(f"model folder {model} does not exist (give a diffusers-layout folder or a hub id)")
    if path.is_dir():
        index = _read_json(path / "model_index.json")
        unet = _read_json(path / "unet" / "config.json") or {}
        if index is None and (path / "text_encoder_2").is_dir():
            return "sdxl"
    else:
        from diffusers import DiffusionPipeline

        try:
            index = dict(DiffusionPipeline.load_config(str(model), revision=revision))
        except Exception as err:  # offline, unknown id, no index: the user names the family
            raise UserError(
                f"cannot read {model}'s model_index.json ({err}); set its family ({' | '.join(FAMILIES)})"
            ) from None
        unet = {}
    name = (index or {}).get("_class_name", "")
    for family in FAMILIES.values():
        if name in family.pipeline_classes:
            return family.name
    if unet.get("addition_embed_type") == "text_time" or (index or {}).get("text_encoder_2"):
        return "sdxl"
    if (index or {}).get("text_encoder") or (path / "text_encoder").is_dir():
        return "sd"
    raise UserError(
        f"cannot tell the family of {model} (pipeline class {name or 'unknown'}): set it ({' | '.join(FAMILIES)})"
    )


def resolve_family(name: str, model: str | Path, revision: str | None = None) -> Family:
    """``auto`` -> the family read from ``model``; anything else checked and returned."""
    return get_family(detect_family(model, revision) if name == "auto" else name)
