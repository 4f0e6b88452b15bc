"""A tiny T5-style SentencePiece tokenizer, built offline (no ``sentencepiece``, no network): the T5 tokenizer
of the tiny SD3 / Flux models that tests and CPU smoke runs build (``model.path=tiny``).

It reproduces what matters about T5's tokenizer for token spans: a Unigram model over "▁"-prefixed
pieces behind T5's pre-tokenizer (``WhitespaceSplit`` + ``Metaspace``, so whitespace runs collapse and
a word's pieces differ with and without a preceding space: ``"▁cat"`` vs ``"cat"``), no start token,
``"</s>"`` appended, ``"<pad>"`` (id 0) as pad and ``"<unk>"``. The vocabulary is written out, not
trained, so the pieces are the same under every ``tokenizers`` version: every word of :data:`CORPUS`
is one piece, a few words split into fixed pieces (:data:`SUBWORDS`), and any other word falls back to
"▁" plus one piece per character (e.g. ``"xylophone"``). Wrapped as ``T5TokenizerFast``, so
``return_offsets_mapping`` works (transformers 4.x and 5.x).

Usage::

    from tokencompose.t5_tokenizer import tiny_t5_tokenizer

    tok = tiny_t5_tokenizer(model_max_length=256)  # SD3's T5 window; Flux uses 512
    tok("a cat on a mat")["input_ids"]  # [..., 1]  ("</s>" = 1)
"""

from __future__ import annotations

import functools
import string

CORPUS = (
    "a cat sitting on a wooden bench next to a dog",
    "two dogs playing with a frisbee in the park",
    "a giraffe standing near a fence in a zoo",
    "a man riding a skateboard down the street",
    "a woman holding an umbrella in the rain",
    "a plate with a piece of bread and bananas",
    "a red car parked next to a blue truck",
    "a teddy bear sitting on a bed",
    "a person eating a hot dog at a table",
    "a bowl of fruit on a kitchen table",
    # the shapes world's captions (tiny SD3 / Flux models train on them)
    "a photo of a red circle, a green square, a blue triangle and a yellow cross",
    "there is a purple circle and a cyan square in the image of shapes",
)
# Multi-piece words: word -> its pieces (the first carries the "▁" of a word start).
SUBWORDS = {
    "skyscraper": ("▁sky", "scraper"),
    "bobcat": ("▁bob", "cat"),
    "category": ("▁cate", "gory"),
    "hotdog": ("▁hot", "dog"),
}
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5
ALPHABET = string.ascii_letters + string.digits + string.punctuation


@functools.lru_cache(maxsize=2)
def _tokenizer_json(whitespace_split: bool) -> str:
    """The serialized ``tokenizers.Tokenizer`` (built once): Unigram scores make a listed piece win
    over its characters, so Viterbi picks whole words, then the :data:`SUBWORDS` pieces, then characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    words = sorted({w for caption in CORPUS for w in caption.split()})
    pieces = [(t, 0.0) for t in SPECIAL_TOKENS]
    pieces += [("▁" + w, -2.0) for w in words]
    pieces += [(p, -4.0) for split in SUBWORDS.values() for p in split]
    pieces += [("▁", -6.0)] + [(c, -8.0) for c in ALPHABET]
    vocab: dict[str, float] = {}
    for piece, score in pieces:
        vocab.setdefault(piece, score)  # a word piece listed twice keeps its first score
    tok = Tokenizer(models.Unigram(list(vocab.items()), unk_id=SPECIAL_TOKENS.index("<unk>")))
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), metaspace]) if whitespace_split else metaspace
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    eos = SPECIAL_TOKENS.index("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
    )
    return tok.to_str()


def tiny_t5_tokenizer(model_max_length: int = 512, whitespace_split: bool = True):
    """A fresh ``T5TokenizerFast`` over the tiny vocabulary, with text window ``model_max_length``.

    ``whitespace_split=False`` drops the ``WhitespaceSplit`` step (the layout of SentencePiece itself):
    every space becomes a "▁" of its own, and a "▁" piece's offsets cover that space rather than the
    next word's first character.
    """
    from tokenizers import Tokenizer
    from transformers import T5TokenizerFast

    backend = Tokenizer.from_str(_tokenizer_json(whitespace_split))
    return T5TokenizerFast(
        tokenizer_object=backend,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=model_max_length,
    )
