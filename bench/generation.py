"""Images/s of our MultiGen generation against a per-image fp32 loop like the paper's script.

Ours: ``build_pipeline`` + ``generate_images`` (batched prompts, per-image seeds, fp16 on CUDA, SDPA,
atomic PNG writes). Baseline, the paper's structure: one pipeline call per image, fp32, diffusers'
classic (non-SDPA) attention processor, one generator per image, PNG saved with ``Image.save``.

    python bench/generation.py --tiny                      # CPU, tiny random-init model, 64 px
    python bench/generation.py --model PATH --device cuda  # a real SD 1.x folder, 512 px, 50 PNDM steps
    python bench/generation.py --random-sd14 --device cuda # SD 1.4 architecture, random weights (no download)

Speed does not depend on the weights: ``--random-sd14`` measures what SD 1.4 would, with noise for images.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from tokencompose.evaluation.generation import (
    GenerationSettings,
    generate_images,
    image_name,
    image_seed,
)
from tokencompose.evaluation.prompts import load_prompts
from tokencompose.evaluation.results import device_description
from tokencompose.loading import ModelSettings, load_pipeline


def build_pipeline(model: str, device: torch.device, dtype: str, scheduler: str):
    return load_pipeline(ModelSettings(model=str(model), device=str(device), dtype=dtype), scheduler=scheduler)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def paper_loop(model: str, prompts, settings: GenerationSettings, out: Path, device: torch.device) -> float:
    """Seconds for the paper-style loop over all (prompt, index) pairs (pipeline built outside the timing)."""
    from diffusers.models.attention_processor import AttnProcessor

    pipe = build_pipeline(model, device=device, dtype="fp32", scheduler=settings.scheduler)
    pipe.unet.set_attn_processor(AttnProcessor())
    pipe.vae.set_attn_processor(AttnProcessor())
    pipe(prompts[0].text, num_inference_steps=1, height=settings.resolution, width=settings.resolution)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for p in prompts:
        for i in range(settings.images_per_prompt):
            g = torch.Generator(device="cpu").manual_seed(image_seed(settings.seed, p.uid, i))
            image = pipe(
                p.text,
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance_scale,
                height=settings.resolution,
                width=settings.resolution,
                generator=g,
            ).images[0]
            image.save(out / image_name(p.uid, i))
    sync(device)
    return time.perf_counter() - t0


def ours(
    model: str, prompts, settings: GenerationSettings, out: Path, device: torch.device, batch_size: int, dtype: str
) -> float:
    pipe = build_pipeline(model, device=device, dtype=dtype, scheduler=settings.scheduler)
    pipe(prompts[0].text, num_inference_steps=1, height=settings.resolution, width=settings.resolution)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    generate_images(pipe, prompts, out, settings, batch_size=batch_size)
    sync(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="diffusers-layout SD folder")
    ap.add_argument("--tiny", action="store_true", help="tiny random-init model (CPU smoke numbers)")
    ap.add_argument("--random-sd14", action="store_true", help="SD 1.4 architecture with random weights")
    ap.add_argument("--json", help="also write the row to this JSON file")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompts", type=int, default=4, help="first N MultiGen COCO prompts")
    ap.add_argument("--images-per-prompt", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"])
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tmp = tempfile.TemporaryDirectory()
    if args.tiny:
        from tokencompose.models import tiny_components

        model = str(Path(tmp.name) / "tiny")
        tiny_components(seed=0).save(model)
        defaults = dict(steps=10, resolution=64, images_per_prompt=4)
    elif args.random_sd14:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from sd_arch import sd14_components

        model = str(Path(tmp.name) / "sd14_random")
        sd14_components(seed=0).save(model)
        defaults = dict(steps=50, resolution=512, images_per_prompt=10)
    elif args.model:
        model = args.model
        defaults = dict(steps=50, resolution=512, images_per_prompt=10)
    else:
        ap.error("pass --model PATH, --random-sd14 or --tiny")
    steps = args.steps or defaults["steps"]
    res = args.resolution or defaults["resolution"]
    n_img = args.images_per_prompt or defaults["images_per_prompt"]
    settings = GenerationSettings(steps=steps, resolution=res, images_per_prompt=n_img)
    prompts = load_prompts("coco")[: args.prompts]
    total = len(prompts) * n_img
    base_dir, our_dir = Path(tmp.name) / "paper", Path(tmp.name) / "ours"
    base_dir.mkdir()
    t_base = paper_loop(model, prompts, settings, base_dir, device)
    t_ours = ours(model, prompts, settings, our_dir, device, args.batch_size, args.dtype)
    row = {
        "device": device_description(device),
        "model": "tiny random-init" if args.tiny else "SD 1.4 architecture, random init" if args.random_sd14 else model,
        "images": total,
        "steps": steps,
        "resolution": res,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "paper_loop_images_per_s": round(total / t_base, 3),
        "ours_images_per_s": round(total / t_ours, 3),
        "speedup": round(t_base / t_ours, 2),
    }
    print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2))
    tmp.cleanup()


if __name__ == "__main__":
    main()
