"""What a model family is: the one seam between the package and an architecture.

A family owns what differs between architectures and nothing else:

- which text parts a pipeline folder holds and how they load (:meth:`Family.load_text`);
- the token index space phrases map into (:attr:`Family.index_tokenizer`: the tokenizer whose positions
  are the attention maps' columns) and the text-encoder inputs of a caption (:meth:`Family.tokenizers`);
- how a caption becomes the denoiser's conditioning (:meth:`Family.encode`);
- the default supervised attention layers (:attr:`Family.default_layers`);
- the pipeline class that samples from it, and the ``model_index.json`` that stock diffusers loads.

The training target (epsilon / v / sample) is read from the noise scheduler's ``prediction_type`` and is
shared by the UNet families; a flow-matching family will override :meth:`Family.target`.

Shapes: ``B`` batch, ``L`` text positions (77 for CLIP), ``D`` conditioning width.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from tokencompose.tokens import input_ids


def target(scheduler: Any, latents: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the denoiser should predict: the noise (epsilon), the velocity (v) or the clean latents (sample).

    v = alpha_t * eps - sigma_t * x0 (Salimans & Ho 2022, eq. in sec. 4), as ``scheduler.get_velocity`` computes.
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return eps
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, eps, t)
    if kind == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {kind!r}")


class Family:
    """Base of the architecture families (:mod:`tokencompose.families.sd`, :mod:`tokencompose.families.sdxl`)."""

    name: ClassVar[str]
    pipeline_classes: ClassVar[tuple[str, ...]]
    """``model_index.json`` class names of this family; the first is the one we write and run."""
    text_parts: ClassVar[tuple[str, ...]]
    """Subfolders of a pipeline folder holding text encoders and tokenizers."""
    default_layers: ClassVar[tuple[str, ...]] = ("mid", "up")
    """Supervised cross-attention layers when ``loss.layers`` is not given (see ``tokencompose probe layers``)."""

    # -- loading -----------------------------------------------------------------------------------
    def load_text(self, src: str, kw: Mapping[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        """Text encoders and tokenizers of a pipeline folder / hub id, as :class:`Components` fields."""
        raise NotImplementedError

    def tiny(self, seed: int = 0, image_size: int = 64, prediction_type: str = "epsilon") -> Any:
        """Random-init :class:`~tokencompose.models.Components` of this family's classes (tests, smoke runs)."""
        raise NotImplementedError

    def pipeline_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_classes[0])

    # -- text --------------------------------------------------------------------------------------
    def index_tokenizer(self, comps: Any) -> Any:
        """The tokenizer whose positions index the attention maps' text columns (phrase spans live here)."""
        return comps.tokenizer

    def tokenizers(self, comps: Any) -> dict[str, Any]:
        """``{batch key: tokenizer}``: every text-encoder input a caption needs (``input_ids``, ...)."""
        return {"input_ids": comps.tokenizer}

    def tokenize(self, comps: Any, captions: list[str]) -> dict[str, torch.Tensor]:
        """``{batch key: ids [B, L]}`` for :meth:`encode`."""
        return {key: input_ids(tok, captions) for key, tok in self.tokenizers(comps).items()}

    def encode(
        self, comps: Any, batch: Mapping[str, Any], image_size: tuple[int, int], dtype: torch.dtype | None = None
    ) -> dict[str, Any]:
        """Denoiser keyword arguments for a batch (its ``input_ids``... and, where a family needs them,
        ``original_size`` / ``crop_top_left`` ``[B, 2]``); floating outputs cast to ``dtype`` when given.

        ``image_size``: ``(H, W)`` in pixels of the images being denoised.
        """
        raise NotImplementedError

    # -- saving ------------------------------------------------------------------------------------
    def model_index(self, comps: Any) -> dict[str, Any]:
        """The ``model_index.json`` of a folder holding ``comps`` (stock ``DiffusionPipeline`` reads it)."""
        import diffusers

        index: dict[str, Any] = {
            "_class_name": self.pipeline_classes[0],
            "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", type(comps.scheduler).__name__],
            "unet": ["diffusers", type(comps.unet).__name__],
            "vae": ["diffusers", type(comps.vae).__name__],
        }
        for part in self.text_parts:
            index[part] = ["transformers", type(getattr(comps, part)).__name__]
        return index

    def target(self, scheduler: Any, latents: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The training target of the denoiser (see :func:`target`)."""
        return target(scheduler, latents, eps, t)


def cast(tree: Any, dtype: torch.dtype | None) -> Any:
    """Floating tensors of a (nested) dict cast to ``dtype`` (None: unchanged)."""
    if dtype is None:
        return tree
    if isinstance(tree, dict):
        return {k: cast(v, dtype) for k, v in tree.items()}
    if isinstance(tree, torch.Tensor) and tree.is_floating_point():
        return tree.to(dtype)
    return tree
