"""Phrase -> token spans: which text-encoder positions a noun phrase occupies.

The paper's rule (``get_word_idx`` in its training code): tokenize caption and phrase without
special tokens, take the **first** contiguous occurrence of the phrase's tokens in the caption, and
shift by one for the start token, so the first word token has index 1. Every sub-token of a
multi-token phrase is supervised. Unlike the paper's code, which asserts and dies, a phrase that is
not found or that reaches past the text window is dropped with a logged warning.

That rule (``method="ids"``) relies on a word's ids not depending on its context, true of CLIP's BPE.
SentencePiece tokenizers (T5: a word's pieces differ with and without a preceding space, no start
token, ``"</s>"`` appended) need ``method="offsets"`` (any *fast* tokenizer): find the phrase in the
caption by characters (first case-insensitive occurrence at word boundaries, any whitespace run
between its words) and take every token whose character span overlaps it, plus a whitespace-only
"▁" piece right before it (:func:`offset_token_positions`). On CLIP both rules agree on the paper's
cases and on real captions; they differ where the ids rule matches a word-final piece inside a longer
word ("board" in "surfboard") or where phrase and caption space punctuation differently ("t-shirt" /
"t - shirt"): ``KNOWN_CLIP_DIFFERENCES`` in ``tests/test_tokens_offsets.py``.

Shapes: ``B`` captions, ``P`` phrases per caption (padded), ``T`` tokens per phrase (padded).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

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


SpanMethod = Literal["ids", "offsets"]


def id_token_positions(tokenizer: Any, caption: str, phrase: str) -> list[int] | None:
    """The paper's rule, without the window: first contiguous run of the phrase's ids in the
    caption's ids, shifted by one for the start token, or None. The phrase is lower-cased as the paper
    does (CLIP's tokenizer lower-cases anyway); case-sensitive tokenizers fall back to it as written."""
    text_ids = text_token_ids(tokenizer, caption)
    phrase_ids = text_token_ids(tokenizer, phrase.lower())
    start = find_span(text_ids, phrase_ids)
    if start is None and phrase != phrase.lower():
        phrase_ids = text_token_ids(tokenizer, phrase)
        start = find_span(text_ids, phrase_ids)
    if start is None:
        return None
    return [start + 1 + j for j in range(len(phrase_ids))]


def find_phrase_chars(caption: str, phrase: str) -> tuple[int, int] | None:
    """Character span ``[start, end)`` of the first occurrence of ``phrase`` in ``caption``, or None.

    Case-insensitive; the phrase's words may be separated by any whitespace run in the caption; an
    edge of the phrase that is a word character (``\\w``) must sit at a word boundary of the caption,
    so ``"cat"`` is not found in ``"category"`` or ``"bobcat"`` (but is in ``"cat's"`` and ``"(cat)"``).
    """
    words = phrase.split()
    if not words:
        return None
    pattern = r"\s+".join(re.escape(w) for w in words)
    if re.match(r"\w", words[0][0]):
        pattern = r"(?<!\w)" + pattern
    if re.match(r"\w", words[-1][-1]):
        pattern += r"(?!\w)"
    m = re.search(pattern, caption, flags=re.IGNORECASE)
    return m.span() if m else None


def overlapping_tokens(
    text: str, offsets: Sequence[tuple[int, int]], special: Sequence[int], span: tuple[int, int]
) -> list[int]:
    """Indices of the tokens whose character span overlaps ``span`` (half-open intervals).

    Special tokens and zero-width offsets never count. A non-special token right before the first hit
    whose characters up to ``span``'s start are all whitespace also counts: SentencePiece's word-start
    "▁" piece when its offsets cover the space before the word (T5 without ``WhitespaceSplit``).
    """
    start, end = span
    hits = [
        i
        for i, ((s, e), sp) in enumerate(zip(offsets, special, strict=True))
        if not sp and s < e and s < end and e > start
    ]
    if hits and hits[0] > 0:
        i = hits[0] - 1
        s, e = offsets[i]
        if not special[i] and s < e <= start and text[s:start].isspace():
            hits.insert(0, i)
    return hits


def offset_token_positions(tokenizer: Any, caption: str, phrase: str) -> list[int] | None:
    """Positions (in the caption's ids *with* special tokens) of the tokens covering the phrase's
    first occurrence (:func:`find_phrase_chars`, :func:`overlapping_tokens`), or None; no window.

    Needs a fast tokenizer (``return_offsets_mapping``). The positions are the real ones whether or
    not the tokenizer has a start token (CLIP: first word at 1; T5: at 0).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"method='offsets' needs a fast tokenizer (offset mapping); got {type(tokenizer).__name__}")
    span = find_phrase_chars(caption, phrase)
    if span is None:
        return None
    enc = tokenizer(
        caption, add_special_tokens=True, truncation=False, return_offsets_mapping=True, return_special_tokens_mask=True
    )
    hits = overlapping_tokens(caption, enc["offset_mapping"], enc["special_tokens_mask"], span)
    return hits or None


def phrase_token_positions(
    tokenizer: Any, caption: str, phrase: str, max_length: int | None = None, method: SpanMethod = "ids"
) -> list[int] | None:
    """Positions of ``phrase`` in the tokenized ``caption`` (with special tokens), or None if unusable.

    ``method``: ``"ids"`` is the paper's token-id rule (:func:`id_token_positions`, CLIP);
    ``"offsets"`` the character rule for fast tokenizers (:func:`offset_token_positions`, T5).
    ``max_length`` is the text window including special tokens (default
    ``tokenizer.model_max_length``, 77 for CLIP); a span that reaches the final (end-token) slot
    ``max_length - 1`` or beyond is unusable.
    """
    if max_length is None:
        max_length = int(getattr(tokenizer, "model_max_length", 77))
    if method == "ids":
        positions = id_token_positions(tokenizer, caption, phrase)
    elif method == "offsets":
        positions = offset_token_positions(tokenizer, caption, phrase)
    else:
        raise ValueError(f"method must be 'ids' or 'offsets', got {method!r}")
    if positions is None or positions[-1] > max_length - 2:  # the end token follows the last usable slot
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
    method: SpanMethod = "ids",
) -> PhraseTokens:
    """Token spans of every phrase of every caption (:func:`phrase_token_positions` with ``method``),
    padded to ``[B, P, T]``.

    Unusable phrases are dropped (logged); ``kept`` records which input phrases survived so callers
    can select the matching masks.
    """
    all_positions: list[list[list[int]]] = []
    kept: list[list[int]] = []
    for caption, caption_phrases in zip(captions, phrases, strict=True):
        spans, keep = [], []
        for k, phrase in enumerate(caption_phrases):
            pos = phrase_token_positions(tokenizer, caption, phrase, max_length, method)
            if pos is None:
                log.warning("dropping phrase %r: not found within the text window of %r", phrase, caption)
                continue
            spans.append(pos)
            keep.append(k)
        all_positions.append(spans)
        kept.append(keep)
    index, valid = pad_token_positions(all_positions)
    return PhraseTokens(index=index, valid=valid, kept=kept)
