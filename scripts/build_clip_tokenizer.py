"""Build the CLIP BPE tokenizer files (vocab.json, merges.txt) shipped in tokencompose/assets.

Origin: ``bpe_simple_vocab_16e6.txt.gz`` — OpenAI CLIP's byte-pair vocabulary (MIT licence), the same
file that Stable Diffusion 1.x/2.x's tokenizer was built from. PyPI carries it inside the
``open-clip-torch`` wheel. The id assignment below follows CLIP's published scheme: 256 byte symbols,
the same with an end-of-word marker, one id per merge in file order, then the two special tokens,
49,408 ids in all (start = 49406, end = 49407).

Usage: python scripts/build_clip_tokenizer.py BPE_TXT_GZ OUT_DIR
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

NUM_MERGES = 49152 - 256 - 2


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for raw bytes used by GPT-2/CLIP byte-level BPE, in id order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def main(src: str, out: str) -> None:
    with gzip.open(src) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    print(f"wrote {len(tokens)} tokens and {len(merges)} merges to {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
