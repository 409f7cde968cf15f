"""Fused Triton kernels for the routed rows of the grouped experts forward (`pitlm.kernels.experts`).

Between its grouped GEMMs, the experts forward of a gated-SiLU MoE (Qwen3.5-MoE) runs a chain of memory-bound
elementwise kernels over its routed rows (tokens x top_k: 131k rows for a batch of 8 x 2048 at top-8):

- gate_up: base GEMM output + the LoRA up-projection, then SiLU(gate) * up, then * the routing weight:
  4 kernels forward and ~8 backward, each reading and writing (rows, intermediate) tensors;
- down: base GEMM output + the LoRA up-projection, then each token's top_k rows gathered and summed:
  a (rows, hidden) add, a (rows, hidden) gather and a sum.

On the 35B-A3B's best 74 GiB step these were ~120 ms of 1.47 s (BENCHMARKS.md, session 7's profile by input
shapes). Here each chain is one kernel each way:

- `swiglu_routed(base, lora, weights)`: h = SiLU(g) * u * w per row, (g | u) = base + lora, in float32 with one
  rounding; its backward recomputes SiLU from the saved (g | u) and writes d(g | u) and dw in one pass;
- `gather_sum(rows, extra, inv, top_k)`: out[t] = sum over token t's top_k rows of rows (+ extra), accumulated in
  float32 without materialising the gathered (rows, hidden) tensor;
- `gather_rows(tokens, src)`: each token's row copied to its top_k routed rows (the permute before the experts).

Where a result is read by two GEMMs (the base and the LoRA down-projection), the op returns it twice (the same
memory; `swiglu_routed(..., pair=True)`, `pitlm.kernels.experts._PermuteRoutedPair`), so autograd hands its backward
the two gradients apart and the kernel sums them, instead of autograd adding two (rows, width) tensors first.
Measured on the 35B-A3B's 74 GiB step: 11.4k -> 13.7k tok/s together with the dense LoRA add-in-GEMM
(BENCHMARKS.md, session 8).

They run on CUDA tensors where Triton imports, and on CPU tensors under Triton's interpreter when asked
(TRITON_INTERPRET=1 set before triton's import, and PITLM_ROUTED_KERNELS_CPU=1: how the tests run the same kernel
code without a GPU; `pitlm.kernels.triton_util.available`). `pitlm.kernels.install.install_fast_kernels` switches them on
per experts module (fast path "routed-experts"); the torch reference path in `pitlm.kernels.experts` is what they
are tested against.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn

from pitlm.kernels.registry import LORA_IN_K, ROUTED_EXPERTS
from pitlm.kernels.triton_util import available, has_triton, interpreting, on_device


def supports(experts: nn.Module) -> bool:
    """Whether an experts module's gate is the one `swiglu_routed` computes: transformers' default
    chunk-in-two SiLU(gate) * up (no `_apply_gate` of its own)."""
    apply_gate = getattr(type(experts), "_apply_gate", None)
    default = apply_gate is None or getattr(apply_gate, "__name__", "") == "_default_apply_gate"
    act = getattr(experts, "act_fn", None)
    return default and type(act).__name__ in ("SiLU", "SiLUActivation") and has_triton()


def set_routed_kernels(model: nn.Module, on: bool) -> int:
    """Switch the fused kernels on or off for every supported experts module of `model`; returns how many."""
    n = 0
    for m in model.modules():
        if type(m).__name__.endswith("Experts") and supports(m):
            setattr(m, ROUTED_EXPERTS.attr, on)
            if not hasattr(m, LORA_IN_K.attr):  # with them: a projection's LoRA term in its GEMM's K
                setattr(m, LORA_IN_K.attr, True)
            n += 1
    return n


def enabled(experts: nn.Module, t: torch.Tensor) -> bool:
    return ROUTED_EXPERTS.is_on(experts) and available(t)


@functools.cache
def _kernels(interpret: bool) -> types.SimpleNamespace:
    """The jitted kernels; `triton.jit` picks the interpreter at decoration time, hence one set per mode. They call
    no `triton.language.standard` helper (e.g. tl.sigmoid): those are jitted when triton is first imported, and
    the interpreter cannot call them when TRITON_INTERPRET was set later (as the tests do)."""
    import triton  # noqa: PLC0415 - optional dependency triton
    import triton.language as tl  # noqa: PLC0415 - optional dependency triton

    @triton.jit
    def swiglu_fwd(base, lora, w, gu, h, n_rows, inter: tl.constexpr, h_stride: tl.constexpr, HAS_LORA: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        rmask = rows < n_rows
        mask = rmask[:, None] & (cols < inter)[None, :]
        r64 = rows.to(tl.int64)
        g_off = r64[:, None] * (2 * inter) + cols[None, :]
        g = tl.load(base + g_off, mask=mask, other=0.0)
        u = tl.load(base + g_off + inter, mask=mask, other=0.0)
        if HAS_LORA:  # the sum rounded as the reference's add, and saved for the backward
            g = (g.to(tl.float32) + tl.load(lora + g_off, mask=mask, other=0.0).to(tl.float32)).to(g.dtype)
            u = (u.to(tl.float32) + tl.load(lora + g_off + inter, mask=mask, other=0.0).to(tl.float32)).to(u.dtype)
            tl.store(gu + g_off, g, mask=mask)
            tl.store(gu + g_off + inter, u, mask=mask)
        gf = g.to(tl.float32)
        wr = tl.load(w + rows, mask=rmask, other=0.0).to(tl.float32)
        out = gf / (1.0 + tl.exp(-gf)) * u.to(tl.float32) * wr[:, None]
        tl.store(h + r64[:, None] * h_stride + cols[None, :], out.to(h.dtype.element_ty), mask=mask)

    @triton.jit
    def swiglu_bwd(gu, w, dh, dh2, dgu, dw, n_rows, inter: tl.constexpr, dh_stride: tl.constexpr,
                   dh2_stride: tl.constexpr, HAS_DH2: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < n_rows
        r64 = rows.to(tl.int64)
        wr = tl.load(w + rows, mask=rmask, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for c0 in range(0, inter, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = rmask[:, None] & (cols < inter)[None, :]
            g_off = r64[:, None] * (2 * inter) + cols[None, :]
            g = tl.load(gu + g_off, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(gu + g_off + inter, mask=mask, other=0.0).to(tl.float32)
            d = tl.load(dh + r64[:, None] * dh_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_DH2:  # the second reader's gradient (pair=True), summed here instead of by autograd
                d += tl.load(dh2 + r64[:, None] * dh2_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            sig = 1.0 / (1.0 + tl.exp(-g))
            act = g * sig
            acc += tl.sum(d * act * u, axis=1)
            dw_row = d * wr[:, None]
            tl.store(dgu + g_off, (dw_row * u * sig * (1.0 + g * (1.0 - sig))).to(dgu.dtype.element_ty), mask=mask)
            tl.store(dgu + g_off + inter, (dw_row * act).to(dgu.dtype.element_ty), mask=mask)
        tl.store(dw + rows, acc.to(dw.dtype.element_ty), mask=rmask)

    @triton.jit
    def gather_sum(rows, extra, inv, out, hidden, rows_stride, extra_stride, TOP_K: tl.constexpr,
                   HAS_EXTRA: tl.constexpr, BLOCK_H: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        m = cols < hidden
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for j in tl.static_range(TOP_K):
            r = tl.load(inv + t * TOP_K + j).to(tl.int64)
            acc += tl.load(rows + r * rows_stride + cols, mask=m, other=0.0).to(tl.float32)
            if HAS_EXTRA:
                acc += tl.load(extra + r * extra_stride + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(out + t * hidden + cols, acc.to(out.dtype.element_ty), mask=m)

    @triton.jit
    def gather_rows(tokens, src, out, n_rows, hidden, out_stride, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        rmask = rows < n_rows
        mask = rmask[:, None] & (cols < hidden)[None, :]
        t = tl.load(src + rows, mask=rmask, other=0).to(tl.int64)
        v = tl.load(tokens + t[:, None] * hidden + cols[None, :], mask=mask, other=0.0)
        tl.store(out + rows.to(tl.int64)[:, None] * out_stride + cols[None, :], v, mask=mask)

    return types.SimpleNamespace(triton=triton, swiglu_fwd=swiglu_fwd, swiglu_bwd=swiglu_bwd, gather_sum=gather_sum,
                                 gather_rows=gather_rows)


def _k() -> types.SimpleNamespace:
    return _kernels(interpreting())


def _blocks(inter: int) -> tuple[int, int]:
    import triton  # noqa: PLC0415 - optional dependency triton

    block_c = min(triton.next_power_of_2(inter), 256)
    return max(1, 4096 // block_c), block_c


class _SwiGLURouted(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base, lora, weights, pair, pad):
        k = _k()
        n_rows, inter = base.shape[0], base.shape[1] // 2
        base = base.contiguous()
        lora = lora.contiguous() if lora is not None else None
        weights = weights.contiguous()
        gu = torch.empty_like(base) if lora is not None else base
        h = base.new_empty(n_rows, inter + pad)[:, :inter]
        block_r, block_c = _blocks(inter)
        if n_rows:
            grid = (k.triton.cdiv(n_rows, block_r), k.triton.cdiv(inter, block_c))
            with on_device(base):
                k.swiglu_fwd[grid](base, lora if lora is not None else base, weights, gu, h, n_rows, inter=inter,
                                   h_stride=h.stride(0), HAS_LORA=lora is not None, BLOCK_R=block_r,
                                   BLOCK_C=block_c)
        ctx.save_for_backward(gu, weights)
        ctx.has_lora = lora is not None
        return (h, h.view_as(h)) if pair else h

    @staticmethod
    def backward(ctx, dh, dh2=None):
        k = _k()
        gu, weights = ctx.saved_tensors
        n_rows, inter = gu.shape[0], gu.shape[1] // 2
        dh, dh2 = (dh, dh2) if dh is not None else (dh2, None)
        dh = _rows(dh)
        dh2 = _rows(dh2) if dh2 is not None else dh
        dgu = torch.empty_like(gu)
        dw = torch.empty_like(weights)
        block_r, block_c = _blocks(inter)
        if n_rows:
            with on_device(gu):
                k.swiglu_bwd[(k.triton.cdiv(n_rows, block_r),)](
                    gu, weights, dh, dh2, dgu, dw, n_rows, inter=inter, dh_stride=dh.stride(0),
                    dh2_stride=dh2.stride(0), HAS_DH2=dh2 is not dh, BLOCK_R=block_r, BLOCK_C=block_c)
        return dgu, (dgu if ctx.has_lora else None), dw, None, None


def swiglu_routed(base: torch.Tensor, lora: torch.Tensor | None, weights: torch.Tensor, pair: bool = False,
                  pad: int = 0):
    """SiLU(g) * u * weights[:, None] with (g | u) = base + lora split in two halves along the last dimension:
    base, lora (rows, 2 * intermediate), weights (rows,); returns (rows, intermediate) in base's dtype. pair: the
    result twice (the same memory) for two readers, e.g. the down projection's base and LoRA GEMMs; their two
    gradients are summed inside the backward kernel instead of by autograd over a (rows, intermediate) tensor.
    pad: the result is the first columns of a (rows, intermediate + pad) buffer, the pad columns left for
    `pitlm.kernels.experts`' LoRA in the GEMM's K dimension (unwritten)."""
    if base.dim() != 2 or base.shape[1] % 2 or weights.shape != base.shape[:1]:
        raise ValueError(f"swiglu_routed wants (rows, 2*inter) and (rows,), got {tuple(base.shape)} and "
                         f"{tuple(weights.shape)}")
    return _SwiGLURouted.apply(base, lora, weights, pair, pad)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t with unit column stride (rows may be strided, e.g. the first columns of a padded buffer)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def gather_sum(rows: torch.Tensor, extra: torch.Tensor | None, inv: torch.Tensor, top_k: int) -> torch.Tensor:
    """out[t] = sum_j (rows + extra)[inv[t * top_k + j]] for rows, extra (tokens * top_k, hidden): the forward of
    `pitlm.kernels.experts.unpermute_routed`, one kernel, no autograd of its own."""
    if rows.dim() != 2 or rows.shape[0] % top_k or inv.shape != rows.shape[:1]:
        raise ValueError(f"gather_sum wants (tokens*top_k, hidden) rows and as many indices, got "
                         f"{tuple(rows.shape)} and {tuple(inv.shape)}")
    k = _k()
    rows = _rows(rows)  # strided rows are read in place (e.g. the first columns of a padded buffer)
    extra = _rows(extra) if extra is not None else None
    n_tokens, hidden = rows.shape[0] // top_k, rows.shape[1]
    out = rows.new_empty(n_tokens, hidden)
    block_h = min(k.triton.next_power_of_2(hidden), 1024)
    if n_tokens:
        with on_device(rows):
            k.gather_sum[(n_tokens, k.triton.cdiv(hidden, block_h))](
                rows, extra if extra is not None else rows, inv.contiguous(), out, hidden, rows.stride(0),
                (extra if extra is not None else rows).stride(0), TOP_K=top_k, HAS_EXTRA=extra is not None,
                BLOCK_H=block_h)
    return out


def gather_rows(tokens: torch.Tensor, src: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """tokens[src] for tokens (n, hidden) and src (rows,): the forward of `pitlm.kernels.experts.permute_routed`, one
    kernel of (rows x hidden) tiles (torch's index_select runs this shape at ~1.3 TB/s on an H200). pad: the result
    is the first columns of a (rows, hidden + pad) buffer (pad columns unwritten), as in `swiglu_routed`."""
    if tokens.dim() != 2 or src.dim() != 1:
        raise ValueError(f"gather_rows wants (n, hidden) tokens and (rows,) indices, got {tuple(tokens.shape)} and "
                         f"{tuple(src.shape)}")
    k = _k()
    tokens = tokens.contiguous()
    n_rows, hidden = src.shape[0], tokens.shape[1]
    out = tokens.new_empty(n_rows, hidden + pad)[:, :hidden]
    block_h = min(k.triton.next_power_of_2(hidden), 512)
    block_r = max(1, 4096 // block_h)
    if n_rows:
        with on_device(tokens):
            k.gather_rows[(k.triton.cdiv(n_rows, block_r), k.triton.cdiv(hidden, block_h))](
                tokens, src.contiguous(), out, n_rows, hidden, out.stride(0), BLOCK_R=block_r, BLOCK_H=block_h)
    return out
