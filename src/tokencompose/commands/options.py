"""Command-line flags that fill typed settings: each flag names the dotted settings key it sets.

A flag's value lands at its key (``--guidance-scale 5`` -> ``generation.guidance_scale``) only when it is
given, so defaults live in one place, the settings dataclass. ``--config FILE`` (YAML) and positional
``key=value`` overrides go through the same typed parsing (:func:`tokencompose.typed_data.load_settings`),
so every command reports a bad setting the way ``train`` does.
"""

from __future__ import annotations

import argparse
from typing import Any

KEY_PREFIX = "settings:"  # argparse dests that are settings keys


def option(parser: Any, *flags: str, key: str, **kw: Any) -> None:
    """Add a flag that sets the dotted settings ``key`` (no default here: the dataclass has it).

    Its help names the key, so ``--guidance-scale 5`` and ``generation.guidance_scale=5`` read as one setting.
    """
    if kw.get("action") not in ("store_true", "store_false"):
        kw.setdefault("metavar", key.rsplit(".", 1)[-1].upper())
    kw["help"] = f"{kw['help']} [{key}]" if kw.get("help") else f"[{key}]"
    parser.add_argument(*flags, dest=KEY_PREFIX + key, default=argparse.SUPPRESS, **kw)


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` and positional ``key=value`` overrides."""
    parser.add_argument("--config", default=None, help="YAML file of settings (flags and key=value win over it)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted settings overrides")


def add_model_options(parser: argparse.ArgumentParser, key: str = "model") -> None:
    """``--model BASE [--checkpoint CK] [--ema]`` and where it runs: the same flags in every command."""
    g = parser.add_argument_group("model")
    option(g, "--model", key=f"{key}.model", help="base model: diffusers-layout folder or hub id")
    option(g, "--checkpoint", key=f"{key}.checkpoint", help="a training checkpoint of ours (step-N/): UNet or LoRA")
    option(g, "--ema", key=f"{key}.ema", action="store_true", help="with --checkpoint: its EMA UNet (unet_ema/)")
    option(g, "--lora-scale", key=f"{key}.lora_scale", help="strength of a LoRA checkpoint (1: as trained)")
    option(g, "--device", key=f"{key}.device", help="auto | cpu | cuda | cuda:N | mps")
    option(g, "--dtype", key=f"{key}.dtype", help="auto | fp32 | fp16 | bf16 (auto: fp16 on CUDA)")
    option(g, "--family", key=f"{key}.family", help="auto | sd | sdxl | sd3 | flux (auto: from the model_index.json)")


def settings_data(args: argparse.Namespace) -> dict[str, Any]:
    """The nested settings data of the flags given on the command line."""
    data: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if not dest.startswith(KEY_PREFIX):
            continue
        *parents, leaf = dest[len(KEY_PREFIX) :].split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return data


def settings_from_args(cls: type, args: argparse.Namespace, **fixed: Any) -> Any:
    """Typed settings of ``cls`` from ``--config``, the flags, ``fixed`` values and ``key=value`` overrides."""
    from tokencompose.typed_data import load_settings, merge

    data = merge(settings_data(args), fixed)
    return load_settings(cls, data, getattr(args, "overrides", None), getattr(args, "config", None))
