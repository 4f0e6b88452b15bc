"""One function per figure kind: run the model(s), aggregate, render, write the PNG and a manifest entry.

Every output folder gets a ``figures.json`` manifest (``[{"kind", "file", "title"}]``) that the HTML
report reads to place each figure in its section. Kinds: ``attention``, ``masks``, ``grid``, ``curves``.
Attention entries also list the words drawn (``"words": [{"text", "positions"}]``, positions: the maps' text
columns, e.g. T5 positions for Flux).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokencompose.atomic import write_json_atomic
from tokencompose.data.dataset import TokenDataset, collate
from tokencompose.data.images import load_image
from tokencompose.families import family_of
from tokencompose.loading import ModelSettings, default_image_size, load_model, release_memory
from tokencompose.train.curves import plot_loss_curves
from tokencompose.train.metrics import read_metrics
from tokencompose.visualize import aggregate as agg
from tokencompose.visualize import capture
from tokencompose.visualize.figures import attention_figure, grid_figure, mask_figure, save_png

log = logging.getLogger(__name__)

MANIFEST = "figures.json"


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:n] or "figure"


def add_to_manifest(folder: Path, kind: str, file: Path, title: str, **extra: Any) -> None:
    """Record one figure in ``folder/figures.json`` (replacing an entry for the same file)."""
    path = folder / MANIFEST
    entries = json.loads(path.read_text()) if path.is_file() else []
    entries = [e for e in entries if e.get("file") != file.name]
    entries.append({"kind": kind, "file": file.name, "title": title, **extra})
    write_json_atomic(path, entries)


def record_settings(files: Sequence[Path], settings: dict[str, Any]) -> None:
    """Store the settings that drew ``files`` in their manifest entries (``"settings"``)."""
    for folder in {Path(f).parent for f in files}:
        path = folder / MANIFEST
        if not path.is_file():
            continue
        names = {Path(f).name for f in files if Path(f).parent == folder}
        entries = json.loads(path.read_text())
        for entry in entries:
            if entry.get("file") in names:
                entry["settings"] = settings
        write_json_atomic(path, entries)


def _word_figure(
    image: np.ndarray,
    token_maps: dict[agg.Size, torch.Tensor],
    comps: Any,
    prompt: str,
    resolutions: Sequence[int] | None,
    words: Sequence[str] | None,
    special: bool,
    merge: str,
    cmap: str,
    title: str,
) -> tuple[Any, list[dict[str, Any]]]:
    """The figure and its words, ``[{"text", "positions"}]`` (positions: the maps' text columns)."""
    chosen = agg.select_sizes(token_maps, resolutions)
    combined = agg.combine_resolutions({s: token_maps[s] for s in chosen})  # [1, L, h, w]
    family = family_of(comps)
    tokenizer, spans = family.index_tokenizer(comps), family.span_finder(comps)
    ws = agg.phrase_words(spans, prompt, words) if words else agg.prompt_words(tokenizer, prompt, special)
    if words and special:
        ws = [*agg.prompt_words(tokenizer, prompt, True)[:1], *ws, *agg.prompt_words(tokenizer, prompt, True)[-1:]]
    per_word = agg.word_maps(combined, ws, merge)
    per_word = agg.normalize(agg.upsample(per_word, image.shape[:2]))[0].numpy()
    res = "+".join(str(s[0]) for s in chosen)
    fig = attention_figure(image, [w.text for w in ws], per_word, title=f"{title}  [attention {res}]", cmap=cmap)
    return fig, [{"text": w.text, "positions": list(w.positions)} for w in ws]


def attention_from_prompt(
    comps: Any,
    prompt: str,
    out: Path,
    seed: int = 0,
    steps: int = 50,
    guidance: float = 7.5,
    size: int | None = None,
    layers: Sequence[str] | None = None,
    resolutions: Sequence[int] | None = None,
    t_range: tuple[float, float] | None = None,
    words: Sequence[str] | None = None,
    special: bool = False,
    merge: str = "sum",
    cmap: str = "inferno",
    dpi: int = 150,
    device: Any = "cpu",
    label: str = "",
    normalize: str = "text",
    scheduler: str = "auto",
) -> Path:
    """Generate ``prompt`` with capture and write the per-word attention figure into ``out`` (a folder)."""
    image, maps, used = capture.generate_with_attention(
        comps, prompt, seed, steps, guidance, size, layers, None, t_range, device, scheduler, normalize
    )
    log.info("attention averaged over %d steps (timesteps %s..%s)", len(used), used[-1], used[0])
    title = f"{label + ': ' if label else ''}{prompt} (seed {seed})"
    fig, shown = _word_figure(image, maps, comps, prompt, resolutions, words, special, merge, cmap, title)
    file = save_png(fig, out / f"attention_{slug(label + '_' + prompt if label else prompt)}_s{seed}.png", dpi)
    add_to_manifest(out, "attention", file, title, prompt=prompt, seed=seed, timesteps=used, words=shown)
    return file


def attention_from_image(
    comps: Any,
    image_path: str | Path,
    caption: str,
    out: Path,
    seed: int = 0,
    noise_levels: Sequence[int] = (400,),
    size: int | None = None,
    layers: Sequence[str] | None = None,
    resolutions: Sequence[int] | None = None,
    words: Sequence[str] | None = None,
    special: bool = False,
    merge: str = "sum",
    cmap: str = "inferno",
    dpi: int = 150,
    device: Any = "cpu",
    label: str = "",
    normalize: str = "text",
) -> Path:
    """Per-word attention of an existing image + caption, noised at ``noise_levels`` with ``seed``."""
    size = size or default_image_size(comps)
    px, _ = load_image(image_path, size)  # the training pipeline's resize + centre crop
    maps = capture.image_attention(
        comps, px[None], [caption], noise_levels, seed, layers, None, device, normalize=normalize
    )
    title = f"{label + ': ' if label else ''}{caption} (t={','.join(map(str, noise_levels))}, seed {seed})"
    image = capture.to_uint8_image(px)
    fig, shown = _word_figure(image, maps, comps, caption, resolutions, words, special, merge, cmap, title)
    name = f"attention_{slug((label + '_' if label else '') + Path(image_path).stem + '_' + caption)}_s{seed}.png"
    file = save_png(fig, out / name, dpi)
    add_to_manifest(out, "attention", file, title, caption=caption, image=str(image_path), seed=seed, words=shown)
    return file


def mask_comparisons(
    data: str | Path,
    models: Sequence[tuple[str, ModelSettings]],
    out: Path,
    indices: Sequence[int] | None = None,
    num: int = 4,
    seed: int = 0,
    noise_levels: Sequence[int] = (400,),
    size: int | None = None,
    layers: Sequence[str] | None = None,
    resolutions: Sequence[int] | None = None,
    cmap: str = "inferno",
    dpi: int = 150,
    device: Any = "cpu",
    normalize: str = "text",
) -> list[Path]:
    """For dataset samples: each phrase's mask beside each model's attention for it; one PNG per sample.

    ``models``: ``(label, settings)`` pairs, loaded one at a time by the one loader.
    """
    first = load_model(models[0][1])
    size = size or default_image_size(first)
    family = family_of(first)
    ds = TokenDataset(
        data, family.index_tokenizer(first), size, attention_sizes=[(size, size)], **family.dataset_text(first)
    )
    idx = list(indices) if indices else list(range(min(num, len(ds))))
    batch = collate([ds[i] for i in idx])
    masks = batch["masks"][(size, size)].reshape(len(idx), -1, size, size)  # [B, P, S, S]
    per_model: dict[str, torch.Tensor] = {}
    scores: dict[str, torch.Tensor] = {}
    comps = first
    for k, (label, settings) in enumerate(models):
        if k > 0:
            comps = load_model(settings)
        geometry = {k: batch[k] for k in ("original_size", "crop_top_left")}
        maps = capture.image_attention(
            comps,
            batch["pixel_values"],
            batch["captions"],
            noise_levels,
            seed,
            layers,
            None,
            device,
            geometry,
            normalize,
        )
        chosen = agg.select_sizes(maps, resolutions)
        combined = agg.upsample(agg.combine_resolutions({s: maps[s] for s in chosen}), (size, size))
        # Phrase positions from this model's own tokenizer (a model may tokenize differently).
        pm = torch.zeros(len(idx), masks.shape[1], size, size)
        for b, (caption, phrases) in enumerate(zip(batch["captions"], batch["phrases"], strict=True)):
            for w in agg.phrase_words(family_of(comps).span_finder(comps), caption, phrases):
                pm[b, phrases.index(w.text)] = agg.word_maps(combined[b : b + 1], [w])[0, 0]  # the phrase map (sum)
        scores[label] = agg.mass_in_mask(pm, masks)
        per_model[label] = agg.normalize(pm)
        comps = first = None
        release_memory()
    files = []
    for b, i in enumerate(idx):
        phrases = batch["phrases"][b]
        image = capture.to_uint8_image(batch["pixel_values"][b])
        fig = mask_figure(
            image,
            phrases,
            masks[b, : len(phrases)].numpy(),
            {lab: m[b, : len(phrases)].numpy() for lab, m in per_model.items()},
            {lab: s[b, : len(phrases)].tolist() for lab, s in scores.items()},
            title=f"{batch['captions'][b]} (t={','.join(map(str, noise_levels))}, seed {seed})",
            cmap=cmap,
        )
        file = save_png(fig, out / f"masks_{i:05d}.png", dpi)
        add_to_manifest(
            out, "masks", file, batch["captions"][b], index=i, in_mask={k: v[b].tolist() for k, v in scores.items()}
        )
        files.append(file)
    return files


def model_grid(
    models: Sequence[tuple[str, ModelSettings]],
    prompts: Sequence[str],
    out: Path,
    seeds: Sequence[int] = (0,),
    steps: int = 50,
    guidance: float = 7.5,
    size: int | None = None,
    dpi: int = 150,
    device: Any = "cpu",
    name: str = "grid",
    scheduler: str = "auto",
) -> Path:
    """Same prompts and seeds for every model; models side by side, one row per (prompt, seed)."""
    images: dict[str, list[np.ndarray]] = {}
    for label, settings in models:
        comps = load_model(settings)
        pipe = capture.sampling_pipeline(comps, scheduler).to(device)
        rows = []
        for prompt in prompts:
            rows.extend(capture.seed_images(comps, prompt, seeds, steps, guidance, size, device, pipe=pipe))
        images[label] = rows
        del comps, pipe
        release_memory()
    captions = [f"{p} (seed {s})" for p in prompts for s in seeds]
    fig = grid_figure(images, captions)
    file = save_png(fig, out / f"{name}.png", dpi)
    add_to_manifest(out, "grid", file, f"{len(models)} models, {len(prompts)} prompts, seeds {list(seeds)}")
    return file


def loss_curves(run: str | Path, out: Path, smoothing: float = 0.9) -> Path:
    """Loss curves of a run folder (or its ``metrics.jsonl``) as ``out/loss_curves.png``.

    Drawn by the trainer's own figure (``tokencompose.train.curves``), so the report and the end of
    training show the same plot.
    """
    run = Path(run)
    rows = read_metrics(run / "metrics.jsonl" if run.is_dir() else run)
    out.mkdir(parents=True, exist_ok=True)
    file = plot_loss_curves(rows, out / "loss_curves.png", smoothing)
    if file is None:
        raise ValueError(f"{run}: no loss values in the metrics")
    add_to_manifest(out, "curves", Path(file), f"loss curves of {run.name}")
    return Path(file)
