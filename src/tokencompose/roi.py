"""ROI-token contrastive alignment: an optional InfoNCE term between box features and phrase tokens.

For phrase ``i`` of the batch (one with a box and at least one token), the image side ``I_i`` pools
UNet decoder features inside its box (ROI-Align, then a mean over the output grid) and projects them;
the text side ``T_i`` averages the frozen text encoder's hidden states over the phrase's token span
and projects them. Both are L2-normalised, and

    L = mean_i  -log( exp(I_i.T_i / tau) / sum_{j in J(i)} exp(I_i.T_j / tau) )

where ``J(i)`` is ``i`` plus every phrase of the (global, under DDP) batch whose normalised text
differs from ``i``'s: a phrase with the same text elsewhere in the batch is neither a negative nor a
positive, it is removed from the denominator. ``tau`` is learnable (``log tau`` parameter). The
symmetric form averages this with the text->image direction.

No host syncs in the step: texts are compared through int64 ids that ``collate`` computes
(:func:`~tokencompose.phrase_ids.phrase_text_ids`, a stable hash of the normalised text, equal on
every process), the same-text mask is built on the device from them, and padding phrases stay in
the tensors as masked rows (every ``(b, p)`` slot is a row), so no shape depends on a device value.

The decoder features come from the same UNet forward that predicts the noise (a forward hook, no
second pass): :func:`decoder_feature_hook`.

Shapes: ``B`` batch, ``P`` phrases per sample, ``T`` tokens per phrase, ``L`` text length, ``D`` text
width, ``C`` feature channels, ``E`` embedding width, ``R = B*P`` phrase slots (row-major over ``(b, p)``),
``M`` rows of the InfoNCE (``R``, or the gathered rows of every process under DDP).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokencompose.maps import gather_phrase_rows
from tokencompose.roi_dist import gather_phrases, world

ROI_HEAD_FILE = "roi_head.safetensors"
TAU_INIT, TAU_MIN, TAU_MAX = 0.07, 0.01, 1.0  # CLIP's init; its logit-scale cap of 100 is tau >= 0.01


# --------------------------------------------------------------------------------------------------
# Image side
# --------------------------------------------------------------------------------------------------
class DecoderFeatureHook:
    """Captures the output ``[B, C, h, w]`` of one UNet submodule during the UNet's own forward.

    A forward pre-hook on the UNet clears the capture at the start of every UNet forward, and the
    block keeps the **first** output it produces in that forward (as :class:`AttentionStore` does):
    gradient checkpointing recomputes forwards during backward, and that recomputation must not
    replace the tensor the loss already holds. Pass the unwrapped UNet (not the DDP wrapper).
    """

    def __init__(self, unet: nn.Module, block: str = "up_blocks.2") -> None:
        self.unet = unet
        self.block = block
        try:
            self.module = unet.get_submodule(block)
        except AttributeError as err:
            blocks = [n for n, _ in unet.named_children()]
            raise ValueError(f"UNet has no submodule {block!r}; top-level children: {blocks}") from err
        self.features: torch.Tensor | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> DecoderFeatureHook:
        self._handles = [
            self.unet.register_forward_pre_hook(self._on_unet_start),
            self.module.register_forward_hook(self._on_block_output),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _on_unet_start(self, module: nn.Module, args: tuple) -> None:
        self.features = None

    def _on_block_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.features is not None:  # checkpoint recomputation or a second call: keep the first
            return
        out = output[0] if isinstance(output, (tuple, list)) else output
        if not (isinstance(out, torch.Tensor) and out.ndim == 4):
            raise TypeError(f"{self.block} output is not a [B, C, h, w] tensor: {type(out).__name__}")
        self.features = out


def decoder_feature_hook(unet: nn.Module, block: str = "up_blocks.2") -> DecoderFeatureHook:
    """Context manager capturing ``unet.<block>``'s output of the last UNet forward as ``.features``."""
    return DecoderFeatureHook(unet, block)


def block_channels(unet: nn.Module, block: str = "up_blocks.2") -> int:
    """Channels ``C`` of a diffusers UNet block's output (its last resnet's ``out_channels``)."""
    module = unet.get_submodule(block)
    resnets = getattr(module, "resnets", None)
    if resnets is not None and len(resnets) > 0:
        return int(resnets[-1].out_channels)
    if isinstance(getattr(module, "out_channels", None), int):
        return int(module.out_channels)
    raise ValueError(f"cannot infer the output channels of {block!r}; pass feature_dim explicitly")


def roi_features(
    features: torch.Tensor,
    boxes: torch.Tensor,
    box_valid: torch.Tensor,
    image_size: tuple[int, int],
    output_size: int = 2,
    sampling_ratio: int = 2,
    aligned: bool = True,
) -> torch.Tensor:
    """ROI-Align pooled features of every box slot: ``[B, C, h, w]``, ``[B, P, 4]``, ``[B, P]`` -> ``[B, P, C]``.

    Boxes are ``(x0, y0, x1, y1)`` in continuous image pixels (pixel ``k`` spans ``[k, k+1)``, so a
    mask's box has an exclusive max) of an image of ``image_size = (height, width)``. They are scaled to
    feature cells per axis (``x * w/width``, ``y * h/height``) before ``roi_align`` with ``spatial_scale=1``:
    the same as ``spatial_scale = h/height`` when the aspect ratios match, and still right when they do not.
    ``aligned=True`` puts cell centres at half-integers, which is what the pixel convention above needs.
    Each box gives an ``output_size x output_size`` grid (``sampling_ratio`` bilinear samples per bin
    side), averaged to one ``C`` vector. Float32.

    Every slot is pooled (fixed shapes: selecting the valid ones would need their count on the host);
    an invalid slot pools a dummy one-cell box and its row is zeroed, so it carries no gradient.
    """
    from torchvision.ops import roi_align

    b, p = box_valid.shape
    _, _, h, w = features.shape
    height, width = image_size
    valid = box_valid.to(features.device)
    # Scaled by Python scalars, not a constant tensor: copying one to the device would sync under CUDA.
    corners = boxes.to(device=features.device, dtype=torch.float32).reshape(b * p, 2, 2)  # [(x0, y0), (x1, y1)]
    cells = torch.stack([corners[..., 0] * (w / width), corners[..., 1] * (h / height)], dim=-1).reshape(b * p, 4)
    # Padding may hold NaN or empty boxes: pool the cell (0, 0, 1, 1) instead (its row is zeroed below).
    pad = ~valid.reshape(b * p, 1)
    dummy = torch.zeros_like(cells[:1])
    dummy[:, 2:] = 1.0
    cells = torch.where(pad, dummy, cells)
    batch_of = torch.arange(b, device=features.device, dtype=torch.float32).repeat_interleave(p)
    rois = torch.cat([batch_of[:, None], cells], dim=1)  # [B*P, 5]
    pooled = roi_align(
        features.float(), rois, output_size, spatial_scale=1.0, sampling_ratio=sampling_ratio, aligned=aligned
    )  # [B*P, C, o, o]
    return pooled.mean(dim=(-2, -1)).reshape(b, p, -1) * valid[..., None]


# --------------------------------------------------------------------------------------------------
# Text side
# --------------------------------------------------------------------------------------------------
def phrase_text_embeddings(hidden: torch.Tensor, token_index: torch.Tensor, token_valid: torch.Tensor) -> torch.Tensor:
    """Mean text-encoder state over each phrase's tokens: ``[B, L, D]``, ``[B, P, T]`` x2 -> ``[B, P, D]`` float32.

    A phrase without valid tokens (padding) gets zeros.
    """
    token_index, token_valid = token_index.to(hidden.device), token_valid.to(hidden.device)
    tokens = gather_phrase_rows(hidden.float(), token_index)  # [B, P, T, D]
    weight = token_valid.to(tokens.dtype)[..., None]
    return (tokens * weight).sum(dim=2) / weight.sum(dim=2).clamp_min(1.0)


def same_text_mask(ids: torch.Tensor) -> torch.Tensor:
    """Phrase-text ids ``[M]`` -> ``[M, M]`` bool: ``True`` where two phrases have the same text (diagonal too)."""
    return ids[:, None] == ids[None, :]


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------
def _zero(*tensors: torch.Tensor) -> torch.Tensor:
    """An exact float32 0 that keeps every input in the graph (DDP expects all parameters to get a gradient)."""
    total = tensors[0].float().sum()
    for x in tensors[1:]:
        total = total + x.float().sum()
    return total * 0.0


def info_nce(
    img: torch.Tensor,
    txt: torch.Tensor,
    tau: torch.Tensor,
    same_text: torch.Tensor,
    symmetric: bool = False,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE over ``M`` rows: ``img``, ``txt`` ``[M, E]`` (L2-normalised), ``tau`` scalar, ``same_text`` ``[M, M]``,
    ``valid`` ``[M]`` bool (default: every row is a phrase).

    The positive of row ``i`` is column ``i``; columns ``j != i`` with ``same_text[i, j]``, and padding
    rows/columns (``~valid``), are removed from the denominator (neither negative nor positive), likewise
    in the symmetric (image->text and text->image averaged) form. The mean runs over the valid rows.
    Padding is handled by masks, not by selecting rows, so nothing is read back to the host. Fewer
    than two phrases, or no pair with different texts, leave every row with only its positive: an
    exact 0 (``log_softmax`` of a lone logit), with exactly zero gradients, that keeps the graph.
    Float32 scalar.
    """
    m = img.shape[0]
    if m == 0:  # a static shape, not a value: no sync
        return _zero(img, txt, tau)
    eye = torch.eye(m, dtype=torch.bool, device=img.device)
    valid = torch.ones(m, dtype=torch.bool, device=img.device) if valid is None else valid.to(img.device)
    padding = ~(valid[:, None] & valid[None, :])
    # Symmetric by construction (so .T serves the other direction); the positive is never removed.
    removed = (same_text.to(img.device) | padding) & ~eye
    logits = (img.float() @ txt.float().T) / tau.float()  # [M, M], row i: image i against every text
    labels = torch.arange(m, device=img.device)
    weight = valid.float()
    count = weight.sum().clamp_min(1.0)

    def direction(scores: torch.Tensor) -> torch.Tensor:
        per_row = F.cross_entropy(scores.masked_fill(removed, float("-inf")), labels, reduction="none")
        return (per_row * weight).sum() / count  # padding rows are finite (their positive) and weigh 0

    loss = direction(logits)
    if symmetric:  # column j: text j against every image
        loss = 0.5 * (loss + direction(logits.T))
    return loss


@dataclass
class RoiOutput:
    """Result of :class:`RoiAlignmentHead`, all device tensors (nothing read back during the step):
    ``loss`` float32 scalar (global batch), ``tau`` detached scalar, ``num_phrases`` long scalar (phrases
    in the global batch), ``contrasted`` bool scalar (some pair of phrases has different texts)."""

    loss: torch.Tensor
    tau: torch.Tensor
    num_phrases: torch.Tensor
    contrasted: torch.Tensor

    @property
    def skipped(self) -> str | None:
        """Why the loss is 0 (None when it is not). Reads values back to the host: for logs and tests."""
        m = int(self.num_phrases)
        if m < 2:
            return f"{m} valid phrase(s) in the batch"
        if not bool(self.contrasted):
            return "every phrase of the batch has the same text"
        return None


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


class RoiAlignmentHead(nn.Module):
    """Projection heads (image ``C -> E``, text ``D -> E``, Linear-GELU-Linear) and the learnable temperature.

    ``tau = exp(log_tau)`` is used clamped to ``[tau_min, tau_max]`` (default ``[0.01, 1]``: CLIP's
    logit-scale cap of 100 at the low end; at 1 cosine logits barely separate). The clamp passes the
    gradient straight through, and :meth:`clamp_temperature_` projects the parameter back after each
    optimizer step (as CLIP clamps its logit scale), so it can neither stick at a bound nor drift.

    Trained with the UNet, kept in float32 (autocast is disabled inside), saved with the checkpoint
    (:meth:`save` / :meth:`load`, ``roi_head.safetensors``). Under ``torch.distributed`` the loss runs
    over the global batch (``distributed=None``: whenever a process group with >1 process exists);
    wrap the head in DDP (``accelerator.prepare``) so its gradients are averaged like the UNet's.
    """

    def __init__(
        self,
        feature_dim: int,
        text_dim: int,
        embed_dim: int = 256,
        hidden_dim: int | None = None,
        block: str = "up_blocks.2",
        symmetric: bool = False,
        sampling_ratio: int = 2,
        output_size: int = 2,
        tau_init: float = TAU_INIT,
        tau_min: float = TAU_MIN,
        tau_max: float = TAU_MAX,
        distributed: bool | None = None,
    ) -> None:
        super().__init__()
        if not 0 < tau_min <= tau_init <= tau_max:
            raise ValueError(f"need 0 < tau_min <= tau_init <= tau_max, got {tau_min}, {tau_init}, {tau_max}")
        hidden_dim = hidden_dim or embed_dim
        self.config: dict[str, Any] = dict(
            feature_dim=feature_dim,
            text_dim=text_dim,
            embed_dim=embed_dim,
            hidden_dim=hidden_dim,
            block=block,
            symmetric=symmetric,
            sampling_ratio=sampling_ratio,
            output_size=output_size,
            tau_init=tau_init,
            tau_min=tau_min,
            tau_max=tau_max,
        )
        self.block, self.symmetric = block, symmetric
        self.sampling_ratio, self.output_size = sampling_ratio, output_size
        self.log_tau_range = (math.log(tau_min), math.log(tau_max))
        self.distributed = distributed
        self.image_proj = _mlp(feature_dim, hidden_dim, embed_dim)
        self.text_proj = _mlp(text_dim, hidden_dim, embed_dim)
        self.log_tau = nn.Parameter(torch.tensor(math.log(tau_init), dtype=torch.float32))

    @classmethod
    def for_unet(cls, unet: nn.Module, text_dim: int, block: str = "up_blocks.2", **kwargs: Any) -> RoiAlignmentHead:
        """A head sized for ``unet.<block>``'s channels and a text encoder of width ``text_dim``."""
        return cls(block_channels(unet, block), text_dim, block=block, **kwargs)

    def temperature(self) -> torch.Tensor:
        """``tau``: the clamped value, with the gradient of the unclamped parameter (straight-through)."""
        lo, hi = self.log_tau_range
        clamped = self.log_tau.clamp(lo, hi)
        return (self.log_tau + (clamped - self.log_tau).detach()).exp()

    @torch.no_grad()
    def clamp_temperature_(self) -> None:
        """Project ``log_tau`` into its range; call after every optimizer step."""
        self.log_tau.clamp_(*self.log_tau_range)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer groups: the heads with ``weight_decay``, the temperature without (decay would pull tau to 1)."""
        heads = [p for n, p in self.named_parameters() if n != "log_tau"]
        return [{"params": heads, "weight_decay": weight_decay}, {"params": [self.log_tau], "weight_decay": 0.0}]

    def forward(
        self,
        features: torch.Tensor,
        boxes: torch.Tensor,
        box_valid: torch.Tensor,
        image_size: tuple[int, int],
        text_hidden: torch.Tensor,
        token_index: torch.Tensor,
        token_valid: torch.Tensor,
        phrase_ids: torch.Tensor,
    ) -> RoiOutput:
        """Loss of one (local) batch: features ``[B, C, h, w]``, boxes ``[B, P, 4]`` (image pixels),
        ``box_valid`` ``[B, P]``, ``image_size`` ``(height, width)``, ``text_hidden`` ``[B, L, D]`` (what the UNet is
        conditioned on), ``token_index``/``token_valid`` ``[B, P, T]``, ``phrase_ids`` long ``[B, P]``
        (:func:`~tokencompose.phrase_ids.phrase_text_ids`, built by ``collate``).

        A phrase takes part when it has a box and at least one token. Every ``(b, p)`` slot is a row
        (``R = B*P``) and padding is a mask: no step reads a device value back to the host.
        """
        with torch.autocast(device_type=features.device.type, enabled=False):
            valid = box_valid.to(features.device) & token_valid.to(features.device).any(dim=-1)  # [B, P]
            pooled = roi_features(
                features, boxes, valid, image_size, self.output_size, self.sampling_ratio, aligned=True
            )  # [B, P, C]
            img = F.normalize(self.image_proj(pooled.flatten(0, 1)), dim=-1)  # [R, E]
            text = phrase_text_embeddings(text_hidden.to(features.device), token_index, token_valid)  # [B, P, D]
            txt = F.normalize(self.text_proj(text.flatten(0, 1)), dim=-1)  # [R, E]
            ids, rows = phrase_ids.to(features.device).flatten(), valid.flatten()  # [R]
            use_dist = self.distributed if self.distributed is not None else world()[1] > 1
            if use_dist:
                img, txt, ids, rows = gather_phrases(img, txt, ids, rows)
            tau = self.temperature()
            same = same_text_mask(ids)
            loss = info_nce(img, txt, tau, same, self.symmetric, valid=rows)
            contrasted = (~same & rows[:, None] & rows[None, :]).any()
        return RoiOutput(loss=loss, tau=tau.detach(), num_phrases=rows.sum(), contrasted=contrasted)

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/roi_head.safetensors`` (weights + constructor config in the metadata)."""
        from safetensors.torch import save_file

        path = Path(folder) / ROI_HEAD_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"config": json.dumps(self.config)})
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", **overrides: Any) -> RoiAlignmentHead:
        """Rebuild a head from ``roi_head.safetensors`` (or the folder holding it)."""
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            path = path / ROI_HEAD_FILE
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            config = json.loads((f.metadata() or {})["config"])
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        head = cls(**{**config, **overrides})
        head.load_state_dict(state)
        return head.to(device)
