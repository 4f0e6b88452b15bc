"""Capture of cross-attention probabilities on chosen UNet layers.

TokenCompose supervises the cross-attention maps ``A = softmax(Q K^T / sqrt(d))`` of a few layers
(SD 1.x default: the ``attn2`` of the mid block and of every up-block transformer, 10 layers). Fused
kernels (SDPA / flash) never materialise ``A``, so on the supervised layers only we install a
processor that computes the probabilities explicitly (softmax in float32) and keeps them, with
autograd intact, for the losses. Every other layer keeps its fused processor.

Installation goes through diffusers' attention-processor API (``set_attn_processor``) and is undone
on exit of :class:`AttentionCapture`; nothing is monkey-patched.

Store semantics: a forward pre-hook on the UNet clears and arms the store at the start of every UNet
forward, and each layer keeps the **first** map it produces in that forward. Gradient checkpointing
recomputes a block's forward during backward; that recomputation must neither replace the maps the
losses already hold nor add new ones: first-write-wins covers a recompute before ``clear()``, and
``clear()`` disarms the store until the next forward, so a recompute after it (the usual case: the
step clears the store before ``backward``) records nothing and the maps are freed with the graph.

Shapes: ``B`` batch, ``H`` heads, ``N = h*w`` query positions, ``L`` text tokens (77 for CLIP).
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

Size = tuple[int, int]

# Block prefixes accepted in a layer selection, besides fnmatch patterns on full module names.
_BLOCK_PREFIXES = {"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks."}


def cross_attention_names(unet: torch.nn.Module) -> list[str]:
    """Module names of every cross-attention (text-conditioned) layer of a diffusers UNet, in model order."""
    names = []
    for name, module in unet.named_modules():
        if getattr(module, "is_cross_attention", False) and hasattr(module, "set_processor"):
            names.append(name)
    return names


def select_layers(unet: torch.nn.Module, layers: Sequence[str] = ("mid", "up")) -> list[str]:
    """Cross-attention module names matching ``layers``.

    Each entry is ``"down"``, ``"mid"``, ``"up"`` (every cross-attention layer of those blocks) or an
    fnmatch pattern on module names, e.g. ``"up_blocks.3.*"``. Raises if nothing matches, since a
    silently empty selection would train without the grounding losses.
    """
    if isinstance(layers, str):
        layers = [layers]
    all_names = cross_attention_names(unet)
    chosen = []
    for name in all_names:
        for sel in layers:
            prefix = _BLOCK_PREFIXES.get(sel)
            if (prefix and name.startswith(prefix)) or (not prefix and fnmatch.fnmatchcase(name, sel)):
                chosen.append(name)
                break
    if not chosen:
        raise ValueError(f"layer selection {list(layers)} matches no cross-attention layer; available: {all_names}")
    return chosen


class AttentionStore:
    """Per-forward store of attention maps, keyed by layer name.

    ``maps[name]`` is ``[B, H, N, L]`` (or ``[B, H, N, K]`` with a column subset); ``sizes[name]`` is
    the layer's ``(h, w)`` derived from the UNet input's latent size.
    """

    def __init__(self) -> None:
        self.maps: dict[str, torch.Tensor] = {}
        self.sizes: dict[str, Size] = {}
        self.latent_size: Size | None = None
        self.columns: torch.Tensor | None = None  # keep only these token columns (``[K]`` long), or all
        self.armed = True  # records only between a UNet forward's start and the next clear()

    def clear(self) -> None:
        """Drop the maps and stop recording until :meth:`start` (the next UNet forward)."""
        self.maps = {}
        self.sizes = {}
        self.armed = False

    def start(self) -> None:
        """Begin a forward: an empty store that records."""
        self.maps = {}
        self.sizes = {}
        self.armed = True

    def spatial_size(self, n: int) -> Size:
        """``(h, w)`` of a layer with ``n`` query positions: the latent size divided by the layer's stride."""
        if self.latent_size is not None:
            h0, w0 = self.latent_size
            stride = math.sqrt(h0 * w0 / n)
            s = round(stride)
            if s > 0 and abs(stride - s) < 1e-6 and (h0 // s) * (w0 // s) == n:
                return (h0 // s, w0 // s)
            # diffusers pads odd sizes up (ceil) when downsampling
            h, w = math.ceil(h0 / s), math.ceil(w0 / s)
            if h * w == n:
                return (h, w)
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"cannot infer the spatial size of a layer with {n} positions")
        return (side, side)

    def record(self, name: str, probs: torch.Tensor) -> None:
        # Not armed: a checkpoint recompute in the backward after clear(). Already there: a recompute
        # before clear(), or a second call in one forward. Either way keep what the losses hold.
        if not self.armed or name in self.maps:
            return
        self.maps[name] = probs
        self.sizes[name] = self.spatial_size(probs.shape[-2])


class CaptureAttnProcessor:
    """Attention with explicit probabilities, recorded in an :class:`AttentionStore`.

    Computes exactly what diffusers' default ``AttnProcessor2_0`` computes (same projections, norms,
    residual and rescale), but with ``softmax(Q K^T * scale)`` materialised in float32.

    ``sdpa_output``: the layer's output comes from the fused ``scaled_dot_product_attention`` (as in
    the uncaptured model) and the materialised probabilities serve the losses only. Same values and
    gradients up to rounding; on a GPU it saves the half-precision copy of the probabilities and the
    explicit product with V (memory traffic of size ``B·H·N·L``), at the price of computing
    ``Q K^T`` twice. Off by default until measured (``bench/train_step.py --sdpa-output``).
    """

    def __init__(
        self,
        name: str,
        store: AttentionStore,
        keep_cond_only: bool = False,
        sdpa_output: bool = False,
    ) -> None:
        self.name = name
        self.store = store
        self.keep_cond_only = keep_cond_only
        self.sdpa_output = sdpa_output

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, _, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key = attn.to_k(context)
        value = attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # [B, H, N, d]
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # [B, H, L, d]
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # SDPA's default scale is 1/sqrt(d), which is attn.scale for every SD cross-attention layer. It
        # is applied to the keys ([B, H, L, d], L = 77) rather than to the scores ([B, H, N, L]): one
        # pass less over the largest tensor of the layer.
        scores = torch.matmul(query, key.transpose(-1, -2) * attn.scale)  # [B, H, N, L]
        if attention_mask is not None:
            scores = scores + attention_mask
        # One kernel: the up-cast to float32 happens inside the softmax (no float32 copy of the scores
        # is materialised under bf16/fp16 autocast), and autograd keeps only its output.
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        if self.sdpa_output:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, scale=attn.scale
            )  # the maps' scale, so output and maps are one attention
        else:
            hidden_states = torch.matmul(probs.to(value.dtype), value)

        kept = probs
        if self.keep_cond_only:
            kept = kept[kept.shape[0] // 2 :]  # classifier-free guidance batches are [uncond; cond]
        if self.store.columns is not None:
            kept = kept.index_select(-1, self.store.columns.to(kept.device))
        self.store.record(self.name, kept)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def no_store_replay_under_checkpoint() -> contextlib.AbstractContextManager:
    """Context for compiling a captured UNet with gradient checkpointing as one graph.

    A map is stored inside its transformer block; under checkpointing that store is a side effect in
    a checkpointed region, which Dynamo answers with a graph break unless told not to replay it in the
    backward recomputation (``skip_fwd_side_effects_in_bwd_under_checkpoint``). Not replaying it is
    exactly this store's first-write-wins rule. A no-op on torch versions without that setting.
    """
    import torch._dynamo

    if not hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)


class AttentionCapture:
    """Context manager: capture cross-attention probabilities on chosen layers of a UNet.

    Example::

        with AttentionCapture(unet, layers=("mid", "up")) as cap:
            noise_pred = unet(latents, t, text_embeddings).sample
            maps = cap.by_size()  # {(h, w): [Tensor[B, H, N, L], ...]}

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (or any model with ``set_attn_processor``).
        layers: selection passed to :func:`select_layers`.
        keep_cond_only: keep only the second half of the batch (the conditional half of a
            classifier-free-guidance batch).
        columns: keep only these token columns (``[K]`` long) of each map, to save memory; the
            softmax still runs over all ``L`` tokens.
        sdpa_output: layer outputs from the fused attention kernel, maps for the losses only (see
            :class:`CaptureAttnProcessor`).

    Under gradient checkpointing, call ``backward`` before leaving the context: the recomputation in
    the backward pass runs whichever processors are installed at that moment (torch's checkpoint then
    stops with a ``CheckpointError`` about recomputed values).
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        layers: Sequence[str] = ("mid", "up"),
        keep_cond_only: bool = False,
        columns: torch.Tensor | Iterable[int] | None = None,
        sdpa_output: bool = False,
    ) -> None:
        self.unet = unet
        self.names = select_layers(unet, layers)
        self.keep_cond_only = keep_cond_only
        self.sdpa_output = sdpa_output
        self.store = AttentionStore()
        self.columns = columns
        self._original: dict[str, object] | None = None
        self._hook = None

    def __enter__(self) -> AttentionCapture:
        # set_attn_processor takes a processor for every attention layer: pass the current ones
        # through unchanged (they stay fused) and replace only the supervised layers.
        self._original = dict(self.unet.attn_processors)
        processors = dict(self._original)
        for name in self.names:
            processors[f"{name}.processor"] = CaptureAttnProcessor(
                name, self.store, self.keep_cond_only, self.sdpa_output
            )
        self.unet.set_attn_processor(processors)
        self._hook = self.unet.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._original is not None:
            self.unet.set_attn_processor(self._original)
        if self._hook is not None:
            self._hook.remove()
        self._original, self._hook = None, None

    def _pre_forward(self, module, args, kwargs) -> None:
        self.store.start()
        sample = args[0] if args else kwargs.get("sample")
        if isinstance(sample, torch.Tensor) and sample.ndim == 4:
            self.store.latent_size = (int(sample.shape[-2]), int(sample.shape[-1]))

    @property
    def columns(self) -> torch.Tensor | None:
        """Token columns kept in each map (``[K]`` long), or None for all; may change between forwards."""
        return self.store.columns

    @columns.setter
    def columns(self, columns: torch.Tensor | Iterable[int] | None) -> None:
        if columns is not None and not isinstance(columns, torch.Tensor):
            columns = torch.as_tensor(list(columns), dtype=torch.long)
        if columns is not None:
            # K changes from batch to batch: tell torch.compile up front, so that a compiled UNet is
            # traced once with a symbolic K instead of once per K.
            mark = getattr(torch._dynamo, "maybe_mark_dynamic", None)  # absent from old torch
            if mark is not None:
                mark(columns, 0)
        self.store.columns = columns

    @property
    def maps(self) -> dict[str, torch.Tensor]:
        """``{layer name: [B, H, N, L]}`` of the last UNet forward, in model order."""
        return {n: self.store.maps[n] for n in self.names if n in self.store.maps}

    def by_size(self, names: Iterable[str] | None = None) -> dict[Size, list[torch.Tensor]]:
        """Maps of the last forward grouped by spatial size ``(h, w)``, each group in model order.

        ``names``: only these captured layers (e.g. one layer, to score it alone); default all. A name
        that is not captured is a ``KeyError`` (a silent empty group would score nothing).
        """
        maps = self.maps
        if names is not None:
            wanted = set(names)
            missing = sorted(wanted - set(self.names))
            if missing:
                raise KeyError(f"layers not captured: {missing}; captured: {self.names}")
            maps = {n: m for n, m in maps.items() if n in wanted}
        groups: dict[Size, list[torch.Tensor]] = {}
        for name, m in maps.items():
            groups.setdefault(self.store.sizes[name], []).append(m)
        return groups

    def size_of(self, name: str) -> Size:
        """``(h, w)`` of a captured layer in the last forward."""
        return self.store.sizes[name]

    def clear(self) -> None:
        self.store.clear()
