"""Extra objective terms built from the config: the ROI-token contrastive alignment (``loss.roi_weight``).

Each term is a :class:`~tokencompose.train.step.LossTerm`; a weight of 0 builds nothing.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from tokencompose.config import Config
from tokencompose.roi import RoiAlignmentHead, decoder_feature_hook
from tokencompose.train.step import LossTerm, StepContext


class RoiTerm(LossTerm):
    """InfoNCE between ROI-pooled UNet decoder features of each phrase's box and its token embeddings.

    A batch-level scalar (over the global batch under DDP, see :mod:`tokencompose.roi`). The decoder
    features come from a forward hook on the UNet, installed once for the run by :meth:`capture`.
    """

    name = "roi"

    def __init__(self, head: torch.nn.Module, weight: float, image_size: int) -> None:
        super().__init__()
        self.head = head
        self.weight = float(weight)
        self.image_size = int(image_size)
        self._features: Any = None
        self._last: dict[str, torch.Tensor] = {}

    def capture(self, unet: torch.nn.Module) -> AbstractContextManager[Any]:
        self._features = decoder_feature_hook(unet, self.head.block)
        return self._features

    def forward(self, ctx: StepContext) -> torch.Tensor:
        if self._features is None or self._features.features is None:
            raise RuntimeError("the ROI term's decoder feature hook is not installed (capture() not entered)")
        b = ctx.batch
        out = self.head(
            self._features.features,
            b["boxes"],
            b["box_valid"],
            (self.image_size, self.image_size),
            ctx.cond["encoder_hidden_states"],
            b["token_index"],
            b["token_valid"],
            b["phrase_ids"],
        )
        # logged as roi_tau / roi_phrases: the temperature and how many phrases the InfoNCE saw (device
        # tensors: the metrics accumulate them without a host read per step)
        self._last = {"tau": out.tau.detach(), "phrases": out.num_phrases.detach().float()}
        return out.loss

    def diagnostics(self) -> dict[str, torch.Tensor]:
        return self._last

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        return self.head.param_groups(weight_decay)  # no decay on the temperature

    def after_step(self) -> None:
        self.head.clamp_temperature_()

    def save(self, folder: Path) -> None:
        self.head.save(folder)  # roi_head.safetensors beside the UNet


def build_terms(cfg: Config, unet: torch.nn.Module) -> list[LossTerm]:
    """The extra terms whose weight is > 0 (the text side is the UNet's context, ``cross_attention_dim`` wide)."""
    terms: list[LossTerm] = []
    if cfg.loss.roi_weight > 0:
        # Seeded on its own so that turning the term on does not shift any other random stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            head = RoiAlignmentHead.for_unet(
                unet,
                unet.config.cross_attention_dim,
                block=cfg.loss.roi_block,
                embed_dim=cfg.loss.roi_embed_dim,
                symmetric=cfg.loss.roi_symmetric,
            )
        terms.append(RoiTerm(head, cfg.loss.roi_weight, cfg.data.image_size))
    return terms
