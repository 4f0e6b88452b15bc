"""``tokencompose evaluate fid``: FID / KID of generated images against real ones (the paper's Table 1).

captions (COCO captions JSON, Flickr30K token file, text or JSON list; ``--num-captions`` drawn with
``--caption-seed``) -> images (generated with ``--model``, resumable and sharded like MultiGen; or an existing
``--images`` folder) -> Inception features (torch-fidelity, weights from ``--inception-weights``, no download)
-> FID and KID in ``OUT/results.json``. Reference statistics are cached per reference set (``--cache``).

Flags set fields of :class:`tokencompose.evaluation.fid.FidSettings`; ``key=value`` sets any field.
"""

from __future__ import annotations

import argparse

from tokencompose.commands.generate import add_generation_options
from tokencompose.commands.options import add_model_options, add_settings_arguments, option


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``fid`` to the ``evaluate`` subcommands."""
    p = sub.add_parser("fid", help="FID / KID of generated images against real ones (torch-fidelity's Inception)")
    add_arguments(p)


def add_arguments(p: argparse.ArgumentParser) -> None:
    option(p, "--out", key="out", required=True, help="output folder (images/, captions.json, results.json)")
    option(p, "--name", key="name", help="label of this model in comparison tables")
    weights = "local .pth of the FID Inception (torch-fidelity's weights-inception-2015-12-05-6726825d.pth)"
    option(p, "--inception-weights", key="inception_weights", required=True, help=weights)
    option(p, "--reference", key="reference", required=True, help="folder of real images (e.g. COCO val2017)")
    option(p, "--images", key="images", help="without --model: score this folder; with it: generate here")
    c = p.add_argument_group("captions")
    option(c, "--captions", key="captions", help="COCO captions JSON, text file (image<TAB>caption) or JSON list")
    option(c, "--num-captions", key="num_captions", help="captions drawn without replacement (10000; 0: all)")
    option(c, "--caption-seed", key="caption_seed", help="seed of that draw (0)")
    f = p.add_argument_group("features")
    option(f, "--cache", key="cache", help="reference statistics cache (default ~/.cache/tokencompose/fid)")
    option(f, "--save-features", key="save_features", help="write real.npy and generated.npy here")
    option(f, "--feature-layer", key="feature_layer", help="2048 (standard FID) | 768 | 192 | 64")
    option(f, "--resize", key="resize", help="shorter side + centre crop before the extractor (512; 0: none)")
    option(f, "--feature-batch-size", key="batch_size", help="images per extractor call (64)")
    option(f, "--kid-subsets", key="kid_subsets", help="(100)")
    option(f, "--kid-subset-size", key="kid_subset_size", help="(1000, capped at the set sizes)")
    option(f, "--kid-seed", key="kid_seed", help="(2020)")
    add_model_options(p)
    add_generation_options(p)
    add_settings_arguments(p)


def run(args: argparse.Namespace) -> int:
    from tokencompose.commands.options import settings_from_args
    from tokencompose.evaluation.fid import FidSettings, run_fid

    settings = settings_from_args(FidSettings, args)
    result = run_fid(settings)
    if result:  # process 0 scores
        s, n = result["scores"], result["counts"]
        print(f"{settings.out}/results.json: FID {s['fid']:.4f}, KID {s['kid_mean']:.6f} ± {s['kid_std']:.6f} "
              f"({n['generated']} generated vs {n['real']} real images)")  # fmt: skip
    return 0
