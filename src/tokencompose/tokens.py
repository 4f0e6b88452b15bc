"""Phrase -> token spans: which text-encoder positions a noun phrase occupies.

The paper's rule (``get_word_idx`` in its training code): tokenize caption and phrase without
special tokens, take the **first** contiguous occurrence of the phrase's tokens in the caption, and
shift by one for the start token, so the first word token has index 1. Every sub-token of a
multi-token phrase is supervised. Unlike the paper's code, which asserts and dies, a phrase that is
not found or that reaches past the text window is dropped with a logged warning.

Shapes: ``B`` captions, ``P`` phrases per caption (padded), ``T`` tokens per phrase (padded).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


def find_span(text_ids: Sequence[int], phrase_ids: Sequence[int]) -> int | None:
    """Index of the first occurrence of ``phrase_ids`` as a contiguous run in ``text_ids``, else None."""
    n, m = len(text_ids), len(phrase_ids)
    if m == 0:
        return None
    first = phrase_ids[0]
    for i in range(n - m + 1):
        if text_ids[i] == first and list(text_ids[i : i + m]) == list(phrase_ids):
            return i
    return None


def text_token_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without start/end tokens and without truncation."""
    return list(tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"])


def input_ids(tokenizer: Any, captions: Sequence[str]) -> torch.Tensor:
    """Text-encoder input ``[B, L]`` long: start + tokens + end, truncated and padded to the window
    (``tokenizer.model_max_length``, 77 for CLIP)."""
    n = int(getattr(tokenizer, "model_max_length", 77))
    out = tokenizer(list(captions), padding="max_length", max_length=n, truncation=True, return_tensors="pt")
    return out["input_ids"]


def phrase_token_positions(
    tokenizer: Any, caption: str, phrase: str, max_length: int | None = None
) -> list[int] | None:
    """Positions of ``phrase`` in the tokenized ``caption`` (start token = 0), or None if unusable.

    ``max_length`` is the text window including start and end tokens (77 for CLIP); a span that
    reaches the end-token slot or beyond is unusable. The phrase is lower-cased as the paper does
    (CLIP's tokenizer lower-cases anyway; other tokenizers may not).
    """
    if max_length is None:
        max_length = int(getattr(tokenizer, "model_max_length", 77))
    text_ids = text_token_ids(tokenizer, caption)
    phrase_ids = text_token_ids(tokenizer, phrase.lower())
    start = find_span(text_ids, phrase_ids)
    if start is None and phrase != phrase.lower():
        # Case-sensitive tokenizers: fall back to the phrase as written.
        phrase_ids = text_token_ids(tokenizer, phrase)
        start = find_span(text_ids, phrase_ids)
    if start is None:
        return None
    positions = [start + 1 + j for j in range(len(phrase_ids))]
    if positions[-1] > max_length - 2:  # last usable slot is max_length - 2; the end token follows
        return None
    return positions


@dataclass
class PhraseTokens:
    """Padded phrase-token indices for a batch.

    Attributes:
        index: ``[B, P, T]`` int64 token positions (0 where padded).
        valid: ``[B, P, T]`` bool, True for real tokens.
        kept: for each caption, the indices (into its input phrase list) of the phrases kept.
    """

    index: torch.Tensor
    valid: torch.Tensor
    kept: list[list[int]]

    @property
    def phrase_valid(self) -> torch.Tensor:
        """``[B, P]`` bool: the phrase slot holds a real phrase."""
        return self.valid.any(-1)


def pad_token_positions(positions: Sequence[Sequence[Sequence[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ragged ``[B][P_b][T_bp]`` positions into ``index [B, P, T]`` and ``valid [B, P, T]``."""
    b = len(positions)
    p = max([len(x) for x in positions] + [1])
    t = max([len(s) for x in positions for s in x] + [1])
    index = torch.zeros(b, p, t, dtype=torch.long)
    valid = torch.zeros(b, p, t, dtype=torch.bool)
    for i, phrases in enumerate(positions):
        for j, span in enumerate(phrases):
            index[i, j, : len(span)] = torch.as_tensor(list(span), dtype=torch.long)
            valid[i, j, : len(span)] = True
    return index, valid


def phrase_tokens(
    tokenizer: Any,
    captions: Sequence[str],
    phrases: Sequence[Sequence[str]],
    max_length: int | None = None,
) -> PhraseTokens:
    """Token spans of every phrase of every caption, padded to ``[B, P, T]``.

    Unusable phrases are dropped (logged); ``kept`` records which input phrases survived so callers
    can select the matching masks.
    """
    all_positions: list[list[list[int]]] = []
    kept: list[list[int]] = []
    for caption, caption_phrases in zip(captions, phrases, strict=True):
        spans, keep = [], []
        for k, phrase in enumerate(caption_phrases):
            pos = phrase_token_positions(tokenizer, caption, phrase, max_length)
            if pos is None:
                log.warning("dropping phrase %r: not found within the text window of %r", phrase, caption)
                continue
            spans.append(pos)
            keep.append(k)
        all_positions.append(spans)
        kept.append(keep)
    index, valid = pad_token_positions(all_positions)
    return PhraseTokens(index=index, valid=valid, kept=kept)
