"""``tokencompose visualize`` as a library function: :class:`VisualizeSettings` in, the figure files out.

One settings type for the four figures (``attention``, ``masks``, ``grid``, ``curves``); each uses the
fields it needs. Models are the base (``model``) and checkpoints of it, loaded by the one loader.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tokencompose.errors import UserError
from tokencompose.evaluation.generation import Sampler
from tokencompose.loading import ModelSettings, load_model, resolve_device
from tokencompose.typed_data import to_dict
from tokencompose.visualize import make
from tokencompose.visualize.capture import parse_model_spec


@dataclass
class VisualizeSettings:
    """Which figure to draw, of which models, and how."""

    figure: Literal["attention", "masks", "grid", "curves"] = "attention"
    """attention: per-word maps of one model; masks: masks vs each model's attention; grid: models side by
    side; curves: loss curves of a run folder."""
    out: str = "figures"
    """Output folder (PNG files + a ``figures.json`` manifest the HTML report reads)."""
    model: ModelSettings = field(default_factory=ModelSettings)
    """The base model (and, for ``attention``, its checkpoint)."""
    checkpoints: list[str] = field(default_factory=list)
    """masks / grid: checkpoints of the base to show, each ``[LABEL=]PATH``."""
    no_base: bool = False
    """masks / grid: leave the base model out (it is shown first by default)."""
    label: str | None = None
    """attention: the model's name in the title (default: ``base`` or the checkpoint's run/step)."""
    prompts: list[str] = field(default_factory=list)
    """attention: the prompt (or the caption of ``image``); grid: one row per prompt and seed."""
    prompts_file: str | None = None
    """grid: a text file of prompts, one per line."""
    image: str | None = None
    """attention: draw this image's attention (noised at ``timesteps``) instead of generating."""
    data: str | None = None
    """masks: a metadata.jsonl with phrase masks."""
    num: int = 4
    """masks: the first N samples (unless ``indices``)."""
    indices: list[int] = field(default_factory=list)
    """masks: dataset indices to show."""
    steps: int = 50
    """Denoising steps when generating."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale when generating."""
    scheduler: Sampler = "auto"
    """Sampler when generating: ``auto`` = the family's figure sampler (DDIM for SD), else a
    :class:`~tokencompose.evaluation.generation.GenerationSettings` choice (``dpm``, ...)."""
    t_range: list[int] = field(default_factory=list)
    """attention: denoising timesteps LO,HI whose attention is averaged (default: every step)."""
    timesteps: list[int] = field(default_factory=lambda: [400])
    """attention with ``image`` / masks: noise timesteps the attention is read at (fixed noise)."""
    words: list[str] = field(default_factory=list)
    """attention: only these words/phrases (default: every word of the prompt)."""
    special: bool = False
    """attention: also show the start and end tokens."""
    merge: Literal["sum", "mean"] = "sum"
    """attention: how a word's sub-tokens merge (sum: the phrase map of ``tokencompose.maps``)."""
    layers: list[str] | None = None
    """Text-attention layers read (down, mid, up; joint, single; blocks or module-name patterns); None: the
    model family's supervised default."""
    normalize: Literal["joint", "text"] = "text"
    """SD3 / Flux: the image->text block of the joint softmax (``joint``) or renormalised over text (``text``)."""
    res: list[int] = field(default_factory=list)
    """Attention resolutions (map heights) to average; default all."""
    cmap: str = "inferno"
    """Colour map (perceptually uniform: inferno, magma, viridis)."""
    resolution: int | None = None
    """Image size in pixels (default: the model's native size)."""
    seed: int = 0
    """Seed of the generation or of the noise (attention, masks)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """grid: seeds, one row each per prompt."""
    dpi: int = 150
    """Figure resolution."""
    name: str = "grid"
    """grid: file name (without .png)."""
    run: str | None = None
    """curves: a run folder or its metrics.jsonl."""
    smoothing: float = 0.9
    """curves: EMA smoothing factor in [0, 1)."""


def checkpoint_label(checkpoint: str) -> str:
    """A readable default label: ``run/step-00000300`` for our checkpoints, else the folder's name."""
    p = Path(checkpoint)
    return f"{p.parent.parent.name}/{p.name}" if p.parent.name == "checkpoints" else (p.name or str(p))


def figure_models(s: VisualizeSettings) -> list[tuple[str, ModelSettings]]:
    """``(label, settings)`` of the base (unless ``no_base``) and of each ``[LABEL=]PATH`` checkpoint.

    ``model.checkpoint`` (the ``--checkpoint`` every command has) counts as the first checkpoint.
    """
    models = [] if s.no_base else [("base", dataclasses.replace(s.model, checkpoint=None))]
    for spec in ([s.model.checkpoint] if s.model.checkpoint else []) + list(s.checkpoints):
        label, path = parse_model_spec(spec)
        explicit = "=" in spec and not Path(spec).exists()
        models.append((label if explicit else checkpoint_label(path), dataclasses.replace(s.model, checkpoint=path)))
    if not models:
        raise UserError("no model to show: give checkpoints or leave the base in")
    return models


def run_visualize(s: VisualizeSettings) -> list[Path]:
    """Draw the figure ``s`` names into ``s.out``; returns the files written.

    Each figure's entry in its folder's ``figures.json`` keeps the settings that drew it.
    """
    files = _draw(s)
    make.record_settings(files, to_dict(s))
    return files


def _draw(s: VisualizeSettings) -> list[Path]:
    if s.figure == "curves":
        if not s.run:
            raise UserError("curves: name a run folder (or its metrics.jsonl)")
        run = Path(s.run)
        out = Path(s.out) if s.out != "figures" else (run if run.is_dir() else run.parent)
        return [make.loss_curves(run, out, s.smoothing)]
    out = Path(s.out)
    device = resolve_device(s.model.device)
    if s.figure == "attention":
        if len(s.prompts) != 1:
            raise UserError(f"attention draws one prompt, got {len(s.prompts)}")
        if s.t_range and len(s.t_range) != 2:
            raise UserError(f"t_range takes two timesteps LO,HI, got {s.t_range}")
        label = s.label or (checkpoint_label(s.model.checkpoint) if s.model.checkpoint else "base")
        comps = load_model(s.model)
        out.mkdir(parents=True, exist_ok=True)
        common = dict(size=s.resolution, layers=s.layers, normalize=s.normalize, resolutions=s.res or None,
                      words=s.words or None,
                      special=s.special, merge=s.merge, cmap=s.cmap, dpi=s.dpi, device=device, label=label)  # fmt: skip
        if s.image is not None:
            return [make.attention_from_image(comps, s.image, s.prompts[0], out, s.seed, s.timesteps, **common)]
        t_range = (float(s.t_range[0]), float(s.t_range[1])) if s.t_range else None
        return [make.attention_from_prompt(comps, s.prompts[0], out, s.seed, s.steps, s.guidance_scale,
                                           t_range=t_range, scheduler=s.scheduler, **common)]  # fmt: skip
    models = figure_models(s)
    if s.figure == "masks":
        if not s.data:
            raise UserError("masks: name a metadata.jsonl with phrase masks (--data)")
        out.mkdir(parents=True, exist_ok=True)
        return make.mask_comparisons(s.data, models, out, s.indices or None, s.num, s.seed, s.timesteps, s.resolution,
                                     s.layers, s.res or None, s.cmap, s.dpi, device, s.normalize)  # fmt: skip
    prompts = list(s.prompts)
    if s.prompts_file:
        prompts += [ln.strip() for ln in Path(s.prompts_file).read_text().splitlines() if ln.strip()]
    if not prompts:
        raise UserError("grid needs prompts (--prompt or --prompts-file)")
    out.mkdir(parents=True, exist_ok=True)
    return [make.model_grid(models, prompts, out, s.seeds, s.steps, s.guidance_scale, s.resolution, s.dpi, device,
                            s.name, s.scheduler)]  # fmt: skip
