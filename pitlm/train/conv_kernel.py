"""The Gated DeltaNet's depthwise causal conv1d (+ SiLU) with its output written straight into the q, k and v tensors
the delta rule reads, in one Triton kernel each way.

transformers' Qwen3.5 layer projects to (B, T, 2 key_dim + value_dim), convolves each channel over the last W tokens,
applies SiLU and splits the result into q, k and v. With fla's conv (pitlm.kernels) that is a conv kernel, a copy
that splits, and in backward a `cat` of the three gradients and fla's conv backward, which recomputes the forward in a
kernel of its own and reached ~1 TB/s on the 35B-A3B (0.84 ms for a (16,384 x 8,192) layer on an H200, BENCHMARKS.md
session 10). Here:

- forward: each (tokens x channels) tile reads its W shifted rows of x and writes SiLU(bias + sum_j w_j x[t-W+1+j])
  into the output its channels belong to (a launch per output): one read of x, one write of q, k, v;
- backward: from dq, dk, dv and x, each tile recomputes the pre-activation of the W rows its own rows feed, forms
  g = dy * SiLU'(pre) and writes dx[t] = sum_u w_{W-1-u} g[t+u]; its partial sums of dw (and d bias) over its rows go
  to a float32 buffer summed after (no atomics: the same result on every run).

Sequences are the rows of the batch (no packing): a row before the start of its sequence reads as zero, as
transformers' left padding of the conv. Channels are taken in blocks that divide every output's width.
`conv_split(x, weight, bias, activation, sizes)` runs it where `routed_kernels.available(x)` (CUDA, or the tests'
interpreter); pitlm.kernels' Gated DeltaNet forward calls it under the switch `CONV_FLAG` (fast path "conv-split").
"""

from __future__ import annotations

import functools
import math
import types

import torch

from pitlm.train.routed_kernels import _interpreting, _on, available

CONV_FLAG = "_pitlm_conv_split"  # on a Gated DeltaNet module: conv + SiLU + split in this module's kernels
BLOCK_T = 64


@functools.cache
def _kernels(interpret: bool) -> types.SimpleNamespace:  # noqa: ARG001 - one build per interpreter mode
    import triton
    import triton.language as tl

    @triton.jit
    def conv_fwd(x, w, bias, out, T, sxb, sxt, swd, swj, sob, sot, c0, HAS_BIAS: tl.constexpr,
                 SILU: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
        b = tl.program_id(1).to(tl.int64)
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        d = tl.program_id(2) * BD + tl.arange(0, BD)
        ch = (c0 + d).to(tl.int64)
        acc = tl.zeros([BT, BD], dtype=tl.float32)
        if HAS_BIAS:
            acc += tl.load(bias + ch).to(tl.float32)[None, :]
        xb = x + b * sxb + ch[None, :]
        for j in tl.static_range(W):
            r = t - (W - 1) + j
            m = (r >= 0) & (r < T)
            xv = tl.load(xb + r.to(tl.int64)[:, None] * sxt, mask=m[:, None], other=0.0).to(tl.float32)
            acc += xv * tl.load(w + ch * swd + j * swj).to(tl.float32)[None, :]
        if SILU:
            acc = acc * tl.sigmoid(acc)
        ob = out + b * sob + t.to(tl.int64)[:, None] * sot + d[None, :]
        tl.store(ob, acc.to(out.dtype.element_ty), mask=(t < T)[:, None])

    @triton.jit
    def conv_bwd(x, w, bias, dy, dx, part, T, NT, D, sxb, sxt, swd, swj, syb, syt, sdb, sdt, c0,
                 HAS_BIAS: tl.constexpr, SILU: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
        pid_t = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        t = pid_t * BT + tl.arange(0, BT)
        d = tl.program_id(2) * BD + tl.arange(0, BD)
        ch = (c0 + d).to(tl.int64)
        xb = x + b * sxb + ch[None, :]
        yb = dy + b * syb + d[None, :]
        dxacc = tl.zeros([BT, BD], dtype=tl.float32)
        g0 = tl.zeros([BT, BD], dtype=tl.float32)
        for u in tl.static_range(W):  # the rows s = t + u that row t feeds through weight W - 1 - u
            s = t + u
            g = tl.load(yb + s.to(tl.int64)[:, None] * syt, mask=(s < T)[:, None], other=0.0).to(tl.float32)
            if SILU:
                pre = tl.zeros([BT, BD], dtype=tl.float32)
                if HAS_BIAS:
                    pre += tl.load(bias + ch).to(tl.float32)[None, :]
                for j in tl.static_range(W):
                    r = s - (W - 1) + j
                    m = (r >= 0) & (r < T)
                    xv = tl.load(xb + r.to(tl.int64)[:, None] * sxt, mask=m[:, None], other=0.0).to(tl.float32)
                    pre += xv * tl.load(w + ch * swd + j * swj).to(tl.float32)[None, :]
                sig = tl.sigmoid(pre)
                g = g * sig * (1.0 + pre * (1.0 - sig))
            dxacc += g * tl.load(w + ch * swd + (W - 1 - u) * swj).to(tl.float32)[None, :]
            if u == 0:
                g0 = g
        db = dx + b * sdb + t.to(tl.int64)[:, None] * sdt + ch[None, :]
        tl.store(db, dxacc.to(dx.dtype.element_ty), mask=(t < T)[:, None])
        pb = part + ((b * NT + pid_t) * D + ch) * (W + 1)  # this tile's sums over its rows, per channel
        for i in tl.static_range(W):
            r = t - (W - 1) + i
            m = (r >= 0) & (r < T)
            xv = tl.load(xb + r.to(tl.int64)[:, None] * sxt, mask=m[:, None], other=0.0).to(tl.float32)
            tl.store(pb + i, tl.sum(g0 * xv, axis=0))
        if HAS_BIAS:
            tl.store(pb + W, tl.sum(g0, axis=0))

    return types.SimpleNamespace(triton=triton, fwd=conv_fwd, bwd=conv_bwd)


def block_d(sizes: tuple[int, ...]) -> int:
    """Channels per tile: the largest power of 2 up to 64 dividing every output's width."""
    g = functools.reduce(math.gcd, sizes)
    return min(64, g & -g)


def _forward(x, weight, bias, silu: bool, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    k = _kernels(_interpreting())
    batch, seq, _ = x.shape
    outs = [x.new_empty(batch, seq, n) for n in sizes]
    bd, c0 = block_d(sizes), 0
    with _on(x):
        for out, n in zip(outs, sizes, strict=True):
            if x.numel():
                k.fwd[(k.triton.cdiv(seq, BLOCK_T), batch, n // bd)](
                    x, weight, bias if bias is not None else weight, out, seq, x.stride(0), x.stride(1),
                    weight.stride(0), weight.stride(1), out.stride(0), out.stride(1), c0, HAS_BIAS=bias is not None,
                    SILU=silu, W=weight.shape[1], BT=BLOCK_T, BD=bd)
            c0 += n
    return outs


def _backward(x, weight, bias, silu: bool, sizes: tuple[int, ...], grads) -> tuple[torch.Tensor, ...]:
    k = _kernels(_interpreting())
    batch, seq, dim = x.shape
    width = weight.shape[1]
    n_t = -(-seq // BLOCK_T)
    dx = torch.empty_like(x)
    part = torch.zeros(batch * n_t, dim, width + 1, dtype=torch.float32, device=x.device)
    bd, c0 = block_d(sizes), 0
    with _on(x):
        for g, n in zip(grads, sizes, strict=True):
            if g is None:
                g = x.new_zeros(batch, seq, n)
            if x.numel():
                k.bwd[(n_t, batch, n // bd)](
                    x, weight, bias if bias is not None else weight, g, dx, part, seq, n_t, dim, x.stride(0),
                    x.stride(1), weight.stride(0), weight.stride(1), g.stride(0), g.stride(1), dx.stride(0),
                    dx.stride(1), c0, HAS_BIAS=bias is not None, SILU=silu, W=width, BT=BLOCK_T, BD=bd)
            c0 += n
    sums = part.sum(0)
    dbias = sums[:, width].to(bias.dtype) if bias is not None else None
    return dx, sums[:, :width].to(weight.dtype), dbias


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
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[-1] or sum(sizes) != x.shape[-1] \
            or x.stride(-1) != 1 or (bias is not None and bias.shape != (x.shape[-1],)) or min(sizes) <= 0:
        raise ValueError(f"conv_split wants x (batch, tokens, D) with unit last stride, weight (D, W), bias (D,) and "
                         f"widths adding up to D; got {tuple(x.shape)}, {tuple(weight.shape)}, {sizes}")
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"conv_split: activation {activation!r} is not silu / swish / None")
    return _ConvSplit.apply(x, weight, bias, activation is not None, sizes)


def supported(x: torch.Tensor, activation: str | None) -> bool:
    """Whether conv_split runs on x here (else: fla's conv and a split)."""
    return activation in (None, "silu", "swish") and x.dim() == 3 and x.stride(-1) == 1 and available(x)
