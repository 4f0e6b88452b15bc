"""Noun phrases of a caption, picked the way the TokenCompose paper picked them, with spaCy's tagger.

Used when a row gives no phrases: the phrases to ground are chosen from the caption itself.

The paper's rule (its ``preprocess_data/gen_noun_tgt.py``): POS-tag the caption with flair's
``flair/pos-english`` tagger and take every maximal run of consecutive words whose Penn tag is a noun
tag (NN, NNS, NNP, NNPS) as one phrase, the words joined by a space; then ``list(set(...))``.

Ours: the same rule with spaCy's tagger (``token.tag_`` is the same Penn tag set; the default pipeline
is :data:`tokencompose.data.coco.SPACY_MODEL`). A "word" is what flair's tokenizer would have seen:

1. **Hyphenated compounds are one word.** flair splits a caption into words with segtok, which keeps
   ``pick-up``, ``close-up``, ``t-shirt``, ``double-decker`` whole, so its tagger gives the compound one
   tag; spaCy splits them into ``pick`` ``-`` ``up``, and the hyphen (tagged HYPH) would cut the run
   ("decker bus" instead of "double-decker bus", "t" and "shirt" instead of "t-shirt"). We join tokens
   linked by a ``-`` with no space on either side into one word and call it a noun when its **last**
   part is tagged as one (an English compound's head is its right-most part: ``close-up``, ``up`` NN, is
   a noun, ``heart-shaped``, ``shaped`` VBN, is not). A compound whose last part is a particle (``pick-up``,
   ``take-out``, ``carry-on``: spaCy tags ``up`` RP) is therefore not a noun, where flair often called
   it one; we did not add a rule for that pattern.
2. **Whitespace is not a word.** spaCy makes a token of every extra space (tag ``_SP``); segtok drops
   it. Such tokens neither start, end nor cut a run, so "sandwich  chips" stays one phrase.

The phrase is the caption's own text, ``doc[start:end].text`` from the run's first to its last token
(a double space inside stays double, a hyphen stays), so the token-span rule finds it in the caption.
The paper joined words with one space; the two differ only where the caption has a double space.

Deviations we keep on purpose (we do not reproduce the paper's tokenizer's quirks):

- **Punctuation never joins a phrase.** segtok sometimes leaves it attached ("bowl." at a caption's
  end, "broccoli,beans", "fork.A pipe"), so a few of the paper's phrases carry it; spaCy splits those
  and tags the punctuation as such, which gives "bowl", "broccoli" + "beans", "fork" + "pipe".
  Abbreviations spaCy keeps whole ("Dr. Pepper", "T.V. screen") stay as written.
- **Order and duplicates:** caption order, duplicates removed (first occurrence kept), where the
  paper's ``set`` left a random order. Deterministic output; the same set of phrases.
- The paper's word-piece branches (``##`` / ``@@``) never fire with flair's word-level tokens; spaCy
  has none either.

Everything else that differs from the paper's list is the two taggers disagreeing (the paper has
"bear" where we have "teddy bear": flair did not tag "teddy" as a noun, spaCy does; spaCy tags "kitten"
JJ in a few captions): measured, not patched. ``bench/noun_phrase_agreement.py`` measures the agreement
with the paper's list, with and without the two word rules above (``plain_tokens=True`` turns them off:
every spaCy token is a word); bench/RESULTS.md has the numbers (F1 0.955 over its 15,156 phrases).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from tokencompose.errors import UserError, one_line

INSTALL_HINT = 'pip install -e ".[grounded]"'
HYPHENS = frozenset({"-", "\u2010", "\u2011"})  # ASCII hyphen-minus, Unicode hyphen, non-breaking hyphen
# Components noun_phrases does not use; left out when loading (the tagger does not depend on them).
_UNUSED = ["parser", "ner", "lemmatizer", "senter"]


def load_nlp(model: str | None = None) -> Any:
    """The spaCy pipeline for :func:`noun_phrases` (tokenizer, tagger, attribute ruler).

    ``model`` is a package name or a folder; default :data:`tokencompose.data.coco.SPACY_MODEL`. spaCy
    or the model missing, or a model without a tagger, is a :class:`UserError`.
    """
    from tokencompose.data.coco import SPACY_MODEL

    name = model or SPACY_MODEL
    try:
        import spacy
    except ImportError as err:
        raise UserError(f"spaCy is not installed (noun phrases need it): {INSTALL_HINT}") from err
    try:
        nlp = spacy.load(name, exclude=_UNUSED)
    except OSError as err:  # E050: no package or folder of that name
        raise UserError(
            one_line(f"spaCy model {name} is not installed ({INSTALL_HINT} installs {SPACY_MODEL})")
        ) from err
    if "tagger" not in nlp.pipe_names:
        raise UserError(f"spaCy model {name} has no tagger (noun phrases need one): use {SPACY_MODEL}")
    return nlp


def _words(doc: Any, plain_tokens: bool) -> list[tuple[int, int]]:
    """Token spans ``[start, end)`` of the words of ``doc`` (whitespace tokens left out, see the module)."""
    if plain_tokens:
        return [(t.i, t.i + 1) for t in doc]
    words: list[tuple[int, int]] = []
    n = len(doc)
    i = 0
    while i < n:
        if doc[i].is_space:
            i += 1
            continue
        start, end = i, i + 1
        # extend over "-" + word while the hyphen touches both neighbours: pick-up, out-of-focus
        while (
            end + 1 < n
            and doc[end].text in HYPHENS
            and not doc[end - 1].whitespace_
            and not doc[end].whitespace_
            and not doc[end - 1].is_punct
            and not doc[end + 1].is_punct
            and not doc[end + 1].is_space
        ):
            end += 2
        words.append((start, end))
        i = end
    return words


def phrase_spans(doc: Any, *, plain_tokens: bool = False) -> list[tuple[int, int]]:
    """Token spans ``[start, end)`` of the maximal noun runs of a tagged ``doc``, in caption order.

    A word is a noun when its last token's fine tag starts with "NN"; whitespace tokens are skipped
    (they neither break nor end a run). ``plain_tokens=True``: every token is a word (the paper's rule
    applied to spaCy's tokens as they are, whitespace tokens included).
    """
    spans: list[tuple[int, int]] = []
    run: tuple[int, int] | None = None
    for start, end in _words(doc, plain_tokens):
        if doc[end - 1].tag_.startswith("NN"):
            run = (run[0] if run else start, end)
        elif run is not None:
            spans.append(run)
            run = None
    if run is not None:
        spans.append(run)
    return spans


def doc_noun_phrases(doc: Any, *, plain_tokens: bool = False) -> list[str]:
    """:func:`noun_phrases` of an already tagged spaCy ``doc``."""
    return list(dict.fromkeys(doc[s:e].text for s, e in phrase_spans(doc, plain_tokens=plain_tokens)))


def noun_phrases(text: str, nlp: Any) -> list[str]:
    """The caption's noun phrases (the module's rule): caption substrings, caption order, no duplicates."""
    return doc_noun_phrases(nlp(text))


def noun_phrases_batch(texts: Sequence[str], nlp: Any, batch_size: int = 256) -> list[list[str]]:
    """:func:`noun_phrases` of many captions, tagged in batches (``nlp.pipe``)."""
    return [doc_noun_phrases(doc) for doc in nlp.pipe(texts, batch_size=batch_size)]


def _rates(matched: int, reference: int, ours: int) -> tuple[float, float, float]:
    precision = matched / ours if ours else 0.0
    recall = matched / reference if reference else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def phrase_agreement(
    rows: Iterable[tuple[str, Sequence[str]]],
    nlp: Any,
    *,
    plain_tokens: bool = False,
    batch_size: int = 256,
    top: int = 10,
) -> dict[str, Any]:
    """How well our phrases of each caption agree with reference phrases of the same caption.

    ``rows``: ``(caption, reference phrases)``; a row's reference phrases count once each (the
    paper's lists are sets). Per row, a phrase of ours matches a reference phrase with the identical
    string (``matched``) or the same string up to letter case (``matched_ci``; one-to-one in both).
    Precision = matched / ours, recall = matched / reference, summed over all rows; ``rows_equal`` is
    the fraction of rows whose phrase set is exactly the reference's. ``misses`` (reference phrases we
    did not produce) and ``extras`` (ours not in the reference) list the ``top`` most frequent as
    ``[phrase, count]``, exact-string sense.
    """
    rows = list(rows)
    docs = nlp.pipe([caption for caption, _ in rows], batch_size=batch_size)
    n_ref = n_ours = matched = matched_ci = equal = 0
    misses: Counter[str] = Counter()
    extras: Counter[str] = Counter()
    for (_, reference), doc in zip(rows, docs, strict=True):
        ref = list(dict.fromkeys(reference))
        ours = doc_noun_phrases(doc, plain_tokens=plain_tokens)
        n_ref += len(ref)
        n_ours += len(ours)
        matched += len(set(ref) & set(ours))
        matched_ci += sum((Counter(p.lower() for p in ref) & Counter(p.lower() for p in ours)).values())
        equal += set(ref) == set(ours)
        misses.update(p for p in ref if p not in ours)
        extras.update(p for p in ours if p not in ref)
    precision, recall, f1 = _rates(matched, n_ref, n_ours)
    precision_ci, recall_ci, f1_ci = _rates(matched_ci, n_ref, n_ours)
    return {
        "rows": len(rows),
        "reference": n_ref,
        "ours": n_ours,
        "matched": matched,
        "matched_ci": matched_ci,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "precision_ci": precision_ci,
        "recall_ci": recall_ci,
        "f1_ci": f1_ci,
        "rows_equal": equal / len(rows) if rows else 0.0,
        "rows_equal_count": equal,
        "misses": [[p, c] for p, c in misses.most_common(top)],
        "extras": [[p, c] for p, c in extras.most_common(top)],
    }
