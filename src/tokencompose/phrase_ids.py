"""Phrase-text ids: the integer identity of a phrase's text, built in the data pipeline.

The ROI contrastive loss must know which phrases of the (global) batch share a text, without
touching strings in the training step or sending them between processes. ``collate`` turns each
phrase into an int64 (a stable hash of its normalised text), and the loss compares ids on the
device (:func:`tokencompose.roi.same_text_mask`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


def normalize_phrase(text: str) -> str:
    """Text identity used for masking: lower-case, surrounding and repeated whitespace removed."""
    return " ".join(text.lower().split())


def phrase_text_id(text: str) -> int:
    """Stable int64 id of a phrase's normalised text: the first 8 bytes of its BLAKE2b digest.

    The same on every process and every run (Python's ``hash`` is salted per process), so processes
    compare phrases by id without exchanging strings; two different texts collide with probability
    ~2^-64 per pair.
    """
    digest = hashlib.blake2b(normalize_phrase(text).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def phrase_text_ids(phrases: Sequence[Sequence[str]], num_phrases: int | None = None) -> torch.Tensor:
    """Per-sample phrase texts -> long ``[B, P]`` of :func:`phrase_text_id` (padding 0; validity is a mask).

    ``P`` is ``num_phrases`` or the longest list. Built in the data pipeline (``collate``), so the
    training step never touches a string.
    """
    p = max([len(t) for t in phrases] + [0]) if num_phrases is None else num_phrases
    out = torch.zeros(len(phrases), p, dtype=torch.long)
    for b, texts in enumerate(phrases):
        if texts:
            out[b, : len(texts)] = torch.tensor([phrase_text_id(t) for t in texts], dtype=torch.long)
    return out
