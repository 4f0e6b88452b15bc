"""Training-step throughput: plain fine-tuning vs our TokenCompose step vs a re-creation of the paper's design.

Builds the SD 1.4, SD 2.1 or SDXL base 1.0 UNet architecture with random weights -- no download -- and
times UNet forward + backward + AdamW step on random latents, per configuration:

  (a) plain     denoising loss only, every attention layer on the fused SDPA path
  (b) ours      + token and pixel losses; explicit probabilities on the supervised layers only (the
                family's default, mid + up: 10 layers for SD 1.x / 2.x, 46 for SDXL)
  (c) paper     the paper's design: explicit attention in all 32 layers, every map stored,
                batch 1, fp32, gradient checkpointing (its own configuration; not run for SDXL)

    python bench/train_step.py --batch 1 8 32 64 --precision bf16 [--compile] [--grad-ckpt] [--arch sd21]
    python bench/train_step.py --arch sdxl --batch 1 2 --grad-ckpt       # SDXL full fine-tune, 1024 px
    python bench/train_step.py --arch sdxl --lora 128 --batch 8          # SDXL LoRA (peft, as the trainer)
    python bench/train_step.py --tiny [--arch sdxl]   # CPU smoke run: tiny UNet, one timed step each
    python bench/train_step.py --px 256 --batch 1 --steps 1 --warmup 0   # CPU pre-flight of the real sizes

SDXL batches carry what its UNet needs besides the 2048-wide context: ``added_cond_kwargs`` with the
pooled text embedding ``[B, 1280]`` and the 6 size/crop time ids. ``--lora RANK`` freezes the UNet and
trains peft adapters on to_q, to_k, to_v, to_out.0 (``tokencompose.train.lora.add_lora``); AdamW then
holds the adapters only.

Before timing, the script prints what each configuration captures, computed from the UNet's structure
and the image size: how many layers and the captured maps' size per sample (``H·N·L`` fp32 floats per
layer), with all 77 token columns and with ``loss.capture_columns`` (K kept columns, ``--capture-k``).

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
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch._dynamo
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd_arch import ARCHS, FAMILIES  # noqa: E402  (this folder)
from tokencompose.attention import AttentionCapture, no_store_replay_under_checkpoint, select_layers
from tokencompose.config import LoraConfig, OptimConfig
from tokencompose.families import get_family
from tokencompose.losses import column_subset, grounding_losses
from tokencompose.masks import masks_at_resolutions
from tokencompose.tokens import pad_token_positions
from tokencompose.train.lora import add_lora
from tokencompose.train.setup import build_optimizer

TOKENS = 77  # CLIP context length: the L of every cross-attention map


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
    lora: int = 0  # LoRA rank (0: full fine-tune)
    captured_layers: int = 0  # layers whose maps this row stores
    capture_mib: float = 0.0  # those maps per sample, fp32 (analytical, see capture_costs)


def build_unet(arch: str, tiny: bool, device: torch.device, px: int | None = None):
    """Random-init UNet of the SD 1.4 / SD 2.1 / SDXL architecture (or the tests' tiny one of the same
    family); ``px`` overrides the image size (latent = px / 8) for a quick pre-flight on a CPU."""
    from diffusers import UNet2DConditionModel

    if tiny and arch == "sdxl":
        return get_family("sdxl").tiny(image_size=px or 64).unet.to(device)
    if tiny:
        from tokencompose.models import tiny_unet_config

        config = tiny_unet_config()
    else:
        config = dict(ARCHS[arch])
    if px:
        config["sample_size"] = px // 8
    with torch.device(device):  # initialised where it runs: 2.6B parameters (SDXL) need no host copy
        return UNet2DConditionModel(**config)


def add_lora_adapters(unet, rank: int) -> None:
    """Freeze the UNet and add rank-``rank`` adapters to the trainer's default target modules, as the trainer."""
    add_lora(unet, rank, None, LoraConfig().target_modules)


def added_conditioning(unet, batch: int, device) -> dict | None:
    """SDXL's ``added_cond_kwargs`` (pooled text embedding, 6 time ids for an uncropped square image), else None."""
    cfg = unet.config
    if cfg.addition_embed_type != "text_time":
        return None
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim  # 1280 for SDXL
    px = float(cfg.sample_size * 8)
    time_ids = torch.tensor([px, px, 0.0, 0.0, px, px], device=device).expand(batch, 6)
    return {"text_embeds": torch.randn(batch, pooled, device=device), "time_ids": time_ids}


def make_batch(unet, batch: int, device, phrases: int = 3):
    size = unet.config.sample_size
    dim = unet.config.cross_attention_dim  # 2048 for SDXL: its two encoders' states concatenated
    x = torch.randn(batch, 4, size, size, device=device)
    ctx = torch.randn(batch, TOKENS, dim, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    spans = [[[1 + 3 * j, 2 + 3 * j][: 1 + j % 2] for j in range(phrases)] for _ in range(batch)]
    index, valid = pad_token_positions(spans)
    masks_img = torch.rand(batch, phrases, size * 8, size * 8, device=device) > 0.5
    return x, t, ctx, added_conditioning(unet, batch, device), index.to(device), valid.to(device), masks_img


def attention_layers(unet, px: int) -> list[tuple[str, bool, int, int]]:
    """``(name, is cross-attention, heads, N)`` of every attention layer at ``px`` pixels, from the structure.

    A layer in ``down_blocks.i`` runs at level ``i`` (before its downsampler), the mid block at the
    lowest level, ``up_blocks.i`` at level ``levels - 1 - i``; each level halves the latent side,
    rounding up as diffusers pads odd sizes.
    """
    levels = len(unet.down_blocks)
    out = []
    for name, module in unet.named_modules():
        if not (hasattr(module, "set_processor") and hasattr(module, "is_cross_attention")):
            continue
        block, _, rest = name.partition(".")
        if block == "mid_block":
            level = levels - 1
        else:
            index = int(rest.split(".")[0])
            level = index if block == "down_blocks" else levels - 1 - index
        side = px // 8
        for _ in range(level):
            side = math.ceil(side / 2)
        out.append((name, bool(module.is_cross_attention), int(module.heads), side * side))
    return out


def maps_mib(layers: list[tuple[str, bool, int, int]], columns: int | None = None) -> float:
    """Stored maps of ``layers`` per sample, MiB of fp32: ``H·N·L`` a cross-attention layer (``L`` = 77, or
    ``columns``), ``H·N·N`` a self-attention one."""
    floats = sum(h * n * ((columns or TOKENS) if cross else n) for _, cross, h, n in layers)
    return floats * 4 / 2**20


def capture_costs(unet, px: int, supervised: list[str], k: int) -> list[dict]:
    """What each configuration stores, per sample (analytical, fp32): (a) nothing, (b) the supervised
    cross-attention maps (all columns, or K with ``loss.capture_columns``), (c) every map of every layer."""
    layers = attention_layers(unet, px)
    chosen = set(supervised)
    ours = [x for x in layers if x[0] in chosen]
    n_cross = sum(x[1] for x in layers)
    groups: dict[tuple[int, int], int] = {}
    for _, _, h, n in ours:
        groups[(n, h)] = groups.get((n, h), 0) + 1
    detail = "; ".join(
        f"{c} at {math.isqrt(n)}x{math.isqrt(n)}, {h} heads, {maps_mib([('', True, h, n)]):.2f} MiB each"
        for (n, h), c in sorted(groups.items())
    )
    return [
        dict(mode="plain", px=px, layers=0, what="none", mib=0.0, mib_columns=0.0),
        dict(mode="ours", px=px, layers=len(ours), what=f"cross-attention: {detail}", mib=maps_mib(ours),
             mib_columns=maps_mib(ours, k), k=k),
        dict(mode="paper", px=px, layers=len(layers), what=f"{len(layers) - n_cross} self + {n_cross} cross",
             mib=maps_mib(layers), mib_columns=None),
    ]  # fmt: skip


def print_capture(costs: list[dict], batches: list[int], paper_runs: bool) -> None:
    """The capture table: layers and maps per sample (and at the largest batch) of each configuration."""
    px, k, b = costs[0]["px"], costs[1]["k"], max(batches)
    print(f"captured maps at {px} px (analytical: H*N*L fp32 floats per layer and sample; not a measurement):")
    print(f"| config | layers | MiB/sample (L={TOKENS}) | MiB/sample (capture_columns, K={k}) | GiB at batch {b} |")
    print("|---|---|---|---|---|")
    for c in costs:
        cols = "" if c["mib_columns"] is None else f"{c['mib_columns']:.1f}"
        note = "" if c["mode"] != "paper" or paper_runs else " (not run)"
        print(
            f"| {c['mode']}{note} | {c['layers']} ({c['what']}) | {c['mib']:.1f} | {cols} | {c['mib'] * b / 1024:.2f} |"
        )


def host_memory_shortfall(unet, device) -> str:
    """On a CPU: why the rows would not fit this machine's free memory (fp32 gradients and two AdamW
    states of the trainable parameters, activations not counted), else "". On a GPU a row that runs out
    of memory is caught and reported; on a host it would meet the OOM killer."""
    if device.type != "cpu":
        return ""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        free = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return ""
    need = 12 * sum(p.numel() for p in unet.parameters() if p.requires_grad)
    if need < 0.9 * free:
        return ""
    return f"skipped: gradients + AdamW states need {need / 1e9:.1f} GB, {free / 1e9:.1f} GB host memory free"


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
    layers: tuple[str, ...] = ("mid", "up"),
    lora: int = 0,
    costs: dict[str, float] | None = None,
) -> Row:
    torch._dynamo.reset()  # a fresh compile cache: no graphs (or recompile budget) from an earlier row
    unet.zero_grad(set_to_none=True)  # an earlier row that ran out of memory may have left gradients
    if ckpt:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    unet.train()
    unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    opt = build_optimizer([p for p in unet.parameters() if p.requires_grad], OptimConfig(lr=1e-6))  # LoRA: adapters
    x, t, ctx, added, index, valid, masks_img = make_batch(unet, batch, device)
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
    supervised = select_layers(unet, layers)
    if mode == "paper":
        unet.set_attn_processor({k: StoreEverything(k.removesuffix(".processor"), store) for k in original})
    # As the trainer: one capture for the whole run. (Leaving it before backward would make gradient
    # checkpointing recompute the supervised blocks with the fused processors.)
    cap = AttentionCapture(unet, layers, columns=cols, sdpa_output=sdpa_output) if mode == "ours" else None

    def step():
        nonlocal masks
        store.clear()
        with amp:
            pred = model(x, t, ctx, added_cond_kwargs=added).sample
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
    captured = {"plain": 0, "ours": len(supervised), "paper": len(original)}[mode]
    unet.set_attn_processor(original)  # (empties the dict: diffusers pops what it installs)
    graphs = counter.frame_count if counter is not None else None
    mib = (costs or {}).get(mode, float("nan"))
    if mode == "ours" and cols is not None and costs:  # the K columns this batch kept instead of 77
        mib = costs["ours"] * len(cols) / TOKENS
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
        lora=lora,
        captured_layers=captured,
        capture_mib=mib,
    )


def print_table(rows: list[Row], header: str) -> None:
    print(header)
    print(
        "| mode | batch | precision | compile | grad ckpt | ms/step | samples/s | peak GiB | graphs | ours/plain |",
        end="",
    )
    print(" ours/paper | captured layers, MiB/sample |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    paper = next((r for r in rows if r.mode == "paper" and not r.error), None)
    for r in rows:
        if r.error:
            print(f"| {r.mode} | {r.batch} | {r.precision} | {r.compile} | {r.ckpt} | {r.error} | | | | | | |")
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
        label += f" (LoRA {r.lora})" if r.lora else ""
        print(
            f"| {label} | {r.batch} | {r.precision} | {r.compile} | {r.ckpt} | "
            f"{r.ms:.1f} | {r.sps:.2f} | {r.mem_gib:.2f} | {graphs} | {vs_plain} | {vs_paper} | "
            f"{r.captured_layers}, {r.capture_mib:.1f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="sd14")
    ap.add_argument("--batch", type=int, nargs="+", help="default 1 8 32 64; sdxl: 1 2, with --lora 8")
    ap.add_argument("--lora", type=int, default=0, metavar="RANK", help="train LoRA adapters of this rank only")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile variants")
    ap.add_argument("--compile-only", action="store_true", help="time only the torch.compile variants")
    ap.add_argument("--grad-ckpt", action="store_true", help="also time gradient-checkpointed variants")
    ap.add_argument("--ckpt-only", action="store_true", help="time only the gradient-checkpointed variants")
    ap.add_argument("--channels-last", action="store_true", help="UNet weights in channels-last format")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--px", type=int, help="image size (default: the architecture's, 512 / 768 / 1024)")
    ap.add_argument("--capture-k", type=int, default=6, help="K of the capture table's capture_columns figure")
    ap.add_argument("--no-paper", action="store_true", help="skip the paper-design baseline")
    ap.add_argument("--columns", action="store_true", help="(b) captures only the supervised token columns")
    ap.add_argument("--sdpa-output", action="store_true", help="(b): layer outputs from SDPA, maps for the losses")
    ap.add_argument("--budget-s", type=float, default=float("inf"), help="start no new row after this many s")
    ap.add_argument("--tiny", action="store_true", help="tiny UNet on CPU, one timed step (smoke run)")
    ap.add_argument("--json", help="write the rows to this JSON file (rewritten after every row)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.batch is None:
        args.batch = ([8] if args.lora else [1, 2]) if args.arch == "sdxl" else [1, 8, 32, 64]
    if args.tiny:
        args.batch, args.steps, args.warmup, args.precision = [2], 1, 1, "fp32"
    unet = build_unet(args.arch, args.tiny, device, args.px)
    if args.lora:
        add_lora_adapters(unet, args.lora)
    layers = get_family(FAMILIES[args.arch]).default_layers
    supervised = select_layers(unet, layers)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    px = unet.config.sample_size * 8
    n_params = sum(p.numel() for p in unet.parameters())
    n_train = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    header = (
        f"device: {name}; torch {torch.__version__}; arch {args.arch}{' (tiny)' if args.tiny else ''}; "
        f"{px} px; channels_last {args.channels_last}; {time.strftime('%Y-%m-%d')}; "
        f"{n_params / 1e6:.1f}M parameters, {n_train / 1e6:.1f}M trained"
        + (f" (LoRA rank {args.lora} on {', '.join(LoraConfig().target_modules)})" if args.lora else "")
        + f"; supervised: {' + '.join(layers)}, {len(supervised)} cross-attention layers"
    )
    print(header)
    paper_runs = not args.no_paper and args.arch != "sdxl"
    if args.arch == "sdxl" and not args.no_paper:
        print("(c) paper design: skipped for sdxl (the paper trained SD 1.4 only; its every-layer map store is in the")
        print("    capture table below, beside what (b) keeps)")
    costs = capture_costs(unet, px, supervised, args.capture_k)
    print_capture(costs, args.batch, paper_runs)
    native = ARCHS.get(args.arch, {}).get("sample_size", 0) * 8
    if native and native != px and not args.tiny:  # a reduced-size run: also the architecture's own size
        print_capture(capture_costs(unet, native, supervised, args.capture_k), args.batch, paper_runs)
    mib = {c["mode"]: c["mib"] for c in costs}
    shortfall = host_memory_shortfall(unet, device)
    rows: list[Row] = []
    start = time.perf_counter()

    def measure(mode: str, batch: int, precision: str, use_compile: bool, ckpt: bool) -> None:
        cols, sdpa = (args.columns, args.sdpa_output) if mode == "ours" else (False, False)

        def failed(reason: str) -> Row:  # a row that was not measured, with the configuration it had
            return Row(mode, batch, precision, use_compile, ckpt, columns=cols, channels_last=args.channels_last,
                       sdpa_output=sdpa, error=reason, lora=args.lora)  # fmt: skip

        if time.perf_counter() - start > args.budget_s:
            rows.append(failed("skipped (budget)"))
        elif shortfall:
            rows.append(failed(shortfall))
        else:
            try:
                rows.append(
                    run(mode, unet, batch, precision, use_compile, ckpt, args.steps, args.warmup, device,
                        cols, args.channels_last, sdpa, layers, args.lora, mib)
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
                record = {"device": name, "header": header, "capture": costs, "rows": [x.__dict__ for x in rows]}
                json.dump(record, f, indent=2)

    compiles = [True] if args.compile_only else [False, True] if args.compile else [False]
    ckpts = [True] if args.ckpt_only else [False, True] if args.grad_ckpt else [False]
    if paper_runs:  # first: the baseline every "ours" row is compared with
        measure("paper", 1, "fp32", False, True)
    for use_compile in compiles:
        for ckpt in ckpts:
            for b in args.batch:
                for mode in ("plain", "ours"):
                    measure(mode, b, args.precision, use_compile, ckpt)
    print_table(rows, header)


if __name__ == "__main__":
    main()
