"""Our spaCy noun-phrase rule vs the paper's phrases, on the paper's training list.

Reads the paper's ``coco_gsam_train_metadata.jsonl`` (caption ``text``, phrases ``attn_list``), picks
the phrases of every caption with :func:`tokencompose.data.noun_phrases.noun_phrases` and compares
them with the paper's, row by row (:func:`~tokencompose.data.noun_phrases.phrase_agreement`). Two
rows of results: ``plain`` (the paper's rule on spaCy's tokens as they are) and ``ours`` (hyphenated
compounds one word, whitespace tokens skipped: the module's rule). Also counts our phrases that the
token-span rule (:func:`tokencompose.tokens.find_phrase_chars`) does not find in their caption.

    python bench/noun_phrase_agreement.py [--data PATH] [--model NAME] [--limit N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "official" / "coco_gsam_train_metadata.jsonl"


def read_rows(path: Path, limit: int | None) -> list[tuple[str, list[str]]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                rows.append((record["text"], [phrase for phrase, _ in record["attn_list"]]))
            if limit is not None and len(rows) >= limit:
                break
    return rows


def _words(phrase: str) -> set[str]:
    return {w.lower() for w in re.findall(r"\w+", phrase)}


def breakdown(rows: list[tuple[str, list[str]]], ours: list[list[str]]) -> dict[str, int]:
    """Disagreements by kind. A missed paper's phrase that shares a word with one of ours in its row
    is a boundary disagreement ('bear' vs 'teddy bear'); one with punctuation right after a word of
    two or more lower-case letters ('bowl.', 'broccoli,beans') is one our rule never makes;
    the rest are words spaCy did not tag as nouns. Extras likewise (no word shared: flair's tagger
    did not tag it as a noun)."""
    out = dict.fromkeys(["miss_boundary", "miss_punct", "miss_untagged", "extra_boundary", "extra_untagged"], 0)
    for (_, ref), phrases in zip(rows, ours, strict=True):
        ref = list(dict.fromkeys(ref))
        ref_words = set().union(*map(_words, ref)) if ref else set()
        our_words = set().union(*map(_words, phrases)) if phrases else set()
        for p in ref:
            if p in phrases:
                continue
            if re.search(r"[a-z]{2}[.,;:!?]", p):  # 'bowl.', 'fork.A pipe'; not 'Dr. Pepper', 'T.V. screen'
                out["miss_punct"] += 1
            elif _words(p) & our_words:
                out["miss_boundary"] += 1
            else:
                out["miss_untagged"] += 1
        for p in phrases:
            if p not in ref:
                out["extra_boundary" if _words(p) & ref_words else "extra_untagged"] += 1
    return out


def line(name: str, r: dict) -> str:
    return (
        f"{name:6s} reference {r['reference']:6d}  ours {r['ours']:6d}  matched {r['matched']:6d} "
        f"(case-insensitive {r['matched_ci']:6d})  P {r['precision']:.4f}  R {r['recall']:.4f}  "
        f"F1 {r['f1']:.4f}  (ci F1 {r['f1_ci']:.4f})  rows equal {r['rows_equal_count']}/{r['rows']} "
        f"= {r['rows_equal']:.4f}"
    )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA, help="the paper's coco_gsam_train_metadata.jsonl")
    ap.add_argument("--model", default=None, help="spaCy pipeline (default: tokencompose's SPACY_MODEL)")
    ap.add_argument("--limit", type=int, default=None, help="first N rows only")
    ap.add_argument("--top", type=int, default=15, help="most frequent misses / extras to list")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)

    import spacy

    from tokencompose.data.noun_phrases import load_nlp, noun_phrases_batch, phrase_agreement
    from tokencompose.tokens import find_phrase_chars

    rows = read_rows(args.data, args.limit)
    nlp = load_nlp(args.model)
    meta = nlp.meta
    env = {
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "spacy": spacy.__version__,
        "model": f"{meta.get('lang', '')}_{meta.get('name', '')} {meta.get('version', '')}",
        "pipeline": list(nlp.pipe_names),
        "data": str(args.data),
    }
    print(
        f"{len(rows)} rows of {args.data.name}; spaCy {env['spacy']}, model {env['model']} "
        f"({', '.join(env['pipeline'])}), python {env['python']}"
    )

    results: dict = {"env": env}
    for name, plain in (("plain", True), ("ours", False)):
        t0 = time.perf_counter()
        r = phrase_agreement(rows, nlp, plain_tokens=plain, top=args.top)
        r["seconds"] = time.perf_counter() - t0
        results[name] = r
        print(line(name, r) + f"  [{r['seconds']:.1f} s]")

    t0 = time.perf_counter()
    ours = noun_phrases_batch([caption for caption, _ in rows], nlp)
    seconds = time.perf_counter() - t0
    pairs = [(p, c) for (c, _), phrases in zip(rows, ours, strict=True) for p in phrases]
    missing = [(p, c) for p, c in pairs if p not in c]
    unfound = [(p, c) for p, c in pairs if find_phrase_chars(c, p) is None]
    results["substring_misses"] = len(missing)
    results["token_rule_misses"] = [[p, c] for p, c in unfound]
    results["tag_seconds"] = seconds
    results["captions_per_second"] = len(rows) / seconds if seconds else 0.0
    print(
        f"our phrases: {sum(map(len, ours))}; not a caption substring: {len(missing)}; not found by the "
        f"token-span rule (find_phrase_chars): {len(unfound)}; noun_phrases_batch {len(rows) / seconds:.0f} "
        "captions/s"
    )
    for p, c in unfound[:10]:
        print(f"  not found: {p!r} in {c!r}")

    results["breakdown"] = breakdown(rows, ours)
    b = results["breakdown"]
    print(
        f"misses: {b['miss_boundary']} overlap one of ours (other extent), {b['miss_punct']} carry punctuation we "
        f"never join, {b['miss_untagged']} no noun of ours there; extras: {b['extra_boundary']} overlap a "
        f"paper's phrase, {b['extra_untagged']} no phrase of the paper's there"
    )
    r = results["ours"]
    print("most frequent misses (paper's phrase, not ours):", ", ".join(f"{p!r} {n}" for p, n in r["misses"]))
    print("most frequent extras (ours, not the paper's):  ", ", ".join(f"{p!r} {n}" for p, n in r["extras"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
