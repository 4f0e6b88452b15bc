"""TokenCompose's objective, batched: denoising, token-level and pixel-level grounding losses.

Paper <-> code (TokenCompose, Wang et al., CVPR 2024, Sec. 3). Every term is per sample ``[B]``,
float32; the trainer averages the total over the batch.

==========  ===========================================  ==============================================
term        paper (Sec. 3)                               code
==========  ===========================================  ==============================================
L_denoise   ``L_LDM``: the latent-diffusion MSE          :func:`denoise_loss`; the target from
                                                         ``train.step.prediction_target``
L_token     the token-level attention loss               :func:`_token_term` (one layer) ->
                                                         :func:`token_loss_at` (one resolution) ->
                                                         :func:`grounding_losses` (``.token``)
L_pixel     the pixel-level attention loss: BCE of a     ``maps.head_layer_mean`` +
            phrase's attention map against its mask      ``maps.sum_phrase_tokens`` (the phrase map) ->
                                                         :func:`pixel_loss_at` (one resolution) ->
                                                         :func:`grounding_losses` (``.pixel``)
L           ``L_LDM + lambda*L_token + gamma*L_pixel``,  ``train.step.training_step``, weights
            lambda = 1e-3, gamma = 5e-5                  ``loss.token_weight`` / ``loss.pixel_weight``
==========  ===========================================  ==============================================

The formulas, with their reduction order (innermost first). ``A_{l,h}[u, t]``: cross-attention
probability of query position ``u`` (``N = h*w`` of them) for text token ``t``, head ``h``, supervised
layer ``l``; phrase ``i`` has token set ``T_i`` and binary mask ``M_i`` at the layer's resolution;
``mean_i`` runs over the phrases with at least one valid token; ``sum_res`` over attention resolutions,
``l in res`` over one resolution's layers.

* ``L_denoise = mean_{c,u} (pred - target)^2``; target: the noise, v or x0, by the scheduler's
  ``prediction_type``.
* ``a_h(t) = sum_u A_{l,h}[u,t] M_i[u] / sum_u A_{l,h}[u,t]`` (0 where the column sums to 0), and
  ``L_token = sum_res mean_i sum_{l in res} mean_{t in T_i} (1 - mean_h a_h(t))^2``: squared *after*
  the head mean, mean over the phrase's tokens, **summed** (not averaged) over the resolution's layers,
  mean over phrases, summed over resolutions.
* ``S_i[u] = sum_{t in T_i} mean_{l in res} mean_h A_{l,h}[u,t]`` (heads averaged first, then layers as
  ``sum_l / n_l``, then the phrase's tokens summed: :mod:`tokencompose.maps`, the map the grounding
  metric and the figures read too), and
  ``L_pixel = sum_res mean_i mean_u -[M_i log S_i + (1 - M_i) log(1 - S_i)]`` with each log clamped at
  -100 (torch's ``BCELoss``): mean over pixels, mean over phrases, summed over resolutions.

Exactness: the grounding terms reproduce the authors' ``get_grounding_loss_by_layer`` (reference values
computed by their code, ``tests/test_parity_official.py``), for a whole batch at once: no Python loop over
samples, phrases or tokens. All grounding math runs in float32 with autocast disabled, whatever the
model's precision. Guards that change nothing where the paper's code gives a finite value: a column
summing to 0 has share ``a_h = 0``; ``S_i`` is clamped into ``[0, 1]`` (a sum of probabilities can round a
hair above 1, where torch's BCE raises); a non-finite map gives NaN, not an exception (:func:`_bce`). A
sample without a valid phrase has grounding losses of exactly 0.

Inputs shared by the grounding losses:
    maps:  ``{(h, w): [A_1, A_2, ...]}`` cross-attention probabilities of one resolution's layers,
           each ``[B, H, N, L]`` (``N = h*w``; ``L`` text tokens, or a captured column subset).
    index: ``[B, P, T]`` long, token positions (columns of ``A``) of each phrase's tokens.
    valid: ``[B, P, T]`` bool, True for real tokens (padding is False; a phrase with no valid token
           is absent).
    masks: ``{(h, w): [B, P, N]}`` binary phrase masks already at that resolution (see ``masks.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokencompose.maps import gather_phrase_columns, head_layer_mean, sum_phrase_tokens

Size = tuple[int, int]


def denoise_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE between predicted and true noise (or v): ``[B, C, h, w]`` x2 -> ``[B]`` float32."""
    return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)


def _phrase_counts(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token counts ``[B, P]``, phrase validity ``[B, P]`` and phrase counts ``[B]`` (counts clamped >= 1)."""
    tokens = valid.sum(-1)
    phrase_valid = tokens > 0
    phrases = phrase_valid.sum(-1)
    return tokens.clamp_min(1), phrase_valid, phrases.clamp_min(1)


def _token_term(cols: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(1 - mean_h a_h(t))^2`` per token: cols ``[B, H, N, P, T]``, mask ``[B, P, N]`` -> ``[B, P, T]``.

    ``a_h(t) = sum_u A_h[u, t] M[u] / sum_u A_h[u, t]``: the share of token t's attention inside the mask.
    """
    inside = torch.einsum("bhnpt,bpn->bhpt", cols, mask)
    total = cols.sum(2)
    # A is non-negative, so total == 0 means inside == 0: define the share as 0 there (loss 1, no
    # gradient) instead of NaN; wherever the paper's value is finite it is unchanged.
    share = inside / torch.where(total > 0, total, torch.ones_like(total))
    return (1.0 - share.mean(1)) ** 2


@dataclass
class GroundingLosses:
    """Per-sample grounding losses (float32) and their per-resolution parts, all ``[B]``."""

    token: torch.Tensor
    pixel: torch.Tensor
    token_parts: dict[Size, torch.Tensor]
    pixel_parts: dict[Size, torch.Tensor]


def _prepare(
    maps: Mapping[Size, Sequence[torch.Tensor]],
    index: torch.Tensor,
    valid: torch.Tensor,
    masks: Mapping[Size, torch.Tensor],
):
    if not maps:
        raise ValueError("no attention maps given: was the UNet run inside AttentionCapture?")
    missing = [s for s in maps if s not in masks]
    if missing:
        raise KeyError(f"no masks for attention size(s) {missing}; masks are given for {list(masks)}")
    device = next(iter(maps.values()))[0].device
    index = index.to(device)
    valid = valid.to(device)
    # Padded token slots point at column 0 (the start token); their values are masked out below.
    index = torch.where(valid, index, torch.zeros_like(index))
    return index, valid, device


def token_loss_at(cols: Sequence[torch.Tensor], valid: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token loss of one resolution: summed over its layers, averaged over phrases -> ``[B]``.

    ``cols``: each layer's phrase columns ``[B, H, N, P, T]`` (:func:`gather_phrase_columns`).
    Per layer and phrase: mean over the phrase's tokens of ``(1 - mean_h a_h(t))^2``.
    """
    tokens, phrase_valid, phrases = _phrase_counts(valid)
    m = mask.float()
    vt = valid.float()
    total = 0.0
    for c in cols:
        term = _token_term(c, m)  # [B, P, T]
        total = total + (term * vt).sum(-1) / tokens  # [B, P]
    return (total * phrase_valid).sum(-1) / phrases


def pixel_loss_at(cols: Sequence[torch.Tensor], valid: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pixel loss of one resolution -> ``[B]``; ``cols`` as in :func:`token_loss_at`.

    Average the maps over heads, then over layers; a phrase's map is the sum of its tokens' columns,
    scored by binary cross-entropy against the mask (mean over pixels, logs clamped at -100 as torch's
    ``BCELoss``), averaged over phrases.
    """
    _, phrase_valid, phrases = _phrase_counts(valid)
    prob = sum_phrase_tokens(head_layer_mean(cols), valid)  # the shared phrase map S_i: [B, P, N]
    return (_bce(prob, mask.float()).mean(-1) * phrase_valid).sum(-1) / phrases


def _bce(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Elementwise ``BCELoss(reduction="none")`` that turns a non-finite probability into NaN, not an error.

    torch's BCE checks its input range (an exception on the CPU, a device assert on CUDA), so a
    diverged map would crash the step before ``train.nan_policy`` sees it. Non-finite entries are
    scored on a stand-in value and set back to NaN afterwards; finite ones go through torch's own
    kernel (its -100 log clamp and its gradient), so values match the paper's code exactly. No host sync.
    """
    bad = ~torch.isfinite(prob)
    # Rounding can push a sum of probabilities a hair above 1; BCE needs [0, 1].
    safe = torch.where(bad, torch.full_like(prob, 0.5), prob).clamp(0.0, 1.0)
    bce = F.binary_cross_entropy(safe, target, reduction="none")
    return torch.where(bad, torch.full_like(bce, float("nan")), bce)


def grounding_losses(
    maps: Mapping[Size, Sequence[torch.Tensor]],
    index: torch.Tensor,
    valid: torch.Tensor,
    masks: Mapping[Size, torch.Tensor],
    token: bool = True,
    pixel: bool = True,
) -> GroundingLosses:
    """``L_token`` and ``L_pixel`` per sample, summed over resolutions (the paper's objective terms).

    A sample without a valid phrase contributes exactly 0. Set ``token``/``pixel`` False to skip a term
    (its values are then zeros).
    """
    index, valid, device = _prepare(maps, index, valid, masks)
    b = index.shape[0]
    zero = torch.zeros(b, device=device)
    token_parts: dict[Size, torch.Tensor] = {}
    pixel_parts: dict[Size, torch.Tensor] = {}
    # BCE is autocast-unsafe and the paper's math is float32: run the losses outside autocast.
    with torch.autocast(device_type=device.type, enabled=False):
        for size, layers in maps.items():
            mask = masks[size].to(device)
            # Only the phrase columns matter: gather them once per layer for both terms.
            cols = [gather_phrase_columns(a.float(), index) for a in layers]
            if token:
                token_parts[size] = token_loss_at(cols, valid, mask)
            if pixel:
                pixel_parts[size] = pixel_loss_at(cols, valid, mask)
    token_total = sum(token_parts.values(), zero)
    pixel_total = sum(pixel_parts.values(), zero)
    return GroundingLosses(token_total, pixel_total, token_parts, pixel_parts)


def token_loss(maps, index, valid, masks) -> torch.Tensor:
    """``L_token`` per sample ``[B]`` (see :func:`grounding_losses`)."""
    return grounding_losses(maps, index, valid, masks, pixel=False).token


def pixel_loss(maps, index, valid, masks) -> torch.Tensor:
    """``L_pixel`` per sample ``[B]`` (see :func:`grounding_losses`)."""
    return grounding_losses(maps, index, valid, masks, token=False).pixel


def column_subset(index: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The token columns a batch supervises and its index into them: ``([K], [B, P, T])``.

    Compute it where the batch still lives on the CPU (``torch.unique`` needs the values); give the
    columns to :class:`~tokencompose.attention.AttentionCapture` so it keeps ``[B, H, N, K]`` instead of
    ``[B, H, N, L]``, and the returned index to the losses. At least one column is always kept.
    """
    columns = torch.unique(index[valid])
    if columns.numel() == 0:
        columns = torch.zeros(1, dtype=torch.long)
    return columns, remap_to_columns(index, valid, columns)


def remap_to_columns(index: torch.Tensor, valid: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Token positions -> positions within a captured column subset ``columns [K]``.

    Use when :class:`~tokencompose.attention.AttentionCapture` stored only some columns. Raises if a
    valid token's column was not captured.
    """
    size = int(max(int(columns.max()), int(index.max()))) + 1
    lookup = torch.full((size,), -1, dtype=torch.long, device=index.device)
    lookup[columns.to(index.device)] = torch.arange(len(columns), device=index.device)
    out = lookup[torch.where(valid, index, torch.zeros_like(index))]
    if bool(((out < 0) & valid).any()):
        raise ValueError("a supervised token's column was not captured")
    return torch.where(valid, out, torch.zeros_like(out))
