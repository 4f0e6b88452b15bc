"""Training-step throughput: plain fine-tuning vs our TokenCompose step vs a re-creation of the paper's design.

Builds the SD 1.4, SD 2.1 or SDXL base 1.0 UNet architecture, or the SD3-medium or FLUX.1-dev
transformer, with random weights -- no download -- and times denoiser forward + backward + AdamW step on
random latents, per configuration:

  (a) plain     denoising loss only, every attention layer on the fused SDPA path
  (b) ours      + token and pixel losses; explicit probabilities on the supervised layers only (the
                family's default, mid + up: 10 layers for SD 1.x / 2.x, 46 for SDXL; the joint
                attention of transformer_blocks.9 for SD3, of transformer_blocks.15-18 for Flux)
  (c) paper     the paper's design: explicit attention in all 32 layers, every map stored,
                batch 1, fp32, gradient checkpointing (its own configuration; SD 1.x / 2.x only)

    python bench/train_step.py --batch 1 8 32 64 --precision bf16 [--compile] [--grad-ckpt] [--arch sd21]
    python bench/train_step.py --arch sdxl --batch 1 2 --grad-ckpt       # SDXL full fine-tune, 1024 px
    python bench/train_step.py --arch sdxl --lora 128 --batch 8          # SDXL LoRA (peft, as the trainer)
    python bench/train_step.py --tiny [--arch sdxl]   # CPU smoke run: tiny UNet, one timed step each
    python bench/train_step.py --px 256 --batch 1 --steps 1 --warmup 0   # CPU pre-flight of the real sizes
    python bench/train_step.py --arch sd3 --lora 16 --batch 1 4          # SD3-medium LoRA, 1024 px
    python bench/train_step.py --arch flux --lora 16 --grad-ckpt --ckpt-only --batch 2 --normalize text joint
    python bench/train_step.py --arch flux --lora 16 --blocks 4,2 --px 256   # REDUCED DEPTH (CPU pre-flight)

SDXL batches carry what its UNet needs besides the 2048-wide context: ``added_cond_kwargs`` with the
pooled text embedding ``[B, 1280]`` and the 6 size/crop time ids. ``--lora RANK`` freezes the UNet and
trains peft adapters on to_q, to_k, to_v, to_out.0 (``tokencompose.train.lora.add_lora``); AdamW then
holds the adapters only.

SD3 / Flux (rectified flow, run through the family's ``predict``): latents ``[B, 16, H/8, W/8]`` (Flux packs
them into ``[B, N, 64]`` tokens with ``img_ids`` ``[N, 3]``, ``txt_ids`` ``[512, 3]`` and guidance 3.5),
text context ``[B, 77 + 256, 4096]`` (SD3) / ``[B, 512, 4096]`` (Flux), pooled ``[B, 2048]`` / ``[B, 768]``,
timestep sigma * 1000; phrase indices in the text range. ``--lora RANK`` there adapts the supervised
blocks' attention projections only (to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out, as the
sd3_coco_lora / flux_coco_lora presets), and under bf16 / fp16 the frozen weights are stored in that
type (adapters fp32), as diffusers' SD3 / Flux LoRA scripts do (``--base-fp32``: fp32, as tokencompose's
trainer keeps its denoiser). ``--normalize text joint`` times an (b) row per map normalisation
(``AttentionCapture(normalize=...)``, ``--chunk``: query rows per chunk of the joint log-sum-exp).
``--blocks D,S`` (Flux) keeps D double-stream blocks (the supervised ones among them, at their own
indices; the others pass their inputs through) and S single-stream ones: a REDUCED-DEPTH model for a
CPU pre-flight, marked as such in every output.

Before timing, the script prints what each configuration captures, computed from the model's structure
and the image size: how many layers and the captured maps' size per sample (``H·N·L`` fp32 floats per
layer), with all L token columns (77; SD3 333, Flux 512) and with ``loss.capture_columns`` (K kept
columns, ``--capture-k``); for SD3 / Flux also the transient memory of one chunk of ``normalize="joint"``.
On a CPU the rows are skipped, with the reason, when the weights, gradients and AdamW states would not
fit the free host memory (checked on the meta device, before anything is allocated).

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
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch._dynamo
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd_arch import ARCHS, CLASSES, FAMILIES, NATIVE_PX, TEXT_LEN  # noqa: E402  (this folder)
from tokencompose.attention import AttentionCapture, no_store_replay_under_checkpoint, select_layers
from tokencompose.config import LoraConfig, OptimConfig
from tokencompose.families import get_family
from tokencompose.joint_attention import DEFAULT_CHUNK_SIZE
from tokencompose.losses import column_subset, grounding_losses
from tokencompose.masks import masks_at_resolutions
from tokencompose.tokens import pad_token_positions
from tokencompose.train.lora import add_lora
from tokencompose.train.setup import build_optimizer

TOKENS = 77  # CLIP context length: the L of every cross-attention map
# Attention projections of a joint block that LoRA adapts (image stream, then the text stream's added ones).
JOINT_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


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
    normalize: str = ""  # SD3 / Flux (b) rows: the maps' normalisation, "text" or "joint"
    weights: str = "fp32"  # dtype of the stored (frozen, with LoRA) denoiser weights
    depth: str = ""  # "" = the architecture's depth, else what a reduced-depth model (--blocks) kept


class PassThrough(torch.nn.Module):
    """A double-stream block left out of a reduced-depth Flux (``--blocks``): its inputs go through unchanged."""

    def forward(self, hidden_states, encoder_hidden_states, *args, **kwargs):
        return encoder_hidden_states, hidden_states


def joint_arch(model) -> str | None:
    """``"sd3"`` / ``"flux"`` for a joint-attention transformer, None for a UNet."""
    return {cls: arch for arch, cls in CLASSES.items()}.get(type(model).__name__)


def build_transformer(
    arch: str,
    tiny: bool,
    device: torch.device | str,
    px: int | None = None,
    blocks: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float32,
):
    """Random-init SD3-medium / FLUX.1-dev transformer (or the family's tiny one), built where it runs and in
    ``dtype`` (11.9B Flux parameters never exist in fp32 under bf16); ``device="meta"`` allocates nothing.

    ``blocks=(D, S)`` (Flux): reduced depth, D double-stream blocks (the family's supervised ones at their
    own indices, the first other indices for the rest, pass-through stubs elsewhere: module names stay the
    real model's) and the first S single-stream blocks.
    """
    import diffusers

    family = get_family(FAMILIES[arch])
    config = dict(family.tiny().unet.config) if tiny else dict(ARCHS[arch])
    if "sample_size" in config:  # SD3 (Flux has none: its size comes with the packed latents)
        config["sample_size"] = (px or (64 if tiny else NATIVE_PX[arch])) // 8
    kept, total = None, config.get("num_layers")
    if blocks is not None:
        double, single = blocks
        supervised = [int(name.rsplit(".", 1)[1]) for name in family.default_layers]
        if arch != "flux":
            raise SystemExit("--blocks: Flux only (SD3-medium fits at its full depth)")
        if not (len(supervised) <= double <= total and 0 <= single <= config["num_single_layers"]):
            raise SystemExit(
                f"--blocks {double},{single}: need {len(supervised)} <= D <= {total} (the supervised blocks "
                f"{supervised} are kept) and 0 <= S <= {config['num_single_layers']}"
            )
        others = [i for i in range(total) if i not in supervised][: double - len(supervised)]
        kept = sorted(set(supervised) | set(others))
        config.update(num_layers=double, num_single_layers=single)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = getattr(diffusers, CLASSES[arch]).from_config(config)
    finally:
        torch.set_default_dtype(previous)
    if dtype != torch.float32:  # buffers built in float32 (SD3's position table) too, as from_pretrained(torch_dtype)
        torch.nn.Module.to(model, dtype=dtype)  # (skips ModelMixin.to's keep-in-fp32 warning: there are none)
    if kept is not None:
        real = iter(model.transformer_blocks)
        model.transformer_blocks = torch.nn.ModuleList(next(real) if i in kept else PassThrough() for i in range(total))
    return model


def build_unet(
    arch: str,
    tiny: bool,
    device: torch.device | str,
    px: int | None = None,
    blocks: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float32,
):
    """Random-init UNet of the SD 1.4 / SD 2.1 / SDXL architecture (or the tests' tiny one of the same
    family), or the SD3 / Flux transformer (:func:`build_transformer`); ``px`` overrides the image size
    (latent = px / 8) for a quick pre-flight on a CPU."""
    from diffusers import UNet2DConditionModel

    if arch in CLASSES:
        return build_transformer(arch, tiny, device, px, blocks, dtype)
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


def lora_targets(model, supervised: list[str]) -> list[str]:
    """peft target modules: the trainer's default (to_q, to_k, to_v, to_out.0 of every layer) for a UNet; the
    supervised blocks' attention projections, image and text stream, for SD3 / Flux (as their presets)."""
    if joint_arch(model) is None:
        return list(LoraConfig().target_modules)
    names = {name for name, _ in model.named_modules()}
    return [f"{layer}.{p}" for layer in supervised for p in JOINT_PROJECTIONS if f"{layer}.{p}" in names]


def lora_parameters(model, targets: list[str], rank: int) -> int:
    """Parameters peft's adapters on ``targets`` will have: ``rank * (in + out)`` per matched Linear."""
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            n += rank * (module.in_features + module.out_features)
    return n


def add_lora_adapters(unet, rank: int, targets: list[str] | None = None) -> None:
    """Freeze the denoiser and add rank-``rank`` adapters to ``targets`` (default: the trainer's target
    modules), as the trainer; adapters in fp32 also where the frozen weights are half (peft matches them)."""
    add_lora(unet, rank, None, targets or LoraConfig().target_modules)
    for p in unet.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def added_conditioning(unet, batch: int, device) -> dict | None:
    """SDXL's ``added_cond_kwargs`` (pooled text embedding, 6 time ids for an uncropped square image), else None."""
    cfg = unet.config
    if cfg.addition_embed_type != "text_time":
        return None
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim  # 1280 for SDXL
    px = float(cfg.sample_size * 8)
    time_ids = torch.tensor([px, px, 0.0, 0.0, px, px], device=device).expand(batch, 6)
    return {"text_embeds": torch.randn(batch, pooled, device=device), "time_ids": time_ids}


def joint_conditioning(model, batch: int, device) -> dict:
    """SD3 / Flux conditioning of random text: the context (SD3: 77 CLIP + 256 T5 positions, Flux: 512 T5),
    pooled embedding and, for Flux, ``txt_ids`` and the distilled guidance (the family's ``encode`` shapes)."""
    arch, cfg = joint_arch(model), model.config
    cond = {
        "encoder_hidden_states": torch.randn(batch, TEXT_LEN[arch], cfg.joint_attention_dim, device=device),
        "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, device=device),
    }
    if arch == "flux":
        from tokencompose.families.flux import TRAIN_GUIDANCE

        cond["txt_ids"] = torch.zeros(TEXT_LEN[arch], 3, device=device)
        if cfg.guidance_embeds:
            cond["guidance"] = torch.full((batch,), TRAIN_GUIDANCE, device=device)
    return cond


def make_batch(unet, batch: int, device, phrases: int = 3, px: int | None = None):
    """Random latents, timesteps, context and conditioning (UNets: SDXL's ``added_cond_kwargs``; SD3 / Flux:
    the family's ``cond``), phrase token positions and masks. ``px``: image size (default the model's)."""
    size = (px or unet.config.sample_size * 8) // 8
    if joint_arch(unet) is not None:
        channels = unet.config.in_channels // (4 if joint_arch(unet) == "flux" else 1)  # Flux: 2x2 packed later
        x = torch.randn(batch, channels, size, size, device=device)
        t = torch.rand(batch, device=device) * 1000  # sigma * num_train_timesteps, as FlowFamily.noise_latents
        added = joint_conditioning(unet, batch, device)
        ctx = added["encoder_hidden_states"]
    else:
        dim = unet.config.cross_attention_dim  # 2048 for SDXL: its two encoders' states concatenated
        x = torch.randn(batch, 4, size, size, device=device)
        ctx = torch.randn(batch, TOKENS, dim, device=device)
        t = torch.randint(0, 1000, (batch,), device=device)
        added = added_conditioning(unet, batch, device)
    # phrase token positions 1, 4-5, 7: inside every text range (CLIP's 77, SD3's CLIP part, Flux's T5)
    spans = [[[1 + 3 * j, 2 + 3 * j][: 1 + j % 2] for j in range(phrases)] for _ in range(batch)]
    index, valid = pad_token_positions(spans)
    masks_img = torch.rand(batch, phrases, size * 8, size * 8, device=device) > 0.5
    return x, t, ctx, added, index.to(device), valid.to(device), masks_img


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


def joint_layers(model, px: int) -> list[tuple[str, int, int, int]]:
    """``(name, heads, N image tokens, L text tokens)`` of every text-attention layer of SD3 / Flux at ``px``:
    SD3's joint blocks, Flux's double- and single-stream blocks (pass-through stubs have none). One token
    per 2x2 latent patch, so ``N = (px / 16)^2``."""
    side = px // 8 // get_family(FAMILIES[joint_arch(model)]).patch_size
    return [
        (name, int(model.get_submodule(name).heads), side * side, TEXT_LEN[joint_arch(model)])
        for name in select_layers(model, ("joint", "single") if joint_arch(model) == "flux" else ("joint",))
    ]


def joint_capture_costs(model, px: int, supervised: list[str], k: int, chunk: int, precision: str) -> list[dict]:
    """:func:`capture_costs` for SD3 / Flux: (b) keeps the image->text block ``[H, N, L]`` (fp32) of each
    supervised block's joint attention, whatever the normalisation; ``normalize="joint"`` also needs, per
    chunk of C query rows, the ``[H, C, N + L]`` logits in the compute dtype and their float32 copy (freed
    before the next chunk, recomputed in backward). The paper-design row is the analogue of its every-layer
    store: every block's image->text map (the full ``(N + L)^2`` joint maps in its text)."""
    layers = joint_layers(model, px)
    chosen = set(supervised)
    ours = [x for x in layers if x[0] in chosen]

    def mib(rows, columns=None) -> float:
        return sum(h * n * (columns or text) for _, h, n, text in rows) * 4 / 2**20

    _, h, n, text = ours[0]
    s = n + text
    c = min(chunk, n)
    chunk_mib = h * c * s * (4 + (2 if precision in ("bf16", "fp16") else 0)) / 2**20
    full = sum(h * (nn + tt) ** 2 for _, h, nn, tt in layers) * 4 / 2**30
    side = math.isqrt(n)
    return [
        dict(mode="plain", px=px, layers=0, what="none", mib=0.0, mib_columns=0.0, tokens=text),
        dict(mode="ours", px=px, layers=len(ours), tokens=text, k=k, mib=mib(ours), mib_columns=mib(ours, k),
             what=f"joint attention, image->text: {side}x{side} image x {text} text tokens, {h} heads, "
                  f"{mib(ours[:1]):.1f} MiB each",
             chunk=c, chunk_mib=chunk_mib),
        dict(mode="paper", px=px, layers=len(layers), tokens=text, mib=mib(layers), mib_columns=None,
             what=f"every block's image->text map; full {s}x{s} joint maps: {full:.1f} GiB"),
    ]  # fmt: skip


def print_capture(costs: list[dict], batches: list[int], paper_runs: bool) -> None:
    """The capture table: layers and maps per sample (and at the largest batch) of each configuration."""
    px, k, b = costs[0]["px"], costs[1]["k"], max(batches)
    tokens, chunk = costs[1].get("tokens", TOKENS), costs[1].get("chunk")
    print(f"captured maps at {px} px (analytical: H*N*L fp32 floats per layer and sample; not a measurement):")
    print(
        f"| config | layers | MiB/sample (L={tokens}) | MiB/sample (capture_columns, K={k}) | GiB at batch {b} |",
        end="",
    )
    print(f" normalize=joint: transient MiB/sample per chunk (C={chunk}) |" if chunk else "")
    print("|---|---|---|---|---|" + ("---|" if chunk else ""))
    for c in costs:
        cols = "" if c["mib_columns"] is None else f"{c['mib_columns']:.1f}"
        note = "" if c["mode"] != "paper" or paper_runs else " (not run)"
        extra = "" if not chunk else f" {c['chunk_mib']:.1f} |" if "chunk_mib" in c else " |"
        print(
            f"| {c['mode']}{note} | {c['layers']} ({c['what']}) | {c['mib']:.1f} | {cols} | {c['mib'] * b / 1024:.2f} |"
            + extra
        )


def host_memory_shortfall(weight_bytes: int, n_train: int, device) -> str:
    """On a CPU, before the model is built: why the rows would not fit this machine's free memory (the
    weights, plus fp32 gradients and two AdamW states of the trainable parameters; activations not
    counted), else "". On a GPU a row that runs out of memory is caught and reported; on a host it would
    meet the OOM killer."""
    if device.type != "cpu":
        return ""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        free = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return ""
    need = weight_bytes + 12 * n_train
    if need < 0.9 * free:
        return ""
    return (
        f"skipped: weights {weight_bytes / 1e9:.1f} GB + gradients and AdamW states {12 * n_train / 1e9:.1f} GB "
        f"need {need / 1e9:.1f} GB, {free / 1e9:.1f} GB host memory free"
    )


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
    px: int | None = None,
    normalize: str = "",
    chunk: int = DEFAULT_CHUNK_SIZE,
    weights: str = "fp32",
    depth: str = "",
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
    x, t, ctx, added, index, valid, masks_img = make_batch(unet, batch, device, px=px)
    family = get_family(FAMILIES[joint_arch(unet)]) if joint_arch(unet) else None
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
    cap = None
    if mode == "ours":  # normalize, chunk_size: joint-attention layers only (UNets ignore them)
        cap = AttentionCapture(
            unet, layers, columns=cols, sdpa_output=sdpa_output, normalize=normalize or "text", chunk_size=chunk
        )

    def step():
        nonlocal masks
        store.clear()
        with amp:
            if family is not None:  # SD3 / Flux: through the family (Flux packs, passes img_ids)
                pred = family.predict(model, x, t, added)
            else:
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
    if mode == "ours" and cols is not None and costs:  # the K columns this batch kept instead of L
        mib = costs["ours"] * len(cols) / costs.get("tokens", TOKENS)
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
        normalize=normalize if mode == "ours" else "",
        weights=weights,
        depth=depth,
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
            label = r.mode + (f" ({r.normalize})" if r.normalize else "") + (" (REDUCED DEPTH)" if r.depth else "")
            print(f"| {label} | {r.batch} | {r.precision} | {r.compile} | {r.ckpt} | {r.error} | | | | | | |")
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
        label += f" ({r.normalize})" if r.normalize else ""
        label += " (REDUCED DEPTH)" if r.depth else ""
        print(
            f"| {label} | {r.batch} | {r.precision} | {r.compile} | {r.ckpt} | "
            f"{r.ms:.1f} | {r.sps:.2f} | {r.mem_gib:.2f} | {graphs} | {vs_plain} | {vs_paper} | "
            f"{r.captured_layers}, {r.capture_mib:.1f} |"
        )


def parse_blocks(text: str) -> tuple[int, int]:
    try:
        double, single = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected D,S (two integers), got {text!r}") from None
    return double, single


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="sd14")
    ap.add_argument(
        "--batch", type=int, nargs="+", help="default 1 8 32 64; sdxl: 1 2, with --lora 8; sd3 1 4; flux 1 2"
    )
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
    ap.add_argument("--normalize", nargs="+", choices=["text", "joint"], default=["text"],
                    help="sd3 / flux: (b) rows with these map normalisations (default text)")  # fmt: skip
    ap.add_argument("--chunk", type=int, default=DEFAULT_CHUNK_SIZE, help="query rows per chunk of normalize=joint")
    ap.add_argument("--blocks", type=parse_blocks, metavar="D,S",
                    help="flux: REDUCED DEPTH, D double (>= 4, the supervised), S single-stream blocks")  # fmt: skip
    ap.add_argument("--base-fp32", action="store_true",
                    help="sd3 / flux LoRA: frozen weights fp32 (as the trainer), not the --precision type")  # fmt: skip
    ap.add_argument("--budget-s", type=float, default=float("inf"), help="start no new row after this many s")
    ap.add_argument("--tiny", action="store_true", help="tiny UNet on CPU, one timed step (smoke run)")
    ap.add_argument("--json", help="write the rows to this JSON file (rewritten after every row)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    joint = args.arch in CLASSES
    if args.blocks and args.arch != "flux":
        ap.error("--blocks: flux only (SD3-medium fits at its full depth)")
    if joint and args.px and args.px % 16:
        ap.error(f"--px {args.px}: {args.arch} needs a multiple of 16 (8x VAE, 2x2 patches)")
    if args.batch is None:
        args.batch = {"sdxl": [8] if args.lora else [1, 2], "sd3": [1, 4], "flux": [1, 2]}.get(
            args.arch, [1, 8, 32, 64]
        )
    if args.tiny:
        args.batch, args.steps, args.warmup, args.precision = [2], 1, 1, "fp32"
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    # SD3 / Flux LoRA under bf16 / fp16: frozen weights in that type, adapters fp32 (diffusers' LoRA scripts)
    wdtype = half if joint and args.lora and half is not None and not args.base_fp32 else torch.float32
    layers = get_family(FAMILIES[args.arch]).default_layers
    # The model's structure first, on the meta device (nothing allocated): parameter counts, LoRA targets and
    # the host-memory check before any weight exists; the capture tables need no more than this.
    probe = build_unet(args.arch, args.tiny, "meta" if not args.tiny else device, args.px, args.blocks, wdtype)
    supervised = select_layers(probe, layers)
    targets = lora_targets(probe, supervised) if args.lora else []
    n_params = sum(p.numel() for p in probe.parameters())
    n_train = lora_parameters(probe, targets, args.lora) if args.lora else n_params
    weight_bytes = sum(p.numel() * p.element_size() for p in probe.parameters()) + (4 * n_train if args.lora else 0)
    shortfall = host_memory_shortfall(weight_bytes, n_train, device)
    unet = probe
    if not shortfall and not args.tiny:
        del probe
        unet = build_unet(args.arch, False, device, args.px, args.blocks, wdtype)
    if args.lora and not shortfall:
        add_lora_adapters(unet, args.lora, targets)
        n_train = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    px = (
        unet.config.sample_size * 8
        if "sample_size" in unet.config
        else args.px or (64 if args.tiny else NATIVE_PX[args.arch])
    )
    weights = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[wdtype]
    depth = ""
    if args.blocks:
        full = build_unet(args.arch, args.tiny, "meta", args.px)
        real = [i for i, b in enumerate(unet.transformer_blocks) if not isinstance(b, PassThrough)]
        depth = (
            f"REDUCED DEPTH: {len(real)} of {len(full.transformer_blocks)} double-stream blocks (real: "
            f"{', '.join(map(str, real))}; the others pass their inputs through), "
            f"{len(unet.single_transformer_blocks)} of {len(full.single_transformer_blocks)} single-stream; "
            "widths as the architecture; "
            f"{sum(p.numel() for p in full.parameters()) / 1e6:.1f}M parameters at full depth"
        )
        del full
    if args.lora and joint:
        lora_desc = f" (LoRA rank {args.lora} on the supervised blocks' attention {'/'.join(JOINT_PROJECTIONS)}: "
        lora_desc += f"{len(targets)} modules)"
    else:
        lora_desc = f" (LoRA rank {args.lora} on {', '.join(LoraConfig().target_modules)})" if args.lora else ""
    kind = "joint-attention" if joint else "cross-attention"
    header = (
        f"device: {name}; torch {torch.__version__}; arch {args.arch}{' (tiny)' if args.tiny else ''}; "
        f"{px} px; channels_last {args.channels_last}; {time.strftime('%Y-%m-%d')}; "
        f"{n_params / 1e6:.1f}M parameters, {n_train / 1e6:.1f}M trained"
        + lora_desc
        + f"; weights {weights}{' (frozen; adapters fp32)' if args.lora and wdtype != torch.float32 else ''}"
        + f"; supervised: {' + '.join(layers)}, {len(supervised)} {kind} layers"
        + (f"; normalize {' / '.join(args.normalize)}, joint chunk {args.chunk}" if joint else "")
        + (f"; {depth}" if depth else "")
    )
    print(header)
    paper_runs = not args.no_paper and args.arch not in ("sdxl", "sd3", "flux")
    if args.arch in ("sdxl", "sd3", "flux") and not args.no_paper:
        print(f"(c) paper design: skipped for {args.arch} (the paper trained SD 1.4 only; its every-layer map store is")
        print("    in the capture table below, beside what (b) keeps)")

    def costs_at(size: int) -> list[dict]:
        if joint:
            return joint_capture_costs(unet, size, supervised, args.capture_k, args.chunk, args.precision)
        return capture_costs(unet, size, supervised, args.capture_k)

    costs = costs_at(px)
    print_capture(costs, args.batch, paper_runs)
    native = NATIVE_PX[args.arch]
    if native != px and not args.tiny:  # a reduced-size run: also the architecture's own size
        print_capture(costs_at(native), args.batch, paper_runs)
    mib = {c["mode"]: c["mib"] for c in costs}
    mib["tokens"] = costs[1].get("tokens", TOKENS)
    rows: list[Row] = []
    start = time.perf_counter()

    def measure(mode: str, batch: int, precision: str, use_compile: bool, ckpt: bool, normalize: str = "") -> None:
        cols, sdpa = (args.columns, args.sdpa_output) if mode == "ours" else (False, False)

        def failed(reason: str) -> Row:  # a row that was not measured, with the configuration it had
            return Row(mode, batch, precision, use_compile, ckpt, columns=cols, channels_last=args.channels_last,
                       sdpa_output=sdpa, error=reason, lora=args.lora, normalize=normalize, weights=weights,
                       depth=depth)  # fmt: skip

        if time.perf_counter() - start > args.budget_s:
            rows.append(failed("skipped (budget)"))
        elif shortfall:
            rows.append(failed(shortfall))
        else:
            try:
                rows.append(
                    run(mode, unet, batch, precision, use_compile, ckpt, args.steps, args.warmup, device,
                        cols, args.channels_last, sdpa, layers, args.lora, mib, px, normalize, args.chunk,
                        weights, depth)
                )  # fmt: skip
            except torch.OutOfMemoryError:
                rows.append(failed("out of memory"))
            except Exception as e:  # keep measuring the other rows; the reason is in the table
                rows.append(failed(f"{type(e).__name__}: {e}"[:200]))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        r = rows[-1]
        label = r.mode + (f" ({r.normalize})" if r.normalize else "")
        print(
            f"{label} batch {r.batch} compile {r.compile} ckpt {r.ckpt}: " + (r.error or f"{r.sps:.2f} samples/s"),
            flush=True,
        )
        if args.json:
            with open(args.json, "w") as f:
                record = {"device": name, "header": header, "capture": costs, "rows": [x.__dict__ for x in rows]}
                if device.type == "cpu":  # ru_maxrss: KiB on Linux
                    record["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
                json.dump(record, f, indent=2)

    compiles = [True] if args.compile_only else [False, True] if args.compile else [False]
    ckpts = [True] if args.ckpt_only else [False, True] if args.grad_ckpt else [False]
    variants = [("plain", "")] + ([("ours", n) for n in args.normalize] if joint else [("ours", "")])
    if paper_runs:  # first: the baseline every "ours" row is compared with
        measure("paper", 1, "fp32", False, True)
    for use_compile in compiles:
        for ckpt in ckpts:
            for b in args.batch:
                for mode, normalize in variants:
                    measure(mode, b, args.precision, use_compile, ckpt, normalize)
    print_table(rows, header)
    if device.type == "cpu":
        print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9:.1f} GB")


if __name__ == "__main__":
    main()
