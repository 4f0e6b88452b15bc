"""ROI contrastive loss under DDP: 2 CPU processes (gloo) reproduce the single-process global batch.

Loss and every parameter gradient (after DDP's averaging) must equal those of one process holding
the concatenated batch, with a different number of phrases per process (one process with none), a
different padded ``P`` per process (as ``collate`` pads per local batch, so each process has its own
number of rows), and a phrase text repeated across processes (masked across the gather by its id).
"""

from __future__ import annotations

import datetime

import torch
import torch.multiprocessing as mp
from torch import nn

from tokencompose.phrase_ids import phrase_text_ids
from tokencompose.roi import RoiAlignmentHead
from train_util import free_port

WORLD = 2
PER_RANK = 2


class _Net(nn.Module):
    """A conv standing in for the UNet (its parameters must get the right gradient too) + the head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Conv2d(3, 6, 3, padding=1)
        self.head = RoiAlignmentHead(feature_dim=6, text_dim=5, embed_dim=4, symmetric=True)

    def forward(self, batch: dict):
        feats = self.backbone(batch["images"])
        return self.head(
            feats,
            batch["boxes"],
            batch["box_valid"],
            (64, 64),
            batch["hidden"],
            batch["token_index"],
            batch["token_valid"],
            batch["phrase_ids"],
        )


def _scenarios() -> list[dict]:
    """Global batches of ``WORLD * PER_RANK`` samples; rank r holds samples ``[r*PER_RANK, (r+1)*PER_RANK)``."""
    g = torch.Generator().manual_seed(1)
    b, p, t = WORLD * PER_RANK, 3, 2
    xy0 = torch.rand(b, p, 2, generator=g) * 32
    boxes = torch.cat([xy0, xy0 + 8 + torch.rand(b, p, 2, generator=g) * 24], dim=-1)
    common = dict(
        images=torch.randn(b, 3, 8, 8, generator=g),
        boxes=boxes,
        hidden=torch.randn(b, 77, 5, generator=g),
        token_index=torch.randint(1, 20, (b, p, t), generator=g),
        token_valid=torch.tensor([True, False]).repeat(b, p, 1) | (torch.rand(b, p, t, generator=g) > 0.5),
    )
    # 4 phrases on rank 0, 1 on rank 1; "Dog" (rank 1) repeats "dog" (rank 0).
    uneven = dict(
        common,
        box_valid=torch.tensor([[1, 1, 1], [1, 0, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool),
        phrase_ids=phrase_text_ids([["dog", "cat", "tree"], ["bird"], ["Dog"], []], p),
    )
    # 1 phrase in the whole global batch: 0 on every process, no hang, finite (zero) gradients.
    single = dict(
        common,
        box_valid=torch.tensor([[0, 0, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=torch.bool),
        phrase_ids=phrase_text_ids([[], ["bird"], [], []], p),
    )
    return [uneven, single]


def _local(batch: dict, rank: int) -> dict:
    """Rank ``rank``'s samples, ``P`` cut to its own longest phrase list (at least 1), as ``collate`` pads."""
    s = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    local = {k: v[s] for k, v in batch.items()}
    used = local["box_valid"].any(dim=0).nonzero()
    p = int(used.max()) + 1 if len(used) else 1
    for key in ("boxes", "box_valid", "token_index", "token_valid", "phrase_ids"):
        local[key] = local[key][:, :p]
    return local


def _run(net: nn.Module, batch: dict) -> dict:
    net.zero_grad(set_to_none=True)
    out = net(batch)
    out.loss.backward()
    inner = net.module if hasattr(net, "module") else net
    grads = {n: p.grad.clone() for n, p in inner.named_parameters()}
    return {"loss": out.loss.detach(), "num_phrases": int(out.num_phrases), "grads": grads}


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        net = DDP(_Net())
        results = [_run(net, _local(batch, rank)) for batch in _scenarios()]
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_gather_equals_single_process_global_batch(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    net = _Net()
    for k, batch in enumerate(_scenarios()):
        ref = _run(net, batch)
        for r in range(WORLD):
            got = ranks[r][k]
            assert got["num_phrases"] == ref["num_phrases"]
            torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
            for name, g in ref["grads"].items():
                torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6, msg=f"{k} {name}")
    uneven, single = (ranks[0][0], ranks[0][1])
    assert uneven["num_phrases"] == 5 and uneven["loss"] > 0
    assert single["num_phrases"] == 1 and single["loss"].item() == 0.0
