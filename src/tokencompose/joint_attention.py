"""Capture of image→text attention maps in joint-attention transformers (SD3, Flux).

In MMDiT models there is no cross-attention layer: image and text tokens are concatenated into one
sequence of ``S = N + L`` tokens and attend jointly, ``softmax(Q K^T / sqrt(d))`` over all ``S`` keys.
The map TokenCompose supervises is the image-query → text-key block of that softmax:

- SD3 (``JointTransformerBlock.attn``, ``JointAttnProcessor2_0``): sequence order ``[image, text]``;
  the text comes in as ``encoder_hidden_states`` through the added projections (``add_k_proj``).
- Flux double-stream blocks (``transformer_blocks.N.attn``): order ``[text, image]``, text through the
  added projections, RoPE applied to q and k of the whole sequence before attention.
- Flux single-stream blocks (``single_transformer_blocks.N.attn``): the block concatenates
  ``[text, image]`` into ``hidden_states`` before calling the attention, which therefore cannot tell
  where the text ends. The text length is that of the model's ``encoder_hidden_states`` (the context
  embedder keeps it); :class:`~tokencompose.attention.AttentionCapture` records it in the store's
  ``text_len`` at the start of every forward.

Each capturing processor computes the layer output exactly as the stock processor does (same
projections, norms, RoPE and fused attention kernel); the maps are extra work on the side, recorded
as float32 ``[B, H, N, L]`` (``N`` image tokens in row-major order of the patch grid, ``L`` text
positions, or ``K`` kept columns) with one of two normalisations:

- ``"joint"``: the model's own probabilities, softmax over all ``N + L`` keys, text columns only (a
  row sums to the text's share of the attention, < 1);
- ``"text"``: softmax over the ``L`` text keys only (a row sums to 1, like UNet cross-attention).

Memory: ``"joint"`` needs the log-sum-exp over all keys, i.e. the ``N × (N + L)`` logits. They are
computed in query chunks under ``torch.utils.checkpoint``, so no chunk's logits are kept for backward:
the backward pass recomputes them chunk by chunk. What stays per layer is the ``[B, H, N, L]`` map.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from tokencompose.attention_store import AttentionStore

NORMALIZATIONS = ("joint", "text")
# Query rows per chunk of the joint log-sum-exp. The transient memory of one chunk is about
# B*H*C*S*(2 + 4) bytes under bf16 (logits + their float32 copy): B=2, H=24, S=4.6k (Flux at 1024 px)
# gives ~1.4 GB at C=1024, freed before the next chunk. Fewer chunks mean fewer kernel launches.
DEFAULT_CHUNK_SIZE = 1024


def _joint_chunk(
    query: torch.Tensor, key: torch.Tensor, text: slice, columns: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """``exp(text logits - logsumexp over all keys)`` for one chunk of queries.

    query ``[B, H, C, d]``, key ``[B, H, S, d]`` → float32 ``[B, H, C, L]`` (or ``[B, H, C, K]``).
    """
    # Logits in the compute dtype (bf16 under autocast, as the UNet capture does), reductions in float32.
    logits = torch.matmul(query * scale, key.transpose(-1, -2))  # [B, H, C, S]
    lse = torch.logsumexp(logits.float(), dim=-1, keepdim=True)  # [B, H, C, 1]
    text_logits = logits[..., text]
    if columns is not None:
        text_logits = text_logits.index_select(-1, columns)
    return torch.exp(text_logits.float() - lse)


def joint_text_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    text: slice,
    columns: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Text columns of the joint softmax, without keeping any ``N × S`` matrix for backward.

    Args:
        query: image queries ``[B, H, N, d]`` (after norms and RoPE).
        key: keys of the whole joint sequence ``[B, H, S, d]``.
        text: where the text keys sit in ``S``.
        columns: keep only these text columns (``[K]`` long); the softmax still runs over all keys.
        chunk_size: query rows per checkpointed chunk.

    Returns:
        float32 ``[B, H, N, L]`` (or ``K``): ``softmax(Q K^T / sqrt(d))[..., text]``, with gradients to
        ``query`` and to every key (image and text).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    scale = query.shape[-1] ** -0.5  # SDPA's default scale, as in the stock processors
    if columns is not None:
        columns = columns.to(query.device)
    needs_graph = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)
    chunks = []
    for start in range(0, query.shape[2], chunk_size):
        q = query[:, :, start : start + chunk_size]
        if needs_graph:
            # The checkpoint keeps only its inputs (a view of the queries and the shared keys) and
            # recomputes the chunk's [B, H, C, S] logits in backward. No randomness inside: skip the
            # RNG-state save and restore (a device sync on CUDA per chunk otherwise).
            chunks.append(
                checkpoint(_joint_chunk, q, key, text, columns, scale, use_reentrant=False, preserve_rng_state=False)
            )
        else:
            chunks.append(_joint_chunk(q, key, text, columns, scale))
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)


def text_probs(query: torch.Tensor, key_text: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the text keys only: query ``[B, H, N, d]``, key_text ``[B, H, L, d]`` → float32 ``[B, H, N, L]``."""
    logits = torch.matmul(query * query.shape[-1] ** -0.5, key_text.transpose(-1, -2))
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # the up-cast happens inside the kernel
    if columns is not None:
        probs = probs.index_select(-1, columns.to(probs.device))
    return probs


class JointCaptureProcessor:
    """Base of the joint-attention capturing processors: options and the recording of maps.

    Subclasses compute the layer exactly like the stock processor they replace and call
    :meth:`capture` with the joint sequence's queries and keys.
    """

    def __init__(
        self,
        name: str,
        store: AttentionStore,
        keep_cond_only: bool = False,
        normalize: str = "joint",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        original: object | None = None,
    ) -> None:
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        self.name = name
        self.store = store
        self.keep_cond_only = keep_cond_only
        self.normalize = normalize
        self.chunk_size = chunk_size
        # diffusers' attention-dispatch settings of the replaced processor (set_attention_backend, context
        # parallelism): the output goes through the same kernel as without capture.
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    @staticmethod
    def accepts(attn: torch.nn.Module) -> bool:
        """Whether ``attn`` (holding the stock processor) attends to text, i.e. has maps to capture."""
        return True

    def capture(self, query: torch.Tensor, key: torch.Tensor, image: slice, text: slice) -> None:
        """Record the image→text map of one layer.

        query, key: ``[B, H, S, d]`` of the joint sequence, as the attention kernel sees them.
        """
        if self.keep_cond_only:  # classifier-free guidance batches are [uncond; cond]: skip the work on uncond
            half = query.shape[0] // 2
            query, key = query[half:], key[half:]
        q_img = query[:, :, image]
        if self.normalize == "text":
            probs = text_probs(q_img, key[:, :, text], self.store.columns)
        else:
            probs = joint_text_probs(q_img, key, text, self.store.columns, self.chunk_size)
        self.store.record(self.name, probs)

    def refuse_mask(self, attention_mask: torch.Tensor | None) -> None:
        # Flux's pipelines pass none; with one, the maps would need it too. Loud rather than wrong maps.
        if attention_mask is not None:
            raise NotImplementedError(f"{self.name}: capturing maps under an attention mask is not implemented")

    def text_len_of_single_stream(self, seq_len: int) -> int:
        """Text length of a layer that gets ``[text, image]`` already concatenated (Flux single-stream)."""
        n = self.store.text_len
        if n is None or not 0 < n < seq_len:
            raise RuntimeError(
                f"{self.name}: the text length of this single-stream layer is unknown ({n}) for a sequence "
                f"of {seq_len}; it is read from the model's encoder_hidden_states when the model runs "
                "inside AttentionCapture"
            )
        return n


class SD3JointCaptureProcessor(JointCaptureProcessor):
    """Capturing twin of ``JointAttnProcessor2_0`` (SD3 ``JointTransformerBlock.attn``), order ``[image, text]``."""

    @staticmethod
    def accepts(attn: torch.nn.Module) -> bool:
        # The same stock processor serves image-only self-attention (SD3.5's attn2, SD3 single blocks).
        return getattr(attn, "add_k_proj", None) is not None

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if encoder_hidden_states is None:
            raise ValueError(f"{self.name}: a joint-attention capture needs encoder_hidden_states")
        batch, n_image = hidden_states.shape[:2]

        def heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:  # [B, T, H*d] -> [B, H, T, d]
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = heads(query, head_dim), heads(key, head_dim), heads(value, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        ctx_q = heads(attn.add_q_proj(encoder_hidden_states), head_dim)
        ctx_k = heads(attn.add_k_proj(encoder_hidden_states), head_dim)
        ctx_v = heads(attn.add_v_proj(encoder_hidden_states), head_dim)
        if getattr(attn, "norm_added_q", None) is not None:
            ctx_q = attn.norm_added_q(ctx_q)
        if getattr(attn, "norm_added_k", None) is not None:
            ctx_k = attn.norm_added_k(ctx_k)
        query = torch.cat([query, ctx_q], dim=2)  # [B, H, N + L, d]
        key = torch.cat([key, ctx_k], dim=2)
        value = torch.cat([value, ctx_v], dim=2)

        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        self.capture(query, key, image=slice(0, n_image), text=slice(n_image, None))

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states, encoder_hidden_states = out[:, :n_image], out[:, n_image:]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states, encoder_hidden_states


class FluxCaptureProcessor(JointCaptureProcessor):
    """Capturing twin of ``FluxAttnProcessor`` (diffusers >= 0.35), double- and single-stream, order ``[text, image]``.

    Works in the stock layout ``[B, S, H, d]`` and calls the same ``dispatch_attention_fn`` with the
    replaced processor's backend, so the output is the stock one.
    """

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        self.refuse_mask(attention_mask)
        query, key, value, ctx_q, ctx_k, ctx_v = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))  # [B, T, H, d]
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            ctx_q, ctx_k, ctx_v = (x.unflatten(-1, (-1, attn.head_dim)) for x in (ctx_q, ctx_k, ctx_v))
            ctx_q, ctx_k = attn.norm_added_q(ctx_q), attn.norm_added_k(ctx_k)
            query = torch.cat([ctx_q, query], dim=1)  # [B, L + N, H, d]
            key = torch.cat([ctx_k, key], dim=1)
            value = torch.cat([ctx_v, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        out = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )  # fmt: skip
        n_text = (
            encoder_hidden_states.shape[1]
            if encoder_hidden_states is not None
            else self.text_len_of_single_stream(query.shape[1])
        )
        self.capture(query.transpose(1, 2), key.transpose(1, 2), image=slice(n_text, None), text=slice(0, n_text))

        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out  # single-stream: the block projects [attention, MLP] itself
        encoder_hidden_states, hidden_states = out.split_with_sizes([n_text, out.shape[1] - n_text], dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states


class FluxLegacyCaptureProcessor(JointCaptureProcessor):
    """Capturing twin of the older ``FluxAttnProcessor2_0`` / ``FluxSingleAttnProcessor2_0`` (diffusers < 0.35).

    Layout ``[B, H, S, d]`` and ``F.scaled_dot_product_attention`` as they use. RoPE comes in two forms:
    a tensor for ``apply_rope`` (diffusers 0.30) or a ``(cos, sin)`` pair for ``apply_rotary_emb``.
    """

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        self.refuse_mask(attention_mask)
        batch = hidden_states.shape[0]

        def heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:  # [B, T, H*d] -> [B, H, T, d]
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = heads(query, head_dim), heads(key, head_dim), heads(value, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            ctx_q = heads(attn.add_q_proj(encoder_hidden_states), head_dim)
            ctx_k = heads(attn.add_k_proj(encoder_hidden_states), head_dim)
            ctx_v = heads(attn.add_v_proj(encoder_hidden_states), head_dim)
            if getattr(attn, "norm_added_q", None) is not None:
                ctx_q = attn.norm_added_q(ctx_q)
            if getattr(attn, "norm_added_k", None) is not None:
                ctx_k = attn.norm_added_k(ctx_k)
            query = torch.cat([ctx_q, query], dim=2)  # [B, H, L + N, d]
            key = torch.cat([ctx_k, key], dim=2)
            value = torch.cat([ctx_v, value], dim=2)
        if isinstance(image_rotary_emb, torch.Tensor):
            from diffusers.models.attention_processor import apply_rope

            query, key = apply_rope(query, key, image_rotary_emb)
        elif image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query, key = apply_rotary_emb(query, image_rotary_emb), apply_rotary_emb(key, image_rotary_emb)

        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        n_text = (
            encoder_hidden_states.shape[1]
            if encoder_hidden_states is not None
            else self.text_len_of_single_stream(query.shape[2])
        )
        self.capture(query, key, image=slice(n_text, None), text=slice(0, n_text))

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        encoder_hidden_states, hidden_states = out[:, :n_text], out[:, n_text:]
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


# Stock processor class name -> its capturing twin. Names, not classes: each diffusers version has only
# some of them. The twins map to themselves, so that layers found while a capture is installed still count.
JOINT_CAPTURE: dict[str, type[JointCaptureProcessor]] = {
    "JointAttnProcessor2_0": SD3JointCaptureProcessor,
    "FluxAttnProcessor": FluxCaptureProcessor,
    "FluxAttnProcessor2_0": FluxLegacyCaptureProcessor,
    "FluxSingleAttnProcessor2_0": FluxLegacyCaptureProcessor,
}
JOINT_CAPTURE.update({cls.__name__: cls for cls in set(JOINT_CAPTURE.values())})


def joint_capture_class(attn: torch.nn.Module) -> type[JointCaptureProcessor] | None:
    """The capturing processor for a joint-attention module, by the type of its processor; None if none applies."""
    cls = JOINT_CAPTURE.get(type(getattr(attn, "processor", None)).__name__)
    return cls if cls is not None and cls.accepts(attn) else None


def token_grid(img_ids: torch.Tensor) -> tuple[int, int]:
    """``(h, w)`` of Flux's packed image tokens from their position ids.

    ``img_ids``: ``[N, 3]`` (or ``[B, N, 3]`` in diffusers < 0.31) with columns ``(0, row, col)`` in
    row-major order, as ``FluxPipeline`` builds them; checked, since the maps' rows are read in that
    order. One host sync per forward, on ``N × 2`` numbers.
    """
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    pos = ids[:, 1:].round().long().cpu()
    h, w = int(pos[:, 0].max()) + 1, int(pos[:, 1].max()) + 1
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    if pos.shape[0] != h * w or not torch.equal(pos, torch.stack([rows, cols], dim=-1).reshape(-1, 2)):
        raise ValueError(
            f"img_ids ({tuple(img_ids.shape)}) are not one row-major (row, col) grid from (0, 0); the maps' "
            "rows could not be placed (image-conditioned Flux variants, e.g. Kontext, are not supported)"
        )
    return h, w
