"""Probes of a base model: which cross-attention layers ground phrases (``tokencompose probe layers``)."""

from tokencompose.probe.layers import ProbeSettings, run_probe

__all__ = ["ProbeSettings", "run_probe"]
