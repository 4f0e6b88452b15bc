"""Typed configuration: dataclass schema, YAML presets, ``extends:`` merging, dotted ``key=value`` overrides.

A config is built in one pass, before anything heavy is imported or loaded::

    cfg = load_config("shapes_tiny", ["train.max_steps=50", "loss.token_weight=0"])

``source`` is a YAML path or a preset name (``src/tokencompose/configs/NAME.yaml``, shipped as package
data; the top-level ``configs/`` folder is a link to it). A YAML file may name a base with
``extends: other`` (a preset name or a path relative to the file); mappings merge key by key, lists
and scalars replace. Every key is checked against the schema and every value parsed to the field's
type and range-checked; an error names the dotted key (and suggests the closest valid one).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from tokencompose.atomic import atomic_write_text
from tokencompose.typed_data import (
    ConfigError,
    build_dataclass,
    load_yaml_text,
    merge,
    parse_override,
    to_dict,
)
from tokencompose.typed_data import (
    apply_overrides as typed_apply_overrides,
)

__all__ = ["Config", "ConfigError", "build_dataclass", "dump_yaml", "load_config", "parse_override", "preset_names",
           "save_config", "to_dict", "validate"]  # fmt: skip

Precision = Literal["fp32", "fp16", "bf16"]


# --------------------------------------------------------------------------------------------------
# Schema. Attribute docstrings document each field; defaults are the paper's SD 1.4 recipe where
# one exists, so a preset only states what differs.
# --------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    path: str = "CompVis/stable-diffusion-v1-4"
    """Diffusers-layout folder or hub id. ``tiny`` = tiny random-init SD-shaped model (tests, shapes world)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); ignored for local folders."""
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    """Override the scheduler's prediction type (SD 2.x 768 px models are ``v_prediction``); None = keep."""
    family: Literal["auto", "sd", "sdxl", "sd3", "flux"] = "auto"
    """Architecture: ``auto`` (read from the folder's ``model_index.json``; ``tiny`` is ``sd``), ``sd`` (SD 1.x /
    2.x, one CLIP text encoder) or ``sdxl`` (two encoders, pooled embedding, size/crop conditioning)."""


@dataclass
class ShapesConfig:
    num: int = 0
    """When > 0 and ``data.path`` does not exist, render this many shapes-world images there first."""
    seed: int = 0
    """Seed of the rendered shapes world."""


@dataclass
class DataConfig:
    path: str = ""
    """Training list: ``metadata.jsonl`` in the paper's format (relative paths resolve from its folder)."""
    image_size: int = 512
    """Side ``S`` of the square training crop, in pixels (512 for SD 1.x, 768 for SD 2.x-v)."""
    latent_cache: str | None = None
    """Folder of cached VAE posteriors (mean, std) built by ``tokencompose prepare``; the VAE then never runs."""
    num_workers: int = 2
    """DataLoader worker processes (0 = load in the training process)."""
    flip: bool = False
    """Random horizontal flip (off in the paper; not with a latent cache)."""
    caption_dropout: float = 0.0
    """Share of samples trained on the empty caption (denoising loss only; their phrases are not supervised), so
    the unconditional prediction classifier-free guidance subtracts keeps being trained. 0 in the paper (SD 1.4's
    unconditional branch is robust to a short fine-tune); a small base trained with dropout needs it (the demo)."""
    shuffle: bool = True
    """Shuffle every epoch (a fixed permutation per (seed, epoch): resumable)."""
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    """Render the built-in shapes world to ``path`` if it is missing."""


@dataclass
class LossConfig:
    token_weight: float = 1e-3
    """lambda, weight of L_token. 0 removes the term and its cost."""
    pixel_weight: float = 5e-5
    """gamma, weight of L_pixel. 0 removes the term and its cost."""
    roi_weight: float = 0.0
    """Weight of the ROI-token contrastive alignment term (InfoNCE, box features vs phrase tokens); 0 = off."""
    roi_block: str = "up_blocks.2"
    """UNet block whose output features are ROI-pooled for the alignment term."""
    roi_embed_dim: int = 256
    """Width of the alignment term's shared embedding (projection heads' output)."""
    roi_symmetric: bool = False
    """Average the image->text and text->image InfoNCE directions."""
    text_spans: Literal["clip", "t5", "both"] = "clip"
    """Which text positions a phrase supervises where the model reads several encoders in sequence (SD3:
    the 77 CLIP positions, the T5 positions after them, or both); families with one index space ignore it."""
    normalize: Literal["joint", "text"] = "text"
    """Joint-attention models (SD3, Flux): the supervised map is the image->text block of the joint softmax
    (``joint``, the model's own probabilities) or that block renormalised over the text keys (``text``, a
    distribution over text tokens like SD's cross-attention). UNet families ignore it."""
    layers: list[str] | None = None
    """Supervised cross-attention layers: ``mid``, ``up``, ``down`` or fnmatch patterns on layer names; None:
    the family's default (``mid`` + ``up`` for SD, the paper's 10 layers, and for SDXL)."""
    capture_columns: bool = False
    """Keep only the batch's supervised token columns of each captured map (less memory; same losses)."""
    capture_sdpa_output: bool = False
    """Supervised layers compute their output with the fused attention kernel; the explicit maps feed
    the losses only (same values and gradients; less memory traffic on a GPU, one more ``Q K^T``)."""


@dataclass
class OptimConfig:
    lr: float = 5e-6
    """Peak learning rate (constant after warm-up)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = 1e-2
    """AdamW decoupled weight decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear warm-up: lr * min(1, (step + 1) / warmup_steps); 0 = constant from the first step."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 = no clipping (the norm is still logged)."""


@dataclass
class EmaConfig:
    enabled: bool = False
    """Keep an exponential moving average of the UNet weights (saved as ``unet_ema/``)."""
    decay: float = 0.9999
    """EMA decay."""


@dataclass
class LoraConfig:
    rank: int = 0
    """LoRA rank; 0 = full fine-tuning of the UNet."""
    alpha: float | None = None
    """LoRA alpha (scale = alpha / rank); None = rank."""
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """UNet module names that get adapters (peft ``target_modules``)."""
    dropout: float = 0.0
    """Dropout on the LoRA path."""


@dataclass
class TrainConfig:
    batch_size: int = 1
    """Micro-batch per process. Effective batch = batch_size * grad_accum * number of processes."""
    grad_accum: int = 4
    """Micro-batches accumulated per optimizer step."""
    max_steps: int = 24000
    """Optimizer steps (skipped NaN steps count)."""
    precision: Precision = "fp32"
    """Mixed precision through Accelerate; falls back to fp32 where autocast is unsupported."""
    grad_checkpointing: bool = False
    """Recompute UNet activations in the backward pass (less memory, ~30% more compute)."""
    compile: bool = False
    """``torch.compile`` the UNet in place (``nn.Module.compile``; weights and checkpoints unchanged). The
    capture processors trace without graph breaks, also under ``grad_checkpointing`` (the trainer tells
    Dynamo not to replay the map store in the recomputation)."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    """``torch.compile`` mode (``reduce-overhead`` and ``max-autotune`` use CUDA graphs)."""
    compile_backend: str = "inductor"
    """``torch.compile`` backend (``eager`` / ``aot_eager`` trace without generating code: for debugging)."""
    channels_last: bool = False
    """UNet weights in channels-last memory format (faster convolutions on recent GPUs)."""
    seed: int = 0
    """Seeds model init (tiny), data order, noise, timesteps and every library RNG."""
    deterministic: bool = False
    """``torch.use_deterministic_algorithms(True)`` (slower on GPU; bit-exact reruns)."""
    allow_tf32: bool = True
    """TF32 matmuls on Ampere+ GPUs (ignored elsewhere)."""
    nan_policy: Literal["skip", "stop"] = "skip"
    """On a non-finite loss or gradient: skip the optimizer step and count it, or stop with an error."""
    max_nan_skips: int = 100
    """Stop anyway after this many skipped steps in one run."""
    ema: EmaConfig = field(default_factory=EmaConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class LogConfig:
    every: int = 10
    """Optimizer steps between log rows (the only host syncs of the loop)."""
    tensorboard: bool = True
    """Log to TensorBoard under ``RUN_DIR/tensorboard`` (Accelerate's tracker): scalars, config, samples."""
    trackers: list[str] = field(default_factory=list)
    """Further Accelerate trackers, each installed: ``wandb``, ``mlflow``, ``comet_ml``, ``aim``, ...
    (TensorBoard is ``log.tensorboard``)."""
    project: str = "tokencompose"
    """Project (wandb, Comet, Aim) or experiment (MLflow) the runs of ``log.trackers`` go to."""
    samples: int = 4
    """Images drawn at every checkpoint and logged as one grid: the first distinct training captions,
    fixed seeds, no grid when 0 or when no tracker is on."""
    sample_steps: int = 8
    """Denoising steps (DDIM) of the checkpoint samples."""
    progress: bool = True
    """Show a tqdm progress bar."""
    curves: bool = True
    """Draw ``loss_curves.png`` at the end."""
    smoothing: float = 0.9
    """EMA factor of the smoothed curves."""


@dataclass
class CheckpointConfig:
    every: int = 1000
    """Optimizer steps between checkpoints (the last step is always saved)."""
    keep_last: int = 3
    """Keep the newest N checkpoints (>= 1)."""


@dataclass
class Config:
    run_dir: str = "runs/default"
    """Run folder: config.yaml, manifest.json, metrics.jsonl, tensorboard/, checkpoints/. Rerun = resume."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


# --------------------------------------------------------------------------------------------------
# Range checks: (dotted key, predicate, message). Run after every build.
# --------------------------------------------------------------------------------------------------
_CHECKS: list[tuple[str, typing.Callable[[Any], bool], str]] = [
    ("model.path", lambda v: bool(v), "must not be empty"),
    ("data.image_size", lambda v: v >= 8 and v % 8 == 0, "must be a positive multiple of 8"),
    ("data.caption_dropout", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("data.num_workers", lambda v: v >= 0, "must be >= 0"),
    ("data.shapes.num", lambda v: v >= 0, "must be >= 0"),
    ("loss.token_weight", lambda v: v >= 0, "must be >= 0"),
    ("loss.pixel_weight", lambda v: v >= 0, "must be >= 0"),
    ("loss.roi_weight", lambda v: v >= 0, "must be >= 0"),
    ("loss.roi_embed_dim", lambda v: v >= 1, "must be >= 1"),
    ("loss.layers", lambda v: v is None or len(v) > 0, "must name at least one layer group (or be null)"),
    ("optim.lr", lambda v: v > 0, "must be > 0"),
    ("optim.betas", lambda v: all(0 <= b < 1 for b in v), "each beta must be in [0, 1)"),
    ("optim.weight_decay", lambda v: v >= 0, "must be >= 0"),
    ("optim.eps", lambda v: v > 0, "must be > 0"),
    ("optim.warmup_steps", lambda v: v >= 0, "must be >= 0"),
    ("optim.max_grad_norm", lambda v: v >= 0, "must be >= 0 (0 = no clipping)"),
    ("train.batch_size", lambda v: v >= 1, "must be >= 1"),
    ("train.grad_accum", lambda v: v >= 1, "must be >= 1"),
    ("train.max_steps", lambda v: v >= 1, "must be >= 1"),
    ("train.max_nan_skips", lambda v: v >= 0, "must be >= 0"),
    ("train.ema.decay", lambda v: 0 < v < 1, "must be in (0, 1)"),
    ("train.lora.rank", lambda v: v >= 0, "must be >= 0 (0 = full fine-tuning)"),
    ("train.lora.alpha", lambda v: v is None or v > 0, "must be > 0"),
    ("train.lora.target_modules", lambda v: len(v) > 0, "must name at least one module"),
    ("train.lora.dropout", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("log.every", lambda v: v >= 1, "must be >= 1"),
    ("log.smoothing", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("log.trackers", lambda v: len(set(v)) == len(v), "must not repeat a tracker"),
    ("log.trackers", lambda v: "tensorboard" not in v, "must not name tensorboard (that is log.tensorboard)"),
    ("log.project", lambda v: bool(v), "must not be empty"),
    ("log.samples", lambda v: v >= 0, "must be >= 0 (0 = no sample grid)"),
    ("log.sample_steps", lambda v: v >= 1, "must be >= 1"),
    ("checkpoint.every", lambda v: v >= 1, "must be >= 1"),
    ("checkpoint.keep_last", lambda v: v >= 1, "must be >= 1"),
]


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: Config) -> Config:
    """Range and cross-field checks; raises :class:`ConfigError` naming the key."""
    for key, ok, msg in _CHECKS:
        value = _get(cfg, key)
        if not ok(value):
            raise ConfigError(key, f"{msg}, got {value!r}")
    if cfg.data.latent_cache and cfg.data.flip:
        raise ConfigError("data.flip", "cannot be used with data.latent_cache (the cache holds unflipped latents)")
    if not cfg.data.path:
        raise ConfigError("data.path", "must name a metadata.jsonl training list")
    if cfg.train.ema.enabled and cfg.train.lora.rank > 0:
        raise ConfigError("train.ema.enabled", "EMA of LoRA adapters is not supported; use full fine-tuning")
    return cfg


def from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from nested plain data (unknown keys rejected)."""
    if not isinstance(data, dict):
        raise ConfigError("<root>", f"expected a mapping, got {type(data).__name__}")
    return validate(build_dataclass(Config, data))


# --------------------------------------------------------------------------------------------------
# YAML files, presets, overrides.
# --------------------------------------------------------------------------------------------------
def preset_names() -> list[str]:
    """Names of the presets shipped with the package."""
    folder = resources.files("tokencompose") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def resolve_source(source: str | Path, relative_to: Path | None = None) -> Path:
    """A YAML path (as given, or relative to ``relative_to``) or a preset name -> an existing file."""
    p = Path(source)
    candidates = [p] if relative_to is None or p.is_absolute() else [relative_to / p, p]
    for c in candidates:
        if c.is_file():
            return c
    name = p.name[:-5] if p.name.endswith(".yaml") else p.name
    preset = resources.files("tokencompose") / "configs" / f"{name}.yaml"
    if preset.is_file():
        with resources.as_file(preset) as real:
            return Path(real)
    raise FileNotFoundError(f"no config file {str(source)!r} and no preset of that name (presets: {preset_names()})")


def load_yaml(source: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config file, following ``extends:`` chains, -> merged plain data (not yet validated)."""
    path = resolve_source(source) if not _seen else resolve_source(source, _seen[-1].parent)
    path = path.resolve()
    if path in _seen:
        raise ConfigError("extends", f"circular extends: {' -> '.join(str(p) for p in (*_seen, path))}")
    data = load_yaml_text(path.read_text(), path) or {}
    if not isinstance(data, dict):
        raise ConfigError("<root>", f"{path} must hold a mapping")
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError("extends", f"must be a preset name or a path, got {base!r}")
    return merge(load_yaml(base, (*_seen, path)), data)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys of the :class:`Config` schema in plain data (see :func:`typed_data.apply_overrides`)."""
    return typed_apply_overrides(Config, data, overrides)


def load_config(source: str | Path | dict[str, Any] | None = None, overrides: list[str] | None = None) -> Config:
    """Preset name, YAML path or plain data (+ dotted overrides) -> a validated :class:`Config`."""
    if source is None:
        data: dict[str, Any] = {}
    elif isinstance(source, dict):
        data = merge({}, source)
        if "extends" in data:
            data = merge(load_yaml(data.pop("extends")), data)
    else:
        data = load_yaml(source)
    return from_dict(apply_overrides(data, list(overrides or [])))


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (every field, no ``extends``) as YAML."""
    atomic_write_text(path, dump_yaml(cfg))
