"""The one loader of "a model to run": base + optional checkpoint (full, EMA, LoRA) + dtype + device.

Every command that runs a model (generate, evaluate, visualize, demo, export) describes it with
:class:`ModelSettings` and gets it from here: :func:`load_model` for the parts (what attention capture
and grounding need), :func:`load_pipeline` for a ready pipeline of the model's family (``StableDiffusionPipeline``,
``StableDiffusionXLPipeline``). A checkpoint is one
of ours (``step-N/`` with ``unet/``, ``unet_ema/`` or a LoRA file) or a plain diffusers UNet folder; a
LoRA is fused into the UNet, so every caller sees one plain UNet whatever was trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from tokencompose.errors import UserError
from tokencompose.families import family_of, resolve_family
from tokencompose.models import load_components
from tokencompose.shipped import resolve_shipped

SCHEDULERS = ("default", "pndm", "ddim", "ddpm", "euler", "euler-ancestral", "dpm")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name, as train/lora.py writes it


@dataclass
class ModelSettings:
    """Which model to run, and where."""

    model: str = ""
    """Base model: diffusers-layout folder, hub id, or a shipped base's name (``shapes_nouns16_wordwise``,
    ``shapes_nouns16``, ``shapes_base``: its folder in this install)."""
    checkpoint: str | None = None
    """A training checkpoint of ours (``step-N/``: full UNet or LoRA, found automatically), or a UNet folder."""
    ema: bool = False
    """With ``checkpoint``: run its EMA UNet (``unet_ema/``)."""
    lora_scale: float = 1.0
    """Strength of a LoRA checkpoint when it is fused (1.0 = the trained model)."""
    device: str = "auto"
    """``auto`` (CUDA, else MPS, else CPU) | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps``."""
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    """Weights' precision; ``auto``: fp16 on CUDA, fp32 elsewhere."""
    family: Literal["auto", "sd", "sdxl", "sd3", "flux"] = "auto"
    """Architecture: ``auto`` reads the base's ``model_index.json``; ``sd`` (1.x / 2.x) | ``sdxl``."""

    def __post_init__(self) -> None:
        self.model = resolve_shipped(self.model)  # a shipped base by name: the folder is what results record


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA if present, else Apple MPS, else CPU; anything else is a torch device string."""
    if name != "auto":
        try:
            return torch.device(name)
        except RuntimeError as err:
            raise UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from err
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: fp16 on CUDA, fp32 elsewhere (CPU half is slow; MPS fp16 works but is opt-in)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def check_model_path(model: str | Path) -> None:
    """A name that looks like a local path (``/``, ``.``, ``~`` or a separator) must be an existing folder.

    Otherwise the hub client reports it as a malformed repo id, which tells the user nothing.
    """
    text = str(model)
    looks_local = text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text
    if looks_local and not Path(text).expanduser().exists():
        raise UserError(f"model folder {text} does not exist (give a diffusers-layout folder or a hub id)")


def resolve_checkpoint(path: str | Path, ema: bool = False) -> tuple[Path | None, Path | None]:
    """A checkpoint folder -> ``(unet, lora)``: the UNet folder to load, or the LoRA folder to fuse."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if ema:
        if not (path / "unet_ema").is_dir():
            raise UserError(f"checkpoint {path} has no unet_ema/ (trained without EMA?): drop --ema")
        return path / "unet_ema", None
    if (path / "unet").is_dir() or (path / "config.json").is_file():
        return path, None
    if (path / LORA_FILE).is_file():
        return None, path
    raise UserError(f"checkpoint {path} holds neither unet/ nor {LORA_FILE}: is it a training checkpoint?")


def scheduler_config(scheduler: Any) -> dict[str, Any]:
    """A scheduler's config with its ``_class_name`` (absent from one built in code rather than loaded)."""
    return {"_class_name": type(scheduler).__name__, **dict(scheduler.config)}


def make_scheduler(config: dict[str, Any], name: str = "default") -> Any:
    """A sampling scheduler of kind ``name`` configured from a model's scheduler ``config``."""
    import diffusers

    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r}: use one of {', '.join(SCHEDULERS)}")
    if name == "default":
        return getattr(diffusers, config["_class_name"]).from_config(config)
    if config.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
        raise UserError(f"this model samples with its flow-matching scheduler, not {name}: use --scheduler auto")
    classes = {
        "pndm": diffusers.PNDMScheduler,
        "ddim": diffusers.DDIMScheduler,
        "ddpm": diffusers.DDPMScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
        "euler-ancestral": diffusers.EulerAncestralDiscreteScheduler,
        "dpm": diffusers.DPMSolverMultistepScheduler,
    }
    if name == "pndm":
        # SD's own scheduler config is PLMS-only PNDM; a config from another class (e.g. a DDPM training
        # config) does not say, so use SD's choice.
        config = {**config, "skip_prk_steps": config.get("skip_prk_steps", True)}
    return classes[name].from_config(config)


def base_scheduler_config(model: str | Path) -> dict[str, Any]:
    """The base model's ``scheduler/`` config (with its ``_class_name``)."""
    import diffusers

    kw = {"local_files_only": True} if Path(str(model)).exists() else {}
    return dict(diffusers.DDPMScheduler.load_config(str(model), subfolder="scheduler", **kw))


def pipeline_from_components(comps: Any, scheduler: Any, safety_checker: Any = None, extractor: Any = None) -> Any:
    """The family's pipeline over loaded parts; attention through PyTorch SDPA, progress bars off."""
    family = family_of(comps)
    pipe = family.pipeline(comps, scheduler, safety_checker, extractor)
    family.use_fused_attention(comps.unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _fuse_lora(comps: Any, lora: Path, scale: float) -> None:
    """Fuse a diffusers-format LoRA into ``comps.unet`` in place (the adapter layers are removed)."""
    pipe = pipeline_from_components(comps, comps.scheduler)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()  # keep the fused weights, drop the adapter layers


def load_model(settings: ModelSettings) -> Any:
    """The parts (:class:`tokencompose.models.Components`) of the model ``settings`` name, on its device/dtype.

    The scheduler is the training (noise) scheduler; samplers come from :func:`make_scheduler`.
    """
    check_model_path(settings.model)
    unet = lora = None
    if settings.checkpoint is not None:
        unet, lora = resolve_checkpoint(settings.checkpoint, ema=settings.ema)
    comps = load_components(settings.model, unet=unet, family=settings.family)
    if lora is not None:
        _fuse_lora(comps, lora, settings.lora_scale)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    for part in (comps.unet, comps.vae, *comps.text_encoders):
        # Cast only when needed: diffusers warns on every ``to(dtype)`` of a model loaded in float32.
        part.to(device) if dtype == torch.float32 else part.to(device=device, dtype=dtype)
    return comps


def load_pipeline(settings: ModelSettings, scheduler: str = "default", safety_checker: bool = False) -> Any:
    """A ready pipeline (the family's class) of the model ``settings`` name, sampling with ``scheduler``."""
    check_model_path(settings.model)
    resolve_device(settings.device)
    if settings.checkpoint is not None:
        resolve_checkpoint(settings.checkpoint, ema=settings.ema)
    if scheduler == "auto":  # the family's own sampler (PNDM for SD / SDXL, the flow scheduler for SD3 / Flux)
        scheduler = resolve_family(settings.family, settings.model).sampler
    if scheduler not in SCHEDULERS:  # all checked before any weights load
        raise UserError(f"unknown scheduler {scheduler!r}: use one of {', '.join(SCHEDULERS)}")
    sampler = make_scheduler(base_scheduler_config(settings.model), scheduler)
    comps = load_model(settings)
    checker = extractor = None
    if safety_checker:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        checker = StableDiffusionSafetyChecker.from_pretrained(str(settings.model), subfolder="safety_checker")
        extractor = CLIPImageProcessor.from_pretrained(str(settings.model), subfolder="feature_extractor")
        checker.to(comps.unet.device)
    return pipeline_from_components(comps, sampler, checker, extractor)


def default_image_size(comps: Any) -> int:
    """The model's native image size in pixels, as its family says (512 for SD 1.x, 1024 for SDXL)."""
    return family_of(comps).native_size(comps.unet, comps.vae_scale_factor)


def release_memory() -> None:
    """Give a model's memory back before the next one loads (the caller has dropped its references)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
