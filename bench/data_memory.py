"""Peak RSS of iterating a lazily loaded shapes dataset: 1k records vs 100k records.

Renders ``--unique`` real scenes once, then writes index files of 1k and 100k rows; the 100k rows
reuse the rendered files cyclically (each image/mask file is read ``100k / unique`` times), which
exercises exactly the same code path and memory as 100k distinct files minus the disk space.
Each size runs in a fresh process: build TokenDataset, iterate every record through a DataLoader
(batch 64, collate), report RSS after indexing and the peak RSS (ru_maxrss) at the end.

    python bench/data_memory.py [--unique 1000] [--sizes 1000 100000] [--workers 0]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(jsonl: str, workers: int) -> dict:
    import torch

    from tokencompose.data.dataset import TokenDataset, collate
    from tokencompose.models import clip_tokenizer

    tok = clip_tokenizer()
    base = rss_mb()
    t0 = time.time()
    ds = TokenDataset(jsonl, tok, image_size=64)
    indexed = rss_mb()
    loader = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=workers, collate_fn=collate)
    n = 0
    for batch in loader:
        n += batch["index"].numel()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(
        records=len(ds),
        iterated=n,
        rss_before_mb=base,
        rss_indexed_mb=indexed,
        peak_rss_mb=peak,
        index_bytes=int(ds.source.offsets.nbytes),
        seconds=time.time() - t0,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--unique", type=int, default=1000)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 100000])
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.workers)))
        return
    from tokencompose.data.shapes import make_shapes_dataset

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        src = make_shapes_dataset(Path(tmp) / "shapes", args.unique, seed=0, size=64)
        rows = src.read_text().splitlines()
        print(f"rendered {args.unique} scenes in {time.time() - t0:.1f}s", file=sys.stderr)
        for size in args.sizes:
            path = src.parent / f"index_{size}.jsonl"
            path.write_text("\n".join(rows[i % len(rows)] for i in range(size)) + "\n")
            out = subprocess.run(
                [sys.executable, __file__, "--measure", str(path), "--workers", str(args.workers)],
                check=True,
                capture_output=True,
                text=True,
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            result["jsonl_mb"] = path.stat().st_size / 2**20
            print(json.dumps(result))


if __name__ == "__main__":
    main()
