"""Typed settings of the evaluation commands: what ``generate`` and ``evaluate`` run, as data.

Each command's settings are one dataclass (fields documented), built by the one typed parsing path
(:func:`tokencompose.typed_data.load_settings`: the command's flags, an optional YAML file, dotted
``key=value`` overrides, the same errors as ``train``) and saved beside its output. The library
functions in :mod:`tokencompose.evaluation.run` take them; the CLI and the demo both call those.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tokencompose.evaluation.generation import GenerationSettings
from tokencompose.evaluation.prompts import PromptSettings
from tokencompose.loading import ModelSettings
from tokencompose.sharding import ShardSettings

__all__ = [
    "DetectorSettings",
    "GenerateSettings",
    "GenerationSettings",
    "GroundingSettings",
    "ModelSettings",
    "MultiGenSettings",
    "PromptSettings",
    "ShardSettings",
]


@dataclass
class GenerateSettings:
    """``tokencompose generate``: images of prompts, one seed per image, resumable."""

    out: str = ""
    """Image folder (``<prompt id>_<index>.png``, ``generation.json``, ``prompts.json``)."""
    model: ModelSettings = field(default_factory=ModelSettings)
    prompts: PromptSettings = field(default_factory=PromptSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    run: ShardSettings = field(default_factory=ShardSettings)


@dataclass
class DetectorSettings:
    """The open-vocabulary detector that counts objects (MultiGen's scorer)."""

    detector: str = "google/owlv2-large-patch14-ensemble"
    """Hub id, local folder (OWLv2, OWL-ViT, Grounding DINO), or ``shapes`` (the exact shapes detector)."""
    revision: str | None = None
    """Hub revision of the detector."""
    batch_size: int = 16
    """Images per detector call."""
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    """Detector precision."""
    query_template: str | None = None
    """Query text per category; default ``a photo of a {category}`` (OWL), ``{category}`` (Grounding DINO)."""
    queries: Literal["vocabulary", "prompt"] = "vocabulary"
    """Query every image with the whole category vocabulary (the paper) or with its prompt's categories."""
    threshold: float = 0.1
    """A category counts as found when a box scores above this."""
    bootstrap: int = 1000
    """Bootstrap samples for the 95% CIs (0: none)."""


@dataclass
class MultiGenSettings:
    """``tokencompose evaluate multigen``: generate, detect, score MG_k ± std and 95% CI."""

    out: str = ""
    """Output folder (``images/``, ``detections*.jsonl``, ``results.json``)."""
    name: str | None = None
    """Label of this model in comparison tables."""
    images: str | None = None
    """Image folder (default ``OUT/images``)."""
    skip_generation: bool = False
    """Score the images already in the image folder (no model needed)."""
    output: str | None = None
    """Results file (default ``OUT/results.json``)."""
    model: ModelSettings = field(default_factory=ModelSettings)
    prompts: PromptSettings = field(default_factory=PromptSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    detector: DetectorSettings = field(default_factory=DetectorSettings)
    run: ShardSettings = field(default_factory=ShardSettings)


@dataclass
class GroundingSettings:
    """``tokencompose evaluate grounding``: each phrase's attention against its mask (mIoU sweep, AUROC)."""

    out: str = ""
    """Output folder (``results.json``)."""
    name: str | None = None
    """Label of this model in comparison tables."""
    model: ModelSettings = field(default_factory=ModelSettings)
    data: str | None = None
    """A metadata.jsonl with phrase masks (the paper's format)."""
    shapes: int | None = None
    """Instead of ``data``: render this many shapes-world scenes and use them."""
    shapes_seed: int = 12345
    """Seed of those scenes (unseen in training by default)."""
    shapes_world: str = "attributes"
    """The shapes world of those scenes (``attributes`` | ``nouns``): the one the model was trained on."""
    resolution: int | None = None
    """Image size in pixels (default: the model's native size)."""
    eval_size: int | None = None
    """Mask/score resolution (default: the image size)."""
    timesteps: list[int] = field(default_factory=lambda: [100, 300, 500])
    """Noise timesteps the attention is read at (averaged)."""
    layers: list[str] | None = None
    """Text-attention layers to aggregate (``down``, ``mid``, ``up``; ``joint``, ``single``; blocks or module-name
    patterns); None: the model family's supervised default (``mid`` + ``up`` for SD / SDXL)."""
    normalize: Literal["joint", "text"] = "text"
    """SD3 / Flux: the image->text block of the joint softmax (``joint``) or renormalised over text (``text``)."""
    thresholds: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(1, 10)])
    """Thresholds of the mIoU sweep."""
    batch_size: int = 4
    """Images per UNet call."""
    limit: int | None = None
    """Only the first N images."""
    seed: int = 0
    """Seed of the noise the images are corrupted with."""
