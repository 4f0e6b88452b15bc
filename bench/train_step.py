"""Training-step throughput: plain fine-tuning vs our TokenCompose step vs a re-creation of the paper's design.

Builds the SD 1.4 (or SD 2.1) UNet architecture with random weights -- no download -- and times
UNet forward + backward + AdamW step on random latents, per configuration:

  (a) plain     denoising loss only, every attention layer on the fused SDPA path
  (b) ours      + token and pixel losses; explicit probabilities on the 10 supervised layers only
  (c) paper     the paper's design: explicit attention in all 32 layers, every map stored,
                batch 1, fp32, gradient checkpointing (its own configuration)

    python bench/train_step.py --batch 1 8 32 64 --precision bf16 [--compile] [--grad-ckpt] [--arch sd21]
    python bench/train_step.py --tiny            # CPU smoke run: tiny UNet, one timed step each
    python bench/train_step.py --px 256 --batch 1 --steps 1 --warmup 0   # CPU pre-flight of the real sizes

Prints samples/s, ms/step, peak GPU memory and (compiled rows) the number of graphs per row, and the
ratios (b)/(a) and (b)/(c). With ``--json`` every row is written as soon as it is measured, so a run
cut short keeps what it measured; ``--budget-s`` stops starting new rows after that many seconds.
Both (a) and (b) use what the trainer uses: AdamW fused on CUDA, Dynamo's compile cache reset per
row (a row never inherits another's graphs or hits the recompile limit).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch._dynamo
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd_arch import SD14, SD21  # noqa: E402  (this folder)
from tokencompose.attention import AttentionCapture, no_store_replay_under_checkpoint, select_layers
from tokencompose.config import OptimConfig
from tokencompose.losses import column_subset, grounding_losses
from tokencompose.masks import masks_at_resolutions
from tokencompose.tokens import pad_token_positions
from tokencompose.train.setup import build_optimizer


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
    ms: float = float("nan")
    sps: float = float("nan")
    mem_gib: float = float("nan")
    columns: bool = False
    channels_last: bool = False
    sdpa_output: bool = False
    graphs: int | None = None  # Dynamo graphs of the compiled UNet (1 = no graph break)
    error: str = ""


def build_unet(arch: str, tiny: bool, device: torch.device, px: int | None = None):
    """Random-init UNet of the SD 1.4 / SD 2.1 architecture (or the tests' tiny one); ``px`` overrides
    the image size (latent = px / 8) for a quick pre-flight on a CPU."""
    from diffusers import UNet2DConditionModel

    if tiny:
        from tokencompose.models import tiny_unet_config

        config = tiny_unet_config()
    else:
        config = dict(SD21 if arch == "sd21" else SD14)
    if px:
        config["sample_size"] = px // 8
    return UNet2DConditionModel(**config).to(device)


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
    channels_last: bool = False,
    sdpa_output: bool = False,
) -> Row:
    torch._dynamo.reset()  # a fresh compile cache: no graphs (or recompile budget) from an earlier row
    unet.zero_grad(set_to_none=True)  # an earlier row that ran out of memory may have left gradients
    if ckpt:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    unet.train()
    unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    opt = build_optimizer(list(unet.parameters()), OptimConfig(lr=1e-6))
    x, t, ctx, index, valid, masks_img = make_batch(unet, batch, device)
    cols = None
    if columns:  # keep only the supervised token columns of each captured map (loss.capture_columns)
        cols, index = column_subset(index.cpu(), valid.cpu())
        cols, index = cols.to(device), index.to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    amp = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    counter = None
    model = unet
    if use_compile:
        from torch._dynamo.testing import CompileCounterWithBackend

        counter = CompileCounterWithBackend("inductor" if device.type == "cuda" else "aot_eager")
        model = torch.compile(unet, backend=counter)
    masks = None
    store: dict = {}
    original = dict(unet.attn_processors)
    supervised = select_layers(unet)
    if mode == "paper":
        unet.set_attn_processor({k: StoreEverything(k.removesuffix(".processor"), store) for k in original})
    # As the trainer: one capture for the whole run. (Leaving it before backward would make gradient
    # checkpointing recompute the supervised blocks with the fused processors.)
    cap = AttentionCapture(unet, columns=cols, sdpa_output=sdpa_output) if mode == "ours" else None

    def step():
        nonlocal masks
        store.clear()
        with amp:
            pred = model(x, t, ctx).sample
            if cap is not None:
                maps = cap.by_size()
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
        if cap is not None:
            cap.clear()

    with contextlib.ExitStack() as stack:
        if cap is not None:
            stack.enter_context(cap)
        # As the trainer: the map store must not repeat in a checkpointed block's recomputation, so Dynamo
        # need not replay it there (otherwise every checkpointed block with a capture is a graph break).
        stack.enter_context(no_store_replay_under_checkpoint())
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
    graphs = counter.frame_count if counter is not None else None
    return Row(
        mode,
        batch,
        precision,
        use_compile,
        ckpt,
        dt * 1e3,
        batch / dt,
        mem,
        columns,
        channels_last,
        sdpa_output,
        graphs,
    )


def print_table(rows: list[Row], header: str) -> None:
    print(header)
    print(
        "| mode | batch | precision | compile | grad ckpt | ms/step | samples/s | peak GiB | graphs | ours/plain |",
        end="",
    )
    print(" ours/paper |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    paper = next((r for r in rows if r.mode == "paper" and not r.error), None)
    for r in rows:
        if r.error:
            print(f"| {r.mode} | {r.batch} | {r.precision} | {r.compile} | {r.ckpt} | {r.error} | | | | | |")
            continue
        key = (r.batch, r.compile, r.ckpt, r.channels_last)
        plain = next(
            (
                p
                for p in rows
                if p.mode == "plain" and not p.error and (p.batch, p.compile, p.ckpt, p.channels_last) == key
            ),
            None,
        )
        vs_plain = f"{r.sps / plain.sps:.3f}" if r.mode == "ours" and plain else ""
        vs_paper = f"{r.sps / paper.sps:.1f}x" if r.mode == "ours" and paper else ""
        graphs = "" if r.graphs is None else str(r.graphs)
        label = r.mode + (" (columns)" if r.columns else "") + (" (sdpa out)" if r.sdpa_output else "")
        print(
            f"| {label} | {r.batch} | {r.precision} | {r.compile} | {r.ckpt} | "
            f"{r.ms:.1f} | {r.sps:.2f} | {r.mem_gib:.2f} | {graphs} | {vs_plain} | {vs_paper} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["sd14", "sd21"], default="sd14")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile variants")
    ap.add_argument("--compile-only", action="store_true", help="time only the torch.compile variants")
    ap.add_argument("--grad-ckpt", action="store_true", help="also time gradient-checkpointed variants")
    ap.add_argument("--ckpt-only", action="store_true", help="time only the gradient-checkpointed variants")
    ap.add_argument("--channels-last", action="store_true", help="UNet weights in channels-last format")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--px", type=int, help="image size (default: the architecture's, 512 / 768)")
    ap.add_argument("--no-paper", action="store_true", help="skip the paper-design baseline")
    ap.add_argument("--columns", action="store_true", help="(b) captures only the supervised token columns")
    ap.add_argument("--sdpa-output", action="store_true", help="(b): layer outputs from SDPA, maps for the losses")
    ap.add_argument("--budget-s", type=float, default=float("inf"), help="start no new row after this many s")
    ap.add_argument("--tiny", action="store_true", help="tiny UNet on CPU, one timed step (smoke run)")
    ap.add_argument("--json", help="write the rows to this JSON file (rewritten after every row)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        args.batch, args.steps, args.warmup, args.precision = [2], 1, 1, "fp32"
    unet = build_unet(args.arch, args.tiny, device, args.px)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    header = (
        f"device: {name}; torch {torch.__version__}; arch {args.arch}{' (tiny)' if args.tiny else ''}; "
        f"{unet.config.sample_size * 8} px; channels_last {args.channels_last}; {time.strftime('%Y-%m-%d')}"
    )
    rows: list[Row] = []
    start = time.perf_counter()

    def measure(mode: str, batch: int, precision: str, use_compile: bool, ckpt: bool) -> None:
        cols, sdpa = (args.columns, args.sdpa_output) if mode == "ours" else (False, False)

        def failed(reason: str) -> Row:  # a row that was not measured, with the configuration it had
            return Row(mode, batch, precision, use_compile, ckpt, columns=cols, channels_last=args.channels_last,
                       sdpa_output=sdpa, error=reason)  # fmt: skip

        if time.perf_counter() - start > args.budget_s:
            rows.append(failed("skipped (budget)"))
        else:
            try:
                rows.append(
                    run(mode, unet, batch, precision, use_compile, ckpt, args.steps, args.warmup, device,
                        cols, args.channels_last, sdpa)
                )  # fmt: skip
            except torch.OutOfMemoryError:
                rows.append(failed("out of memory"))
            except Exception as e:  # keep measuring the other rows; the reason is in the table
                rows.append(failed(f"{type(e).__name__}: {e}"[:200]))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        r = rows[-1]
        print(
            f"{r.mode} batch {r.batch} compile {r.compile} ckpt {r.ckpt}: " + (r.error or f"{r.sps:.2f} samples/s"),
            flush=True,
        )
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": name, "header": header, "rows": [x.__dict__ for x in rows]}, f, indent=2)

    compiles = [True] if args.compile_only else [False, True] if args.compile else [False]
    ckpts = [True] if args.ckpt_only else [False, True] if args.grad_ckpt else [False]
    if not args.no_paper:  # first: the baseline every "ours" row is compared with
        measure("paper", 1, "fp32", False, True)
    for use_compile in compiles:
        for ckpt in ckpts:
            for b in args.batch:
                for mode in ("plain", "ours"):
                    measure(mode, b, args.precision, use_compile, ckpt)
    print_table(rows, header)


if __name__ == "__main__":
    main()
