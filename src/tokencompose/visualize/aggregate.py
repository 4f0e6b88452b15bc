"""Per-word attention maps from captured cross-attention (pure: tensors in, tensors out).

Reduction order, as for the paper's figures: mean over heads, mean over the layers of one
resolution, accumulate over denoising timesteps (mean), then upsample each chosen resolution
bilinearly to a common size and average the resolutions (each resolution weighs the same however
many layers it has). Sub-tokens of a word are summed after that -- the phrase map of
:mod:`tokencompose.maps` -- and figures min-max normalise each map for display (:func:`normalize`).

Shapes: ``B`` batch, ``H`` heads, ``N = h*w`` query positions, ``L`` text tokens, ``W`` words.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tokencompose.maps import head_layer_mean
from tokencompose.tokens import text_token_ids

Size = tuple[int, int]

START, END = "<start>", "<end>"


@dataclass(frozen=True)
class Word:
    """A word of a prompt and the text-token positions it occupies (start token = 0)."""

    text: str
    positions: tuple[int, ...]


def prompt_words(
    tokenizer: Any,
    prompt: str,
    special: bool = False,
    punctuation: bool = False,
    max_length: int | None = None,
) -> list[Word]:
    """Split ``prompt`` into words, each with the positions of its sub-tokens in the encoder's input.

    CLIP's BPE marks the last sub-token of every word with ``</w>``, SentencePiece (T5) the first with
    ``▁``; sub-tokens are grouped by that mark (``"tokencompose"`` -> ``token`` + ``compose</w>`` -> one
    word). Tokenizers with neither get one word per token. Positions count a start token when the
    tokenizer adds one (CLIP: the first word is at 1; T5: at 0). Words past the text window are cut;
    punctuation-only words are dropped unless ``punctuation``; ``special`` adds the start token (if any)
    and the end token as words ``<start>``/``<end>``.
    """
    if max_length is None:
        max_length = int(getattr(tokenizer, "model_max_length", 77))
    ids = text_token_ids(tokenizer, prompt)
    full = list(tokenizer(prompt, truncation=False)["input_ids"])
    start = 1 if full[:1] != ids[:1] else 0  # a start token shifts every position by one
    ids = ids[: max_length - 1 - start]  # the window holds [start] + tokens + end
    tokens = tokenizer.convert_ids_to_tokens(ids)
    ends = any(t.endswith("</w>") for t in tokens)
    starts = not ends and any(t.startswith("▁") for t in tokens)
    groups: list[list[int]] = []
    for i, tok in enumerate(tokens):
        if (
            not groups
            or (ends and tokens[i - 1].endswith("</w>"))
            or (starts and tok.startswith("▁"))
            or not (ends or starts)
        ):
            groups.append([])
        groups[-1].append(i)
    words = []
    for group in groups:
        pieces = [tokens[i] for i in group]
        text = "".join(p.removesuffix("</w>") for p in pieces) if ends else tokenizer.convert_tokens_to_string(pieces)
        words.append(Word(text.strip(), tuple(i + start for i in group)))
    if not punctuation:
        words = [w for w in words if any(ch.isalnum() for ch in w.text)]
    if special:
        words = ([Word(START, (0,))] if start else []) + [*words, Word(END, (len(ids) + start,))]
    return words


def phrase_words(
    spans: Callable[[str, str], tuple[list[int] | None, Any]], prompt: str, phrases: Sequence[str]
) -> list[Word]:
    """Words for chosen phrases of ``prompt``, placed by the model's phrase-span rule ``spans`` (the training
    rule: :meth:`tokencompose.families.base.Family.span_finder`); phrases it cannot place are skipped."""
    out = []
    for phrase in phrases:
        pos, _ = spans(prompt, phrase)
        if pos is not None:
            out.append(Word(phrase, tuple(pos)))
    return out


def layer_mean(maps: Sequence[torch.Tensor], size: Size) -> torch.Tensor:
    """Maps of one resolution, ``[B, H, N, L]`` each -> mean over heads and layers, ``[B, L, h, w]`` float32."""
    h, w = size
    mean = head_layer_mean([m.detach().float() for m in maps])  # the shared reduction: [B, N, L]
    return mean.transpose(1, 2).reshape(mean.shape[0], mean.shape[2], h, w)


class TimestepAccumulator:
    """Running mean over denoising steps of head- and layer-averaged maps, per resolution.

    Keeps ``[B, L, h, w]`` per resolution (not every layer of every step), so memory is flat in the
    number of steps. ``sizes`` restricts which resolutions are kept (None = all).
    """

    def __init__(self, sizes: Iterable[Size] | None = None) -> None:
        self.sizes = None if sizes is None else {tuple(s) for s in sizes}
        self.sums: dict[Size, torch.Tensor] = {}
        self.count = 0

    def add(self, by_size: Mapping[Size, Sequence[torch.Tensor]]) -> None:
        """One step's ``{(h, w): [Tensor[B, H, N, L], ...]}`` (``AttentionCapture.by_size()``)."""
        added = False
        for size, maps in by_size.items():
            size = (int(size[0]), int(size[1]))
            if self.sizes is not None and size not in self.sizes:
                continue
            m = layer_mean(maps, size).cpu()
            self.sums[size] = self.sums[size] + m if size in self.sums else m
            added = True
        if added:
            self.count += 1

    def mean(self) -> dict[Size, torch.Tensor]:
        """``{(h, w): [B, L, h, w]}`` averaged over the steps added."""
        if self.count == 0:
            raise ValueError("no attention was captured: check the timestep range and the resolution set")
        return {s: v / self.count for s, v in sorted(self.sums.items())}


def combine_resolutions(per_size: Mapping[Size, torch.Tensor], size: Size | None = None) -> torch.Tensor:
    """``{(h, w): [B, L, h, w]}`` -> ``[B, L, *size]``: bilinear upsampling, then mean over resolutions.

    ``size`` defaults to the largest resolution present.
    """
    if not per_size:
        raise ValueError("no resolutions to combine")
    if size is None:
        size = max(per_size, key=lambda s: s[0] * s[1])
    ups = [upsample(m, size) for m in per_size.values()]
    return torch.stack(ups).mean(0)


def upsample(maps: torch.Tensor, size: Size) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, C, *size]`` bilinear (align_corners=False); identity at the same size."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps.float(), size=tuple(size), mode="bilinear", align_corners=False)


def word_maps(token_maps: torch.Tensor, words: Sequence[Word | Sequence[int]], merge: str = "sum") -> torch.Tensor:
    """Token maps ``[B, L, h, w]`` -> word maps ``[B, W, h, w]``, merging each word's sub-tokens.

    ``merge="sum"`` adds them: the phrase map of :mod:`tokencompose.maps`, the probability mass the pixel
    loss scores. ``"mean"`` averages them instead (a display choice; figures min-max normalise each map,
    so the two look the same there).
    """
    if merge not in ("mean", "sum"):
        raise ValueError(f"merge must be 'mean' or 'sum', got {merge!r}")
    out = []
    for w in words:
        pos = list(w.positions if isinstance(w, Word) else w)
        sel = token_maps[:, pos]
        out.append(sel.mean(1) if merge == "mean" else sel.sum(1))
    if not out:
        return token_maps.new_zeros(token_maps.shape[0], 0, *token_maps.shape[-2:])
    return torch.stack(out, 1)


def normalize(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Min-max scale each map ``[..., h, w]`` to [0, 1] independently (a constant map becomes 0)."""
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - lo) / (hi - lo).clamp_min(eps)


def mass_in_mask(maps: torch.Tensor, masks: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Share of each map's attention that falls inside its mask: ``Σ A·M / Σ A`` over ``[..., h, w]``.

    The quantity the token loss drives to 1 (``a(t)`` in the paper), a number to print under a figure.
    """
    m = masks.to(maps.dtype)
    return (maps * m).sum(dim=(-2, -1)) / maps.sum(dim=(-2, -1)).clamp_min(eps)


def select_sizes(available: Iterable[Size], resolutions: Sequence[int] | None) -> list[Size]:
    """Sizes whose height is in ``resolutions`` (None or empty = all); raises if none matches."""
    available = sorted({(int(h), int(w)) for h, w in available})
    if not resolutions:
        return available
    chosen = [s for s in available if s[0] in set(resolutions)]
    if not chosen:
        raise ValueError(f"no attention resolution in {list(resolutions)}; available: {[s[0] for s in available]}")
    return chosen
