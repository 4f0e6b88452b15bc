"""Box-prompted segmenters behind one interface: the exact box fill and transformers' SAM family.

``segmenter.segment(images, boxes)`` takes a batch of PIL images and, per image, a list of boxes
``(x0, y0, x1, y1)`` in pixels of that image (exclusive max); it returns per image a bool array
``[K, H, W]``, one mask per box at the image's own size (``K`` may be 0).

- ``box`` (:class:`BoxSegmenter`): each mask is the box filled exactly (:func:`box_mask`); the shapes
  world's boxes are exact, so this is its segmenter.
- ``sam`` / ``sam_hq`` / ``sam2`` (:class:`SamSegmenter`): transformers' ``SamModel``, ``SamHQModel`` or
  ``Sam2Model`` prompted with one box per mask, ``multimask_output=False``; the mask is the decoder's logits
  post-processed to the image's size and thresholded at 0.0 (the rule of segment-anything's ``SamPredictor``,
  which Grounded-SAM used; the paper's masks come from SAM-HQ ViT-H, :data:`PAPER_SEGMENTER`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from tokencompose.data.records import Box
from tokencompose.errors import UserError, one_line
from tokencompose.hub import check_model_name, hf_kwargs, load_hf

BOX = "box"
# SAM-HQ ViT-H (the paper's sam_hq_vit_h) converted to transformers' SamHQModel by the transformers team.
PAPER_SEGMENTER = "syscv-community/sam-hq-vit-huge"


@dataclass(frozen=True)
class _Backend:
    kind: str
    model: str  # transformers class names
    processor: str
    since: str  # first transformers release with both classes


_SAM2 = _Backend("sam2", "Sam2Model", "Sam2Processor", "4.56")
# config.json's model_type -> backend. The hub's SAM 2.1 checkpoints are "sam2_video" (video model and image
# model share their weights' names): Sam2Model loads them for images, as transformers' mask-generation mapping does.
BACKENDS: dict[str, _Backend] = {
    "sam": _Backend("sam", "SamModel", "SamProcessor", "4.29"),
    "sam_hq": _Backend("sam_hq", "SamHQModel", "SamHQProcessor", "4.52"),
    "sam2": _SAM2,
    "sam2_video": _SAM2,
}
KINDS: tuple[str, ...] = (BOX, "sam", "sam_hq", "sam2")


class Segmenter(Protocol):
    """What the Grounded-SAM pipeline needs from a segmenter."""

    name: str  # "box", a folder or a hub id
    kind: str  # "box" | "sam" | "sam_hq" | "sam2"
    resolved_revision: str | None  # commit of a hub download (provenance), else None

    def segment(self, images: Sequence[Any], boxes: Sequence[Sequence[Box]]) -> list[np.ndarray]: ...


def box_mask(box: Box, height: int, width: int) -> np.ndarray:
    """Bool ``[H, W]``: the pixels whose centres ``(x + 0.5, y + 0.5)`` lie in ``[x0, x1) x [y0, y1)``.

    The inverse of a mask's bounding box (``(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)``) for an
    integer box; a box reaching outside the image is clipped to it; a NaN or empty box gives no pixel.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    xs = np.arange(width, dtype=np.float64) + 0.5
    ys = np.arange(height, dtype=np.float64) + 0.5
    cols = (xs >= x0) & (xs < x1)
    rows = (ys >= y0) & (ys < y1)
    return rows[:, None] & cols[None, :]


def _check_batch(images: Sequence[Any], boxes: Sequence[Sequence[Box]]) -> None:
    if len(images) != len(boxes):
        raise ValueError(f"{len(images)} images but {len(boxes)} box lists")


class BoxSegmenter:
    """Each mask is its box filled exactly (:func:`box_mask`): for sources whose boxes are exact."""

    name = BOX
    kind = BOX
    resolved_revision = None

    def segment(self, images: Sequence[Any], boxes: Sequence[Sequence[Box]]) -> list[np.ndarray]:
        _check_batch(images, boxes)
        out = []
        for img, bxs in zip(images, boxes, strict=True):
            w, h = img.size
            masks = np.zeros((len(bxs), h, w), dtype=bool)
            for k, b in enumerate(bxs):
                masks[k] = box_mask(b, h, w)
            out.append(masks)
        return out


def _slice(x: Any, j: int) -> Any:
    """Image ``j`` of a batch of embeddings (a tensor, or lists / tuples / dicts of them), batch dim kept."""
    if isinstance(x, dict):
        return {k: _slice(v, j) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_slice(v, j) for v in x]
    return x[j : j + 1]


class SamSegmenter:
    """SAM, SAM-HQ or SAM 2 (transformers' ``SamModel`` / ``SamHQModel`` / ``Sam2Model``) prompted with boxes.

    Per box one mask (``multimask_output=False``; SAM-HQ sums its SAM and HQ masks, ``hq_token_only=False``,
    the defaults of SAM-HQ's predictor that Grounded-SAM called). The image encoder runs on up to
    ``batch_size`` images at once; each image's boxes then go through the prompt encoder and mask decoder in
    one call. The low-resolution logits are upscaled by the processor's ``post_process_masks`` (padding
    cropped, original size) and thresholded at 0.0. Images without boxes skip the model.
    """

    def __init__(
        self,
        name: str | Path,
        revision: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 4,
    ) -> None:
        import transformers

        if batch_size < 1:
            raise UserError(f"segmenter batch size must be at least 1, got {batch_size}")
        self.name = str(name)
        model_type = _model_type(self.name, revision)
        backend = _backend(self.name, model_type)
        self.kind = backend.kind
        self.revision = revision
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        self.processor, self.model, self.resolved_revision = load_hf(
            getattr(transformers, backend.model), getattr(transformers, backend.processor), self.name, revision,
            dtype, self.device, "segmenter",
        )  # fmt: skip

    def segment(self, images: Sequence[Any], boxes: Sequence[Sequence[Box]]) -> list[np.ndarray]:
        return self._run(images, boxes, lambda logits: (logits > 0.0).cpu().numpy())

    def logits(self, images: Sequence[Any], boxes: Sequence[Sequence[Box]]) -> list[torch.Tensor]:
        """Per image the float32 mask logits ``[K, H, W]`` at the image's size (on the CPU); mask = logits > 0."""
        return self._run(images, boxes, lambda logits: logits.cpu())

    def _run(
        self, images: Sequence[Any], boxes: Sequence[Sequence[Box]], finish: Callable[[torch.Tensor], Any]
    ) -> list:
        """``finish`` of each image's logits ``[K, H, W]``; images without boxes get ``finish`` of ``[0, H, W]``."""
        _check_batch(images, boxes)
        out: list[Any] = [None] * len(images)
        todo = []
        for i, (img, bxs) in enumerate(zip(images, boxes, strict=True)):
            if len(bxs):
                todo.append(i)
            else:
                w, h = img.size
                out[i] = finish(torch.zeros((0, h, w), dtype=torch.float32))
        with torch.inference_mode():
            for start in range(0, len(todo), self.batch_size):
                idx = todo[start : start + self.batch_size]
                found = self._decode([images[i] for i in idx], [boxes[i] for i in idx])
                for i, logits in zip(idx, found, strict=True):
                    out[i] = finish(logits)
        return out

    def _decode(self, images: list[Any], boxes: list[Sequence[Box]]) -> Iterator[torch.Tensor]:
        """One batch of images (each with at least one box) -> per image float32 logits ``[K, H, W]``."""
        images = [img if img.mode == "RGB" else img.convert("RGB") for img in images]
        # The processors scale boxes to the model's input; they take as many boxes for every image, so
        # shorter lists repeat their last box and the repeats are cut off before the decoder.
        k_max = max(len(b) for b in boxes)
        prompts = [[[float(v) for v in b] for b in bxs] for bxs in boxes]
        prompts = [p + [p[-1]] * (k_max - len(p)) for p in prompts]
        with warnings.catch_warnings():
            # SamHQProcessor (4.52-4.57) hands its own point_pad_value to the image processor, which warns.
            warnings.filterwarnings("ignore", message=".*point_pad_value.*")
            inputs = self.processor(images=images, input_boxes=prompts, return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
        embeddings = self.model.get_image_embeddings(pixel_values)
        if self.kind == "sam_hq":  # (last embedding, intermediate ViT embeddings)
            embeddings = {"image_embeddings": embeddings[0], "intermediate_embeddings": list(embeddings[1])}
        else:  # SAM: a tensor; SAM 2: the feature maps of every level
            embeddings = {"image_embeddings": embeddings}
        # Boxes stay float32: the prompt encoder normalises them before casting to the model's dtype.
        input_boxes = inputs["input_boxes"].to(self.device, torch.float32)
        for j, bxs in enumerate(boxes):
            output = self.model(
                **_slice(embeddings, j), input_boxes=input_boxes[j : j + 1, : len(bxs)], multimask_output=False
            )
            low = output.pred_masks[0, :, :1].float()  # [K, 1, h, w]
            sizes = inputs["original_sizes"][j : j + 1]
            if self.kind == "sam2":  # resized to a square without padding
                up = self.processor.post_process_masks([low], sizes, binarize=False)[0]
            else:  # longest side resized, padded to a square: the padding is cropped before the upscale
                reshaped = inputs["reshaped_input_sizes"][j : j + 1]
                up = self.processor.post_process_masks([low], sizes, reshaped, binarize=False)[0]
            yield up[:, 0].float()


def check_segmenter_name(name: str | Path) -> None:
    """Refuse a segmenter name that cannot resolve (cheap and offline: a typo is reported before any image is read)."""
    check_model_name(name, "segmenter", BOX, PAPER_SEGMENTER, "a local SAM / SAM-HQ / SAM 2 folder")


def _model_type(name: str, revision: str | None) -> str | None:
    """``model_type`` of a checkpoint's config.json, read without building the config (old releases of
    transformers that lack the class can still name it)."""
    folder = Path(name).expanduser()
    try:
        if folder.is_dir():
            config = json.loads((folder / "config.json").read_text())
        else:
            from transformers import PretrainedConfig

            config, _ = PretrainedConfig.get_config_dict(name, **hf_kwargs(name, revision))
    except (OSError, ValueError) as err:
        raise UserError(f"segmenter {name} could not be loaded: {one_line(str(err))}") from err
    return config.get("model_type") if isinstance(config, dict) else None


def _backend(name: str, model_type: str | None) -> _Backend:
    """The backend of ``model_type``; a :class:`UserError` if unsupported or missing from this transformers."""
    backend = BACKENDS.get(model_type or "")
    if backend is None:
        raise UserError(
            f"unsupported segmenter model type {model_type!r} ({name}): use a SAM, SAM-HQ or SAM 2 checkpoint, or 'box'"
        )
    import transformers

    missing = [c for c in (backend.model, backend.processor) if not hasattr(transformers, c)]
    if missing:
        raise UserError(
            f"segmenter {name} is a {model_type} checkpoint, which needs transformers >= {backend.since} "
            f"(this is {transformers.__version__}, without {' and '.join(missing)}): upgrade transformers"
        )
    return backend


def segmenter_kind(name: str | Path, revision: str | None = None) -> str:
    """``"box"``, ``"sam"``, ``"sam_hq"`` or ``"sam2"`` from the name or the checkpoint's config.

    Reads only the config (a local file, or one small download), so callers check the segmenter before
    any work; a name that does not resolve, an unsupported model type or a class this transformers lacks
    is a :class:`UserError`.
    """
    check_segmenter_name(name)
    if str(name) == BOX:
        return BOX
    return _backend(str(name), _model_type(str(name), revision)).kind


def load_segmenter(
    name: str | Path = PAPER_SEGMENTER,
    revision: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 4,
) -> Segmenter:
    """A segmenter from ``"box"``, a local folder or a hub id; the class follows the config's model type."""
    if segmenter_kind(name, revision) == BOX:
        return BoxSegmenter()
    return SamSegmenter(name, revision=revision, device=device, dtype=dtype, batch_size=batch_size)
