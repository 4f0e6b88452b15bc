"""Run folder bookkeeping: the resolved config and a manifest of what produced the run."""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokencompose.atomic import atomic_write_text
from tokencompose.config import Config, load_config, save_config, to_dict
from tokencompose.versions import package_versions

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)


def git_commit() -> dict[str, Any] | None:
    """Commit (and dirty flag) of the source tree this package runs from, when it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        kw: dict[str, Any] = {"cwd": here, "capture_output": True, "text": True, "timeout": 10}
        sha = subprocess.run(["git", "rev-parse", "HEAD"], check=True, **kw).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **kw).stdout.strip()
        return {"commit": sha, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return None


def write_manifest(run_dir: Path, cfg: Config, info: dict[str, Any]) -> None:
    """``manifest.json``: versions, git commit, seed, device, precision, processes, command line."""
    manifest = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": sys.argv,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "git": git_commit(),
        "seed": cfg.train.seed,
        **info,
    }
    atomic_write_text(run_dir / "manifest.json", json.dumps(manifest, indent=2, default=str))


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config dicts."""
    changed = []
    for k in sorted(set(old) | set(new)):
        key = f"{prefix}{k}"
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += config_changes(a, b, key + ".")
        elif a != b:
            changed.append(f"{key}: {a!r} -> {b!r}")
    return changed


def write_config(run_dir: Path, cfg: Config) -> list[str]:
    """Save ``config.yaml``; returns how it differs from the one already there (a resumed run)."""
    path = run_dir / "config.yaml"
    changes = []
    if path.exists():
        try:
            changes = config_changes(to_dict(load_config(path)), to_dict(cfg))
        except Exception as err:  # an older schema: report, do not block the resume
            changes = [f"(previous config.yaml unreadable: {err})"]
    save_config(cfg, path)
    return changes


def announce_run(
    cfg: Config,
    accelerator: Accelerator,
    precision: str,
    global_batch: int,
    trainable: int,
    resumed: Path | None,
    step: int,
    family: str = "sd",
) -> None:
    """Write config.yaml and manifest.json, warn about config changes since the last start, log the plan.

    Main process only.
    """
    run_dir = Path(cfg.run_dir)
    for change in write_config(run_dir, cfg):
        log.warning("config differs from the run's previous config: %s", change)
    info = {
        "device": str(accelerator.device),
        "precision": {"requested": cfg.train.precision, "used": precision},
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "effective_batch": global_batch,
        "trainable_parameters": trainable,
        "resumed_from": str(resumed) if resumed else None,
        "resumed_step": step,
        "family": family,
    }
    write_manifest(run_dir, cfg, info)
    log.info(
        "training %s of %s (%s): %d steps, effective batch %d (%d x %d accumulation x %d processes), %s on %s",
        "LoRA adapters" if cfg.train.lora.rank > 0 else "the full UNet",
        cfg.model.path,
        family,
        cfg.train.max_steps,
        global_batch,
        cfg.train.batch_size,
        cfg.train.grad_accum,
        accelerator.num_processes,
        precision,
        accelerator.device,
    )
