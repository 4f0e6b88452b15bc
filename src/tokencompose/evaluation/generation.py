"""MultiGen image generation from a ready pipeline (:mod:`tokencompose.loading`), batched and resumable.

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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from tokencompose.atomic import atomic_write_bytes
from tokencompose.evaluation.prompts import Prompt
from tokencompose.evaluation.provenance import (
    check_folder_record,
    check_image,
    digest,
    image_record,
    png_info,
    read_png,
)
from tokencompose.families import denoiser_of, family_of_pipeline

log = logging.getLogger(__name__)

SETTINGS_FILE = "generation.json"


Sampler = Literal["auto", "pndm", "ddim", "ddpm", "euler", "euler-ancestral", "dpm", "default"]
"""The samplers a generating command takes (see :class:`GenerationSettings`.scheduler)."""


@dataclass
class GenerationSettings:
    """How images are sampled; the paper's settings are the defaults (50 PNDM steps, CFG 7.5, 10 per prompt)."""

    steps: int = 50
    """Denoising steps."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale."""
    resolution: int | None = None
    """Image height and width in pixels; None: the model's native size (UNet sample size x VAE factor)."""
    images_per_prompt: int = 10
    """Images per prompt, each with its own seed."""
    scheduler: Sampler = "auto"
    """Sampler: ``auto`` (the family's: PNDM for SD / SDXL as the paper, the model's own flow-matching scheduler for
    SD3 / Flux; recorded as what it resolved to) | ``pndm`` | ``ddim`` | ``ddpm`` | ``euler`` | ``euler-ancestral`` |
    ``dpm`` | ``default`` (the model folder's own)."""
    seed: int = 0
    """Base seed; image seeds derive from (seed, prompt id, index)."""
    negative_prompt: str | None = None
    """Negative prompt for classifier-free guidance."""
    safety_checker: bool = False
    """Run the model's safety checker (off: a blacked-out image would count as a missed object)."""

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
    atomic_write_bytes(path, buf.getvalue())


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
def sample(pipe: Any, texts: Sequence[str], seeds: Sequence[int], settings: GenerationSettings) -> Any:
    """One pipeline call: ``texts`` with initial noise from ``seeds`` (drawn on the CPU), at the settings' size.

    The one place images are sampled (generation and latency timing), so a timed call is a generating call.
    """
    family, denoiser = family_of_pipeline(pipe), denoiser_of(pipe)
    size = settings.resolution or family.native_size(denoiser, pipe.vae_scale_factor)
    shape = (pipe.vae.config.latent_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
    latents = family.sampling_latents(initial_latents(seeds, shape)).to(device=denoiser.device, dtype=denoiser.dtype)
    negative = {"negative_prompt": [settings.negative_prompt] * len(texts)} if settings.negative_prompt else {}
    return pipe(
        prompt=list(texts),
        **negative,  # only when asked: some pipelines (older Flux) take no negative prompt
        height=size,
        width=size,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        latents=latents,
        # Per-image generators also drive the noise of stochastic schedulers (ancestral samplers).
        generator=[torch.Generator("cpu").manual_seed(s + 1) for s in seeds],
    )


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
    for b in range(0, len(todo), batch_size):
        batch = todo[b : b + batch_size]
        seeds = [image_seed(settings.seed, p.uid, i) for p, i in batch]
        out = sample(pipe, [p.text for p, _ in batch], seeds, settings)
        flags = getattr(out, "nsfw_content_detected", None) or [False] * len(batch)  # SDXL has no checker
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
