"""Latent cache: each image's VAE posterior mean and std (fp16, memory-mapped ``.npy``), so the frozen
encoder does not run every step.

Training samples ``z = mean + std * eps`` (:func:`sample_latents`), the same distribution as
``vae.encode(x).latent_dist.sample()`` every step; the trainer multiplies by
``vae.config.scaling_factor`` as it would after encoding. The cache is keyed by the VAE's identity
(hash of class, config and weights), the resolution, the crop rule and the record list (image file
names in order); a cache whose key does not match is refused with :class:`StaleCacheError`.

Layout: ``meta.json``, ``mean.npy`` / ``std.npy`` fp16 ``[N, C, S/f, S/f]``, ``ok.npy`` bool ``[N]``
(False: the image could not be read), ``sizes.npy`` int32 ``[N, 2]`` original (W, H) for mask crops.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokencompose.data import records as R
from tokencompose.data.images import load_image
from tokencompose.data.outputs import IN_PROGRESS, atomic_write_text, claim_output_dir, mark_complete, read_marker
from tokencompose.data.records import JsonlIndex
from tokencompose.errors import UserError

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: the record fingerprint includes file sizes
CROP = "resize-shorter-side+center-crop"


class StaleCacheError(RuntimeError):
    """The cache was built for another VAE, resolution, crop or record list."""


def vae_fingerprint(vae: Any) -> str:
    """Hash of the VAE's class, config and weights (weights hashed as stored, on CPU)."""
    h = hashlib.sha256(type(vae).__name__.encode())
    config = getattr(vae, "config", {})
    # Private keys (``_name_or_path``, ``_diffusers_version``, ...) change on save/load, not the model.
    public = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
    h.update(json.dumps(public, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        h.update(name.encode())
        t = tensor.detach().to("cpu").contiguous()
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def records_fingerprint(images: Sequence[str]) -> str:
    """Hash of the image file names and byte sizes, in order.

    Moving the folder keeps the cache valid; renaming, reordering or replacing an image (a new file
    of another size) does not. One ``stat`` per image, no reading: an edit that keeps the byte size
    exactly goes unnoticed.
    """
    h = hashlib.sha256()
    for path in images:
        try:
            size = os.path.getsize(path)
        except OSError:
            size = -1  # unreadable now (and marked missing in the cache if it was then)
        h.update(os.path.basename(path).encode() + f"\0{size}\0".encode())
    return h.hexdigest()[:32]


def _image_list(source: Any) -> list[str]:
    if isinstance(source, str | Path):
        source = JsonlIndex(source)
    return [source[i].image for i in range(len(source))]


def build_latent_cache(
    vae: Any,
    records: Sequence[R.Record] | str | Path,
    out: str | Path,
    image_size: int,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Encode every record's image (same resize + crop as training) and write the cache into ``out``.

    ``out`` is claimed with :func:`~tokencompose.data.outputs.claim_output_dir`: a complete cache of
    the same VAE, records, resolution and dtype is reused without encoding, an interrupted build is
    redone, anything else (another cache, a foreign folder) is refused. ``meta.json``, which
    :class:`LatentCache` needs, is written last and atomically.
    """
    from tqdm.auto import tqdm

    source = JsonlIndex(records) if isinstance(records, str | Path) else list(records)
    images = [source[i].image for i in range(len(source))]
    out = Path(out)
    vae = vae.to(device=device, dtype=dtype).eval()
    n = len(images)
    settings = _cache_settings(vae, images, image_size, dtype)
    _adopt_legacy_cache(out, settings)
    if claim_output_dir(out, LATENTS_COMMAND, settings, intact=lambda _: _files_present(out)) is not None:
        log.info("latent cache: %s already holds these latents; reused", out)
        return out
    (out / "meta.json").unlink(missing_ok=True)  # until the new arrays are complete, this is no cache
    mean_mm = std_mm = None
    ok = np.zeros(n, dtype=bool)
    sizes = np.zeros((n, 2), dtype=np.int32)
    # disable=None: a bar on a terminal only (no bar in logs, CI and tests)
    with tqdm(total=n, desc="prepare latents", unit="image", disable=None) as bar:
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            pixels, rows = [], []
            for i in range(start, stop):
                try:
                    px, sizes[i] = load_image(images[i], image_size)
                except (OSError, ValueError) as err:
                    log.warning("latent cache: cannot read %s (%s): row marked missing", images[i], err)
                    continue
                pixels.append(px)
                rows.append(i)
            if rows:
                with torch.no_grad():
                    dist = vae.encode(torch.stack(pixels).to(device=device, dtype=dtype)).latent_dist
                mean, std = dist.mean.float().cpu().numpy(), dist.std.float().cpu().numpy()
                if mean_mm is None:
                    shape = (n, *mean.shape[1:])
                    mean_mm = np.lib.format.open_memmap(out / "mean.npy", mode="w+", dtype=np.float16, shape=shape)
                    std_mm = np.lib.format.open_memmap(out / "std.npy", mode="w+", dtype=np.float16, shape=shape)
                mean_mm[rows] = mean.astype(np.float16)
                std_mm[rows] = std.astype(np.float16)
                ok[rows] = True
            bar.update(stop - start)
    if mean_mm is None:
        raise UserError(f"latent cache: none of the {n} images of the record list could be read; check their paths")
    mean_mm.flush()
    std_mm.flush()
    np.save(out / "ok.npy", ok)
    np.save(out / "sizes.npy", sizes)
    meta = {
        "version": CACHE_VERSION,
        "vae": settings["vae"],
        "vae_class": type(vae).__name__,
        "scaling_factor": float(getattr(vae.config, "scaling_factor", 1.0)),
        "resolution": int(image_size),
        "crop": CROP,
        "flip": False,
        "num_records": n,
        "records": settings["records"],
        "latent_shape": list(mean_mm.shape[1:]),
        "missing": int((~ok).sum()),
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))
    mark_complete(out, LATENTS_COMMAND, settings, rows=n)
    log.info(
        "latent cache: %d latents of shape %s written to %s (%d missing)", n, meta["latent_shape"], out, meta["missing"]
    )
    return out


LATENTS_COMMAND = "prepare latents"
_CACHE_FILES = ("meta.json", "mean.npy", "std.npy", "ok.npy", "sizes.npy")


def _cache_settings(vae: Any, images: Sequence[str], image_size: int, dtype: torch.dtype) -> dict[str, Any]:
    """What the cached values depend on: the cache key plus the encoding dtype."""
    return {
        "version": CACHE_VERSION,
        "vae": vae_fingerprint(vae),
        "resolution": int(image_size),
        "crop": CROP,
        "num_records": len(images),
        "records": records_fingerprint(images),
        "dtype": str(dtype),
    }


def _files_present(out: Path) -> bool:
    return all((out / name).is_file() for name in _CACHE_FILES)


def _adopt_legacy_cache(out: Path, settings: dict[str, Any]) -> None:
    """Mark a cache built before completion markers existed as complete when its key matches.

    Those versions wrote ``meta.json`` after the arrays, so a matching ``meta.json`` means a finished build.
    """
    if not out.is_dir() or read_marker(out) is not None or not _files_present(out):
        return
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return
    keys = ("version", "vae", "resolution", "crop", "num_records", "records")
    if all(meta.get(k) == settings[k] for k in keys) and settings["dtype"] == str(torch.float32):
        mark_complete(out, LATENTS_COMMAND, settings, rows=settings["num_records"])


class LatentCache:
    """A built cache, memory-mapped lazily in each (worker) process."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            if (read_marker(self.path) or {}).get("state") == IN_PROGRESS:
                raise FileNotFoundError(
                    f"{self.path} is an incomplete latent cache (its build was interrupted); "
                    "run `prepare latents` again with the same settings to finish it"
                )
            raise FileNotFoundError(
                f"{self.path} is not a latent cache (no meta.json); build it with `prepare latents`"
            )
        self.meta = json.loads(meta_path.read_text())
        self._arrays: tuple[np.ndarray, ...] | None = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"], state["_pid"] = None, -1  # never pickle memmaps: that would copy them
        return state

    def __len__(self) -> int:
        return int(self.meta["num_records"])

    def _open(self) -> tuple[np.ndarray, ...]:
        if self._arrays is None or self._pid != os.getpid():
            self._arrays = tuple(
                np.load(self.path / name, mmap_mode="r") for name in ("mean.npy", "std.npy", "ok.npy", "sizes.npy")
            )
            self._pid = os.getpid()
        return self._arrays

    def check(
        self,
        image_size: int | None = None,
        num_records: int | None = None,
        vae: Any = None,
        records: Sequence[R.Record] | str | Path | None = None,
        flip: bool = False,
    ) -> None:
        """Raise :class:`StaleCacheError` naming every part of the key that does not match."""
        m, problems = self.meta, []
        if m.get("version") != CACHE_VERSION:
            problems.append(f"cache format version {m.get('version')} != {CACHE_VERSION}")
        if m.get("crop") != CROP:
            problems.append(f"crop rule {m.get('crop')!r} != {CROP!r}")
        if image_size is not None and m["resolution"] != int(image_size):
            problems.append(f"resolution {m['resolution']} != {image_size}")
        if flip:
            problems.append("the cache holds unflipped latents; horizontal flip needs encoding every step")
        if num_records is not None and m["num_records"] != int(num_records):
            problems.append(f"{m['num_records']} cached records != {num_records} records in the dataset")
        if records is not None and m["records"] != records_fingerprint(_image_list(records)):
            problems.append("the record list (image names, order or file sizes) changed")
        if vae is not None and m["vae"] != vae_fingerprint(vae):
            problems.append(f"built with another VAE ({m['vae_class']} {m['vae'][:12]}...)")
        if problems:
            raise StaleCacheError(
                f"stale latent cache {self.path}: "
                + "; ".join(problems)
                + ". Rebuild it with `tokencompose prepare latents` into a new folder (or delete this one first)."
            )

    def get(self, i: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]] | None:
        """``(mean, std)`` float32 ``[C, h, w]`` and the original (W, H) of record ``i``; None if it was unreadable."""
        mean, std, ok, sizes = self._open()
        if not bool(ok[i]):
            return None
        w, h = (int(v) for v in sizes[i])
        return (
            torch.from_numpy(np.array(mean[i], dtype=np.float32)),
            torch.from_numpy(np.array(std[i], dtype=np.float32)),
            (w, h),
        )


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``mean + std * eps`` (unscaled; multiply by the VAE's ``scaling_factor`` as after ``encode``)."""
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + std * eps
