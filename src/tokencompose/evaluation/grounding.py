"""Attention grounding: how well each phrase's cross-attention covers its mask -- what TokenCompose trains.

For images with captions and phrase masks (the shapes world, any Source-A dataset): encode the image,
noise its latent at chosen timesteps, run the UNet once per timestep while capturing cross-attention,
aggregate each phrase's attention (the shared phrase map of ``tokencompose.maps``: mean over heads and
layers of a resolution, sum over the phrase's tokens; then bilinear upsampling to the evaluation size,
mean over resolutions), normalise it to [0, 1] per phrase, and score it against the phrase mask: mean
IoU over a threshold sweep and AUROC; and how alike the phrases' maps of one image are (mean Pearson
correlation over phrase pairs, ``map_correlation``: near 1, every token lights the same region) and whether each
phrase's map prefers its own object to the image's other named objects (``specificity``: 0.5 is chance).

The pure functions take tensors; :func:`evaluate_grounding` runs the model. Shapes: ``B`` batch,
``P`` phrases, ``T`` tokens per phrase, ``H`` heads, ``N = h*w`` positions, ``L`` text tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from tokencompose.attention import AttentionCapture, select_layers
from tokencompose.evaluation.scoring import cluster_bootstrap_ci
from tokencompose.families import family_of
from tokencompose.maps import phrase_maps
from tokencompose.models import scale_latents

Size = tuple[int, int]
DEFAULT_THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(1, 10))


def phrase_score_maps(
    maps: Mapping[Size, Sequence[torch.Tensor]],
    token_index: torch.Tensor,
    token_valid: torch.Tensor,
    out_size: Size,
) -> torch.Tensor:
    """Per-phrase scores ``[B, P, h*w]`` at ``out_size`` in [0, 1]: what the metric thresholds.

    ``maps``: ``{(h, w): [Tensor[B, H, N, L], ...]}`` (one tensor per layer, as ``AttentionCapture.by_size``).
    Each resolution's phrase map is the shared definition (:func:`tokencompose.maps.phrase_maps`: heads and
    layers averaged, a phrase's tokens summed -- the pixel loss's map); the metric's own steps on top:
    bilinear upsampling to ``out_size``, mean over resolutions, min-max normalisation per phrase.
    """
    b, p, _ = token_index.shape
    total = None
    for (h, w), layers in maps.items():
        phrase = phrase_maps(layers, token_index, token_valid).reshape(b * p, 1, h, w)
        up = F.interpolate(phrase, size=out_size, mode="bilinear", align_corners=False)
        total = up if total is None else total + up
    if total is None:
        raise ValueError("no attention maps given")
    flat = (total / len(maps)).reshape(b, p, -1)
    lo = flat.min(dim=-1, keepdim=True).values
    hi = flat.max(dim=-1, keepdim=True).values
    return (flat - lo) / (hi - lo).clamp(min=1e-12)


def iou_sweep(
    scores: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> torch.Tensor:
    """IoU of ``scores > thr`` with ``masks`` per threshold and phrase: ``[len(thresholds), M]`` over valid phrases.

    ``scores`` ``[B, P, N]`` in [0, 1], ``masks`` bool ``[B, P, N]``, ``valid`` bool ``[B, P]``. An empty
    prediction against a non-empty mask has IoU 0 (the union is never empty for a valid phrase).
    """
    s, m = scores[valid], masks[valid].bool()  # [M, N]
    thr = torch.as_tensor(thresholds, dtype=s.dtype, device=s.device)[:, None, None]
    pred = s[None] > thr  # [Tn, M, N]
    inter = (pred & m[None]).sum(-1).float()
    union = (pred | m[None]).sum(-1).float()
    return inter / union.clamp(min=1)


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """AUROC of each row: ``scores [M, N]`` against bool ``labels [M, N]`` -> ``[M]`` (NaN where a row is one class).

    The Mann-Whitney statistic with average ranks for ties (equal to the area under the ROC curve).
    """
    s = scores.float()
    y = labels.bool()
    srt = s.sort(dim=-1).values
    below = torch.searchsorted(srt, s, right=False).float()  # how many are < x
    upto = torch.searchsorted(srt, s, right=True).float()  # how many are <= x
    rank = (below + upto + 1) / 2  # 1-based average rank
    n_pos = y.sum(-1).float()
    n_neg = y.shape[-1] - n_pos
    u = (rank * y).sum(-1) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)  # 0/0 -> NaN for one-class rows


def phrase_correlation(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of the maps of every pair of valid phrases of the same image: ``[M]`` over the pairs.

    ``scores`` ``[B, P, N]``, ``valid`` bool ``[B, P]``. How much a model's token maps differ: near 1 every
    phrase lights the same region (the map says nothing about which object is where), near 0 or below they
    are distinct. A constant map has correlation 0 with every other.
    """
    z = scores.float() - scores.float().mean(dim=-1, keepdim=True)
    z = z / z.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    corr = z @ z.transpose(1, 2)  # [B, P, P]
    p = scores.shape[1]
    upper = torch.ones(p, p, dtype=torch.bool, device=scores.device).triu(diagonal=1)
    return corr[valid[:, :, None] & valid[:, None, :] & upper]


def phrase_specificity(scores: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Does phrase i's map prefer object i to object j? ``[M]`` over ordered pairs (i, j), i != j, of one image.

    ``scores`` ``[B, P, N]``, ``masks`` bool ``[B, P, N]``, ``valid`` bool ``[B, P]``. For phrase i's map, the
    mean score inside mask i against the mean inside mask j: 1 if higher, 0 if lower, 0.5 on a tie. Means, not
    sums, so a large object does not win by its area; a per-phrase affine normalisation leaves it unchanged.
    Correlation says whether two maps differ; this says whether they differ the right way: a map that lights
    every object equally scores 0.5 (chance), one on its own object 1.
    """
    m = masks.float()
    inside = torch.einsum("bpn,bqn->bpq", scores.float(), m) / m.sum(-1)[:, None, :].clamp(min=1)  # [B, P, P]
    own = inside.diagonal(dim1=1, dim2=2)[:, :, None]  # [B, P, 1]: map i on mask i
    wins = (own > inside).float() + 0.5 * (own == inside).float()  # [B, P(map), P(mask)]
    p = scores.shape[1]
    other = ~torch.eye(p, dtype=torch.bool, device=scores.device)
    return wins[valid[:, :, None] & valid[:, None, :] & other]


def valid_phrases(token_valid: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Phrases that can be scored: ``[B, P]`` -- has tokens, mask neither empty nor everything."""
    area = masks.sum(-1)
    return token_valid.any(-1) & (area > 0) & (area < masks.shape[-1])


def summarize(
    ious: torch.Tensor,
    aucs: torch.Tensor,
    thresholds: Sequence[float],
    corr: torch.Tensor | None = None,
    spec: torch.Tensor | None = None,
    spec_counts: torch.Tensor | None = None,
) -> dict[str, Any]:
    """``ious [Tn, M]``, ``aucs [M]`` (, ``corr [pairs]``, ``spec [ordered pairs]``, ``spec_counts [B]``) -> mean
    IoU per threshold, best, mean AUROC, phrase count (, mean correlation between phrases' maps and the number of
    pairs; the mean specificity, None without pairs; with ``spec_counts``, the ordered pairs of each image in
    ``spec``'s order, its 95% CI, a bootstrap over images: ``specificity_ci95``)."""
    miou = ious.mean(dim=1) if ious.shape[1] else torch.full((len(thresholds),), float("nan"))
    out = {
        "thresholds": list(thresholds),
        "miou": [round(float(v), 6) for v in miou],
        "best_miou": round(float(miou.max()), 6),
        "best_threshold": float(thresholds[int(miou.argmax())]),
        "auroc": round(float(aucs.nanmean()), 6),
        "num_phrases": int(ious.shape[1]),
    }
    if corr is not None:
        out["map_correlation"] = round(float(corr.mean()), 6) if corr.numel() else None
        out["num_pairs"] = int(corr.numel())
    if spec is not None:
        out["specificity"] = round(float(spec.mean()), 6) if spec.numel() else None
    if spec is not None and spec_counts is not None:
        ci = cluster_bootstrap_ci(spec.numpy(), spec_counts.numpy())
        out["specificity_ci95"] = None if ci is None else [round(v, 6) for v in ci]
    return out


@dataclass
class _Tally:
    """The scores of one (layer group, timestep) cell, batch by batch; :meth:`summary` concatenates them."""

    ious: list[torch.Tensor] = field(default_factory=list)  # [Tn, M] per batch
    aucs: list[torch.Tensor] = field(default_factory=list)  # [M]
    corrs: list[torch.Tensor] = field(default_factory=list)  # [pairs]
    specs: list[torch.Tensor] = field(default_factory=list)  # [ordered pairs]
    spec_counts: list[torch.Tensor] = field(default_factory=list)  # [B]: ordered pairs of each image

    def add(self, pm: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor, thresholds: Sequence[float]) -> None:
        """Score one batch's phrase maps ``pm [B, P, N]`` against ``masks [B, P, N]``; ``valid [B, P]``."""
        self.ious.append(iou_sweep(pm, masks, valid, thresholds))
        self.aucs.append(auroc(pm[valid], masks[valid]))
        self.corrs.append(phrase_correlation(pm, valid))
        self.specs.append(phrase_specificity(pm, masks, valid))
        v = valid.sum(-1)
        self.spec_counts.append(v * (v - 1))  # phrase_specificity's pairs come image by image

    def summary(self, thresholds: Sequence[float]) -> dict[str, Any]:
        cat = torch.cat
        return summarize(
            cat(self.ious, dim=1), cat(self.aucs), thresholds, cat(self.corrs), cat(self.specs), cat(self.spec_counts)
        )


def evaluate_grounding(
    comps: Any,
    scheduler: Any,
    loader: Any,
    timesteps: Sequence[int] = (100, 300, 500),
    layers: Sequence[str] = ("mid", "up"),
    eval_size: Size | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    seed: int = 0,
    normalize: str = "text",
) -> dict[str, Any]:
    """Grounding scores of a model (``comps``: any family) over ``loader`` batches (``TokenDataset`` + ``collate``).

    The latent is the VAE posterior mean (deterministic); the noise of sample ``index`` at timestep ``t``
    comes from a CPU generator seeded by ``(seed, index, t)``, so scores do not depend on batch size or
    device. ``eval_size`` is the size of the batch's masks to score against (default: the largest).
    Returns metrics per timestep and for the map averaged over timesteps (``"mean"``).
    """
    scores, _ = evaluate_grounding_groups(
        comps, scheduler, loader, {"all": layers}, timesteps, eval_size, thresholds, seed, normalize
    )
    return scores["all"]


@torch.inference_mode()
def evaluate_grounding_groups(
    comps: Any,
    scheduler: Any,
    loader: Any,
    groups: Mapping[str, Sequence[str]],
    timesteps: Sequence[int] = (100, 300, 500),
    eval_size: Size | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    seed: int = 0,
    normalize: str = "text",
) -> tuple[dict[str, dict[str, Any]], dict[str, Size]]:
    """:func:`evaluate_grounding` of several layer groups from one UNet forward per (batch, timestep).

    ``groups``: ``{name: layer selection}`` (as ``layers`` of :func:`evaluate_grounding`); every group's
    layers are captured at once and each group is scored on its own maps only, so a group's scores equal
    :func:`evaluate_grounding` with ``layers=`` that selection. ``normalize``: joint-attention maps' normalisation
    (SD3 / Flux: ``joint`` | ``text``; UNets ignore it). Returns ``({name: scores}, {layer: (h, w)})``
    (the spatial size of each captured layer at the last batch's latent size).
    """
    unet, vae, family = comps.unet, comps.vae, family_of(comps)
    device, dtype = unet.device, unet.dtype
    names = {g: select_layers(unet, sel) for g, sel in groups.items()}
    captured = select_layers(unet, [n for ns in names.values() for n in ns])
    keys = [str(t) for t in timesteps] + ["mean"]
    tallies = {g: {k: _Tally() for k in keys} for g in groups}
    sizes: dict[str, Size] = {}
    images = 0
    with AttentionCapture(unet, layers=captured, normalize=normalize) as cap:
        for batch in loader:
            size = eval_size or max(batch["masks"], key=lambda s: s[0] * s[1])
            masks = batch["masks"][tuple(size)]
            valid = valid_phrases(batch["token_valid"], masks)
            pixels = batch["pixel_values"].to(device=device, dtype=vae.dtype)
            latents = scale_latents(vae, vae.encode(pixels).latent_dist.mean.float())
            cond = family.encode(comps, batch, tuple(pixels.shape[-2:]), dtype)
            tok_index, tok_valid = batch["token_index"].to(device), batch["token_valid"].to(device)
            per_t: dict[str, list[torch.Tensor]] = {g: [] for g in groups}
            for t in timesteps:
                noise = torch.stack(
                    [
                        torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(_seed(seed, int(i), t)))
                        for i in batch["index"]
                    ]
                ).to(device)
                tt = torch.full((latents.shape[0],), int(t), device=device, dtype=torch.long)
                noisy, t_model = family.noisy_at(scheduler, latents, noise, tt)
                family.predict(unet, noisy.to(dtype), t_model, cond)
                sizes.update({n: cap.size_of(n) for n in captured})
                for g, ns in names.items():
                    per_t[g].append(phrase_score_maps(cap.by_size(ns), tok_index, tok_valid, size).cpu())
            for g, maps_t in per_t.items():
                maps_t.append(torch.stack(maps_t).mean(dim=0))
                for key, pm in zip(keys, maps_t, strict=True):
                    # Renormalise the timestep mean (a mean of [0, 1] maps need not span [0, 1]).
                    lo, hi = pm.amin(-1, keepdim=True), pm.amax(-1, keepdim=True)
                    pm = (pm - lo) / (hi - lo).clamp(min=1e-12)
                    tallies[g][key].add(pm, masks, valid, thresholds)
            images += latents.shape[0]
    results = {}
    for g in groups:
        out: dict[str, Any] = {"timesteps": list(timesteps), "num_images": images, "per_timestep": {}}
        for key in keys:
            s = tallies[g][key].summary(thresholds)
            if key == "mean":
                out.update(s)
            else:
                out["per_timestep"][key] = s
        results[g] = out
    return results, sizes


def _seed(seed: int, index: int, t: int) -> int:
    return (seed * 1_000_003 + index) * 1_009 + int(t)
