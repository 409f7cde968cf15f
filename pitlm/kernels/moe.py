"""Fused Triton kernels for the rest of a Qwen3.5-MoE sparse block: the router and the shared expert's gate.

Around the routed experts (`pitlm.kernels.routed`) the block runs two chains of small kernels per layer,
forward, again in the recompute of a checkpointed layer, and backward:

- the router (`Qwen3_5MoeTopKRouter`): softmax of the (tokens, experts) logits in float32, `torch.topk`, a sum, a
  division and a cast. torch's top-k over 256 experts was 18 ms of a 1.2 s step of the 35B-A3B (BENCHMARKS.md,
  session 8's profile: 226 us per call for 16k tokens);
- the shared expert's gate: `expert_out + sigmoid(shared_expert_gate(x)) * shared_out`, a multiply and an add over
  (tokens, hidden) forward, and a multiply, a product and a row sum backward.

Here each is one kernel each way:

- `router_topk(logits, top_k)`: per row the softmax, the top_k experts and their probabilities renormalised to sum
  to 1, in float32, cast to the logits' dtype; indices int64 in descending order of the logits. Selection is on the
  logits (the softmax is monotone), so a tie between distinct logits that rounds to equal probabilities is not a
  tie here; an exact tie takes the lower expert index (torch.topk's order for ties is unspecified). The backward
  recomputes the softmax from the saved logits;
- `shared_gate_add(y, shared, gate_logit)`: y + sigmoid(gate_logit) * shared in float32 with one rounding; the
  backward writes d(shared) and reduces d(gate_logit) over the row in one pass.

`install_moe_kernels(model)` routes the router and the sparse block of Qwen3.5-MoE through them (instances,
CUDA tensors or the tests' interpreter, see `triton_util.available`); each has a switch (the fast paths "router"
and "shared-gate" of `pitlm.kernels.registry`) that `pitlm.kernels.install.set_fast_path` toggles, and off (or on CPU)
transformers' own forward runs.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn

from pitlm.kernels.registry import ROUTER_TOPK, SHARED_EXPERT_GATE
from pitlm.kernels.triton_util import available, has_triton, interpreting, on_device

ROUTERS = {"Qwen3_5MoeTopKRouter"}  # softmax -> top-k -> renormalised to sum 1 -> cast (transformers 5.x)
BLOCKS = {"Qwen3_5MoeSparseMoeBlock"}  # expert_out + sigmoid(shared_expert_gate(x)) * shared_expert(x)


@functools.cache
def _kernels(interpret: bool) -> types.SimpleNamespace:
    """The jitted kernels (one set per interpreter mode, as in pitlm.kernels.routed; no tl.standard helpers)."""
    import triton  # noqa: PLC0415 - optional dependency triton
    import triton.language as tl  # noqa: PLC0415 - optional dependency triton

    @triton.jit
    def router_fwd(logits, w, idx, n_rows, E: tl.constexpr, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_E)
        ks = tl.arange(0, BLOCK_K)
        rmask = rows < n_rows
        r64 = rows.to(tl.int64)
        x = tl.load(logits + r64[:, None] * E + cols[None, :], mask=rmask[:, None] & (cols < E)[None, :],
                    other=float("-inf")).to(tl.float32)
        x = tl.where(rmask[:, None], x, 0.0)  # rows past the end: finite, never stored
        m = tl.max(x, axis=1)
        e = tl.exp(x - m[:, None])
        s = tl.sum(e, axis=1)
        vals = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
        ids = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.int32)
        for j in tl.static_range(TOP_K):
            best = tl.max(x, axis=1)
            pick = tl.min(tl.where(x == best[:, None], cols[None, :], BLOCK_E), axis=1)  # lowest index on a tie
            sel = cols[None, :] == pick[:, None]
            p = tl.sum(tl.where(sel, e, 0.0), axis=1) / s
            vals = tl.where(ks[None, :] == j, p[:, None], vals)
            ids = tl.where(ks[None, :] == j, pick[:, None], ids)
            x = tl.where(sel, float("-inf"), x)
        total = tl.sum(vals, axis=1)
        kmask = rmask[:, None] & (ks < TOP_K)[None, :]
        off = r64[:, None] * TOP_K + ks[None, :]
        tl.store(w + off, (vals / total[:, None]).to(w.dtype.element_ty), mask=kmask)
        tl.store(idx + off, ids.to(tl.int64), mask=kmask)

    @triton.jit
    def router_bwd(logits, idx, dw, dlogits, n_rows, E: tl.constexpr, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        # w_j = t_j / S with t_j = p[idx_j], S = sum_j t_j, p = softmax(x): dt_j = (dw_j - sum_i dw_i w_i) / S and
        # dx = p * (dp - sum_j dt_j t_j) with dp = dt scattered to idx, where sum_j dt_j t_j = 0 (w does not change
        # when p is scaled, so the softmax's normaliser drops out): dx = p * dp
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_E)
        ks = tl.arange(0, BLOCK_K)
        rmask = rows < n_rows
        r64 = rows.to(tl.int64)
        emask = rmask[:, None] & (cols < E)[None, :]
        x = tl.load(logits + r64[:, None] * E + cols[None, :], mask=emask, other=float("-inf")).to(tl.float32)
        x = tl.where(rmask[:, None], x, 0.0)
        e = tl.exp(x - tl.max(x, axis=1)[:, None])
        p = e / tl.sum(e, axis=1)[:, None]
        kmask = rmask[:, None] & (ks < TOP_K)[None, :]
        off = r64[:, None] * TOP_K + ks[None, :]
        ids = tl.load(idx + off, mask=kmask, other=-1)
        d = tl.load(dw + off, mask=kmask, other=0.0).to(tl.float32)
        t = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
        for j in tl.static_range(TOP_K):
            i_j = tl.sum(tl.where(ks[None, :] == j, ids, 0), axis=1)
            t_j = tl.sum(tl.where(cols[None, :] == i_j[:, None], p, 0.0), axis=1)
            t = tl.where(ks[None, :] == j, t_j[:, None], t)
        total = tl.where(rmask, tl.sum(t, axis=1), 1.0)
        c = tl.sum(d * t, axis=1) / total
        dt = tl.where(kmask, (d - c[:, None]) / total[:, None], 0.0)
        dp = tl.zeros([BLOCK_R, BLOCK_E], dtype=tl.float32)
        for j in tl.static_range(TOP_K):
            i_j = tl.sum(tl.where(ks[None, :] == j, ids, 0), axis=1)
            dt_j = tl.sum(tl.where(ks[None, :] == j, dt, 0.0), axis=1)
            dp += tl.where(cols[None, :] == i_j[:, None], dt_j[:, None], 0.0)
        dx = p * dp
        tl.store(dlogits + r64[:, None] * E + cols[None, :], dx.to(dlogits.dtype.element_ty), mask=emask)

    @triton.jit
    def gate_add_fwd(y, s, gl, out, n_rows, hidden, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        rmask = rows < n_rows
        mask = rmask[:, None] & (cols < hidden)[None, :]
        off = rows.to(tl.int64)[:, None] * hidden + cols[None, :]
        g = tl.load(gl + rows, mask=rmask, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-g))
        v = tl.load(y + off, mask=mask, other=0.0).to(tl.float32) \
            + sig[:, None] * tl.load(s + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(out + off, v.to(out.dtype.element_ty), mask=mask)

    @triton.jit
    def gate_add_bwd(dout, s, gl, ds, dgl, n_rows, hidden: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < n_rows
        r64 = rows.to(tl.int64)
        g = tl.load(gl + rows, mask=rmask, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-g))
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for c0 in range(0, hidden, BLOCK_H):
            cols = c0 + tl.arange(0, BLOCK_H)
            mask = rmask[:, None] & (cols < hidden)[None, :]
            off = r64[:, None] * hidden + cols[None, :]
            d = tl.load(dout + off, mask=mask, other=0.0).to(tl.float32)
            acc += tl.sum(d * tl.load(s + off, mask=mask, other=0.0).to(tl.float32), axis=1)
            tl.store(ds + off, (d * sig[:, None]).to(ds.dtype.element_ty), mask=mask)
        tl.store(dgl + rows, (acc * sig * (1.0 - sig)).to(dgl.dtype.element_ty), mask=rmask)

    return types.SimpleNamespace(triton=triton, router_fwd=router_fwd, router_bwd=router_bwd,
                                 gate_add_fwd=gate_add_fwd, gate_add_bwd=gate_add_bwd)


def _k() -> types.SimpleNamespace:
    return _kernels(interpreting())


def _router_blocks(n_experts: int, top_k: int) -> tuple[int, int, int]:
    import triton  # noqa: PLC0415 - optional dependency triton

    block_e = triton.next_power_of_2(n_experts)
    return block_e, triton.next_power_of_2(top_k), max(1, min(64, 2048 // block_e))


class _RouterTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, top_k):
        k = _k()
        logits = logits.contiguous()
        n_rows, n_experts = logits.shape
        w = logits.new_empty(n_rows, top_k)
        idx = torch.empty(n_rows, top_k, dtype=torch.int64, device=logits.device)
        block_e, block_k, block_r = _router_blocks(n_experts, top_k)
        if n_rows:
            with on_device(logits):
                k.router_fwd[(k.triton.cdiv(n_rows, block_r),)](logits, w, idx, n_rows, E=n_experts, TOP_K=top_k,
                                                                 BLOCK_E=block_e, BLOCK_K=block_k, BLOCK_R=block_r)
        ctx.save_for_backward(logits, idx)
        ctx.mark_non_differentiable(idx)
        return w, idx

    @staticmethod
    def backward(ctx, dw, _didx):
        k = _k()
        logits, idx = ctx.saved_tensors
        n_rows, n_experts = logits.shape
        top_k = idx.shape[1]
        dlogits = torch.empty_like(logits)
        block_e, block_k, block_r = _router_blocks(n_experts, top_k)
        if n_rows:
            with on_device(logits):
                k.router_bwd[(k.triton.cdiv(n_rows, block_r),)](logits, idx, dw.contiguous(), dlogits, n_rows,
                                                                 E=n_experts, TOP_K=top_k, BLOCK_E=block_e,
                                                                 BLOCK_K=block_k, BLOCK_R=block_r)
        return dlogits, None


def router_topk(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, indices) of each row's top_k experts: softmax in float32, the top_k probabilities renormalised to
    sum 1 and cast to the logits' dtype; indices int64, by descending logit. logits (tokens, experts)."""
    if logits.dim() != 2 or not 0 < top_k <= logits.shape[1]:
        raise ValueError(f"router_topk wants (tokens, experts) logits and 0 < top_k <= experts, got "
                         f"{tuple(logits.shape)} and top_k={top_k}")
    return _RouterTopK.apply(logits, top_k)


def _gate_blocks(hidden: int) -> tuple[int, int]:
    import triton  # noqa: PLC0415 - optional dependency triton

    block_h = min(triton.next_power_of_2(hidden), 1024)
    return max(1, 4096 // block_h), block_h


class _SharedGateAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, shared, gate_logit):
        k = _k()
        y, shared, gl = y.contiguous(), shared.contiguous(), gate_logit.contiguous()
        n_rows, hidden = y.shape
        out = torch.empty(n_rows, hidden, dtype=torch.promote_types(y.dtype, shared.dtype), device=y.device)
        block_r, block_h = _gate_blocks(hidden)
        if n_rows:
            with on_device(y):
                k.gate_add_fwd[(k.triton.cdiv(n_rows, block_r), k.triton.cdiv(hidden, block_h))](
                    y, shared, gl, out, n_rows, hidden, BLOCK_R=block_r, BLOCK_H=block_h)
        ctx.save_for_backward(shared, gl)
        ctx.y_dtype = y.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        k = _k()
        shared, gl = ctx.saved_tensors
        dout = dout.contiguous()
        n_rows, hidden = shared.shape
        ds = torch.empty_like(shared)
        dgl = torch.empty_like(gl)
        block_r, block_h = _gate_blocks(hidden)
        if n_rows:
            with on_device(shared):
                k.gate_add_bwd[(k.triton.cdiv(n_rows, block_r),)](dout, shared, gl, ds, dgl, n_rows, hidden=hidden,
                                                                  BLOCK_R=block_r, BLOCK_H=block_h)
        return dout.to(ctx.y_dtype), ds, dgl


def shared_gate_add(y: torch.Tensor, shared: torch.Tensor, gate_logit: torch.Tensor) -> torch.Tensor:
    """y + sigmoid(gate_logit) * shared for y, shared (tokens, hidden) and gate_logit (tokens, 1), in float32 with
    one rounding to the promoted dtype of y and shared."""
    if y.dim() != 2 or shared.shape != y.shape or gate_logit.shape != (y.shape[0], 1):
        raise ValueError(f"shared_gate_add wants (tokens, hidden) twice and (tokens, 1), got {tuple(y.shape)}, "
                         f"{tuple(shared.shape)} and {tuple(gate_logit.shape)}")
    return _SharedGateAdd.apply(y, shared, gate_logit)


def _router_forward(ref):
    def forward(self, hidden_states):
        if not ROUTER_TOPK.is_on(self) or not available(hidden_states):
            return ref(hidden_states)
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = nn.functional.linear(hidden_states, self.weight)
        weights, indices = router_topk(logits, self.top_k)
        return logits, weights, indices

    return forward


def _block_forward(ref):
    def forward(self, hidden_states):
        if not SHARED_EXPERT_GATE.is_on(self) or not available(hidden_states):
            return ref(hidden_states)
        batch, seq, hidden = hidden_states.shape
        x = hidden_states.view(-1, hidden)
        shared = self.shared_expert(x)
        _, weights, indices = self.gate(x)
        routed = self.experts(x, indices, weights)
        return shared_gate_add(routed, shared, self.shared_expert_gate(x)).view(batch, seq, hidden)

    return forward


def install_moe_kernels(model: nn.Module, on: bool = True) -> tuple[int, int]:
    """Route the Qwen3.5-MoE routers and sparse blocks of `model` through the fused kernels, switched on or off;
    returns (routers, blocks). Idempotent: patched modules are switched again, not wrapped twice."""
    if not has_triton():
        return 0, 0
    n_router = n_block = 0
    for m in model.modules():
        kind = type(m).__name__
        if kind in ROUTERS:
            if not hasattr(m, ROUTER_TOPK.attr):
                m.forward = types.MethodType(_router_forward(m.forward), m)
            setattr(m, ROUTER_TOPK.attr, on)
            n_router += 1
        elif kind in BLOCKS:
            if not hasattr(m, SHARED_EXPERT_GATE.attr):
                m.forward = types.MethodType(_block_forward(m.forward), m)
            setattr(m, SHARED_EXPERT_GATE.attr, on)
            n_block += 1
    return n_router, n_block
