"""The real training loop on cached latents vs the bare step: does the data path stall the device?

Builds a model (SD 1.4 architecture with random weights on a GPU, or the tiny test model with
``--tiny``), renders a shapes-world dataset at the model's resolution, caches its VAE latents, then
runs ``tokencompose.train.train`` (data loader, text encoder, losses, optimizer, logging) and compares
its samples/s with the same TokenCompose step timed on device-resident random tensors
(``bench/train_step.py``'s "ours" row). Target on a GPU: gap <= 5%.

    python bench/train_loop.py --batch 32 --precision bf16 --steps 60
    python bench/train_loop.py --tiny
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step  # noqa: E402  (the step benchmark, same folder)
from sd_arch import sd14_components  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--images", type=int, default=512, help="shapes scenes to render and cache")
    ap.add_argument("--compile", action="store_true", help="train.compile=true in the loop, compiled bare step")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in both")
    ap.add_argument("--columns", action="store_true", help="loss.capture_columns=true in both")
    ap.add_argument("--sdpa-output", action="store_true", help="loss.capture_sdpa_output=true in both")
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU, a few steps (smoke run)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()
    from tokencompose.config import load_config
    from tokencompose.data.latents import build_latent_cache
    from tokencompose.data.shapes import make_shapes_dataset
    from tokencompose.models import tiny_components
    from tokencompose.train import train

    gpu = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if gpu else "cpu")
    if args.tiny:
        args.batch, args.steps, args.workers, args.images, args.precision = 4, 6, 0, 16, "fp32"
    comps = tiny_components() if args.tiny else sd14_components()
    size = 64 if args.tiny else 512
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        comps.save(tmp / "model")
        data = make_shapes_dataset(tmp / "data", args.images, seed=0, size=size)
        cache = build_latent_cache(comps.vae.to(device), data, tmp / "latents", size, batch_size=16, device=device)
        cfg = load_config(
            {
                "run_dir": str(tmp / "run"),
                "model": {"path": str(tmp / "model")},
                "data": {
                    "path": str(data),
                    "image_size": size,
                    "latent_cache": str(cache),
                    "num_workers": args.workers,
                },
                "train": {
                    "batch_size": args.batch,
                    "grad_accum": 1,
                    "max_steps": args.steps,
                    "precision": args.precision,
                    "compile": args.compile,
                    "grad_checkpointing": args.grad_ckpt,
                },
                "loss": {"capture_columns": args.columns, "capture_sdpa_output": args.sdpa_output},
                "optim": {"lr": 1e-6},
                "log": {"every": max(1, args.steps // 6), "tensorboard": False, "curves": False, "progress": False},
                "checkpoint": {"every": 10**6, "keep_last": 1},
            }
        )
        train(cfg)
        rows = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines() if line]
        loop_sps = [r["samples_per_s"] for r in rows if "samples_per_s" in r][1:] or [rows[-1]["samples_per_s"]]
        loop = sorted(loop_sps)[len(loop_sps) // 2]  # median of the log intervals after the first (warm-up)
    gc.collect()  # the trainer's own copies of the models
    if gpu:
        torch.cuda.empty_cache()
    unet = comps.unet.to(device)
    warm = 5 if args.compile else 2  # the loop's median also leaves out its first (compiling) interval
    step = train_step.run(
        "ours", unet, args.batch, args.precision, args.compile, args.grad_ckpt, max(3, args.steps // 4), warm, device,
        args.columns, False, args.sdpa_output,
    )  # fmt: skip
    name = torch.cuda.get_device_name() if gpu else "cpu"
    gap = 1 - loop / step.sps
    print(
        f"device: {name}; torch {torch.__version__}; batch {args.batch}; {args.precision}; compile {args.compile}; "
        f"grad ckpt {args.grad_ckpt}; columns {args.columns}; sdpa output {args.sdpa_output}; workers {args.workers}"
    )
    print(
        f"real loop on cached latents: {loop:.2f} samples/s; bare step: {step.sps:.2f} samples/s; gap {100 * gap:.1f}%"
    )
    if args.json:
        figures = {"device": name, "loop_sps": loop, "step_sps": step.sps, "gap": gap, **vars(args)}
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
