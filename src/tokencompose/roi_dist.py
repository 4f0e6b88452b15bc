"""Cross-process gathering for the ROI-token contrastive loss (DDP), with gradients.

InfoNCE wants every phrase of the *global* batch as a negative, so each process gathers the
embeddings of all processes and computes the same global loss. The gather must keep gradients:

* :func:`gather_with_grad` is an ``all_gather`` whose backward **sums** the incoming gradient over
  processes (``all_reduce``) and returns this process's slice. Every process computes the same loss
  ``L``, so the local slice receives ``W * dL/dx_local``; DDP then averages parameter gradients over
  the ``W`` processes, which gives exactly ``dL/dtheta`` -- the single-process gradient of the
  global batch (tested in ``tests/test_roi_ddp.py``). ``all_reduce`` rather than reduce-scatter
  because gloo (CPU) has no reduce-scatter.
* :func:`gather_phrases` handles a different number of phrases ``M`` per process: it pads to the
  largest ``M``, gathers, and drops the padding rows; texts travel with ``all_gather_object``.

Everything is the identity when ``torch.distributed`` is not initialised or has one process.
Every process must call these functions the same number of times (they are collectives).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherSumGrad(torch.autograd.Function):
    """``[N, ...]`` per process -> ``[W * N, ...]`` (rank-major); backward: sum over processes, keep own slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, size = world()
        ctx.rank, ctx.size = rank, size
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad.chunk(ctx.size, dim=0)[ctx.rank]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` ``[N, ...]`` (same ``N`` on every process) into ``[W * N, ...]``, differentiable.

    The identity when not distributed.
    """
    if world()[1] == 1:
        return x
    return _GatherSumGrad.apply(x)


def gather_phrases(
    img: torch.Tensor, txt: torch.Tensor, texts: list[str]
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Gather every process's phrases: ``img``/``txt`` ``[M, E]`` + ``M`` texts -> ``[N, E]``, ``[N, E]``, ``N`` texts.

    ``M`` may differ per process (0 included). The result is rank-major and, within a rank, in the
    local order, so it equals the single-process order of the concatenated global batch. When no
    process has a phrase, the local (empty) inputs come back unchanged on every process.
    """
    _, size = world()
    if size == 1:
        return img, txt, list(texts)
    per_rank: list[list[str] | None] = [None] * size
    dist.all_gather_object(per_rank, list(texts))
    counts = [len(t) for t in per_rank]  # type: ignore[arg-type]
    m_max = max(counts)
    if m_max == 0:  # decided identically on every process, so no collective is left unmatched
        return img, txt, []
    e = img.shape[1]
    both = torch.cat([img, txt], dim=1)  # one collective for both sides
    pad = both.new_zeros(m_max - both.shape[0], 2 * e)
    gathered = gather_with_grad(torch.cat([both, pad], dim=0))  # [W * m_max, 2E]
    keep = torch.cat([torch.arange(c, device=both.device) + r * m_max for r, c in enumerate(counts)])
    gathered = gathered.index_select(0, keep)
    flat = [t for group in per_rank for t in group]  # type: ignore[union-attr]
    return gathered[:, :e], gathered[:, e:], flat
