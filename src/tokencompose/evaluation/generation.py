"""MultiGen image generation: a diffusers pipeline from a base model + our UNet or LoRA, batched and resumable.

Every image ``"<uid>_<index>.png"`` has its own seed derived from (base seed, prompt id, image index) and
its own initial noise drawn on the CPU, so any subset, any batch size, any number of processes and any
device draw the same noise. Images already on disk are skipped when they read back whole and carry the
provenance this run would give them (:mod:`tokencompose.evaluation.provenance`); broken ones are redone,
ones from other prompts or settings refused; a file is written to a temporary name and
renamed (``os.replace``), so a crash never leaves a half-written image. The safety checker is **off** by
default (the paper's evaluation counts objects; a blacked-out image would be a false miss).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokencompose.errors import UserError
from tokencompose.evaluation.prompts import Prompt
from tokencompose.evaluation.provenance import (
    check_folder_record,
    check_image,
    digest,
    image_record,
    png_info,
    read_png,
)

log = logging.getLogger(__name__)

SCHEDULERS = ("pndm", "ddim", "euler", "euler-ancestral", "dpm", "default")
SETTINGS_FILE = "generation.json"


@dataclass
class GenerationSettings:
    """The paper's settings are the defaults: 50 PNDM steps, CFG 7.5, 512 px, 10 images per prompt."""

    steps: int = 50
    guidance_scale: float = 7.5
    height: int = 512
    width: int = 512
    images_per_prompt: int = 10
    scheduler: str = "pndm"
    seed: int = 0
    negative_prompt: str | None = None
    safety_checker: bool = False

    def image_affecting(self) -> dict[str, Any]:
        """The fields that change pixels (a folder must not mix images made with different ones)."""
        return asdict(self)


def image_seed(base_seed: int, uid: int, index: int) -> int:
    """Seed of image ``index`` of prompt ``uid``: a hash, so neighbouring ids get unrelated streams."""
    digest = hashlib.sha256(f"tokencompose/{base_seed}/{uid}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def initial_latents(seeds: Sequence[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """``[B, C, h, w]`` float32 noise, one CPU generator per image (device- and batch-independent)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])


def image_name(uid: int, index: int) -> str:
    return f"{uid}_{index}.png"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: fp16 on CUDA, fp32 elsewhere (CPU half is slow; MPS fp16 is fine but opt-in)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def check_scheduler(name: str) -> None:
    """Refuse an unknown scheduler name before any model is loaded or image made."""
    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r}: use one of {', '.join(SCHEDULERS)}")


def make_scheduler(model: str | Path, name: str) -> Any:
    """A sampling scheduler configured from the model's ``scheduler/`` config."""
    import diffusers

    check_scheduler(name)
    classes = {
        "pndm": diffusers.PNDMScheduler,
        "ddim": diffusers.DDIMScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
        "euler-ancestral": diffusers.EulerAncestralDiscreteScheduler,
        "dpm": diffusers.DPMSolverMultistepScheduler,
    }
    kw = {"local_files_only": True} if Path(str(model)).exists() else {}
    config = diffusers.PNDMScheduler.load_config(str(model), subfolder="scheduler", **kw)
    if name == "default":
        return getattr(diffusers, config["_class_name"]).from_config(config)
    if name == "pndm":
        # SD's own scheduler config is PLMS-only PNDM; a config from another class (e.g. a DDPM training
        # config) does not say, so use SD's choice.
        config = {**config, "skip_prk_steps": config.get("skip_prk_steps", True)}
    return classes[name].from_config(config)


def resolve_checkpoint(path: str | Path, ema: bool = False) -> tuple[Path | None, Path | None]:
    """A training checkpoint folder of ours -> ``(unet, lora)``: ``unet/`` (or ``unet_ema/``) or the LoRA file."""
    path = Path(path)
    if ema:
        if not (path / "unet_ema").is_dir():
            raise FileNotFoundError(f"{path} has no unet_ema/ (trained without EMA?)")
        return path / "unet_ema", None
    if (path / "unet").is_dir() or (path / "config.json").is_file():
        return path, None
    if (path / "pytorch_lora_weights.safetensors").is_file():
        return None, path
    raise FileNotFoundError(f"{path}: neither unet/ nor pytorch_lora_weights.safetensors found")


def build_pipeline(
    model: str | Path,
    unet: str | Path | None = None,
    lora: str | Path | None = None,
    lora_scale: float = 1.0,
    device: str | torch.device = "cpu",
    dtype: str = "auto",
    scheduler: str = "pndm",
    safety_checker: bool = False,
) -> Any:
    """A ``StableDiffusionPipeline`` from a diffusers-layout base model plus an optional UNet or LoRA of ours.

    ``unet``: a folder with a full fine-tuned UNet (``config.json`` + weights, or a ``unet/`` subfolder).
    ``lora``: a folder or file in diffusers' LoRA format (``pipe.load_lora_weights``); fused for speed.
    Attention runs through PyTorch SDPA (diffusers' ``AttnProcessor2_0``).
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0

    from tokencompose.models import load_components

    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    comps = load_components(model, unet=unet)
    checker = extractor = None
    if safety_checker:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        checker = StableDiffusionSafetyChecker.from_pretrained(str(model), subfolder="safety_checker")
        extractor = CLIPImageProcessor.from_pretrained(str(model), subfolder="feature_extractor")
    pipe = StableDiffusionPipeline(
        vae=comps.vae,
        text_encoder=comps.text_encoder,
        tokenizer=comps.tokenizer,
        unet=comps.unet,
        scheduler=make_scheduler(model, scheduler),
        safety_checker=checker,
        feature_extractor=extractor,
        requires_safety_checker=False,
    )
    if lora is not None:
        pipe.load_lora_weights(str(lora))
        pipe.fuse_lora(lora_scale=lora_scale)
        pipe.unload_lora_weights()  # keep the fused weights, drop the adapter layers
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    # Cast only when needed: diffusers warns on every ``to(dtype)`` of a model loaded in float32.
    pipe.to(device=device) if torch_dtype == torch.float32 else pipe.to(device=device, dtype=torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class GenerationReport:
    """What one call did: images written, images skipped because present, NSFW flags raised."""

    written: list[str] = field(default_factory=list)
    skipped: int = 0
    nsfw: list[str] = field(default_factory=list)
    seconds: float = 0.0


def save_png_atomic(image: Any, path: Path, record: dict[str, Any] | None = None) -> None:
    """Encode in memory, write a temporary sibling, then rename: readers see the whole file or none.

    ``record`` (the image's provenance) goes into the PNG itself, so it is written in the same rename.
    """
    buf = io.BytesIO()
    image.save(buf, format="PNG", **({"pnginfo": png_info(record)} if record else {}))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def pending_jobs(
    prompts: Sequence[Prompt],
    images_per_prompt: int,
    out_dir: Path,
    shard: int = 0,
    num_shards: int = 1,
    expect: Callable[[Prompt, int], dict[str, Any]] | None = None,
) -> tuple[list[tuple[Prompt, int]], int]:
    """This shard's (prompt, index) pairs that have no intact image yet, and how many of its pairs were present.

    Pairs are dealt round-robin in (prompt order, index) order, so shards are disjoint and cover everything.
    A present image must read back whole (else it is redone, and logged) and, given ``expect`` (the
    provenance record a pair's image must carry), match it (else :class:`UserError`, see
    :func:`~tokencompose.evaluation.provenance.check_image`).
    """
    jobs = [(p, i) for p in prompts for i in range(images_per_prompt)][shard::num_shards]
    todo = []
    for p, i in jobs:
        path = out_dir / image_name(p.uid, i)
        if not path.is_file():
            todo.append((p, i))
        elif not (check_image(path, expect(p, i)) if expect else read_png(path)[0]):
            log.warning("%s is broken (truncated or empty): generating it again", path)
            todo.append((p, i))
    return todo, len(jobs) - len(todo)


@torch.inference_mode()
def generate_images(
    pipe: Any,
    prompts: Sequence[Prompt],
    out_dir: str | Path,
    settings: GenerationSettings,
    batch_size: int = 8,
    shard: int = 0,
    num_shards: int = 1,
    record: dict[str, Any] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> GenerationReport:
    """Generate this shard's missing images into ``out_dir`` (``<uid>_<index>.png``), ``batch_size`` at a time.

    ``record`` (model, checkpoint, dtype, ...) is stored with the settings in ``generation.json``, and each
    image carries its prompt, seed and the digest of that record; a folder holding images made from other
    prompts or settings is refused (:class:`UserError`), a broken image is made again.
    ``on_batch(done, total)`` reports progress.
    """
    import time

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folder_record = {**(record or {}), **settings.image_affecting()}
    check_folder_record(out_dir, SETTINGS_FILE, folder_record, "images")
    settings_digest = digest(folder_record)

    def expect(p: Prompt, i: int) -> dict[str, Any]:
        return image_record(p.uid, i, p.text, image_seed(settings.seed, p.uid, i), settings_digest)

    todo, skipped = pending_jobs(prompts, settings.images_per_prompt, out_dir, shard, num_shards, expect)
    report = GenerationReport(skipped=skipped)
    start = time.perf_counter()
    channels = pipe.unet.config.in_channels
    shape = (channels, settings.height // pipe.vae_scale_factor, settings.width // pipe.vae_scale_factor)
    device, dtype = pipe.unet.device, pipe.unet.dtype
    for b in range(0, len(todo), batch_size):
        batch = todo[b : b + batch_size]
        seeds = [image_seed(settings.seed, p.uid, i) for p, i in batch]
        latents = initial_latents(seeds, shape).to(device=device, dtype=dtype)
        out = pipe(
            prompt=[p.text for p, _ in batch],
            negative_prompt=[settings.negative_prompt] * len(batch) if settings.negative_prompt else None,
            height=settings.height,
            width=settings.width,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            latents=latents,
            # Per-image generators also drive the noise of stochastic schedulers (ancestral samplers).
            generator=[torch.Generator("cpu").manual_seed(s + 1) for s in seeds],
        )
        flags = out.nsfw_content_detected or [False] * len(batch)
        for (p, i), image, flagged in zip(batch, out.images, flags, strict=True):
            name = image_name(p.uid, i)
            save_png_atomic(image, out_dir / name, expect(p, i))
            report.written.append(name)
            if flagged:
                report.nsfw.append(name)
        if on_batch:
            on_batch(min(b + batch_size, len(todo)), len(todo))
    report.seconds = time.perf_counter() - start
    return report
