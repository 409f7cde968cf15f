"""Time pitlm.kernels.conv's backward over tile shapes on a GPU, on the 35B-A3B's Gated DeltaNet conv
((8 x 2048) tokens x (2048 + 2048 + 4096) channels, bf16), each checked against float32 first; fla's conv backward
and the forwards for comparison. Prints `tiles_ms: <spec> <ms>` lines and `best_tiles: <spec>` (for
PITLM_CONV_TILES).

Usage: python scripts/conv_tiles.py [spec ...]   (spec: "tokens per tile,channels,tokens per program,warps[,acc]")
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from pitlm.kernels import conv as ck

SPECS = ["16,64,16,2", "16,64,16,1", "16,32,16,1", "16,32,16,2", "8,64,8,1", "32,32,32,2", "16,64,32,2",
         "16,64,64,2,1", "16,64,128,2,1", "16,32,64,1,1", "32,64,32,4", "32,64,128,4,1", "16,128,16,4", "8,128,64,2,1"]
SIZES = (2048, 2048, 4096)


def timed(fn, n=20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def reference(x, w):
    y = F.conv1d(x.transpose(1, 2), w[:, None], None, padding=3, groups=x.shape[-1])[..., : x.shape[1]]
    return torch.split(F.silu(y).transpose(1, 2), list(SIZES), dim=-1)


def main(specs: list[str]) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8, 2048, sum(SIZES), device="cuda", generator=gen, dtype=torch.bfloat16)
    w = (torch.randn(sum(SIZES), 4, device="cuda", generator=gen) * 0.5).bfloat16()
    grads = tuple(torch.randn(8, 2048, n, device="cuda", generator=gen, dtype=torch.bfloat16) for n in SIZES)
    xf, wf = x.float().requires_grad_(), w.float().requires_grad_()
    torch.autograd.backward(reference(xf, wf), [g.float() for g in grads])
    scale_x, scale_w = xf.grad.abs().max().item(), wf.grad.abs().max().item()
    print(f"fwd_ms: {timed(lambda: ck._forward(x, w, None, True, SIZES)):.3f}")
    try:
        from fla.modules.causal_conv1d import causal_conv1d

        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y, _ = causal_conv1d(xr, wr, None, activation="silu")
        dy = torch.cat(grads, -1)
        print(f"fla_fwd_ms: {timed(lambda: causal_conv1d(x, w, None, activation='silu')):.3f}")
        print(f"fla_bwd_ms: {timed(lambda: torch.autograd.grad(y, (xr, wr), dy, retain_graph=True)):.3f}")
    except ImportError:
        print("fla: not importable")
    best = None
    for spec in specs:
        ck.TILES = ck._tiles(spec)
        dx, dw, _ = ck._backward(x, w, None, True, SIZES, grads)
        err_x = (dx.float() - xf.grad).abs().max().item() / scale_x
        err_w = (dw.float() - wf.grad).abs().max().item() / scale_w
        ms = timed(lambda: ck._backward(x, w, None, True, SIZES, grads))
        ok = err_x < 2e-2 and err_w < 2e-2
        print(f"tiles_ms: {spec} {ms:.3f} rel_err_dx {err_x:.1e} rel_err_dw {err_w:.1e}{'' if ok else ' WRONG'}")
        if ok and (best is None or ms < best[1]):
            best = (spec, ms)
    print(f"best_tiles: {best[0] if best else 'none'}")


if __name__ == "__main__":
    main(sys.argv[1:] or SPECS)
