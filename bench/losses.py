"""Time of the batched grounding losses vs a naive per-sample/per-phrase/per-token loop (the paper's style).

SD-1.4-sized maps: 8 heads, 77 tokens, layers 1x8^2, 3x16^2, 3x32^2, 3x64^2; B samples with P phrases
of up to T tokens. Also reports the losses' share of a tiny-model training step (issue: <= 5%).

    python bench/losses.py [--batch 8] [--phrases 4] [--device cpu] [--repeat 5] [--tiny]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from tokencompose.losses import grounding_losses
from tokencompose.tokens import pad_token_positions

SD14 = {(8, 8): 1, (16, 16): 3, (32, 32): 3, (64, 64): 3}


def naive(maps, spans, masks):
    """The paper's loop structure, one sample at a time (a re-creation, for timing only)."""
    out = []
    for b, sample in enumerate(spans):
        tok_total = pix_total = 0.0
        for size, layers in maps.items():
            m = masks[size][b].float()
            tok = 0.0
            for a in layers:
                for i, span in enumerate(sample):
                    obj = 0.0
                    for t in span:
                        col = a[b, :, :, t]
                        share = (col * m[i]).sum(-1) / col.sum(-1)
                        obj = obj + (1 - share.mean()) ** 2
                    tok = tok + obj / len(span)
            tok_total = tok_total + tok / len(sample)
            avg = torch.stack([a[b].mean(0) for a in layers]).mean(0)
            pix = 0.0
            for i, span in enumerate(sample):
                p = torch.stack([avg[:, t] for t in span]).sum(0)
                pix = pix + F.binary_cross_entropy(p.clamp(0, 1), m[i])
            pix_total = pix_total + pix / len(sample)
        out.append(tok_total + pix_total)
    return torch.stack(out)


def timeit(fn, repeat: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def tiny_step_share(repeat: int) -> tuple[float, float]:
    """(ms of one tiny-model train step with both losses, ms of the losses alone) on CPU, batch 8."""
    from tokencompose.attention import AttentionCapture
    from tokencompose.masks import masks_at_resolutions
    from tokencompose.models import tiny_components

    comps = tiny_components()
    unet = comps.unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    b = 8
    x, ctx = torch.randn(b, 4, 8, 8), torch.randn(b, 77, 32)
    t = torch.randint(0, 1000, (b,))
    index, valid = pad_token_positions([[[1], [3, 4], [6]]] * b)
    masks64 = torch.rand(b, 3, 64, 64) > 0.5
    loss_time = [0.0]

    def step():
        with AttentionCapture(unet) as cap:
            pred = unet(x, t, ctx).sample
            maps = cap.by_size()
            masks = masks_at_resolutions(masks64, maps.keys())  # done once in the data pipeline normally
            t1 = time.perf_counter()
            g = grounding_losses(maps, index, valid, masks)
            loss_time[0] = time.perf_counter() - t1
            loss = F.mse_loss(pred, x) + 1e-3 * g.token.mean() + 5e-5 * g.pixel.mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step_ms = timeit(step, repeat, torch.device("cpu")) * 1e3
    return step_ms, loss_time[0] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--phrases", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="small maps, one repeat (a smoke run for tests)")
    args = ap.parse_args()
    device = torch.device(args.device)
    sizes = {(2, 2): 1, (4, 4): 2} if args.tiny else SD14
    repeat = 1 if args.tiny else args.repeat
    g = torch.Generator().manual_seed(0)
    spans = [[list(range(1 + 3 * j, 1 + 3 * j + 1 + j % 2)) for j in range(args.phrases)] for _ in range(args.batch)]
    index, valid = (t.to(device) for t in pad_token_positions(spans))
    maps = {
        s: [torch.randn(args.batch, 8, s[0] * s[1], 77, generator=g).softmax(-1).to(device) for _ in range(n)]
        for s, n in sizes.items()
    }
    masks = {s: (torch.rand(args.batch, args.phrases, s[0] * s[1], generator=g) > 0.5).to(device) for s in sizes}
    batched = timeit(lambda: grounding_losses(maps, index, valid, masks), repeat, device)
    loop = timeit(lambda: naive(maps, spans, masks), repeat, device)
    check = grounding_losses(maps, index, valid, masks)
    ref = naive(maps, spans, masks)
    assert torch.allclose(check.token + check.pixel, ref, rtol=1e-4), "batched and naive disagree"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; B={args.batch} P={args.phrases} maps={dict(sizes)}")
    print(f"batched: {batched * 1e3:.1f} ms   naive loop: {loop * 1e3:.1f} ms   speed-up: {loop / batched:.1f}x")
    if not args.tiny and device.type == "cpu":  # the CPU target (a share of a tiny-model step)
        step_ms, loss_ms = tiny_step_share(repeat)
        print(
            f"tiny-model train step (B=8, CPU): {step_ms:.1f} ms; "
            f"losses: {loss_ms:.2f} ms ({100 * loss_ms / step_ms:.1f}%)"
        )


if __name__ == "__main__":
    main()
