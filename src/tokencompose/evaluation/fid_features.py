"""Inception features of image folders for FID / KID, through torch-fidelity, and the reference-statistics cache.

The extractor is torch-fidelity's ``FeatureExtractorInceptionV3``: the TensorFlow FID Inception (2015-12-05)
ported bit-exactly, TF1-style bilinear resize to 299 included; torchmetrics' FID wraps the same class.
Its weights are always read from a local file (``--inception-weights``; torch-fidelity's release file
``weights-inception-2015-12-05-6726825d.pth``, whose sha256 starts with ``6726825d``), never downloaded.

Before the extractor, every image is made square the way torch-fidelity's ``samples_resize_and_crop`` does
(shorter side resized to ``resize`` pixels, PIL bilinear, then a centre crop), so COCO's photos of many sizes
batch together and our features equal the library's own on the same folder; ``resize=0`` feeds images as
they are (they must then share one size).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokencompose.atomic import atomic_write_bytes, write_json_atomic
from tokencompose.errors import UserError

log = logging.getLogger(__name__)

LIBRARY = "torch-fidelity"
EXTRACTOR_NAME = "inception-v3-compat"  # torch-fidelity's registry name of the FID Inception
FEATURE_LAYERS = ("64", "192", "768", "2048")  # 2048: the pool3 features of the standard FID
STANDARD_WEIGHTS_PREFIX = "6726825d"  # sha256 prefix in the release file's name (torch.hub convention)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # what torch-fidelity's folder input reads


def library_version() -> str:
    """The installed torch-fidelity version (a UserError naming the install step when it is missing)."""
    from importlib import metadata

    try:
        return metadata.version("torch-fidelity")
    except metadata.PackageNotFoundError as err:
        raise UserError("FID needs torch-fidelity: pip install 'torch-fidelity>=0.4.0'") from err


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def list_images(folder: str | Path) -> list[Path]:
    """The PNG / JPEG files directly in ``folder``, sorted by name (torch-fidelity's order for the same folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"no .png / .jpg images in {folder}")
    return files


def images_digest(files: Sequence[Path]) -> str:
    """SHA-256 over (file name, content sha256) of an image list: the identity of a reference set."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\t{file_sha256(f)}\n".encode())
    return h.hexdigest()


def load_extractor(weights: str | Path, feature_layer: str = "2048", device: Any = "cpu") -> torch.nn.Module:
    """torch-fidelity's FID Inception with the state dict at ``weights``, on ``device``, in eval mode.

    The file is first read with ``weights_only=True`` (tensors only, no pickled code); a missing file, another
    kind of file or a state dict of another network is a :class:`UserError`. Calling the module on a uint8
    ``[B, 3, H, W]`` batch returns a one-tuple holding the float32 ``[B, D]`` features of ``feature_layer``.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    library_version()
    path = Path(weights)
    if feature_layer not in FEATURE_LAYERS:
        raise UserError(f"feature layer {feature_layer!r} is not one of {', '.join(FEATURE_LAYERS)}")
    if not path.is_file():
        raise UserError(f"Inception weights {path} do not exist: pass --inception-weights, a local .pth file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (any unreadable file is the user's)
        raise UserError(f"Inception weights {path} cannot be read as a state dict ({err})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"Inception weights {path} are not a state dict of tensors")
    try:
        model = FeatureExtractorInceptionV3(EXTRACTOR_NAME, [feature_layer], feature_extractor_weights_path=str(path))
    except RuntimeError as err:
        raise UserError(f"Inception weights {path} do not fit torch-fidelity's FID Inception: {err}") from err
    return model.to(device)


def save_random_inception(path: str | Path, seed: int = 0) -> Path:
    """A random-init state dict of the FID Inception at ``path``: for tests and offline smoke runs only.

    Convolutions get He-normal weights so activations neither vanish nor explode through the network (torch's
    default init shrinks them to ~1e-9 at pool3); its features are meaningless, its FID is not the paper's.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
            return None  # keep the fresh initialisation

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    empty = path.with_name(path.name + ".empty")
    torch.save({}, empty)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = _Unloaded(EXTRACTOR_NAME, ["2048"], feature_extractor_weights_path=str(empty))
            for module in model.modules():
                if isinstance(module, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    finally:
        empty.unlink(missing_ok=True)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _load_image(path: Path, resize: int) -> torch.Tensor:
    """``[3, H, W]`` uint8 RGB, made square as torch-fidelity's ``samples_resize_and_crop`` does."""
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF
    from PIL import Image

    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(f"image {path} cannot be read ({err})") from err
    if resize > 0:
        image = T.CenterCrop(resize)(T.Resize(resize)(image))
    return TF.pil_to_tensor(image)


@contextlib.contextmanager
def _full_precision() -> Iterator[None]:
    """No TF32 in the extractor's convolutions on Ampere+ GPUs (it shifts features at the 1e-3 level)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@torch.inference_mode()
def extract_features(
    extractor: torch.nn.Module,
    files: Sequence[Path],
    resize: int = 512,
    batch_size: int = 64,
    on_batch: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Float32 ``[N, D]`` features of ``files``, one row per file in the given order.

    ``resize``: shorter side to this many pixels and centre crop (0: as they are; then all must share one size).
    """
    device = next(extractor.parameters()).device
    rows = []
    with _full_precision():
        for b in range(0, len(files), batch_size):
            batch = [_load_image(f, resize) for f in files[b : b + batch_size]]
            sizes = {tuple(t.shape) for t in batch}
            if len(sizes) > 1:
                raise UserError(f"images of different sizes {sorted(sizes)[:3]}: pass --resize N (N > 0)")
            (features,) = extractor(torch.stack(batch).to(device))
            rows.append(features.float().cpu().numpy())
            if on_batch:
                on_batch(min(b + batch_size, len(files)), len(files))
    return np.concatenate(rows, axis=0)


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mu [D], sigma [D, D])`` as torch-fidelity computes them (``np.mean``, ``np.cov`` with N - 1)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    stats = fid_features_to_statistics(torch.from_numpy(np.ascontiguousarray(features)))
    return stats["mu"], stats["sigma"]


def reference_key(files_digest: str, weights_sha256: str, feature_layer: str, resize: int) -> str:
    """The cache key of a reference set's statistics: what changes its features, nothing else."""
    record = {"images": files_digest, "weights": weights_sha256, "layer": feature_layer, "resize": resize,
              "extractor": f"{LIBRARY}:{EXTRACTOR_NAME}"}  # fmt: skip
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def load_reference(cache: Path, key: str) -> dict[str, np.ndarray] | None:
    """Cached ``features``, ``mu`` and ``sigma`` of a reference set, or None (absent or unreadable: recompute)."""
    path = cache / f"{key}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            return {name: data[name] for name in ("features", "mu", "sigma")}
    except (OSError, ValueError, KeyError) as err:
        log.warning("reference cache %s is unreadable (%s): computing it again", path, err)
        return None


def save_reference(cache: Path, key: str, features: np.ndarray, record: dict[str, Any]) -> dict[str, np.ndarray]:
    """Store a reference set's features and statistics under ``cache/<key>.npz`` (+ a JSON record), atomically."""
    mu, sigma = statistics(features)
    buf = io.BytesIO()
    np.savez(buf, features=features, mu=mu, sigma=sigma)
    atomic_write_bytes(cache / f"{key}.npz", buf.getvalue())
    write_json_atomic(cache / f"{key}.json", record)
    return {"features": features, "mu": mu, "sigma": sigma}
