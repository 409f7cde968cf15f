"""LoRA on routed MoE experts without materialising W + B·A.

peft adapts a fused 3-D expert parameter (`target_parameters`, e.g. Qwen3.5-MoE's `mlp.experts.gate_up_proj`,
(experts, out, in)) through a parametrization: every forward, recompute and backward it builds W + s·lhs@rhs for all
experts of the layer (one baddbmm plus copies: 44% of a training step of Qwen3.5-35B-A3B on an H100, BENCHMARKS.md),
although each token meets only 8 of the 256 experts. The same output is

    x @ (W_e + s·lhs_e @ rhs_e)^T = x @ W_e^T + s·((x @ rhs_e^T) @ lhs_e^T)

per expert e on the tokens routed to it: the base grouped GEMM plus two rank-r grouped GEMMs over the same
routed tokens. `install_expert_lora(model)` makes peft's outermost ParamWrapper of each experts module compute
that, reading the adapter factors from peft (`get_delta_factors`), so adapters, saving, loading and merging stay
peft's; it falls back to peft's own forward whenever adapters are disabled, merged or more than one is active.
"""

from __future__ import annotations

import logging
import types

import torch
from peft.tuners.lora.layer import ParamWrapper
from torch import nn

from pitlm.kernels import routed
from pitlm.kernels.registry import LORA_IN_K

log = logging.getLogger("pitlm.kernels")


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Row block g of x (rows offsets[g-1]..offsets[g]) times weight[g]^T, weight (groups, out, in): one grouped
    GEMM where torch has one for these shapes, else a loop over the groups."""
    w = weight.transpose(-2, -1)
    gmm = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    aligned = all(t.shape[-1] * t.element_size() % 16 == 0 for t in (x, w)) and w.shape[-2] * w.element_size() % 16 == 0
    native = x.dtype == torch.bfloat16 or (x.device.type == "cpu" and x.dtype == torch.float32)
    if gmm is not None and aligned and native:
        return gmm(x, w, offs=offsets)
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
    parts = [blk @ w[g] for g, blk in enumerate(torch.split(x, counts)) if counts[g]]
    return torch.cat(parts) if parts else x.new_zeros(0, w.shape[-1])


_GEMM = grouped_linear  # what lora_experts_forward calls; exclude_grouped_gemm_from_compile swaps it


def exclude_grouped_gemm_from_compile() -> None:
    """Keep the grouped GEMMs out of torch.compile graphs (one graph break each side): inductor may hand
    `_grouped_mm` operands in layouts its kernels refuse (seen on CPU with torch 2.13), and the cuBLAS/CUTLASS
    grouped GEMM is what we measured. Eager calls pay nothing for this until a model is compiled."""
    global _GEMM
    _GEMM = torch.compiler.disable(grouped_linear)


# Indexing's backward is index_put_ with accumulate (sort-based on CUDA: ~60 ms/step on the 35B model, H200
# profile); each token fills exactly top_k rows, so both directions are gathers plus a sum over top_k.
# With sorted[s] = flat[perm[s]], src = perm // top_k and inv[perm[s]] = s: permuted row s is token src[s], and
# token t's rows are inv[t*top_k : (t+1)*top_k]. The two maps are adjoint, so each one's backward is the other.
# fused: both directions run as Triton kernels (pitlm.kernels.routed: gather_rows, gather_sum).
class _PermuteRouted(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, src, inv, top_k, fused):
        ctx.save_for_backward(src, inv)
        ctx.top_k, ctx.fused = top_k, fused
        if fused:
            return routed.gather_rows(tokens, src)
        return tokens.index_select(0, src)

    @staticmethod
    def backward(ctx, grad):
        src, inv = ctx.saved_tensors
        return _UnpermuteRouted.apply(grad, None, src, inv, ctx.top_k, ctx.fused), None, None, None, None


class _UnpermuteRouted(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, extra, src, inv, top_k, fused):
        ctx.save_for_backward(src, inv)
        ctx.top_k, ctx.fused, ctx.has_extra = top_k, fused, extra is not None
        if fused:
            return routed.gather_sum(rows, extra, inv, top_k)
        if extra is not None:
            rows = rows + extra
        gathered = rows.index_select(0, inv)
        return gathered.view(rows.shape[0] // top_k, top_k, *rows.shape[1:]).sum(1)  # bf16 sums in fp32

    @staticmethod
    def backward(ctx, grad):
        src, inv = ctx.saved_tensors
        g = _PermuteRouted.apply(grad, src, inv, ctx.top_k, ctx.fused)
        return g, (g if ctx.has_extra else None), None, None, None, None


class _PermuteRoutedPair(torch.autograd.Function):
    """The fused permute for rows read by two GEMMs (the base and the LoRA down-projection): the same rows returned
    twice, so their two gradients reach backward apart and are summed inside the fused gather-sum, not by autograd
    over a (rows, hidden) tensor."""

    @staticmethod
    def forward(ctx, tokens, src, inv, top_k, pad=0):
        ctx.save_for_backward(src, inv)
        ctx.top_k = top_k
        rows = routed.gather_rows(tokens, src, pad)  # pad: room for the gate_up LoRA term in K (_LoRAInK)
        return rows, rows.view_as(rows)

    @staticmethod
    def backward(ctx, grad, grad2):
        src, inv = ctx.saved_tensors
        grad, grad2 = (grad, grad2) if grad is not None else (grad2, None)
        return _UnpermuteRouted.apply(grad, grad2, src, inv, ctx.top_k, True), None, None, None, None


def grouped_weight_grad(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Per group g of rows (offsets as in grouped_linear): a_g^T @ b_g, stacked (groups, a cols, b cols); the
    weight-gradient form of a grouped GEMM. Groups without rows give zeros."""
    gmm = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    aligned = all(t.shape[-1] * t.element_size() % 16 == 0 and t.shape[0] * t.element_size() % 16 == 0
                  for t in (a, b))
    native = a.dtype == torch.bfloat16 or (a.device.type == "cpu" and a.dtype == torch.float32)
    if gmm is not None and aligned and native and a.dtype == b.dtype:
        return gmm(a.t(), b, offs=offsets)
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
    out = a.new_zeros(n_groups, a.shape[1], b.shape[1])
    start = 0
    for g, n in enumerate(counts):
        if n:
            out[g] = a[start:start + n].t() @ b[start:start + n]
        start += n
    return out


PAD = "_pitlm_lora_pad"  # experts attribute: {parameter name: its (experts, out, in + pad) storage}


def lora_pad(rank: int, width: int) -> int:
    """Columns appended to a width-`width` GEMM operand to hold a rank-`rank` LoRA term: rank, rounded up so that
    rows stay 16-byte aligned in bf16."""
    return rank + (-(width + rank)) % 8


def padded_weight(experts: nn.Module, name: str, pad: int) -> torch.Tensor:
    """The (experts, out, in + pad) storage whose first `in` columns are the frozen expert weight `name`: made once
    (the weight is copied, and the module's parameter becomes a view of it), kept while the parameter is that view."""
    w = getattr(experts, name)
    store = getattr(experts, PAD, {}).get(name)
    if store is not None and store.shape[-1] == w.shape[-1] + pad and store.data_ptr() == w.data_ptr():
        return store
    store = w.new_zeros(*w.shape[:-1], w.shape[-1] + pad)
    with torch.no_grad():
        store[..., :w.shape[-1]].copy_(w)
    setattr(experts, name, nn.Parameter(store[..., :w.shape[-1]], requires_grad=w.requires_grad))
    if not hasattr(experts, PAD):
        setattr(experts, PAD, {})
    getattr(experts, PAD)[name] = store
    return store


class _LoRAInK(torch.autograd.Function):
    """A projection with LoRA as one grouped GEMM over a longer K: per expert e, on its routed rows,

        (h | s·(h_low @ A_e^T)) @ (W_e | B_e)^T = h @ W_e^T + s·(h_low @ A_e^T) @ B_e^T

    with h the first columns of a padded buffer (`swiglu_routed(..., pad=)`) and W_e the first columns of the
    padded weight storage (`padded_weight`): the rank-r term is written into the pad columns of both, so the LoRA
    up-projection and its add ride in the base GEMM (r more of K) instead of a (rows, out) GEMM output that is
    written and read again. Backward: one GEMM gives d(h) and d(low) together; A's and B's gradients are the
    weight-gradient GEMMs. h and h_low are one tensor read twice (their gradients stay apart)."""

    @staticmethod
    def forward(ctx, h, h_low, rhs, lhs, scaling, store, offsets):
        rows, inter = h.shape
        r = rhs.shape[1]
        ctx.rhs_dtype, rhs = rhs.dtype, rhs.to(h.dtype)  # float32 adapters: the GEMMs in the activations' dtype
        ext = torch.as_strided(h, (rows, store.shape[-1]), (h.stride(0), 1))  # h with its pad columns
        low = grouped_linear(h_low, rhs, offsets) * scaling
        ext[:, inter:inter + r].copy_(low)
        if ext.shape[1] > inter + r:  # alignment columns: zero in the weight, and must not be NaN here
            ext[:, inter + r:].zero_()
        store[..., inter:inter + r].copy_(lhs)
        out = grouped_linear(ext, store, offsets)
        ctx.save_for_backward(ext, rhs, store, offsets)
        ctx.scaling, ctx.inter, ctx.lhs_dtype = scaling, inter, lhs.dtype
        return out

    @staticmethod
    def backward(ctx, d_out):
        ext, rhs, store, offsets = ctx.saved_tensors
        inter, r = ctx.inter, rhs.shape[1]
        d_out = d_out.contiguous()
        d_ext = grouped_linear(d_out, store.transpose(-2, -1), offsets)  # (rows, inter + pad): d(h) | d(low)
        d_low = d_ext[:, inter:inter + r] * ctx.scaling
        n = store.shape[0]
        d_lhs = grouped_weight_grad(d_out, ext[:, inter:inter + r].contiguous(), offsets, n)
        d_rhs = grouped_weight_grad(d_low, ext[:, :inter], offsets, n)
        d_h_low = grouped_linear(d_low, rhs.transpose(-2, -1), offsets)
        return d_ext[:, :inter], d_h_low, d_rhs.to(ctx.rhs_dtype), d_lhs.to(ctx.lhs_dtype), None, None, None


def permute_routed(tokens: torch.Tensor, src: torch.Tensor, inv: torch.Tensor, top_k: int,
                   fused: bool = False) -> torch.Tensor:
    """tokens[src]: token src[s] as routed row s."""
    return _PermuteRouted.apply(tokens, src, inv, top_k, fused)


def unpermute_routed(rows: torch.Tensor, src: torch.Tensor, inv: torch.Tensor, top_k: int,
                     extra: torch.Tensor | None = None, fused: bool = False) -> torch.Tensor:
    """The sum of each token's top_k routed rows (+ extra's, the same shape), back in token order (the adjoint of
    `permute_routed`). fused: one Triton kernel (`pitlm.kernels.routed.gather_sum`)."""
    return _UnpermuteRouted.apply(rows, extra, src, inv, top_k, fused)


def lora_experts_forward(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor,
                         factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    """transformers' grouped-GEMM experts forward (gated, no bias, weights (experts, out, in)) with LoRA factors
    {parameter name: (lhs (E, out, r), rhs (E, r, in), scaling)} applied to the routed tokens only."""
    top_k = top_k_index.shape[-1]
    # install_fast_kernels switches the fused kernels on; a torch.compile'd block leaves the fusing to inductor
    fused = routed.enabled(experts, hidden_states) and not torch.compiler.is_compiling()
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    src = perm // top_k  # the token of each routed row
    in_k_gu = fused and "gate_up_proj" in factors and _lora_in_k_ok(experts, "gate_up_proj", factors)
    if fused and "gate_up_proj" in factors:
        pad_gu = lora_pad(factors["gate_up_proj"][1].shape[1], hidden_states.shape[1]) if in_k_gu else 0
        x, x_low = _PermuteRoutedPair.apply(hidden_states, src, inv, top_k, pad_gu)
    else:
        x = x_low = permute_routed(hidden_states, src, inv, top_k, fused)
    weights = permute_routed(top_k_weights.reshape(-1), perm, inv, 1)
    n_experts = experts.gate_up_proj.shape[0]
    hist_in = expert_ids.int() if x.device.type == "cuda" else expert_ids.float()
    offsets = torch.cumsum(torch.histc(hist_in, bins=n_experts, min=0, max=n_experts - 1), 0, dtype=torch.int32)

    def project(inp: torch.Tensor, name: str, inp_low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The base GEMM's output and the LoRA term's (None without an adapter), still to be added; inp_low: inp
        itself, or its alias from a paired op (the two gradients then stay apart)."""
        out = _GEMM(inp, getattr(experts, name), offsets)
        if name not in factors:
            return out, None
        lhs, rhs, scaling = factors[name]  # peft's lhs is a permuted view: grouped GEMMs want plain layouts
        lhs, rhs = lhs.contiguous(), rhs.contiguous()
        low = _GEMM(inp_low, rhs, offsets) * scaling  # (S, r): the scale on r columns, not on the output's
        return out, _GEMM(low, lhs, offsets)

    if in_k_gu:  # gate_up_proj's LoRA in its base GEMM's K (padded routed rows and weight)
        lhs, rhs, scaling = factors["gate_up_proj"]
        store = padded_weight(experts, "gate_up_proj", pad_gu)
        base, lora = _LoRAInK.apply(x, x_low, rhs.contiguous(), lhs.contiguous(), scaling, store, offsets), None
    else:
        base, lora = project(x, "gate_up_proj", x_low)
    in_k = fused and "down_proj" in factors and _lora_in_k_ok(experts, "down_proj", factors)
    if fused:  # the LoRA add, SiLU(gate) * up and the routing weight in one kernel
        pair = "down_proj" in factors  # h read by two GEMMs: their gradients summed in the kernel
        pad = lora_pad(factors["down_proj"][1].shape[1], base.shape[1] // 2) if in_k else 0
        out = routed.swiglu_routed(base, lora, weights, pair=pair, pad=pad)
        h, h_low = out if pair else (out, out)
        if in_k:  # down_proj's LoRA in its base GEMM's K (padded h and weight)
            lhs, rhs, scaling = factors["down_proj"]
            store = padded_weight(experts, "down_proj", pad)
            rows = _LoRAInK.apply(h, h_low, rhs.contiguous(), lhs.contiguous(), scaling, store, offsets)
            return unpermute_routed(rows, src, inv, top_k, fused=True).to(hidden_states.dtype)
    else:
        h = base if lora is None else base + lora
        if hasattr(experts, "_apply_gate"):
            h = experts._apply_gate(h)
        else:
            gate, up = h.chunk(2, dim=-1)
            h = experts.act_fn(gate) * up
        # the routing weight scales each routed row; down_proj is linear, so it goes on the narrow input side
        h = h_low = h * weights.unsqueeze(-1).to(h.dtype)
    base, lora = project(h, "down_proj", h_low)
    return unpermute_routed(base, src, inv, top_k, extra=lora, fused=fused).to(hidden_states.dtype)


def _lora_in_k_ok(experts: nn.Module, name: str, factors: dict) -> bool:
    """Whether projection `name`'s LoRA can ride in its GEMM's K (`_LoRAInK`): with the routed kernels, unless
    switched off (fast path "lora-in-k", default on), for a frozen 3-D weight."""
    w = getattr(experts, name)
    return LORA_IN_K.is_on(experts, default=True) and w.dim() == 3 and not w.requires_grad \
        and factors[name][1].dim() == 3


def experts_unsupported(experts: nn.Module) -> str | None:
    """Why this experts module cannot take the grouped LoRA path (None = it can)."""
    for name in ("gate_up_proj", "down_proj"):
        p = getattr(experts, name, None)
        if not isinstance(p, torch.Tensor) or p.dim() != 3:
            return f"no 3-D {name}"
    if getattr(experts, "is_transposed", False) or getattr(experts, "has_bias", False):
        return "transposed or biased expert weights"
    if not getattr(experts, "has_gate", True) or not getattr(experts, "is_concatenated", True):
        return "ungated or interleaved gate/up layout"
    if getattr(experts, "_is_expert_parallel", False) or getattr(experts, "has_post_expert_norm", False):
        return "expert parallelism or a post-expert norm"
    if not hasattr(experts, "act_fn"):
        return "no act_fn"
    return None


def _chain(wrapper: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """The nested ParamWrappers from `wrapper` inwards, and the module they wrap."""
    chain, inner = [], wrapper
    while isinstance(inner, ParamWrapper):
        chain.append(inner)
        inner = inner.base_layer
    return chain, inner


def install_expert_lora(model: nn.Module) -> int:
    """Route every LoRA-adapted experts module of a peft model through `lora_experts_forward`. Returns how many
    experts modules now take the grouped path (0: none adapted, or none supported, each logged)."""
    inner_ids = {id(m.base_layer) for m in model.modules() if isinstance(m, ParamWrapper)}
    installed, refused = 0, set()
    for module in model.modules():
        if not isinstance(module, ParamWrapper) or id(module) in inner_ids:
            continue  # only outermost wrappers
        chain, experts = _chain(module)
        why = experts_unsupported(experts)
        if why or any(w.parameter_name not in ("gate_up_proj", "down_proj") for w in chain):
            refused.add(why or "a LoRA parameter other than gate_up_proj/down_proj")
            continue
        module.forward = types.MethodType(_expert_lora_forward, module)
        installed += 1
    for why in refused:
        log.warning("expert LoRA: peft's materialising path kept for some experts (%s)", why)
    return installed


def _expert_lora_forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
    # chain, experts and fallback come from self at call time, so a deepcopy computes with its own modules
    chain, experts = _chain(self)
    factors = {}
    for w in chain:
        adapters = [a for a in w.active_adapters if a in w.lora_A]
        if args or kwargs or w.disable_adapters or w.merged or len(adapters) > 1:
            return type(self).forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        if adapters:
            factors[w.parameter_name] = w.get_delta_factors(adapters[0])
    return lora_experts_forward(experts, hidden_states, top_k_index, top_k_weights, factors)
