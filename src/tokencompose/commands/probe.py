"""``tokencompose probe layers``: attention grounding of every cross-attention layer per timestep bucket.

For a base model (``--checkpoint`` for one of ours) and images with phrase masks (``--data`` or ``--shapes N``):
each candidate layer scored alone with ``evaluate grounding``'s metric (best mIoU over the threshold sweep,
AUROC) at each ``--timesteps`` bucket and for their mean. Writes ``probe.md``, ``probe.json``,
``probe_layers.png`` (+ ``figures.json``) and ``settings.json`` to ``--out``: the data for choosing the
supervised layers. Flags set fields of :class:`tokencompose.probe.ProbeSettings`; ``key=value`` sets any.
"""

from __future__ import annotations

import argparse

from tokencompose.commands.evaluate import add_grounding_options
from tokencompose.commands.options import option


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="probe", metavar="PROBE", required=True)
    la = sub.add_parser("layers", help="grounding (mIoU, AUROC) of each cross-attention layer per timestep")
    option(la, "--out", key="out", required=True, help="output folder (probe.md, probe.json, probe_layers.png)")
    option(la, "--name", key="name", help="label of the model in the table")
    add_grounding_options(
        la,
        timesteps="comma-separated timesteps, one bucket each (100,...,900)",
        layers="candidate layers (default: every text-attention layer; down, mid, up, joint, single, patterns)",
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tokencompose.commands.options import settings_from_args
    from tokencompose.probe import ProbeSettings, run_probe
    from tokencompose.probe.layers import TABLE_FILE

    settings = settings_from_args(ProbeSettings, args)
    result = run_probe(settings)
    best = max(result["layers"], key=lambda r: r["cells"]["mean"]["miou"])
    mean = best["cells"]["mean"]["miou"]
    print(f"{Path(settings.out) / TABLE_FILE}: {len(result['layers'])} layers x {len(result['buckets'])} buckets "
          f"in {result['seconds']:.1f} s; best mean mIoU {mean:.4f} at {best['name']}")  # fmt: skip
    return 0
