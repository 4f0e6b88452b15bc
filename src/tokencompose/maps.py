"""Attention-map reduction, the one definition shared by the pixel loss, the grounding metric and the figures.

TokenCompose's pixel loss (the authors' ``get_grounding_loss_by_layer``) reads cross-attention this way,
and every other consumer of "a phrase's attention map" reads it the same way:

1. gather the columns of the phrase's tokens from each layer's probabilities ``A [B, H, N, L]``;
2. average over heads, then over the layers of one resolution (``mean_l mean_h A_{l,h}``);
3. a phrase's map is the **sum** of its tokens' columns: ``S_i[u] = sum_{t in T_i} A[u, t]``, the
   probability mass the phrase receives at position ``u`` (in [0, 1]; what the BCE scores).

Consumers may add a step of their own on top, named where they do it: the grounding metric upsamples
each resolution, averages resolutions and min-max normalises per phrase; figures normalise for display.
Pure tensor code. Shapes: ``B`` batch, ``H`` heads, ``N = h*w`` query positions, ``L`` text tokens,
``P`` phrases, ``T`` tokens per phrase, ``D`` channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def gather_phrase_columns(attn: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Columns of each phrase token: ``attn [B, H, N, L]``, ``index [B, P, T]`` -> ``[B, H, N, P, T]``.

    Padded token slots must hold a valid column (e.g. 0); their values are masked by the caller.
    """
    b, h, n, _ = attn.shape
    _, p, t = index.shape
    idx = index.reshape(b, 1, 1, p * t).expand(b, h, n, p * t)
    return attn.gather(-1, idx).reshape(b, h, n, p, t)


def gather_phrase_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of each phrase token from a per-token tensor: ``x [B, L, *F]``, ``index [B, P, T]`` -> ``[B, P, T, *F]``.

    The text-side twin of :func:`gather_phrase_columns` (text-encoder states ``[B, L, D]``, token maps
    ``[B, L, h, w]``). Indices are clamped into ``[0, L)``; padded slots are masked by the caller.
    """
    b, length = x.shape[:2]
    _, p, t = index.shape
    feat = x.shape[2:]
    idx = index.clamp(0, length - 1).reshape(b, p * t, *([1] * len(feat))).expand(b, p * t, *feat)
    return x.gather(1, idx).reshape(b, p, t, *feat)


def head_layer_mean(layers: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over heads (dim 1), then over layers: ``[[B, H, N, ...], ...]`` -> ``[B, N, ...]``.

    Written as ``sum / count`` over layers, the order of the authors' code (and of our parity fixtures).
    """
    if not layers:
        raise ValueError("no attention maps to reduce: was the model run inside AttentionCapture?")
    return sum(a.mean(1) for a in layers) / len(layers)


def sum_phrase_tokens(cols: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Phrase maps from head/layer-averaged columns: ``cols [B, N, P, T]``, ``valid [B, P, T]`` -> ``[B, P, N]``.

    The sum over each phrase's valid tokens (zero for a padded phrase).
    """
    return (cols * valid.unsqueeze(1).to(cols.dtype)).sum(-1).transpose(1, 2)


def phrase_maps(layers: Sequence[torch.Tensor], index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The phrase maps of one resolution: layers' ``[B, H, N, L]``, ``index``/``valid [B, P, T]`` -> ``[B, P, N]``.

    float32 whatever the capture's precision; padded token slots may hold any index.
    """
    index = torch.where(valid, index, torch.zeros_like(index))
    cols = [gather_phrase_columns(a.float(), index) for a in layers]
    return sum_phrase_tokens(head_layer_mean(cols), valid)
