"""CLIP score of generated images against their prompts, and the folder machinery the image-text scores share.

Rules, with their sources:

- **Embeddings** (both scores): CLIP's image embedding and text embedding (the projected pooled outputs,
  ``CLIPModel.get_image_features`` / ``get_text_features``), each L2-normalised; their dot product is the
  cosine ``c`` in [-1, 1]. Default model ``openai/clip-vit-base-patch32``, the ViT-B/32 that both
  T2I-CompBench (``CLIPScore_eval/CLIP_similarity.py``: ``clip.load("ViT-B/32")``) and Hessel et al. use.
- **Image preprocessing** is OpenAI CLIP's ``preprocess``: bicubic resize of the shorter side to the model's
  size (224), centre crop, [0, 1] scaling, CLIP mean/std. Done here with PIL as OpenAI's torchvision
  pipeline does (transformers' image processors may resize with another backend), sizes and mean/std read
  from the model folder's processor.
- **Text**: the prompt as written, CLIP's tokenizer, 77 tokens. Longer prompts are truncated here; OpenAI's
  ``clip.tokenize`` raises on them instead (deviation: no prompt of T2I-CompBench's val files is that long).
- **T2I-CompBench non-spatial** (Huang et al., NeurIPS 2023; ``CLIPScore_eval/CLIP_similarity.py``): the
  score of an image is the plain cosine ``c``, no scaling and no clipping; the category's score is the mean
  over its images (``non_spatial`` in :mod:`tokencompose.evaluation.compbench`).
- **CLIP score** (Hessel et al., "CLIPScore", EMNLP 2021): ``CLIP-S = w * max(c, 0)`` with ``w = 2.5``; the
  score is the mean over images. ``weight=100`` gives the other common convention (torchmetrics'
  ``CLIPScore``, ``100 * max(c, 0)``). Both the CLIP score and the raw cosine are reported.
- **Spread**: beside each mean, the standard deviation over images (ddof = 1; 0 for one image). The
  benchmarks report means only.

Images come from the same resumable, sharded, provenance-checked generation as MultiGen
(:func:`tokencompose.evaluation.run._generate`), one folder per prompt set, ``<uid>_<index>.png``; a prompt
file of plain text has one prompt a line and prompt id = its 0-based line number among the non-empty lines.
``images=DIR`` scores an existing folder of that layout without a model: every image must be there, read
back whole and, when it records its prompt (ours do), have been made from that prompt's text. Once every
shard's images are written, each process of an ``accelerate launch`` scores its shard of them and process 0
merges the rows in prompt order (:func:`tokencompose.sharding.shard_map`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from tokencompose.errors import UserError
from tokencompose.evaluation.generation import GenerationSettings, image_name
from tokencompose.evaluation.prompts import Prompt, PromptSettings, resolve_prompts
from tokencompose.evaluation.provenance import read_png
from tokencompose.loading import DTYPES, ModelSettings
from tokencompose.sharding import Shard, ShardSettings

log = logging.getLogger(__name__)

CLIP_MODEL = "openai/clip-vit-base-patch32"  # ViT-B/32: T2I-CompBench's and Hessel et al.'s
HESSEL_WEIGHT = 2.5  # CLIP-S = 2.5 * max(cos, 0) (Hessel et al. 2021)


@dataclass
class ClipSettings:
    """The CLIP model that embeds images and texts."""

    model: str = CLIP_MODEL
    """Hub id or local folder of a transformers ``CLIPModel`` with its processor."""
    revision: str | None = None
    """Hub revision."""
    batch_size: int = 32
    """Images (and texts) per model call."""
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    """Weights' precision (fp16 on a GPU is fine: cosines are computed in float32)."""


@dataclass
class ClipScoreSettings:
    """``tokencompose evaluate clipscore``: generate (or take) images of prompts, score CLIP-S and the cosine."""

    out: str = ""
    """Output folder (``images/``, ``results.json``, ``per_image.json``)."""
    name: str | None = None
    """Label of this model in comparison tables."""
    images: str | None = None
    """Score this existing folder (``<uid>_<index>.png``) without a model; default: generate into ``OUT/images``."""
    prompt_file: str | None = None
    """A text file, one prompt a line (e.g. a T2I-CompBench category file); else ``prompts`` says."""
    weight: float = HESSEL_WEIGHT
    """``w`` of ``w * max(cos, 0)``: 2.5 (Hessel et al.), 100 (torchmetrics)."""
    model: ModelSettings = field(default_factory=ModelSettings)
    prompts: PromptSettings = field(default_factory=PromptSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    clip: ClipSettings = field(default_factory=ClipSettings)
    run: ShardSettings = field(default_factory=ShardSettings)


def pixels(
    images: Sequence[Any], resize: int | tuple[int, int], crop: int | None, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """PIL images -> ``[B, 3, H, W]`` float32, normalised; torchvision's ``Resize`` / ``CenterCrop`` rules on PIL.

    ``resize``: an int sets the shorter side (the longer one ``int(size * long / short)``), ``(h, w)`` the
    exact size; bicubic. ``crop``: side of the centre crop (offsets ``round((side - crop) / 2)``), or None.
    """
    from PIL import Image

    out = []
    for im in images:
        im = im.convert("RGB")
        w, h = im.size
        if isinstance(resize, int):
            short, long = min(w, h), max(w, h)
            new_long = int(resize * long / short)
            size = (resize, new_long) if w <= h else (new_long, resize)
        else:
            size = (resize[1], resize[0])
        im = im.resize(size, Image.BICUBIC)
        if crop is not None:
            left, top = int(round((im.width - crop) / 2.0)), int(round((im.height - crop) / 2.0))
            im = im.crop((left, top, left + crop, top + crop))
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
    batch = torch.stack(out)
    return (batch - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _features(out: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output whose pooler output is it (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipScorer:
    """A transformers CLIP model and its processor: ``cosine(images, texts) -> [B]`` (float32, CPU)."""

    def __init__(self, settings: ClipSettings, device: str | torch.device = "cpu") -> None:
        from transformers import AutoProcessor, CLIPModel

        from tokencompose.hub import load_hf

        self.name, self.batch_size, self.device = str(settings.model), settings.batch_size, torch.device(device)
        self.processor, self.model, self.resolved_revision = load_hf(
            CLIPModel, AutoProcessor, self.name, settings.revision, DTYPES[settings.dtype], self.device, "CLIP model"
        )
        self.dtype = self.model.dtype
        ip = self.processor.image_processor
        self.resize = int(_get(ip.size, "shortest_edge"))
        crop = getattr(ip, "crop_size", None)
        self.crop = int(_get(crop, "height")) if crop is not None and getattr(ip, "do_center_crop", True) else None
        self.mean, self.std = list(ip.image_mean), list(ip.image_std)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @torch.inference_mode()
    def cosine(self, images: Sequence[Any], texts: Sequence[str]) -> torch.Tensor:
        """Cosine of each image's and its text's embedding: ``[B]`` float32 on the CPU (B = len(images))."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        out = []
        for s in range(0, len(images), self.batch_size):
            px = pixels(images[s : s + self.batch_size], self.resize, self.crop, self.mean, self.std)
            tok = self.processor.tokenizer(list(texts[s : s + self.batch_size]), padding=True, truncation=True,
                                           max_length=self.max_length, return_tensors="pt")  # fmt: skip
            img = _features(self.model.get_image_features(pixel_values=px.to(self.device, self.dtype))).float()
            tok = {k: tok[k].to(self.device) for k in ("input_ids", "attention_mask")}
            txt = _features(self.model.get_text_features(**tok)).float()
            cos = torch.nn.functional.normalize(img, dim=-1) * torch.nn.functional.normalize(txt, dim=-1)
            out.append(cos.sum(-1).cpu())
        return torch.cat(out) if out else torch.empty(0)

    def record(self) -> dict[str, Any]:
        """Provenance of the scorer in results."""
        return {"id": self.name, "revision": self.resolved_revision, "dtype": str(self.dtype)}


def _get(size: Any, key: str) -> Any:
    return size[key] if isinstance(size, dict) else getattr(size, key)


def clip_s(cosine: torch.Tensor, weight: float = HESSEL_WEIGHT) -> torch.Tensor:
    """Hessel et al.'s CLIP-S: ``weight * max(cosine, 0)``, elementwise (``[B]`` -> ``[B]``)."""
    return weight * cosine.clamp(min=0)


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Mean and standard deviation (ddof 1; 0 for one value) over images, and how many."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise UserError("no images to score")
    std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "num_images": int(v.size)}


def read_prompt_lines(path: str | Path) -> tuple[list[Prompt], dict[str, Any]]:
    """A plain-text prompt file (one prompt a line; blank lines skipped) -> prompts and a provenance record.

    Prompt id = 0-based index among the non-empty lines; the record holds the path and the file's SHA-256.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist (one prompt a line)")
    data = path.read_bytes()
    lines = [line.strip() for line in data.decode("utf-8").splitlines()]
    prompts = [Prompt(uid=i, categories=(), text=t) for i, t in enumerate(t for t in lines if t)]
    if not prompts:
        raise UserError(f"prompt file {path} holds no prompt")
    return prompts, {"file": str(path), "sha256": hashlib.sha256(data).hexdigest(), "num_prompts": len(prompts)}


def image_paths(prompts: Sequence[Prompt], images_per_prompt: int, folder: Path) -> list[tuple[Prompt, Path]]:
    """Every (prompt, image path) pair of ``folder``, checked: present, whole, made from that prompt's text."""
    pairs = [(p, folder / image_name(p.uid, i)) for p in prompts for i in range(images_per_prompt)]
    missing = [path.name for _, path in pairs if not path.is_file()]
    if missing:
        raise UserError(f"{len(missing)} images missing in {folder}, e.g. {missing[:3]}: generate them first")
    for p, path in pairs:
        intact, record = read_png(path)
        if not intact:
            raise UserError(f"image {path} is broken (truncated or empty): delete it and generate it again")
        if record is not None and record.get("prompt") != p.text:
            raise UserError(
                f"{path} was made from another prompt ({record.get('prompt')!r}, not {p.text!r}): "
                f"check the prompt file and --images-per-prompt, or use another --images folder"
            )
    return pairs


def load_images(paths: Sequence[Path]) -> list[Any]:
    """The images at ``paths`` as RGB PIL images."""
    from PIL import Image

    out = []
    for path in paths:
        with Image.open(path) as im:
            out.append(im.convert("RGB"))
    return out


def make_images(
    model: ModelSettings,
    prompts: list[Prompt],
    generation: GenerationSettings,
    run: ShardSettings,
    folder: Path,
    shard: Shard,
    given: bool,
) -> None:
    """Generate this shard's missing images of ``prompts`` into ``folder`` (nothing when the folder was ``given``)."""
    if given:
        if not folder.is_dir():
            raise UserError(f"image folder {folder} does not exist")
        return
    from tokencompose.evaluation.run import _generate

    _generate(model, prompts, generation, run, folder, shard)


def score_clip_pairs(scorer: ClipScorer, pairs: Sequence[tuple[Prompt, Path]], text_of: Any = None) -> list[float]:
    """Cosine per (prompt, image) pair, in order, ``scorer.batch_size`` images loaded at a time.

    ``text_of(prompt) -> str`` picks the text (default: the prompt's own).
    """
    out: list[float] = []
    bs = scorer.batch_size
    for s in range(0, len(pairs), bs):
        chunk = pairs[s : s + bs]
        texts = [text_of(p) if text_of else p.text for p, _ in chunk]
        out += scorer.cosine(load_images([path for _, path in chunk]), texts).tolist()
    return out


def run_clipscore(settings: ClipScoreSettings) -> dict[str, Any]:
    """``tokencompose evaluate clipscore``: images (generated or given) -> CLIP-S and cosine; writes results."""
    from tokencompose.evaluation.results import now_iso, package_versions, write_json_atomic
    from tokencompose.evaluation.run import SETTINGS_FILE, model_record, save_settings
    from tokencompose.sharding import resolve_shard, shard_map

    s = settings
    out = Path(s.out)
    folder = Path(s.images) if s.images else out / "images"
    if s.prompt_file:
        prompts, info = read_prompt_lines(s.prompt_file)
        if s.prompts.limit:
            prompts, info["limit"] = prompts[: s.prompts.limit], s.prompts.limit
    else:
        prompts, info = resolve_prompts(s.prompts)
        if "file" in info:  # a prompt JSON file (or a shipped set): name its content too
            info["sha256"] = hashlib.sha256(Path(info["file"]).read_bytes()).hexdigest()
    shard = resolve_shard(s.model.device, s.run)
    out.mkdir(parents=True, exist_ok=True)
    make_images(s.model, prompts, s.generation, s.run, folder, shard, given=bool(s.images))
    shard.wait()
    if shard.state is None and shard.index != 0:  # shards picked by hand: shard 0 scores once all are there
        return {}
    n = s.generation.images_per_prompt
    pairs = image_paths(prompts, n, folder)
    scorer = ClipScorer(s.clip, shard.device)
    rows = shard_map(shard, pairs, lambda chunk: score_clip_pairs(scorer, chunk), out / "parts", "cosine")
    if rows is None:  # a launched process other than 0: its rows went to process 0
        return {}
    cos = torch.tensor(rows, dtype=torch.float64)
    clip = clip_s(cos, s.weight)
    per_image = [{"image": path.name, "uid": p.uid, "prompt": p.text, "cosine": float(c), "clip_score": float(v)}
                 for (p, path), c, v in zip(pairs, cos, clip, strict=True)]  # fmt: skip
    write_json_atomic(out / "per_image.json", per_image)
    save_settings(out, s)
    gen_file = folder / "generation.json"
    result = {
        "kind": "clipscore",
        "name": s.name,
        "model": model_record(s.model) if s.model.model and not s.images else None,
        "prompts": info,
        "generation": read_json(gen_file),
        "images": str(folder),
        "images_per_prompt": n,
        "clip": scorer.record(),
        "weight": s.weight,
        "scores": {"clip_score": summary(clip.tolist()), "cosine": summary(cos.tolist())},
        "per_image": "per_image.json",
        "device": str(shard.device),
        "processes": shard.count if shard.state is not None else 1,
        "settings": SETTINGS_FILE,
        "environment": package_versions(),
        "created": now_iso(),
    }
    write_json_atomic(out / "results.json", result)
    return result


def read_json(path: Path) -> Any:
    """The JSON at ``path``, or None when there is no such file."""
    import json

    return json.loads(path.read_text()) if path.is_file() else None
