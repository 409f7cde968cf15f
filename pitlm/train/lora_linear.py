"""peft's LoRA Linear with the adapter's scale and sum folded into one GEMM.

peft computes `base(x) + lora_B(lora_A(x)) * scaling`: after the rank-r GEMM the full-width product is scaled by one
elementwise kernel and added by another, and backward repeats the scale. On Qwen3.5-35B-A3B at batch 4 x 2048 those
`mul`/`add` kernels over (tokens x out_features) tensors are ~19% of a LoRA step's CUDA time (BENCHMARKS.md).
`torch.addmm(base_out, x·A^T, B^T, alpha=scaling)` gives the same sum with the scale and the add in the GEMM's
epilogue, and its backward scales only rank-r tensors.

`install_fused_lora_linear(model)` routes every peft `lora.Linear` through that forward; it falls back to peft's own
whenever the fast form does not apply (adapters disabled or merged, several active adapters, dropout, DoRA or
another variant, a base layer that is not an nn.Linear, extra call arguments, mixed dtypes outside autocast). Adapters, saving and merging stay
peft's.
"""

from __future__ import annotations

import types

import torch
from torch import nn


def fused_lora_linear(base: nn.Linear, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                      scaling: float) -> torch.Tensor:
    """base(x) + scaling * (x @ lora_a^T) @ lora_b^T, the scale and the sum inside one addmm (operands of one dtype,
    or under autocast, which casts them alike)."""
    result = base(x)
    low = nn.functional.linear(x, lora_a)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), low.reshape(-1, low.shape[-1]), lora_b.t(), alpha=scaling)
    return out.view(result.shape)


def _make_forward(fallback):
    def forward(self, x, *args, **kwargs):
        active = [a for a in self.active_adapters if a in self.lora_A]
        if (args or kwargs or self.disable_adapters or self.merged or len(active) != 1
                or active[0] in getattr(self, "lora_variant", {}) or not isinstance(self.base_layer, nn.Linear)
                or not isinstance(self.lora_dropout[active[0]], nn.Identity)
                or self.lora_B[active[0]].bias is not None
                or not (torch.is_autocast_enabled(x.device.type)
                        or x.dtype == self.base_layer.weight.dtype == self.lora_A[active[0]].weight.dtype
                        == self.lora_B[active[0]].weight.dtype)):
            return fallback(x, *args, **kwargs)  # peft's own: its dtype promotions, variants, dropout
        a = active[0]
        return fused_lora_linear(self.base_layer, x, self.lora_A[a].weight, self.lora_B[a].weight, self.scaling[a])

    return forward


def install_fused_lora_linear(model: nn.Module) -> int:
    """Route every peft LoRA Linear of `model` through `fused_lora_linear`. Returns how many."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, LoraLinear) and not getattr(module, "_pitlm_fused", False):
            module.forward = types.MethodType(_make_forward(module.forward), module)
            module._pitlm_fused = True
            n += 1
    return n
