"""Partial rotary position embedding in one Triton kernel each way (Qwen3.5's attention rotates the first quarter of
each 256-wide head).

transformers' `apply_rotary_pos_emb` slices the rotated part off, rotates it with a `cat` (rotate_half), two
multiplies and an add, then writes the whole head again with another `cat` of the rotated and the passed part: ~8
kernels per tensor forward and as many backward, two of them over the whole (batch, heads, tokens, head_dim)
tensor (`cat` ~25 ms of a 1.15 s step of the 35B-A3B, BENCHMARKS.md session 9). Here one kernel reads each head
once and writes it once, in any layout (strides), and the backward applies the transposed rotation the same way.

`install_rope(modeling)` routes a modeling module's `apply_rotary_pos_emb` through it for CUDA tensors (and the
tests' interpreter, `triton_util.available`) while its fast path "rope" is on
(`pitlm.kernels.registry.PARTIAL_ROPE`, a process-wide switch); anything else takes transformers' function.
`pitlm.kernels.install.install_fast_kernels` installs it by default (rope=False leaves transformers' function): +1.4% on the
35B-A3B's step (BENCHMARKS.md, session 9); its bf16 GPU test passed on an H200 in session 10.
"""

from __future__ import annotations

import functools
import types

import torch

from pitlm.kernels.registry import PARTIAL_ROPE
from pitlm.kernels.triton_util import available, interpreting, on_device


@functools.cache
def _kernels(interpret: bool) -> types.SimpleNamespace:
    import triton  # noqa: PLC0415 - optional dependency triton
    import triton.language as tl  # noqa: PLC0415 - optional dependency triton

    @triton.jit
    def rope(x, cos, sin, out, T, H, sxb, sxh, sxt, sob, soh, sot, scb, sct, R: tl.constexpr, D: tl.constexpr,
             HALF: tl.constexpr, PASS: tl.constexpr, BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr):
        pid = tl.program_id(0)
        b = (pid // T).to(tl.int64)
        t = (pid % T).to(tl.int64)
        hs = tl.arange(0, BLOCK_H)
        hmask = hs < H
        i = tl.arange(0, HALF)
        imask = i < R // 2
        c_off = b * scb + t * sct
        c1 = tl.load(cos + c_off + i, mask=imask, other=0.0).to(tl.float32)
        c2 = tl.load(cos + c_off + R // 2 + i, mask=imask, other=0.0).to(tl.float32)
        s1 = tl.load(sin + c_off + i, mask=imask, other=0.0).to(tl.float32)
        s2 = tl.load(sin + c_off + R // 2 + i, mask=imask, other=0.0).to(tl.float32)
        m = hmask[:, None] & imask[None, :]
        xb = x + b * sxb + t * sxt + hs.to(tl.int64)[:, None] * sxh
        ob = out + b * sob + t * sot + hs.to(tl.int64)[:, None] * soh
        x1 = tl.load(xb + i[None, :], mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(xb + R // 2 + i[None, :], mask=m, other=0.0).to(tl.float32)
        if BACKWARD:  # the transpose of (x1, x2) -> (x1 c1 - x2 s1, x2 c2 + x1 s2)
            o1 = x1 * c1[None, :] + x2 * s2[None, :]
            o2 = x2 * c2[None, :] - x1 * s1[None, :]
        else:
            o1 = x1 * c1[None, :] - x2 * s1[None, :]
            o2 = x2 * c2[None, :] + x1 * s2[None, :]
        tl.store(ob + i[None, :], o1.to(out.dtype.element_ty), mask=m)
        tl.store(ob + R // 2 + i[None, :], o2.to(out.dtype.element_ty), mask=m)
        if PASS > 0:
            j = tl.arange(0, PASS)
            pm = hmask[:, None] & (j < D - R)[None, :]
            tl.store(ob + R + j[None, :], tl.load(xb + R + j[None, :], mask=pm, other=0.0), mask=pm)

    return types.SimpleNamespace(triton=triton, rope=rope)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    k = _kernels(interpreting())
    batch, heads, seq, dim = x.shape
    rot = cos.shape[-1]
    out = torch.empty_like(x)  # the same layout (strides) as x
    if x.numel():
        p2 = k.triton.next_power_of_2
        with on_device(x):
            k.rope[(batch * seq,)](
                x, cos, sin, out, seq, heads, x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1),
                out.stride(2), cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1), R=rot, D=dim,
                HALF=p2(rot // 2), PASS=p2(dim - rot) if dim > rot else 0, BLOCK_H=p2(heads), BACKWARD=backward)
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        if grad.stride(-1) != 1:  # e.g. the expanded gradient of a sum: the kernel reads a head at unit stride
            grad = grad.contiguous()
        return _launch(grad, cos, sin, backward=True), None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' partial rotary embedding of x (batch, heads, tokens, head_dim): the first R = cos.shape[-1]
    columns of each head rotated (rotate_half convention) by cos, sin (batch or 1, tokens, R), the rest passed."""
    if x.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape or cos.shape[-1] % 2 or cos.shape[-1] > x.shape[-1] \
            or cos.shape[1] != x.shape[2] or cos.shape[0] not in (1, x.shape[0]) or cos.stride(-1) != 1 \
            or sin.stride() != cos.stride() or x.stride(-1) != 1:
        raise ValueError(f"rope wants x (batch, heads, tokens, dim) with unit last stride and cos, sin (batch or 1, "
                         f"tokens, even R <= dim) alike, got {tuple(x.shape)} and {tuple(cos.shape)}")
    return _Rope.apply(x, cos, sin)


def install_rope(modeling) -> bool:
    """Route `modeling.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)` through `rope` where it applies;
    returns whether the module has that function (idempotent)."""
    ref = getattr(modeling, "apply_rotary_pos_emb", None)
    if ref is None:
        return False
    if getattr(ref, "_pitlm_fast", False):
        return True

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, **kwargs):
        if (not PARTIAL_ROPE.is_on() or unsqueeze_dim != 1 or kwargs or not available(q) or q.dim() != 4 or k.dim() != 4
                or cos.dim() != 3 or cos.shape[-1] % 2 or cos.shape[-1] > q.shape[-1] or q.stride(-1) != 1
                or k.stride(-1) != 1):
            return ref(q, k, cos, sin, unsqueeze_dim, **kwargs)
        cos, sin = cos.contiguous(), sin.contiguous()
        return rope(q, cos, sin), rope(k, cos, sin)

    apply_rotary_pos_emb._pitlm_fast = True
    apply_rotary_pos_emb.__wrapped__ = ref
    modeling.apply_rotary_pos_emb = apply_rotary_pos_emb
    return True
