"""Inference latency: seconds per image of the model's own sampling call (the paper's Table 1 "Latency" column).

TokenCompose changes no architecture, so its latency should equal the base's; the column is there to show a
method adds no inference cost. Measured as the wall time of one generating call (:func:`~tokencompose.
evaluation.generation.sample`: text encoding, every denoising step with classifier-free guidance, VAE decode,
conversion to PIL) for one image at a time, after ``warmup`` untimed calls (CUDA context, kernel selection,
caches), the device synchronised before each clock read. Reported as mean ± standard deviation over ``repeats``
calls with the settings (steps, sampler, resolution, dtype, device) that produced it.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokencompose.errors import UserError
from tokencompose.evaluation.generation import GenerationSettings, sample
from tokencompose.loading import ModelSettings, load_pipeline, release_memory
from tokencompose.typed_data import to_dict

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "a photo of a cat, a dog, and a bird."


@dataclass
class LatencySettings:
    """``tokencompose evaluate latency``: seconds per image of one sampling call."""

    out: str = ""
    """Output folder (``results.json``)."""
    name: str | None = None
    """Label of this model in comparison tables."""
    model: ModelSettings = field(default_factory=ModelSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    prompt: str = DEFAULT_PROMPT
    """The prompt of every timed call."""
    repeats: int = 10
    """Timed calls (one image each)."""
    warmup: int = 2
    """Untimed calls first."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_calls(pipe: Any, settings: GenerationSettings, prompt: str, repeats: int, warmup: int) -> list[float]:
    """Wall seconds of ``repeats`` one-image sampling calls after ``warmup`` untimed ones (seeds 0, 1, ...)."""
    device = pipe.device if hasattr(pipe, "device") else torch.device("cpu")
    times = []
    for k in range(warmup + repeats):
        _sync(device)
        start = time.perf_counter()
        sample(pipe, [prompt], [k], settings)
        _sync(device)
        if k >= warmup:
            times.append(time.perf_counter() - start)
    return times


def latency_summary(times: list[float]) -> dict[str, Any]:
    """Mean ± sample standard deviation (0 for one call) of per-image seconds, with min, median and max."""
    if not times:
        raise ValueError("no timed calls")
    return {
        "seconds_per_image": statistics.fmean(times),
        "std": statistics.stdev(times) if len(times) > 1 else 0.0,
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
        "repeats": len(times),
        "times": [round(t, 6) for t in times],
    }


def run_latency(settings: LatencySettings) -> dict[str, Any]:
    """Load the pipeline, time it, write ``OUT/results.json`` (``kind: latency``) and return the result."""
    from tokencompose.sharding import ShardSettings, resolve_shard

    s = settings
    if not s.out:
        raise UserError("evaluate latency needs --out FOLDER")
    if not s.model.model:
        raise UserError("no model given: pass --model (a diffusers folder or hub id)")
    if s.repeats < 1 or s.warmup < 0:
        raise UserError(f"repeats must be >= 1 and warmup >= 0 (got {s.repeats}, {s.warmup})")
    # Under accelerate launch only process 0 times, on its own device, while the others wait at the barrier:
    # processes timing side by side on shared hardware would measure each other.
    shard = resolve_shard(s.model.device, ShardSettings())
    if not shard.main:
        shard.wait()
        return {}
    try:
        return _time_and_write(s, shard.device)
    finally:
        shard.wait()


def _time_and_write(s: LatencySettings, device: torch.device) -> dict[str, Any]:
    from tokencompose.evaluation.results import now_iso, package_versions, write_json_atomic
    from tokencompose.evaluation.run import model_record
    from tokencompose.families import denoiser_of, family_of_pipeline, resolve_family

    generation = s.generation
    if generation.scheduler == "auto":
        generation = dataclasses.replace(generation, scheduler=resolve_family(s.model.family, s.model.model).sampler)
    pipe = load_pipeline(dataclasses.replace(s.model, device=str(device)), scheduler=generation.scheduler)
    denoiser = denoiser_of(pipe)
    native = family_of_pipeline(pipe).native_size(denoiser, pipe.vae_scale_factor)
    generation = dataclasses.replace(generation, resolution=generation.resolution or native)
    log.info("timing %d calls (+%d warm-up) at %d px, %d steps on %s", s.repeats, s.warmup,
             generation.resolution, generation.steps, device)  # fmt: skip
    times = time_calls(pipe, generation, s.prompt, s.repeats, s.warmup)
    result = {
        "kind": "latency",
        "name": s.name,
        "model": model_record(s.model),
        "scores": latency_summary(times),
        "generation": to_dict(generation),
        "prompt": s.prompt,
        "warmup": s.warmup,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or None,
        "dtype": str(denoiser.dtype),
        "environment": package_versions(),
        "created": now_iso(),
    }
    del pipe
    release_memory()
    write_json_atomic(Path(s.out) / "results.json", result)
    return result
