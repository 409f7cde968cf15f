"""LoRA on dense layers with the scale on the rank side and the add inside the GEMM.

peft's `lora.Linear` computes `result + lora_B(lora_A(dropout(x))) * scaling`: after the rank-r up-projection it
multiplies the full (tokens, out) output by the scaling and adds it to the base output, two memory-bound passes over
an (tokens, out) tensor forward, the same again in the recompute of a checkpointed block, and one more backward
(the multiply's). On Qwen3.5-35B-A3B's 74 GiB step the multiplies and adds of the adapted projections were
~60 ms of 1.32 s (BENCHMARKS.md, session 8's profile). The same output is

    x @ W^T + b + ((dropout(x) @ A^T) * scaling) @ B^T

with the scale on the r columns, and the up-projection accumulated into the base output by cuBLAS's epilogue
(`addmm_` with beta = 1, which reads the base output once and writes it once).

Backward (a frozen base, no dropout: `_DenseLoRA`): the input's gradient through W and through the adapter's A
accumulated in one buffer (addmm_) instead of two (tokens, in) tensors added by autograd, in one graph node.

`install_dense_lora(model)` routes peft's `lora.Linear` layers around plain `nn.Linear` bases through that; each
call falls back to peft's own forward when the layer is not plain LoRA at that moment (adapters disabled or merged,
several active, a variant such as DoRA, a LoRA bias, per-call adapter names). Adapters, saving, loading and merging
stay peft's.
"""

from __future__ import annotations

import logging
import types

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from pitlm.kernels.registry import DENSE_ONE_NODE

log = logging.getLogger("pitlm.kernels")


def install_dense_lora(model: nn.Module) -> int:
    """Route every peft `lora.Linear` of `model` whose base is a plain `nn.Linear` through `dense_lora_forward`.
    Returns how many layers were routed."""
    n = 0
    for m in model.modules():
        if isinstance(m, LoraLinear) and type(m.get_base_layer()) is nn.Linear \
                and not getattr(m, "fan_in_fan_out", False):
            m.forward = types.MethodType(_forward, m)
            setattr(m, DENSE_ONE_NODE.attr, DENSE_ONE_NODE.is_on(m, default=True))  # `_DenseLoRA` where it applies
            n += 1
    return n


def _plain_adapter(layer) -> str | None:
    """The one active plain-LoRA adapter of a peft lora.Linear, or None when its own forward must run."""
    if layer.disable_adapters or layer.merged:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or layer.lora_B[name].bias is not None:
        return None
    return name


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = None if args or kwargs else _plain_adapter(self)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    self._check_forward_args(x)
    return dense_lora_forward(self.get_base_layer(), x, self.lora_A[name].weight, self.lora_B[name].weight,
                              self.scaling[name], self.lora_dropout[name], DENSE_ONE_NODE.is_on(self, default=True))


class _DenseLoRA(torch.autograd.Function):
    """base(x) + ((x @ a^T) * s) @ b^T for a frozen base and no dropout, with its own backward: the input's two
    gradients (through W and through a) accumulated in one buffer by addmm_ (autograd would add two (tokens, in)
    tensors), and one graph node instead of four. Computes in `dtype` (autocast's, else x's)."""

    @staticmethod
    def forward(ctx, x2, weight, bias, a, b, scaling, dtype):
        with torch.autocast(x2.device.type, enabled=False):
            xc, wc, ac, bc = (t.to(dtype) for t in (x2, weight, a, b))
            out = nn.functional.linear(xc, wc, None if bias is None else bias.to(dtype))
            low = (xc @ ac.t()) * scaling
            out.addmm_(low, bc.t())
        ctx.save_for_backward(xc, low, wc, ac, bc)
        ctx.scaling, ctx.dtypes = scaling, (x2.dtype, a.dtype, b.dtype)
        return out

    @staticmethod
    def backward(ctx, d_out):
        xc, low, wc, ac, bc = ctx.saved_tensors
        x_dtype, a_dtype, b_dtype = ctx.dtypes
        d_out = d_out.to(wc.dtype)
        d_b = (d_out.t() @ low).to(b_dtype)
        d_low = (d_out @ bc) * ctx.scaling
        d_a = (d_low.t() @ xc).to(a_dtype)
        d_x = None
        if ctx.needs_input_grad[0]:
            d_x = (d_out @ wc).addmm_(d_low, ac).to(x_dtype)
        return d_x, None, None, d_a, d_b, None, None


def dense_lora_forward(base: nn.Linear, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                       dropout: nn.Module, one_node: bool = True) -> torch.Tensor:
    """base(x) + ((dropout(x) @ a^T) * scaling) @ b^T, the up-projection accumulated into base(x) in the GEMM;
    a (r, in), b (out, r). Under autocast both GEMMs run in its dtype, as peft's do. With `one_node`, a frozen base
    without dropout takes `_DenseLoRA` (its own backward)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    frozen = not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
    dev = x.device.type
    autocast = torch.is_autocast_enabled(dev)
    if one_node and frozen and isinstance(dropout, nn.Identity) \
            and (autocast or x.dtype == base.weight.dtype == a.dtype == b.dtype):
        dtype = torch.get_autocast_dtype(dev) if autocast else x.dtype
        out = _DenseLoRA.apply(x2, base.weight, base.bias, a, b, scaling, dtype)
        return out.view(*lead, out.shape[-1])
    out = nn.functional.linear(x2, base.weight, base.bias)  # its backward needs x and W, not this output
    xd = dropout(x2)
    if not autocast:  # peft casts the input to the adapter's dtype
        xd = xd.to(a.dtype)
    low = nn.functional.linear(xd, a) * scaling  # the scale on r columns, not on the output's
    out = out.addmm_(low.to(out.dtype), b.t().to(out.dtype))
    return out.view(*lead, out.shape[-1])
