"""Building what the loop trains: models (frozen parts, LoRA, checkpointing), precision, optimizer, data."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from tokencompose.attention import select_layers
from tokencompose.config import Config, ConfigError, OptimConfig
from tokencompose.data.dataset import TokenDataset, collate
from tokencompose.data.latents import LatentCache
from tokencompose.data.shapes import make_shapes_dataset
from tokencompose.errors import UserError
from tokencompose.families import Family, family_of, resolve_family
from tokencompose.loading import DTYPES
from tokencompose.models import load_components
from tokencompose.train.lora import add_lora

log = logging.getLogger(__name__)


def resolve_precision(requested: str, device: torch.device) -> str:
    """``fp32``/``fp16``/``bf16`` -> the precision this device can train in (falls back to fp32, with a warning).

    fp16 needs a loss scaler, which Accelerate only provides on GPUs; autocast support on MPS depends
    on the macOS and torch versions, so it is probed with a tiny matmul instead of assumed.
    """
    if requested == "fp32":
        return "fp32"
    if requested == "fp16" and device.type == "cpu":
        log.warning("fp16 training needs a GPU (loss scaling); training on the CPU in fp32 instead")
        return "fp32"
    try:
        with torch.autocast(device_type=device.type, dtype=DTYPES[requested]):
            x = torch.ones(2, 2, device=device)
            (x @ x).sum().item()
    except Exception as err:  # RuntimeError on most backends, but some raise other types
        log.warning("%s autocast is not supported on %s (%s); training in fp32", requested, device.type, err)
        return "fp32"
    return requested


def check_launcher_precision(requested: str) -> None:
    """Refuse a mixed precision set by the launcher that differs from ``train.precision``.

    ``accelerate launch --mixed_precision X`` (or an Accelerate config file) exports
    ``ACCELERATE_MIXED_PRECISION``; the trainer passes ``train.precision`` to Accelerate explicitly, which
    would silently win. ``no`` is also what ``accelerate launch`` exports when nothing was asked, so it
    is not a request.
    """

    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launcher in ("", "no") or launcher == requested:
        return
    accelerate_name = {"fp32": "no"}.get(requested, requested)
    fix = f"set train.precision={launcher}, or " if launcher in ("fp16", "bf16") else ""
    raise UserError(
        f"the launcher asks for mixed precision {launcher} (accelerate launch --mixed_precision or its config "
        f"file) but train.precision={requested}: {fix}launch with --mixed_precision {accelerate_name}"
    )


def seed_everything(cfg: Config) -> None:
    """Seed every RNG from ``train.seed``; deterministic algorithms and TF32 as configured."""
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.allow_tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.allow_tf32


def weight_dtype(precision: str) -> torch.dtype:
    """Dtype of the frozen parts (VAE, text encoder): the half type under mixed precision, else fp32."""
    return DTYPES[precision]


def model_family(cfg: Config) -> Family:
    """The family of ``cfg.model`` (``auto``: read from the folder; ``tiny`` is SD unless ``model.family`` says)."""
    return resolve_family(cfg.model.family, cfg.model.path, cfg.model.revision)


def load_models(cfg: Config) -> Any:
    """Components for ``cfg.model`` (``tiny`` = tiny random-init model of the family, seeded by ``train.seed``)."""
    if cfg.model.path == "tiny":
        comps = model_family(cfg).tiny(
            seed=cfg.train.seed, image_size=cfg.data.image_size, prediction_type=cfg.model.prediction_type or "epsilon"
        )
    else:
        comps = load_components(cfg.model.path, revision=cfg.model.revision, family=cfg.model.family)
    if cfg.model.prediction_type:
        comps.scheduler.register_to_config(prediction_type=cfg.model.prediction_type)
    return comps


def supervised_layers(cfg: Config, comps: Any) -> list[str]:
    """``loss.layers``, or the family's default set when it is null."""
    return list(cfg.loss.layers) if cfg.loss.layers is not None else list(family_of(comps).default_layers)


def check_layers(cfg: Config) -> None:
    """Refuse a ``loss.layers`` selection that names no cross-attention layer, before any weights load.

    The layer names come from the denoiser's config alone: the model is built on the meta device (no
    memory, no weights). When the config cannot be read here (a hub id offline), the check happens
    when the capture is installed instead.
    """
    if cfg.loss.token_weight <= 0 and cfg.loss.pixel_weight <= 0:
        return  # no capture, the selection is unused
    if cfg.loss.layers is None:
        return  # the family's default set
    import json

    import diffusers
    from accelerate import init_empty_weights

    path = Path(cfg.model.path).expanduser()
    try:
        family = model_family(cfg)
        cls, sub = getattr(diffusers, family.denoiser_class), family.denoiser_folder
        if cfg.model.path == "tiny":
            config = dict(family.tiny().unet.config)
        elif (path / sub / "config.json").is_file():
            config = json.loads((path / sub / "config.json").read_text())
        else:
            config = cls.load_config(cfg.model.path, subfolder=sub, revision=cfg.model.revision)
        with init_empty_weights():
            unet = cls.from_config(config)
    except Exception as err:  # unreadable or unreachable config: the loader reports it properly
        log.debug("loss.layers not checked before loading (%s)", err)
        return
    try:
        select_layers(unet, cfg.loss.layers)
    except ValueError as err:
        raise ConfigError("loss.layers", str(err)) from None


def vae_dtype(part: Any, dtype: torch.dtype) -> torch.dtype:
    """``dtype``, except float32 for a VAE whose config says ``force_upcast`` (SDXL's overflows in fp16).

    bf16 has float32's range and is kept; the text encoders are never upcast.
    """
    if dtype == torch.float16 and getattr(getattr(part, "config", None), "force_upcast", False):
        log.info("the VAE runs in float32 (force_upcast: it overflows in fp16); bf16 precision keeps it in bf16")
        return torch.float32
    return dtype


def prepare_models(comps: Any, cfg: Config, device: torch.device, precision: str) -> list[torch.nn.Parameter]:
    """Freeze VAE and text encoder (cast to the half type under mixed precision), set up the UNet to train.

    Returns the trainable UNet parameters (all of them, or the LoRA adapters). Trained weights stay fp32:
    autocast computes in half precision, the optimizer updates fp32 master weights. With LoRA under mixed
    precision the frozen base weights are stored in the half type (autocast casts them to it for every
    matmul anyway), which halves the denoiser's memory: FLUX.1's 11.9 B frozen weights take 23.8 GB, not 47.6.
    """
    dtype = weight_dtype(precision)
    for frozen in (comps.vae, *comps.text_encoders):
        frozen.requires_grad_(False)
        frozen.eval()
        frozen.to(device) if dtype == torch.float32 else frozen.to(device, dtype=vae_dtype(frozen, dtype))
    unet = comps.unet
    if cfg.train.lora.rank > 0:
        lora = cfg.train.lora
        add_lora(unet, lora.rank, lora.alpha, lora.target_modules, lora.dropout)
        if dtype != torch.float32:
            for param in unet.parameters():
                if not param.requires_grad:
                    param.data = param.data.to(dtype)
    else:
        unet.requires_grad_(True)
    if cfg.train.grad_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    unet.to(device)
    if cfg.train.channels_last:
        unet.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        # In place: the module keeps its class, parameter names and hooks (AttentionCapture's
        # processors and pre-hook are installed later, before the first forward, and get traced).
        mode = None if cfg.train.compile_mode == "default" else cfg.train.compile_mode
        unet.compile(backend=cfg.train.compile_backend, mode=mode)
    return [p for p in unet.parameters() if p.requires_grad]


def build_optimizer(params: list[Any], cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over parameters or parameter groups (groups may set their own weight decay).

    Fused (one kernel for the whole update) when every parameter is on a CUDA device.
    """
    params = [{**g, "params": list(g["params"])} if isinstance(g, dict) else g for g in params]
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(tensors) and all(p.is_cuda for p in tensors)
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.eps, fused=fused or None
    )


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then constant."""
    if cfg.warmup_steps > 0:
        return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)
    return cfg.lr


def ensure_shapes_data(cfg: Config) -> None:
    """Render the shapes world to ``data.path`` when it is missing and ``data.shapes.num > 0``."""
    path = Path(cfg.data.path)
    if path.exists() or cfg.data.shapes.num <= 0:
        return

    log.info("rendering %d shapes-world images to %s", cfg.data.shapes.num, path.parent)
    make_shapes_dataset(path.parent, num=cfg.data.shapes.num, seed=cfg.data.shapes.seed, size=cfg.data.image_size)
    if not path.exists():  # rendered (or reused) into path.parent, but not under the name asked for
        raise UserError(
            f"data.path {path} does not exist; the shapes world is in {path.parent}/metadata.jsonl "
            "(data.path must name that file)"
        )


def check_latent_cache(cfg: Config, vae: Any) -> None:
    """Refuse a latent cache built from another VAE, resolution or record list (before the VAE is cast)."""
    if not cfg.data.latent_cache:
        return

    LatentCache(cfg.data.latent_cache).check(image_size=cfg.data.image_size, vae=vae, records=cfg.data.path)


def build_dataset(cfg: Config, comps: Any, sizes: list[tuple[int, int]]) -> tuple[Any, Any]:
    """``(TokenDataset, collate)`` for ``cfg.data``, tokenized as the model's family needs."""
    path = Path(cfg.data.path)
    if not path.is_file():
        raise FileNotFoundError(f"data.path: no training list at {path}")
    family = family_of(comps)
    dataset = TokenDataset(
        str(path),
        family.index_tokenizer(comps),
        cfg.data.image_size,
        attention_sizes=sizes,
        **family.dataset_text(comps, cfg.loss.text_spans),
        latent_cache=cfg.data.latent_cache,
        flip=cfg.data.flip,
        caption_dropout=cfg.data.caption_dropout,
    )
    return dataset, collate
