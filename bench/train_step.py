"""Training-step throughput: plain fine-tuning vs our TokenCompose step vs a re-creation of the paper's design.

Builds the SD 1.4 (or SD 2.1) UNet architecture with random weights -- no download -- and times
UNet forward + backward + AdamW step on random latents, per configuration:

  (a) plain     denoising loss only, every attention layer on the fused SDPA path
  (b) ours      + token and pixel losses; explicit probabilities on the 10 supervised layers only
  (c) paper     the paper's design: explicit attention in all 32 layers, every map stored,
                batch 1, fp32, gradient checkpointing (its own configuration)

    python bench/train_step.py --batch 1 8 32 64 --precision bf16 [--compile] [--grad-ckpt] [--arch sd21]
    python bench/train_step.py --tiny            # CPU smoke run: tiny UNet, one timed step each

Prints samples/s, ms/step and peak GPU memory per row, and the ratios (b)/(a) and (b)/(c).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokencompose.attention import AttentionCapture, select_layers
from tokencompose.losses import column_subset, grounding_losses
from tokencompose.masks import masks_at_resolutions
from tokencompose.tokens import pad_token_positions

SD14 = dict(
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SD21 = dict(
    SD14, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True
)


class StoreEverything:
    """The paper's design: explicit attention in every layer (self and cross), every map kept."""

    def __init__(self, name: str, store: dict) -> None:
        self.name, self.store = name, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)
        q, k, v = (attn.head_to_batch_dim(x) for x in (q, k, v))
        probs = attn.get_attention_scores(q, k, None)  # [B*H, N, L]
        self.store[self.name] = probs
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


@dataclass
class Row:
    mode: str
    batch: int
    precision: str
    compile: bool
    ckpt: bool
    ms: float
    sps: float
    mem_gib: float


def build_unet(arch: str, tiny: bool, device: torch.device):
    from diffusers import UNet2DConditionModel

    if tiny:
        from tokencompose.models import tiny_unet_config

        return UNet2DConditionModel(**tiny_unet_config()).to(device)
    return UNet2DConditionModel(**(SD21 if arch == "sd21" else SD14)).to(device)


def make_batch(unet, batch: int, device, phrases: int = 3):
    size = unet.config.sample_size
    dim = unet.config.cross_attention_dim
    x = torch.randn(batch, 4, size, size, device=device)
    ctx = torch.randn(batch, 77, dim, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    spans = [[[1 + 3 * j, 2 + 3 * j][: 1 + j % 2] for j in range(phrases)] for _ in range(batch)]
    index, valid = pad_token_positions(spans)
    masks_img = torch.rand(batch, phrases, size * 8, size * 8, device=device) > 0.5
    return x, t, ctx, index.to(device), valid.to(device), masks_img


def run(
    mode: str,
    unet,
    batch: int,
    precision: str,
    use_compile: bool,
    ckpt: bool,
    steps: int,
    warmup: int,
    device,
    columns: bool = False,
):
    if ckpt:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-6)
    x, t, ctx, index, valid, masks_img = make_batch(unet, batch, device)
    cols = None
    if columns:  # keep only the supervised token columns of each captured map (loss.capture_columns)
        cols, index = column_subset(index.cpu(), valid.cpu())
        cols, index = cols.to(device), index.to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    amp = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    model = torch.compile(unet) if use_compile else unet
    masks = None
    store: dict = {}
    original = dict(unet.attn_processors)
    supervised = select_layers(unet)
    if mode == "paper":
        unet.set_attn_processor({k: StoreEverything(k.removesuffix(".processor"), store) for k in original})

    def step():
        nonlocal masks
        store.clear()
        with amp:
            if mode == "ours":
                with AttentionCapture(unet, columns=cols) as cap:
                    pred = model(x, t, ctx).sample
                    maps = cap.by_size()
            else:
                pred = model(x, t, ctx).sample
            loss = F.mse_loss(pred.float(), x.float())
            if mode in ("ours", "paper"):
                if mode == "paper":  # the supervised maps are among the stored ones
                    maps = {}
                    for name in supervised:
                        p = store[name]
                        side = int(p.shape[1] ** 0.5)
                        maps.setdefault((side, side), []).append(p.view(batch, -1, p.shape[1], p.shape[2]))
                if masks is None:  # once per sample in the data pipeline, not part of the step
                    masks = {s: m for s, m in masks_at_resolutions(masks_img, maps.keys()).items()}
                g = grounding_losses(maps, index, valid, masks)
                loss = loss + 1e-3 * g.token.mean() + 5e-5 * g.pixel.mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    unet.set_attn_processor(original)
    return Row(mode, batch, precision, use_compile, ckpt, dt * 1e3, batch / dt, mem)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["sd14", "sd21"], default="sd14")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile variants")
    ap.add_argument("--grad-ckpt", action="store_true", help="also time gradient-checkpointed variants")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-paper", action="store_true", help="skip the paper-design baseline")
    ap.add_argument("--columns", action="store_true", help="(b) captures only the supervised token columns")
    ap.add_argument("--tiny", action="store_true", help="tiny UNet on CPU, one timed step (smoke run)")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        args.batch, args.steps, args.warmup, args.precision = [2], 1, 1, "fp32"
    unet = build_unet(args.arch, args.tiny, device)
    rows: list[Row] = []
    for use_compile in [False, True] if args.compile else [False]:
        for ckpt in [False, True] if args.grad_ckpt else [False]:
            for b in args.batch:
                for mode in ("plain", "ours"):
                    try:
                        rows.append(
                            run(mode, unet, b, args.precision, use_compile, ckpt, args.steps, args.warmup, device)
                        )
                    except torch.OutOfMemoryError:
                        print(f"{mode} batch {b}: out of memory")
                        torch.cuda.empty_cache()
    if not args.no_paper:
        rows.append(run("paper", unet, 1, "fp32", False, True, args.steps, args.warmup, device))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; arch {args.arch}{' (tiny)' if args.tiny else ''}")
    print(
        "| mode | batch | precision | compile | grad ckpt | ms/step | samples/s | peak GiB | ours/plain | ours/paper |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    paper = next((r for r in rows if r.mode == "paper"), None)
    for r in rows:
        plain = next(
            (p for p in rows if p.mode == "plain" and (p.batch, p.compile, p.ckpt) == (r.batch, r.compile, r.ckpt)),
            None,
        )
        vs_plain = f"{r.sps / plain.sps:.3f}" if r.mode == "ours" and plain else ""
        vs_paper = f"{r.sps / paper.sps:.1f}x" if r.mode == "ours" and paper else ""
        print(
            f"| {r.mode} | {r.batch} | {r.precision} | {r.compile} | {r.ckpt} | {r.ms:.1f} | {r.sps:.2f} | "
            f"{r.mem_gib:.2f} | {vs_plain} | {vs_paper} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "rows": [r.__dict__ for r in rows]}, f, indent=2)


if __name__ == "__main__":
    main()
