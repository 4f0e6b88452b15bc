"""Cross-process gathering for the ROI-token contrastive loss (DDP), with gradients.

InfoNCE wants every phrase of the *global* batch as a negative, so each process gathers the
embeddings of all processes and computes the same global loss. The gather must keep gradients:

* :func:`gather_with_grad` is an ``all_gather`` whose backward **sums** the incoming gradient over
  processes (``all_reduce``) and returns this process's slice. Every process computes the same loss
  ``L``, so the local slice receives ``W * dL/dx_local``; DDP then averages parameter gradients over
  the ``W`` processes, which gives exactly ``dL/dtheta`` -- the single-process gradient of the
  global batch (tested in ``tests/test_roi_ddp.py``). ``all_reduce`` rather than reduce-scatter
  because gloo (CPU) has no reduce-scatter.
* :func:`gather_phrases` handles a different number of phrase slots ``R`` per process (``P`` is
  padded per local batch): it pads to the largest ``R`` and gathers; padding stays in as rows marked
  invalid, so nothing is selected by a device value. Texts travel as int64 ids (no strings, no
  pickling). The one host exchange is the row counts -- plain Python ints known from tensor
  shapes -- over a CPU (gloo) group, so no device tensor is read back.

Everything is the identity when ``torch.distributed`` is not initialised or has one process.
Every process must call these functions the same number of times (they are collectives).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherSumGrad(torch.autograd.Function):
    """``[R, ...]`` per process -> ``[W * R, ...]`` (rank-major); backward: sum over processes, keep own slice."""

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
    """All-gather ``x`` ``[R, ...]`` (same ``R`` on every process) into ``[W * R, ...]``, differentiable.

    The identity when not distributed.
    """
    if world()[1] == 1:
        return x
    return _GatherSumGrad.apply(x)


_HOST_GROUPS: dict[int, Any] = {}  # default group -> its CPU companion, created once


def _host_group() -> Any:
    """A process group that takes CPU tensors: the default one when it has gloo, else a gloo companion.

    Created lazily, and collectively: every process reaches the first ROI gather at the same step.
    """
    if "gloo" in str(dist.get_backend()):
        return None  # the default group
    key = id(dist.group.WORLD)
    if key not in _HOST_GROUPS:
        _HOST_GROUPS[key] = dist.new_group(backend="gloo")
    return _HOST_GROUPS[key]


def row_counts(n: int) -> list[int]:
    """Every process's ``n`` (a host int), rank-major. A host-to-host collective: no device sync."""
    _, size = world()
    mine = torch.tensor([n], dtype=torch.long)
    parts = [torch.zeros_like(mine) for _ in range(size)]
    dist.all_gather(parts, mine, group=_host_group())
    return [int(x) for x in parts]


def gather_phrases(
    img: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather every process's phrase rows: ``img``/``txt`` ``[R, E]``, ``ids`` long ``[R]``, ``valid`` bool ``[R]``
    -> ``[W*R_max, E]`` x2, ``[W*R_max]`` x2.

    ``R`` may differ per process (0 included); each process's rows are padded to the largest ``R``
    with invalid rows. The result is rank-major and, within a rank, in the local order, so its valid
    rows are in the single-process order of the concatenated global batch. The embeddings keep their
    gradients (:func:`gather_with_grad`); ids and validity are plain gathers. When no process has a
    row, the local (empty) inputs come back unchanged on every process.
    """
    _, size = world()
    if size == 1:
        return img, txt, ids, valid
    r, e = img.shape
    r_max = max(row_counts(r))
    if r_max == 0:  # decided identically on every process, so no collective is left unmatched
        return img, txt, ids, valid
    both = torch.cat([img, txt], dim=1)  # one collective for both sides
    both = torch.cat([both, both.new_zeros(r_max - r, 2 * e)], dim=0)
    gathered = gather_with_grad(both)  # [W * r_max, 2E]
    meta = torch.stack([ids.long(), valid.long()], dim=1)  # [R, 2]: one collective for both
    meta = torch.cat([meta, meta.new_zeros(r_max - r, 2)], dim=0)  # padding: invalid
    parts = [torch.empty_like(meta) for _ in range(size)]
    dist.all_gather(parts, meta.contiguous())
    meta = torch.cat(parts, dim=0)
    return gathered[:, :e], gathered[:, e:], meta[:, 0], meta[:, 1].bool()
