"""Every fast path's switch in one place: its name (what `set_fast_path` and `pitlm bench train --ablate` take), the
attribute that switches it on each module it is installed on, the function that installs it, and what it is.

An installer patches a module's forward once and sets the attribute (`path.attr`); the patched forward reads it on
every call (`path.is_on(module)`), so one path of a built model can be switched off without uninstalling anything
(the bench's ablations, `lora.experts_in_k: false`). The partial rotary embedding patches a module-level function of
transformers' modeling module instead, so its switch is the process's: `attr` empty, the state kept here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


@dataclass(eq=False)
class FastPath:
    """One fast path's switch. `process_on` is the state of a process-wide switch (`attr` ""); per-module switches
    live on the modules."""

    name: str
    attr: str
    installer: str
    description: str
    process_on: bool = True

    def is_on(self, module: nn.Module | None = None, default: bool = False) -> bool:
        """Whether this path runs for `module` (a process-wide switch ignores it); `default` where the installer
        has not set the attribute."""
        if not self.attr:
            return self.process_on
        return getattr(module, self.attr, default)

    def set(self, model: nn.Module, on: bool) -> int:
        """Switch it on or off on every module of `model` that has it; returns how many (a process-wide switch:
        flipped for every model of the process, returns 0)."""
        if not self.attr:
            self.process_on = on
            return 0
        n = 0
        for m in model.modules():
            if hasattr(m, self.attr):
                setattr(m, self.attr, on)
                n += 1
        return n


ROUTED_EXPERTS = FastPath(
    "routed-experts", "_pitlm_routed_kernels", "pitlm.kernels.routed.set_routed_kernels",
    "the routed experts' LoRA adds, SiLU * up, routing weight and top-k gather-sum in Triton kernels")
LORA_IN_K = FastPath(
    "lora-in-k", "_pitlm_lora_in_k", "pitlm.kernels.routed.set_routed_kernels",
    "with the routed kernels: an expert projection's LoRA term inside its grouped GEMM's K (experts._LoRAInK)")
ROUTER_TOPK = FastPath(
    "router", "_pitlm_router_kernel", "pitlm.kernels.moe.install_moe_kernels",
    "the MoE router's softmax, top-k and renormalisation in one Triton kernel")
SHARED_EXPERT_GATE = FastPath(
    "shared-gate", "_pitlm_shared_gate_kernel", "pitlm.kernels.moe.install_moe_kernels",
    "the MoE block's expert_out + sigmoid(gate) * shared_out in one Triton kernel")
GATED_DELTANET = FastPath(
    "gdn", "_pitlm_gdn_fast", "pitlm.kernels.install.install_fast_kernels",
    "the Gated DeltaNet forward on fla's GVA delta rule with the gates in its kernels")
CONV_SILU_SPLIT = FastPath(
    "conv-split", "_pitlm_conv_split", "pitlm.kernels.install.install_fast_kernels",
    "inside that forward: the causal conv1d + SiLU written into q, k, v by pitlm.kernels.conv")
DENSE_ONE_NODE = FastPath(
    "dense-one-node", "_pitlm_dense_one_node", "pitlm.kernels.lora_dense.install_dense_lora",
    "dense LoRA's backward as one graph node, the input gradients accumulated in one buffer")
PARTIAL_ROPE = FastPath(
    "rope", "", "pitlm.kernels.rope.install_rope",
    "the attention layers' partial rotary embedding in one Triton kernel (a module-level function: process-wide)")

FAST_PATHS = {p.name: p for p in (ROUTED_EXPERTS, LORA_IN_K, ROUTER_TOPK, SHARED_EXPERT_GATE, GATED_DELTANET,
                                  CONV_SILU_SPLIT, DENSE_ONE_NODE, PARTIAL_ROPE)}


def fast_path(name: str) -> FastPath:
    """The fast path called `name`; ValueError naming the known ones otherwise."""
    if name not in FAST_PATHS:
        raise ValueError(f"unknown fast path {name!r}; known: {', '.join(FAST_PATHS)}")
    return FAST_PATHS[name]
