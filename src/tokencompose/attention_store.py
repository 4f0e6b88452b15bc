"""The per-forward store of captured attention maps, and its rule for gradient checkpointing.

A forward pre-hook (:class:`tokencompose.attention.AttentionCapture`) clears and arms the store at the start of
every model forward (:meth:`AttentionStore.start`), and each layer keeps the **first** map it produces in that
forward. Gradient checkpointing recomputes a block's forward during backward; that recomputation must neither
replace the maps the losses already hold nor add new ones: first-write-wins covers a recompute before
:meth:`AttentionStore.clear`, and ``clear()`` disarms the store until the next forward, so a recompute after it
(the usual case: the step clears the store before ``backward``) records nothing and the maps are freed with
the graph.

Shapes: ``B`` batch, ``H`` heads, ``N = h*w`` query positions, ``L`` text tokens, ``K`` kept token columns.
"""

from __future__ import annotations

import math

import torch

Size = tuple[int, int]


class AttentionStore:
    """Per-forward store of attention maps, keyed by layer name.

    ``maps[name]`` is ``[B, H, N, L]`` (or ``[B, H, N, K]`` with a column subset); ``sizes[name]`` is
    the layer's ``(h, w)`` derived from the model input: the latent size (UNet, SD3) or the token grid
    of the position ids (Flux).
    """

    def __init__(self) -> None:
        self.maps: dict[str, torch.Tensor] = {}
        self.sizes: dict[str, Size] = {}
        self.latent_size: Size | None = None  # [B, C, H, W] input: (H, W)
        self.grid: Size | None = None  # packed-token input (Flux): (h, w) of the token grid
        self.text_len: int | None = None  # L of the model's encoder_hidden_states (Flux single-stream layers)
        self.columns: torch.Tensor | None = None  # keep only these token columns (``[K]`` long), or all
        self.armed = True  # records only between a UNet forward's start and the next clear()

    def clear(self) -> None:
        """Drop the maps and stop recording until :meth:`start` (the next UNet forward)."""
        self.maps = {}
        self.sizes = {}
        self.armed = False

    def start(self) -> None:
        """Begin a forward: an empty store that records."""
        self.maps = {}
        self.sizes = {}
        self.armed = True

    def spatial_size(self, n: int) -> Size:
        """``(h, w)`` of ``n`` query positions: the token grid, or the latent size over the layer's stride."""
        if self.grid is not None and self.grid[0] * self.grid[1] == n:
            return self.grid
        if self.latent_size is not None:
            h0, w0 = self.latent_size
            stride = math.sqrt(h0 * w0 / n)
            s = round(stride)
            if s > 0 and abs(stride - s) < 1e-6 and (h0 // s) * (w0 // s) == n:
                return (h0 // s, w0 // s)
            # diffusers pads odd sizes up (ceil) when downsampling
            h, w = math.ceil(h0 / s), math.ceil(w0 / s)
            if h * w == n:
                return (h, w)
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"cannot infer the spatial size of a layer with {n} positions")
        return (side, side)

    def record(self, name: str, probs: torch.Tensor) -> None:
        # Not armed: a checkpoint recompute in the backward after clear(). Already there: a recompute
        # before clear(), or a second call in one forward. Either way keep what the losses hold.
        if not self.armed or name in self.maps:
            return
        self.maps[name] = probs
        self.sizes[name] = self.spatial_size(probs.shape[-2])
