"""``tokencompose prepare shapes | coco | grounded | latents | official``: build training data in the one input format.

Every source is written as the paper's ``metadata.jsonl`` (+ mask PNGs, + optional ``boxes``), so
training reads one format; ``latents`` adds a VAE latent cache next to it; ``official`` checks a folder.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from tokencompose.commands.options import add_settings_arguments, option

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="source", metavar="SOURCE", required=True)

    p = sub.add_parser("shapes", help="render the built-in shapes world")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num", type=int, default=1000, help="number of scenes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=64, help="image side in pixels")
    p.add_argument("--min-objects", type=int, default=1)
    p.add_argument("--max-objects", type=int, default=4)
    p.add_argument("--colors", default=None, help="comma-separated subset of the palette")
    p.add_argument("--shapes", default=None, help="comma-separated subset of the shapes")
    p.add_argument("--world", default=None, choices=["attributes", "nouns"],
                   help="a named category set instead of --colors x --shapes: attributes (every colour in every "
                        "shape) or nouns (one fixed shape per colour)")  # fmt: skip
    p.add_argument("--max-occlusion", type=float, default=0.1, help="largest hidden fraction of an object")

    p = sub.add_parser("coco", help="COCO 2017 captions + instance masks -> metadata.jsonl + masks")
    p.add_argument("--captions", required=True, help="captions_*.json")
    p.add_argument("--instances", required=True, help="instances_*.json")
    p.add_argument("--images", required=True, help="folder of the split's images")
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, default=None, help="only the first N images (by id)")
    p.add_argument("--keep-unmatched", action="store_true", help="also write images with no masked noun")

    p = sub.add_parser("grounded", help="phrase masks for any image-caption set: detector boxes -> SAM masks")
    option(p, "--data", key="data", required=True, help="rows jsonl: file_name, text[, attn_list]")
    option(p, "--images", key="images", help="folder the file names start from (default: the jsonl's)")
    option(p, "--out", key="out", required=True, help="output folder (metadata.jsonl, seg/, QA)")
    option(p, "--detector", key="detector", help="hub id or folder (Grounding DINO, OWLv2, ...) or 'shapes'")
    option(p, "--detector-revision", key="detector_revision")
    option(p, "--segmenter", key="segmenter", help="hub id or folder (SAM, SAM-HQ, SAM 2) or 'box'")
    option(p, "--segmenter-revision", key="segmenter_revision")
    option(p, "--box-threshold", key="box_threshold", help="keep a box whose best phrase score exceeds this (0.25)")
    option(p, "--text-threshold", key="text_threshold", help="... and this (0.25)")
    option(p, "--phrases", key="phrases", help="auto | given | spacy")
    option(p, "--batch-size", key="run.batch_size", help="images per model call")
    option(p, "--shard", key="run.shard", help="this shard (default: accelerate's process index)")
    option(p, "--num-shards", key="run.num_shards")
    option(p, "--device", key="device", help="auto | cpu | cuda | cuda:N | mps")
    option(p, "--dtype", key="dtype", help="fp32 | fp16 | bf16")
    option(p, "--limit", key="limit", help="first N rows only")
    add_settings_arguments(p)

    p = sub.add_parser("latents", help="cache VAE posterior mean/std of every image")
    p.add_argument("--model", required=True, help="diffusers model folder (with vae/) or a VAE folder")
    p.add_argument("--data", required=True, help="metadata.jsonl")
    p.add_argument("--out", default=None, help="cache folder (default: <data folder>/latents_<resolution>)")
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("official", help="check a folder in the paper's format (metadata.jsonl + images + masks)")
    p.add_argument("--data", required=True, help="metadata.jsonl")
    p.add_argument("--root", default=None, help="folder relative paths start from (default: the file's)")
    p.add_argument("--max-rows", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    if args.source == "shapes":
        from tokencompose.data.shapes import make_shapes_dataset

        path = make_shapes_dataset(
            args.out,
            args.num,
            seed=args.seed,
            size=args.resolution,
            min_objects=args.min_objects,
            max_objects=args.max_objects,
            colors=args.colors.split(",") if args.colors else None,
            shapes=args.shapes.split(",") if args.shapes else None,
            max_occlusion=args.max_occlusion,
            world=args.world,
        )
        print(f"wrote {args.num} scenes: {path}")
        return 0
    if args.source == "coco":
        from tokencompose.data.coco import prepare_coco

        path, stats = prepare_coco(
            args.captions, args.instances, args.images, args.out, limit=args.limit, keep_unmatched=args.keep_unmatched
        )
        print(f"wrote {path}: {json.dumps(dict(sorted(stats.items())))}")
        return 0
    if args.source == "grounded":
        from tokencompose.commands.options import settings_from_args
        from tokencompose.data.grounded import GroundedSettings
        from tokencompose.data.grounded_run import prepare_grounded

        report = prepare_grounded(settings_from_args(GroundedSettings, args))
        if not report.complete:
            print(f"{report.out}: this shard is done; {report.stats.get('rows_pending', 0)} rows wait for other shards")
            return 0
        st = report.stats
        null = st.get("phrases_null", 0) / max(st.get("phrases", 0), 1)
        print(f"wrote {report.out / 'metadata.jsonl'}: {report.rows} rows, {st.get('phrases', 0)} phrases, "
              f"{st.get('phrases_with_mask', 0)} with a mask (null rate {null:.1%})")  # fmt: skip
        return 0
    if args.source == "latents":
        from diffusers import AutoencoderKL

        from tokencompose.data.latents import build_latent_cache

        model = Path(args.model)
        sub = "vae" if (model / "vae").is_dir() else None
        vae = AutoencoderKL.from_pretrained(str(model), subfolder=sub, local_files_only=model.exists())
        out = args.out or str(Path(args.data).parent / f"latents_{args.resolution}")
        build_latent_cache(vae, args.data, out, args.resolution, batch_size=args.batch_size, device=args.device)
        print(f"wrote latent cache: {out}")
        return 0
    if args.source == "official":
        from tokencompose.data.official import defects, validate
        from tokencompose.errors import UserError
        from tokencompose.models import clip_tokenizer

        counts = validate(args.data, root=args.root, tokenizer=clip_tokenizer(), max_rows=args.max_rows)
        print(json.dumps(dict(sorted(counts.items())), indent=2))
        bad = defects(counts)
        if bad:  # a check that finds broken inputs must not look like a pass to a script
            found = ", ".join(f"{k}={v}" for k, v in bad.items())
            raise UserError(
                f"{args.data}: {counts['rows']} rows checked, broken inputs found ({found}); fix or remove them"
            )
        print(f"{args.data}: {counts['rows']} rows checked, no broken inputs")
        return 0
    raise ValueError(f"unknown source {args.source!r}")
