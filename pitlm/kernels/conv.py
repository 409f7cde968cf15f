"""The Gated DeltaNet's depthwise causal conv1d (+ SiLU) with its output written straight into the q, k and v tensors
the delta rule reads, in one Triton kernel each way.

transformers' Qwen3.5 layer projects to (B, T, 2 key_dim + value_dim), convolves each channel over the last W tokens,
applies SiLU and splits the result into q, k and v. With fla's conv (pitlm.kernels) that is a conv kernel, a copy
that splits, and in backward a `cat` of the three gradients and fla's conv backward, which recomputes the forward in a
kernel of its own and reached ~1 TB/s on the 35B-A3B (0.84 ms for a (16,384 x 8,192) layer on an H200, BENCHMARKS.md
session 10). Here:

- forward: each (tokens x channels) tile reads its W shifted rows of x and writes SiLU(bias + sum_j w_j x[t-W+1+j])
  into the output its channels belong to (a launch per output): one read of x, one write of q, k, v;
- backward: from dq, dk, dv and x, each tile reads x at its rows shifted by -3 .. +3 once, recomputes the
  pre-activations of the 4 rows each of its rows feeds, forms g = dy * SiLU'(pre) and writes
  dx[t] = sum_u w_{3-u} g[t+u]; each program's sums of dw (and d bias) over its 128 rows go to a float32 buffer
  summed after (no atomics: the same result on every run).

Sequences are the rows of the batch (no packing): a row before the start of its sequence reads as zero, as
transformers' left padding of the conv. The window is 4 wide (Qwen3.5's conv_kernel_size); channels are taken in
blocks that divide every output's width.
`conv_split(x, weight, bias, activation, sizes)` runs it where `triton_util.available(x)` (CUDA, or the tests'
interpreter); pitlm.kernels' Gated DeltaNet forward calls it under the fast path "conv-split"
(`pitlm.kernels.registry.CONV_SILU_SPLIT`).
"""

from __future__ import annotations

import functools
import math
import os
import types

import torch

from pitlm.kernels.triton_util import available, interpreting, on_device

WIDTH = 4  # the window the kernels are written for (Qwen3.5 / Qwen3-Next: conv_kernel_size 4)


def _tiles(spec: str) -> types.SimpleNamespace:
    """Tile shapes: "tokens per tile, max channels per tile, tokens per backward program, backward warps[, acc]";
    acc 1: the dw sums kept as tiles over a program's rows and reduced once (0, the default: reduced per tile)."""
    try:
        bt, bd, rows, warps, *rest = (int(v) for v in spec.split(","))
        acc = bool(rest[0]) if rest else False
    except ValueError:
        raise ValueError(f"{TILES_ENV}={spec!r}: four or five integers") from None
    if rows % bt or bt & (bt - 1) or bd & (bd - 1) or warps & (warps - 1) or len(rest) > 1:
        raise ValueError(f"{TILES_ENV}={spec!r}: powers of 2, and tokens per program a multiple of tokens per tile")
    return types.SimpleNamespace(bt=bt, bd=bd, rows=rows, warps=warps, acc=acc)


# The backward's tiles: 8 tokens x 128 channels, 64 tokens a program, 2 warps, the dw sums kept as tiles: the
# fastest of 14 shapes on an H200 (scripts/conv_tiles.py, session 10: 0.89 ms for the 35B-A3B's (16,384 x 8,192)
# layer, 0.92-2.4 ms for the rest; fla's backward 1.05 ms). The forward's: 16 tokens x up to 128 channels, 4 warps.
# The per-program dw sums take tokens / 64 x D x 5 floats, transient: 42 MB at that layer. PITLM_CONV_TILES
# overrides the backward's.
TILES_ENV = "PITLM_CONV_TILES"
TILES = _tiles(os.environ.get(TILES_ENV, "8,128,64,2,1"))


@functools.cache
def _kernels(interpret: bool) -> types.SimpleNamespace:  # noqa: ARG001 - one build per interpreter mode
    import triton  # noqa: PLC0415 - optional dependency triton
    import triton.language as tl  # noqa: PLC0415 - optional dependency triton

    @triton.jit
    def conv_fwd(x, w, bias, out, T, sxb, sxt, swd, swj, sob, sot, c0, HAS_BIAS: tl.constexpr,
                 SILU: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
        b = tl.program_id(1).to(tl.int64)
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        d = tl.program_id(2) * BD + tl.arange(0, BD)
        ch = c0 + d
        px = x + b * sxb + t[:, None] * sxt + ch[None, :]
        acc = tl.zeros([BT, BD], dtype=tl.float32)
        if HAS_BIAS:
            acc += tl.load(bias + ch).to(tl.float32)[None, :]
        for j in tl.static_range(4):  # y[t] = sum_j w_j x[t - 3 + j]; rows before the sequence read 0
            m = ((t - 3 + j >= 0) & (t - 3 + j < T))[:, None]
            xv = tl.load(px + (j - 3) * sxt, mask=m, other=0.0).to(tl.float32)
            acc += xv * tl.load(w + ch * swd + j * swj).to(tl.float32)[None, :]
        if SILU:
            acc = acc * tl.sigmoid(acc)
        tl.store(out + b * sob + t[:, None] * sot + d[None, :], acc.to(out.dtype.element_ty), mask=(t < T)[:, None])

    @triton.jit
    def conv_bwd(x, w, bias, dy, dx, part, T, NP, D, sxb, sxt, swd, swj, syb, syt, sdb, sdt, c0,
                 HAS_BIAS: tl.constexpr, SILU: tl.constexpr, ROWS: tl.constexpr, BT: tl.constexpr,
                 BD: tl.constexpr, ACC: tl.constexpr):
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        d = tl.program_id(2) * BD + tl.arange(0, BD)
        ch = c0 + d
        xb, yb = x + b * sxb, dy + b * syb
        w0 = tl.load(w + ch * swd).to(tl.float32)[None, :]
        w1 = tl.load(w + ch * swd + swj).to(tl.float32)[None, :]
        w2 = tl.load(w + ch * swd + 2 * swj).to(tl.float32)[None, :]
        w3 = tl.load(w + ch * swd + 3 * swj).to(tl.float32)[None, :]
        bias_row = tl.zeros([1, BD], dtype=tl.float32)
        if HAS_BIAS:
            bias_row += tl.load(bias + ch).to(tl.float32)[None, :]
        dw0 = tl.zeros([BD], dtype=tl.float32)
        dw1 = tl.zeros([BD], dtype=tl.float32)
        dw2 = tl.zeros([BD], dtype=tl.float32)
        dw3 = tl.zeros([BD], dtype=tl.float32)
        db = tl.zeros([BD], dtype=tl.float32)
        dt0 = tl.zeros([BT, BD], dtype=tl.float32)
        dt1 = tl.zeros([BT, BD], dtype=tl.float32)
        dt2 = tl.zeros([BT, BD], dtype=tl.float32)
        dt3 = tl.zeros([BT, BD], dtype=tl.float32)
        dtb = tl.zeros([BT, BD], dtype=tl.float32)
        for r0 in range(0, ROWS, BT):
            t = pid * ROWS + r0 + tl.arange(0, BT)
            # x at rows t - 3 .. t + 3, each read once (rows outside [0, T) read 0): row t feeds rows t .. t + 3
            # through weights w3 .. w0. In the order the rows are last used, so few tiles are alive at once.
            px = xb + t[:, None] * sxt + ch[None, :]
            py = yb + t[:, None] * syt + d[None, :]  # dy rows at or past T read 0: no gradient flows from them
            xm3 = tl.load(px - 3 * sxt, mask=((t >= 3) & (t < T + 3))[:, None], other=0.0).to(tl.float32)
            xm2 = tl.load(px - 2 * sxt, mask=((t >= 2) & (t < T + 2))[:, None], other=0.0).to(tl.float32)
            xm1 = tl.load(px - sxt, mask=((t >= 1) & (t < T + 1))[:, None], other=0.0).to(tl.float32)
            x0 = tl.load(px, mask=(t < T)[:, None], other=0.0).to(tl.float32)
            g = tl.load(py, mask=(t < T)[:, None], other=0.0).to(tl.float32)
            if SILU:  # through SiLU at the pre-activation p of row t + u: dy * s(p) (1 + p (1 - s(p)))
                p = bias_row + w0 * xm3 + w1 * xm2 + w2 * xm1 + w3 * x0
                sg = tl.sigmoid(p)
                g = g * sg * (1.0 + p * (1.0 - sg))
            if ACC:  # elementwise sums, reduced over the rows once after the loop
                dt0 += g * xm3
                dt1 += g * xm2
                dt2 += g * xm1
                dt3 += g * x0
                dtb += g
            else:
                dw0 += tl.sum(g * xm3, axis=0)
                dw1 += tl.sum(g * xm2, axis=0)
                dw2 += tl.sum(g * xm1, axis=0)
                dw3 += tl.sum(g * x0, axis=0)
                db += tl.sum(g, axis=0)
            dxt = w3 * g
            xp1 = tl.load(px + sxt, mask=(t + 1 < T)[:, None], other=0.0).to(tl.float32)
            g = tl.load(py + syt, mask=(t + 1 < T)[:, None], other=0.0).to(tl.float32)
            if SILU:
                p = bias_row + w0 * xm2 + w1 * xm1 + w2 * x0 + w3 * xp1
                sg = tl.sigmoid(p)
                g = g * sg * (1.0 + p * (1.0 - sg))
            dxt += w2 * g
            xp2 = tl.load(px + 2 * sxt, mask=(t + 2 < T)[:, None], other=0.0).to(tl.float32)
            g = tl.load(py + 2 * syt, mask=(t + 2 < T)[:, None], other=0.0).to(tl.float32)
            if SILU:
                p = bias_row + w0 * xm1 + w1 * x0 + w2 * xp1 + w3 * xp2
                sg = tl.sigmoid(p)
                g = g * sg * (1.0 + p * (1.0 - sg))
            dxt += w1 * g
            xp3 = tl.load(px + 3 * sxt, mask=(t + 3 < T)[:, None], other=0.0).to(tl.float32)
            g = tl.load(py + 3 * syt, mask=(t + 3 < T)[:, None], other=0.0).to(tl.float32)
            if SILU:
                p = bias_row + w0 * x0 + w1 * xp1 + w2 * xp2 + w3 * xp3
                sg = tl.sigmoid(p)
                g = g * sg * (1.0 + p * (1.0 - sg))
            dxt += w0 * g
            tl.store(dx + b * sdb + t[:, None] * sdt + ch[None, :], dxt.to(dx.dtype.element_ty),
                     mask=(t < T)[:, None])
        if ACC:
            dw0 = tl.sum(dt0, axis=0)
            dw1 = tl.sum(dt1, axis=0)
            dw2 = tl.sum(dt2, axis=0)
            dw3 = tl.sum(dt3, axis=0)
            db = tl.sum(dtb, axis=0)
        pb = part + ((b * NP + pid) * D + ch) * 5  # this program's sums over its rows, per channel
        tl.store(pb, dw0)
        tl.store(pb + 1, dw1)
        tl.store(pb + 2, dw2)
        tl.store(pb + 3, dw3)
        tl.store(pb + 4, db)

    return types.SimpleNamespace(triton=triton, fwd=conv_fwd, bwd=conv_bwd)


def block_d(sizes: tuple[int, ...], cap: int = 128) -> int:
    """Channels per tile: the largest power of 2 up to `cap` dividing every output's width."""
    g = functools.reduce(math.gcd, sizes)
    return min(cap, g & -g)


def _forward(x, weight, bias, silu: bool, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    k = _kernels(interpreting())
    batch, seq, _ = x.shape
    outs = [x.new_empty(batch, seq, n) for n in sizes]
    bd, c0 = block_d(sizes), 0
    with on_device(x):
        for out, n in zip(outs, sizes, strict=True):
            if x.numel():
                k.fwd[(k.triton.cdiv(seq, 16), batch, n // bd)](
                    x, weight, bias if bias is not None else weight, out, seq, x.stride(0), x.stride(1),
                    weight.stride(0), weight.stride(1), out.stride(0), out.stride(1), c0, HAS_BIAS=bias is not None,
                    SILU=silu, BT=16, BD=bd, num_warps=4)
            c0 += n
    return outs


def _backward(x, weight, bias, silu: bool, sizes: tuple[int, ...], grads) -> tuple[torch.Tensor, ...]:
    k = _kernels(interpreting())
    batch, seq, dim = x.shape
    n_p = -(-seq // TILES.rows)
    dx = torch.empty_like(x)
    part = torch.empty(batch * n_p, dim, WIDTH + 1, dtype=torch.float32, device=x.device)  # every entry written
    bd, c0 = block_d(sizes, TILES.bd), 0
    with on_device(x):
        for g, n in zip(grads, sizes, strict=True):
            if g is None:
                g = x.new_zeros(batch, seq, n)
            elif g.stride(-1) != 1:  # e.g. the expanded gradient of a sum: the kernel reads channels at unit stride
                g = g.contiguous()
            if x.numel():
                k.bwd[(n_p, batch, n // bd)](
                    x, weight, bias if bias is not None else weight, g, dx, part, seq, n_p, dim, x.stride(0),
                    x.stride(1), weight.stride(0), weight.stride(1), g.stride(0), g.stride(1), dx.stride(0),
                    dx.stride(1), c0, HAS_BIAS=bias is not None, SILU=silu, ROWS=TILES.rows, BT=TILES.bt, BD=bd,
                    ACC=TILES.acc, num_warps=TILES.warps)
            c0 += n
    sums = part.sum(0)
    dbias = sums[:, WIDTH].to(bias.dtype) if bias is not None else None
    return dx, sums[:, :WIDTH].to(weight.dtype), dbias


class _ConvSplit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu, sizes):
        ctx.save_for_backward(x, weight, bias)
        ctx.silu, ctx.sizes = silu, sizes
        return tuple(_forward(x, weight, bias, silu, sizes))

    @staticmethod
    def backward(ctx, *grads):
        x, weight, bias = ctx.saved_tensors
        dx, dw, db = _backward(x, weight, bias, ctx.silu, ctx.sizes, grads)
        return (dx if ctx.needs_input_grad[0] else None, dw if ctx.needs_input_grad[1] else None,
                db if ctx.needs_input_grad[2] else None, None, None)


def conv_split(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
               sizes: list[int]) -> tuple[torch.Tensor, ...]:
    """act(causal depthwise conv1d of x (B, T, D) with weight (D, W) and bias (D,) or None), split along D into
    contiguous (B, T, size) tensors; act: "silu" / "swish" or None. Values and gradients those of transformers'
    `F.conv1d(x.transpose(1, 2), weight[:, None], bias, padding=W - 1, groups=D)[..., :T]` + SiLU + split."""
    sizes = tuple(int(n) for n in sizes)
    if x.dim() != 3 or weight.shape != (x.shape[-1], WIDTH) or sum(sizes) != x.shape[-1] or x.stride(-1) != 1 \
            or (bias is not None and bias.shape != (x.shape[-1],)) or min(sizes) <= 0:
        raise ValueError(f"conv_split wants x (batch, tokens, D) with unit last stride, weight (D, {WIDTH}), bias (D,) "
                         f"and widths adding up to D; got {tuple(x.shape)}, {tuple(weight.shape)}, {sizes}")
    if x.shape[1] * max(x.stride(1), 1) >= 2**31:
        raise ValueError("conv_split: a sequence over 2**31 elements (32-bit offsets within a sequence)")
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"conv_split: activation {activation!r} is not silu / swish / None")
    return _ConvSplit.apply(x, weight, bias, activation is not None, sizes)


def supported(x: torch.Tensor, weight: torch.Tensor, activation: str | None) -> bool:
    """Whether conv_split runs on x and this (D, W) weight here (else: fla's conv and a split)."""
    return (activation in (None, "silu", "swish") and x.dim() == 3 and x.stride(-1) == 1
            and weight.shape[-1] == WIDTH and x.shape[1] * max(x.stride(1), 1) < 2**31 and available(x))
