"""Open-vocabulary detectors behind one interface: OWLv2, OWL-ViT, Grounding DINO, the shapes world's.

``detector.detect(images, queries)`` takes a batch of PIL images and, per image, the category names to look
for; it returns per image ``{"classes": [...], "scores": [...], "boxes": [...]}`` -- the paper's detection
layout -- with **one entry per category that wins at least one box** and that category's best score
(boxes are ``[x0, y0, x1, y1]`` in pixels of the input image). Each box goes to its best-scoring query (the
rule of transformers' OWL post-processing that the paper used), so querying more categories can take boxes
from others. Nothing is thresholded here: the stored per-category maxima rescore exactly at any threshold.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from tokencompose.data.shapes_detect import detect_shapes
from tokencompose.errors import UserError, one_line
from tokencompose.hub import check_model_name, hf_kwargs, load_hf

log = logging.getLogger(__name__)

PAPER_DETECTOR = "google/owlv2-large-patch14-ensemble"
OWL_TEMPLATE = "a photo of a {category}"  # the paper's query
GDINO_TEMPLATE = "{category}"
GDINO_MAX_TOKENS = 256

Candidates = tuple[torch.Tensor, torch.Tensor]  # one image: logits [Q, C] (box x query), boxes [Q, 4] in pixels


class Detector(Protocol):
    """What MultiGen needs from a detector."""

    name: str  # hub id, folder or "shapes"
    revision: str | None
    template: str

    def detect(self, images: Sequence[Any], queries: Sequence[Sequence[str]]) -> list[dict[str, list]]: ...

    def candidates(self, images: Sequence[Any], queries: Sequence[Sequence[str]]) -> list[Candidates]: ...


def reduce_boxes(logits: torch.Tensor, boxes: torch.Tensor, categories: Sequence[str]) -> dict[str, list]:
    """One image: ``logits [Q, C]`` (box x category), ``boxes [Q, 4]`` -> best sigmoid score per winning category.

    Each box is labelled with its argmax category; a category's score is the max over the boxes it wins.
    The argmax is taken on logits, as transformers does, so that ties of saturated sigmoids cannot flip it.
    """
    if logits.numel() == 0:
        return {"classes": [], "scores": [], "boxes": []}
    top, label = logits.float().max(dim=-1)  # [Q]
    score = torch.sigmoid(top)
    out: dict[str, list] = {"classes": [], "scores": [], "boxes": []}
    for c in torch.unique(label).tolist():
        sel = (label == c).nonzero().flatten()
        best = sel[top[sel].argmax()]
        out["classes"].append(categories[c])
        out["scores"].append(round(float(score[best]), 6))
        out["boxes"].append([round(float(v), 2) for v in boxes[best].tolist()])
    return out


def _center_to_corners(boxes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` (cx, cy, w, h) in [0, 1] -> (x0, y0, x1, y1) times ``scale [..., 4]``."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1) * scale


class _HFDetector:
    """Shared loading and batching for transformers' zero-shot detectors."""

    def __init__(
        self,
        name: str | Path,
        revision: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        template: str | None = None,
        batch_size: int = 8,
    ) -> None:
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self.name = str(name)
        self.revision = revision
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        self.template = template or self.default_template
        self.processor, self.model, self.resolved_revision = load_hf(
            AutoModelForZeroShotObjectDetection, AutoProcessor, self.name, revision, dtype, self.device, "detector"
        )  # the resolved commit of a hub download is recorded in results (None for a plain folder)

    default_template = OWL_TEMPLATE

    def detect(self, images: Sequence[Any], queries: Sequence[Sequence[str]]) -> list[dict[str, list]]:
        found = self.candidates(images, queries)
        return [reduce_boxes(logits, boxes, list(q)) for (logits, boxes), q in zip(found, queries, strict=True)]

    @torch.inference_mode()
    def candidates(self, images: Sequence[Any], queries: Sequence[Sequence[str]]) -> list[Candidates]:
        """Every predicted box of each image with its logit per query: ``[(logits [Q, C], boxes [Q, 4])]``.

        ``C = len(queries[i])``; boxes ``(x0, y0, x1, y1)`` in pixels of the input image; float32 on the CPU.
        """
        if len(images) != len(queries):
            raise ValueError(f"{len(images)} images but {len(queries)} query lists")
        out: list[Candidates] = []
        for start in range(0, len(images), self.batch_size):
            out += self._candidates_batch(
                list(images[start : start + self.batch_size]), list(queries[start : start + self.batch_size])
            )
        return out

    def _candidates_batch(self, images: list[Any], queries: list[Sequence[str]]) -> list[Candidates]:
        raise NotImplementedError


class OwlDetector(_HFDetector):
    """OWLv2 or OWL-ViT (``Owlv2ForObjectDetection`` / ``OwlViTForObjectDetection``)."""

    def _candidates_batch(self, images: list[Any], queries: list[Sequence[str]]) -> list[Candidates]:
        texts = [[self.template.format(category=c) for c in q] for q in queries]
        inputs = self.processor(text=texts, images=images, return_tensors="pt", padding="max_length", truncation=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        outputs = self.model(**inputs)
        logits = outputs.logits.float()  # [B, boxes, max queries]
        results = []
        for b, (img, q) in enumerate(zip(images, queries, strict=True)):
            w, h = img.size
            # OWLv2 pads the image to a square at its bottom/right, so boxes are relative to the longer side;
            # OWL-ViT resizes without padding, so they are relative to each side.
            if self.model.config.model_type == "owlv2":
                scale = torch.tensor([max(w, h)] * 4, dtype=torch.float32)
            else:
                scale = torch.tensor([w, h, w, h], dtype=torch.float32)
            boxes = _center_to_corners(outputs.pred_boxes[b].float().cpu(), scale)
            # Only this image's queries compete: padding queries of shorter lists are cut off.
            results.append((logits[b, :, : len(q)].cpu(), boxes))
        return results


class GroundingDinoDetector(_HFDetector):
    """Grounding DINO: all categories of an image in one text ("cat. dog."), split when over 256 tokens.

    A box's score for a category is its best token score within that category's token span.
    """

    default_template = GDINO_TEMPLATE

    def _spans(self, categories: Sequence[str]) -> list[list[str]]:
        """Split categories into groups whose text fits the model's token budget."""
        tok = self.processor.tokenizer
        limit = min(GDINO_MAX_TOKENS, getattr(self.model.config, "max_text_len", GDINO_MAX_TOKENS)) - 2
        groups: list[list[str]] = [[]]
        used = 0
        for c in categories:
            n = len(tok.tokenize(self.template.format(category=c))) + 1  # + the "." separator
            if groups[-1] and used + n > limit:
                groups.append([])
                used = 0
            groups[-1].append(c)
            used += n
        return groups

    def _token_spans(self, input_ids: list[int], categories: Sequence[str]) -> list[tuple[int, int]]:
        """Token positions ``[start, end)`` of each category in the tokenized text, found in order."""
        tok = self.processor.tokenizer
        spans, cursor = [], 0
        for c in categories:
            ids = tok.convert_tokens_to_ids(tok.tokenize(self.template.format(category=c)))
            for pos in range(cursor, len(input_ids) - len(ids) + 1):
                if input_ids[pos : pos + len(ids)] == ids:
                    spans.append((pos, pos + len(ids)))
                    cursor = pos + len(ids)
                    break
            else:
                raise ValueError(f"category {c!r} not found in the tokenized Grounding DINO text")
        return spans

    def _candidates_batch(self, images: list[Any], queries: list[Sequence[str]]) -> list[Candidates]:
        per_image: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in images]
        groups = [self._spans(q) for q in queries]
        for g in range(max(len(x) for x in groups)):
            idx = [i for i in range(len(images)) if g < len(groups[i])]
            texts = [". ".join(self.template.format(category=c) for c in groups[i][g]) + "." for i in idx]
            inputs = self.processor(images=[images[i] for i in idx], text=texts, return_tensors="pt", padding=True)
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            outputs = self.model(**inputs)
            token_logits = outputs.logits.float().cpu()  # [b, boxes, tokens]
            for j, i in enumerate(idx):
                spans = self._token_spans(inputs["input_ids"][j].tolist(), groups[i][g])
                logits = torch.stack([token_logits[j, :, s:e].max(dim=-1).values for s, e in spans], dim=-1)
                w, h = images[i].size
                boxes = _center_to_corners(outputs.pred_boxes[j].float().cpu(), torch.tensor([w, h, w, h]))
                per_image[i].append((logits, boxes))
        results = []
        for i, q in enumerate(queries):
            if not q:
                results.append((torch.empty(0, 0), torch.empty(0, 4)))
                continue
            # Groups see the same image; a box of group g is a separate candidate, so concatenate
            # candidates and give each its scores for its own group's categories only.
            cats = [c for grp in groups[i] for c in grp]
            rows, all_boxes, offset = [], [], 0
            for (logits, boxes), grp in zip(per_image[i], groups[i], strict=True):
                full = torch.full((logits.shape[0], len(cats)), -torch.inf)
                full[:, offset : offset + len(grp)] = logits
                rows.append(full)
                all_boxes.append(boxes)
                offset += len(grp)
            results.append((torch.cat(rows), torch.cat(all_boxes)))
        return results


class ShapesDetector:
    """The shapes world's exact detector (:func:`tokencompose.data.shapes_detect.detect_shapes`)."""

    name = "shapes"
    revision = None
    resolved_revision = None
    template = "{category}"

    def detect(self, images: Sequence[Any], queries: Sequence[Sequence[str]]) -> list[dict[str, list]]:
        results = []
        for img, q in zip(images, queries, strict=True):
            _, regions = detect_shapes(img, return_regions=True)
            # One entry per region, as a box detector gives; scoring takes each category's best.
            wanted = set(q)
            keep = [r for r in regions if r["category"] in wanted]
            results.append(
                {
                    "classes": [r["category"] for r in keep],
                    "scores": [round(float(r["score"]), 6) for r in keep],
                    "boxes": [[float(v) for v in r["box"]] for r in keep],
                }
            )
        return results

    def candidates(self, images: Sequence[Any], queries: Sequence[Sequence[str]]) -> list[Candidates]:
        """Each region of a queried category as a box whose logit is its score's, ``-inf`` for the other queries."""
        out: list[Candidates] = []
        for img, q in zip(images, queries, strict=True):
            _, regions = detect_shapes(img, return_regions=True)
            column = {c: k for k, c in enumerate(q)}
            keep = [r for r in regions if r["category"] in column]
            logits = torch.full((len(keep), len(q)), -torch.inf)
            for row, r in enumerate(keep):
                logits[row, column[r["category"]]] = torch.logit(torch.tensor(float(r["score"])).clamp(1e-6, 1 - 1e-6))
            out.append((logits, torch.tensor([r["box"] for r in keep], dtype=torch.float32).reshape(-1, 4)))
        return out


def check_detector_name(name: str | Path) -> None:
    """Refuse a detector name that cannot resolve (cheap and offline: a typo is reported before generating)."""
    check_model_name(name, "detector", "shapes", PAPER_DETECTOR, "a local transformers detector folder")


def detector_kind(name: str | Path, revision: str | None = None) -> str:
    """``"shapes"``, ``"owlv2"``, ``"owlvit"`` or ``"grounding-dino"`` from the name or the model's config.

    Reads only the config (a local file, or one small download), so callers use it to check the detector
    before generating; a name that does not resolve is a :class:`UserError`.
    """
    check_detector_name(name)
    if str(name) == "shapes":
        return "shapes"
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(str(name), **hf_kwargs(name, revision)).model_type
    except (OSError, ValueError) as err:
        raise UserError(f"detector {name} could not be loaded: {one_line(str(err))}") from err
    if model_type not in ("owlv2", "owlvit", "grounding-dino"):
        raise UserError(f"unsupported detector model type {model_type!r} ({name}): use OWLv2, OWL-ViT, Grounding DINO")
    return model_type


def default_template(kind: str) -> str:
    """The query template a detector of ``kind`` uses when none is given."""
    return {"shapes": ShapesDetector.template, "grounding-dino": GDINO_TEMPLATE}.get(kind, OWL_TEMPLATE)


def load_detector(
    name: str | Path = PAPER_DETECTOR,
    revision: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    template: str | None = None,
    batch_size: int = 8,
) -> Detector:
    """A detector from a local folder, a hub id or ``"shapes"``; the class follows the config's model type."""
    kind = detector_kind(name, revision)
    if kind == "shapes":
        return ShapesDetector()
    cls = GroundingDinoDetector if kind == "grounding-dino" else OwlDetector
    return cls(name, revision=revision, device=device, dtype=dtype, template=template, batch_size=batch_size)
