"""What produced a result: the versions of the packages that shape the numbers (one list for every output)."""

from __future__ import annotations

import platform
import sys
from importlib import metadata

PACKAGES = (
    "tokencompose", "torch", "diffusers", "transformers", "accelerate", "peft", "safetensors", "numpy", "pillow",
)  # fmt: skip


def package_versions() -> dict[str, str | None]:
    """``{"python", "platform", <package>: version or None}`` for this process."""
    out: dict[str, str | None] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
