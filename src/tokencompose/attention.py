"""Capture of cross-attention probabilities on chosen UNet layers (and joint-attention transformer layers).

TokenCompose supervises the cross-attention maps ``A = softmax(Q K^T / sqrt(d))`` of a few layers
(SD 1.x default: the ``attn2`` of the mid block and of every up-block transformer, 10 layers). Fused
kernels (SDPA / flash) never materialise ``A``, so on the supervised layers only we install a
processor that computes the probabilities explicitly (softmax in float32) and keeps them, with
autograd intact, for the losses. Every other layer keeps its fused processor.

Installation goes through diffusers' attention-processor API (``Attention.set_processor`` on the
supervised layers: the per-layer half of ``set_attn_processor``, which diffusers 0.30's Flux model
lacks) and is undone on exit of :class:`AttentionCapture`; nothing is monkey-patched.

Store semantics (first write wins; ``clear()`` disarms until the next forward, so gradient-checkpoint
recomputes neither replace nor add maps): :mod:`tokencompose.attention_store`.

Joint-attention transformers (SD3, Flux) have no cross-attention layer; their text-conditioned
layers get the capturing processors of :mod:`tokencompose.joint_attention`, chosen by the type of the
processor they replace (``JointAttnProcessor2_0``, ``FluxAttnProcessor``...), with the same store.

Shapes: ``B`` batch, ``H`` heads, ``N = h*w`` query positions, ``L`` text tokens (77 for CLIP).
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from tokencompose.attention_store import AttentionStore, Size
from tokencompose.joint_attention import DEFAULT_CHUNK_SIZE, NORMALIZATIONS, joint_capture_class, token_grid

# Groups accepted in a layer selection, besides module names and fnmatch patterns: UNet blocks, and the
# double-stream ("joint": SD3's and Flux's) and single-stream (Flux) blocks of joint-attention transformers.
_BLOCK_PREFIXES = {"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks."}
_BLOCK_PREFIXES.update(joint="transformer_blocks.", single="single_transformer_blocks.")


def _capture_class(module: torch.nn.Module) -> type | None:
    """The capturing processor for an attention module by its processor's type (joint-attention twins, else
    :class:`CaptureAttnProcessor` for a cross-attention layer); None: the layer does not attend to text."""
    if not hasattr(module, "set_processor"):
        return None
    joint = joint_capture_class(module)
    if joint is not None:
        return joint
    return CaptureAttnProcessor if getattr(module, "is_cross_attention", False) else None


def cross_attention_names(unet: torch.nn.Module) -> list[str]:
    """Module names of every text-conditioned attention layer, in model order.

    UNets: the cross-attention layers (``...attn2``). SD3: the joint attention of every
    ``transformer_blocks.N``; Flux: that of every double- and single-stream block.
    """
    return [name for name, module in unet.named_modules() if _capture_class(module) is not None]


def _matches(name: str, sel: str) -> bool:
    prefix = _BLOCK_PREFIXES.get(sel)
    if prefix is not None:
        return name.startswith(prefix)
    # a module name selects the layers inside it: "transformer_blocks.9" -> "transformer_blocks.9.attn"
    return name == sel or name.startswith(sel + ".") or fnmatch.fnmatchcase(name, sel)


def select_layers(unet: torch.nn.Module, layers: Sequence[str] = ("mid", "up")) -> list[str]:
    """Text-conditioned attention module names matching ``layers``, in model order.

    Each entry is a group (``"down"``, ``"mid"``, ``"up"`` for UNets; ``"joint"``, ``"single"`` for
    the double- and single-stream blocks of SD3/Flux), a module name (a layer, or a block such as
    ``"transformer_blocks.9"`` for the layers inside it) or an fnmatch pattern on module names, e.g.
    ``"up_blocks.3.*"``. Raises if nothing matches, since a silently empty selection would train
    without the grounding losses.
    """
    if isinstance(layers, str):
        layers = [layers]
    all_names = cross_attention_names(unet)
    chosen = [name for name in all_names if any(_matches(name, sel) for sel in layers)]
    if not chosen:
        raise ValueError(f"layer selection {list(layers)} matches no cross-attention layer; available: {all_names}")
    return chosen


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
    """Context manager: capture text-attention probabilities on chosen layers of a UNet or an MMDiT.

    Example::

        with AttentionCapture(unet, layers=("mid", "up")) as cap:
            noise_pred = unet(latents, t, text_embeddings).sample
            maps = cap.by_size()  # {(h, w): [Tensor[B, H, N, L], ...]}

        with AttentionCapture(flux, layers=["transformer_blocks.18", "single"], normalize="joint") as cap:
            flux(packed, hidden_text, pooled, t, img_ids=img_ids, txt_ids=txt_ids)
            maps = cap.by_size()  # {(h, w) of the token grid: [...]}, N = image tokens only

    Args:
        unet: a diffusers ``UNet2DConditionModel``, ``SD3Transformer2DModel`` or
            ``FluxTransformer2DModel`` (any model whose text-conditioned attention modules have
            ``set_processor``).
        layers: selection passed to :func:`select_layers`.
        keep_cond_only: keep only the second half of the batch (the conditional half of a
            classifier-free-guidance batch).
        columns: keep only these token columns (``[K]`` long) of each map, to save memory; the
            softmax still runs over all ``L`` tokens.
        sdpa_output: layer outputs from the fused attention kernel, maps for the losses only (see
            :class:`CaptureAttnProcessor`); joint-attention layers always work that way.
        normalize: joint-attention layers only (UNet cross-attention ignores it): ``"joint"``, the
            model's own probabilities over all image and text keys restricted to the text columns, or
            ``"text"``, a softmax over the text keys only (see :mod:`tokencompose.joint_attention`).
        chunk_size: query rows per checkpointed chunk of the ``"joint"`` log-sum-exp.

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
        normalize: str = "joint",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        self.unet = unet
        self.names = select_layers(unet, layers)
        self.keep_cond_only = keep_cond_only
        self.sdpa_output = sdpa_output
        self.normalize = normalize
        self.chunk_size = chunk_size
        self.store = AttentionStore()
        self.columns = columns
        self._original: dict[str, object] | None = None
        self._hook = None
        # Where the pre-hook finds inputs passed positionally: UNets take (sample, timestep,
        # encoder_hidden_states), SD3/Flux (hidden_states, encoder_hidden_states, ..., img_ids).
        try:
            params = list(inspect.signature(unet.forward).parameters)
        except (TypeError, ValueError):
            params = []
        self._positions = {p: i for i, p in enumerate(params)}

    def _processor(self, name: str) -> object:
        module = self.unet.get_submodule(name)
        cls = _capture_class(module)
        if cls is CaptureAttnProcessor:
            return CaptureAttnProcessor(name, self.store, self.keep_cond_only, self.sdpa_output)
        return cls(name, self.store, self.keep_cond_only, self.normalize, self.chunk_size, original=module.processor)

    def __enter__(self) -> AttentionCapture:
        # Only the supervised layers get a capturing processor; every other layer keeps its fused one.
        self._original = {name: self.unet.get_submodule(name).processor for name in self.names}
        for name in self.names:
            self.unet.get_submodule(name).set_processor(self._processor(name))
        self._hook = self.unet.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._original is not None:
            for name, processor in self._original.items():
                self.unet.get_submodule(name).set_processor(processor)
        if self._hook is not None:
            self._hook.remove()
        self._original, self._hook = None, None

    def _input(self, args: tuple, kwargs: dict, name: str) -> object:
        if name in kwargs:
            return kwargs[name]
        i = self._positions.get(name)
        return args[i] if i is not None and i < len(args) else None

    def _pre_forward(self, module, args, kwargs) -> None:
        store = self.store
        store.start()
        # The first input: latents [B, C, H, W] (UNet, SD3: the grid is (H, W) over the patch size) or
        # packed tokens [B, N, C] (Flux: the grid comes from img_ids).
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        is_latent = isinstance(sample, torch.Tensor) and sample.ndim == 4
        store.latent_size = (int(sample.shape[-2]), int(sample.shape[-1])) if is_latent else None
        context = self._input(args, kwargs, "encoder_hidden_states")
        has_context = isinstance(context, torch.Tensor) and context.ndim == 3
        store.text_len = int(context.shape[1]) if has_context else None
        img_ids = self._input(args, kwargs, "img_ids")
        store.grid = token_grid(img_ids) if isinstance(img_ids, torch.Tensor) else None

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
