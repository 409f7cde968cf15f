"""Fused GPU kernels for the Gated-DeltaNet hybrids (Qwen3.5 / Qwen3.5-MoE / Qwen3-Next), installed on a built model.

transformers picks flash-linear-attention's chunked delta rule by itself when fla imports, but four other
pieces of these models run slower than they need to on a GPU (BENCHMARKS.md, the profiles of issue 9):

- the depthwise causal conv1d before the delta rule: transformers looks for Dao's `causal_conv1d` package (a
  CUDA build, not installed here) and otherwise runs `F.conv1d`, ~12x slower than memory speed on an H100;
  fla ships a Triton one (`fla.modules.causal_conv1d`), same maths, which takes (B, T, D), the layout the
  hidden states already have before transformers transposes them;
- RMSNorm with the (1 + weight) scale: ~8 float32 elementwise kernels forward and more backward, per norm;
  fla's fused `rms_norm` (one kernel each way) with the scale (1 + weight) passed as its weight, in float32;
- the gated RMSNorm of the delta-rule output (norm, scale, silu gate): fla's `rms_norm_gated`;
- the routed experts' glue between their grouped GEMMs (LoRA adds, SiLU * up, routing weight, the top-k gather
  and sum): the fused Triton kernels of `pitlm.kernels.routed`, switched on per experts module (training and eval);
- the Gated DeltaNet layer around the delta rule (Qwen3.5 / Qwen3.5-MoE, separate in_proj_qkv/z/b/a): transformers
  5.17 repeats q and k to the value heads (`repeat_interleave`, strided copies ~4x slower than memory speed, and a
  sum backward), and computes the decay gate and beta in separate float32 kernels. fla 0.6's delta rule takes the
  value heads grouped over the key heads (GVA, value head h reads key head h // (HV / H), the repeat's order) and
  fuses `-exp(A_log) * softplus(a + dt_bias)` and `sigmoid(b)` into its kernels; the conv + SiLU writes q, k, v
  contiguous straight from the projection (`pitlm.kernels.conv`, fast path "conv-split"; without Triton, fla's
  conv and one split copy, `split_last`, torch's split_with_sizes_copy fast path);
- the router and the shared expert's gate of the MoE block: the Triton kernels of `pitlm.kernels.moe`;
- the attention layers' partial rotary embedding: `pitlm.kernels.rope` (a module-level function);
- the routed experts: transformers' grouped-GEMM forward masks the routed-token tensors for expert parallelism
  (in 5.17 on every call: ~30% of an embedding forward of the 35B on an H100); pitlm's grouped forward
  (`pitlm.kernels.experts.lora_experts_forward` without adapters) is the same GEMMs without the masks.

`install_fast_kernels(model)` patches instances (norms, experts) and the conv function of the model's modeling
module, each only for CUDA tensors (CPU calls keep the reference path), and returns what it installed. The
experts forward is installed for inference only (`experts=True`, the eval's embedding path): in LoRA training
pitlm's expert-LoRA path already computes the experts, and the FSDP2 full-weight path keeps transformers' own.
Correctness against the reference path, on a GPU in bf16: tests/test_kernels.py (METHOD.md's tolerance).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
import types

import torch
from torch import nn

from pitlm.kernels import conv, registry
from pitlm.kernels.experts import experts_unsupported, lora_experts_forward
from pitlm.kernels.moe import install_moe_kernels
from pitlm.kernels.rope import install_rope
from pitlm.kernels.routed import set_routed_kernels
from pitlm.kernels.triton_util import has_triton

log = logging.getLogger("pitlm")

# modeling modules whose GatedDeltaNet calls a module-level `causal_conv1d_fn(x (B, D, T), weight (D, W), bias,
# activation=...)`, and their RMSNorm classes that scale by (1 + weight)
MODELING = {"qwen3_5_moe": "Qwen3_5Moe", "qwen3_5": "Qwen3_5", "qwen3_next": "Qwen3Next"}  # module -> class prefix
OFFSET_NORMS = {"Qwen3_5MoeRMSNorm", "Qwen3_5RMSNorm", "Qwen3NextRMSNorm"}
GATED_NORMS = {"Qwen3_5MoeRMSNormGated", "Qwen3_5RMSNormGated", "Qwen3NextRMSNormGated"}


def _fla():
    """fla's conv and norm functions, or None where fla does not import (no GPU stack, wrong Triton)."""
    try:
        from fla.modules.causal_conv1d import causal_conv1d  # noqa: PLC0415 - optional dependency fla
        from fla.modules.norm.fused_norm_gate import rms_norm_gated  # noqa: PLC0415 - optional dependency fla
        from fla.modules.norm.layernorm import rms_norm  # noqa: PLC0415 - optional dependency fla
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # noqa: PLC0415 - optional dependency fla
    except Exception as e:  # noqa: BLE001 - any import failure means: not usable here
        log.debug("fla kernels unavailable: %s", e)
        return None
    return types.SimpleNamespace(conv=causal_conv1d, rms_norm=rms_norm, rms_norm_gated=rms_norm_gated,
                                 delta_rule=chunk_gated_delta_rule)


def _patch_conv(modeling, fla) -> bool:
    ref = getattr(modeling, "causal_conv1d_fn", None)
    if ref is None:
        return False
    if getattr(ref, "_pitlm_fast", False):
        return True

    def causal_conv1d_fn(hidden_states, weight, bias=None, activation=None, **kwargs):
        if not hidden_states.is_cuda or kwargs.get("seq_idx") is not None or kwargs.get("cu_seqlens") is not None:
            return ref(hidden_states, weight, bias, activation=activation, **kwargs)
        # transformers hands (B, D, T), a transpose of the (B, T, D) projection: fla reads that layout directly
        out, _ = fla.conv(hidden_states.transpose(1, 2), weight, bias, activation=activation)
        return out.transpose(1, 2)

    causal_conv1d_fn._pitlm_fast = True
    causal_conv1d_fn.__wrapped__ = ref
    modeling.causal_conv1d_fn = causal_conv1d_fn
    return True


DELTA_RULES = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule")


def cpu_safe_delta_rules() -> None:
    """Where fla imports, transformers binds its Triton delta rules at import for every call, so a CPU forward of
    a DeltaNet hybrid on a GPU machine fails ("cannot be accessed from Triton (cpu tensor?)"). Route CPU calls
    back to transformers' torch reference (the `__wrapped__` of its binding). Idempotent."""
    for name in MODELING:
        modeling = sys.modules.get(f"transformers.models.{name}.modeling_{name}")
        for fn_name in DELTA_RULES if modeling is not None else ():
            bound = getattr(modeling, fn_name, None)
            ref = getattr(bound, "__wrapped__", None)
            if bound is None or ref is None or getattr(bound, "_pitlm_cpu_safe", False):
                continue
            sig = inspect.signature(ref).parameters.values()  # transformers >= 5.2x wraps it in a callable module
            params = None if any(p.kind is p.VAR_KEYWORD for p in sig) else {p.name for p in sig}

            def dispatch(*args, _bound=bound, _ref=ref, _params=params, **kwargs):
                first = args[0] if args else next(iter(kwargs.values()), None)
                packed = kwargs.get("cu_seqlens") is not None or kwargs.get("seq_idx") is not None
                if getattr(first, "is_cuda", True) or packed:  # packed sequences: transformers' own handling
                    return _bound(*args, **kwargs)
                return _ref(*args, **{k: v for k, v in kwargs.items() if _params is None or k in _params})

            dispatch._pitlm_cpu_safe = True
            dispatch.__wrapped__ = ref
            setattr(modeling, fn_name, dispatch)


def _offset_norm_forward(fla, ref):
    def forward(self, x):
        if not x.is_cuda:
            return ref(x)
        return fla.rms_norm(x, 1.0 + self.weight.float(), None, eps=self.eps)

    return forward


def _gated_norm_forward(fla, ref):
    def forward(self, hidden_states, gate=None):
        if not hidden_states.is_cuda or gate is None or getattr(self, "activation", "silu") not in ("silu", "swish"):
            return ref(hidden_states, gate)
        return fla.rms_norm_gated(hidden_states, gate, self.weight, None, activation="swish",
                                  eps=self.variance_epsilon)

    return forward


class _SplitLast(torch.autograd.Function):
    """Contiguous pieces of x along its last dimension in one copy kernel (torch's split_with_sizes_copy with out=
    has a fast path for contiguous CUDA operands); the backward concatenates the pieces' gradients."""

    @staticmethod
    def forward(ctx, x, sizes):
        x = x.contiguous()
        outs = [x.new_empty(*x.shape[:-1], n) for n in sizes]
        torch.split_with_sizes_copy(x, list(sizes), dim=-1, out=outs)
        ctx.sizes = sizes
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        like = next(g for g in grads if g is not None)
        grads = [g if g is not None else like.new_zeros(*like.shape[:-1], n) for g, n in zip(grads, ctx.sizes,
                                                                                             strict=True)]
        return torch.cat(grads, dim=-1), None


def split_last(x: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, ...]:
    """x split along its last dimension into contiguous tensors of these widths (one copy kernel on CUDA)."""
    if sum(sizes) != x.shape[-1]:
        raise ValueError(f"split_last: widths {sizes} do not add up to {x.shape[-1]}")
    return _SplitLast.apply(x, tuple(sizes))


GDN_SPLIT = {"Qwen3_5MoeGatedDeltaNet", "Qwen3_5GatedDeltaNet"}  # separate in_proj_qkv / _z / _b / _a
PACKING = ("cu_seq_lens_q", "cu_seq_lens_k", "seq_idx", "cu_seqlens")  # packed sequences: transformers' handling


def _gdn_forward(fla, ref, modeling):
    mask_padding = getattr(modeling, "apply_mask_to_padding_states", None)

    def forward(self, hidden_states, *args, **kwargs):
        cache = kwargs.get("cache_params", kwargs.get("cache"))
        if (args or cache is not None or any(kwargs.get(k) is not None for k in PACKING)
                or not registry.GATED_DELTANET.is_on(self) or not _fast_device(hidden_states)
                or self.conv1d.weight.device != hidden_states.device):  # e.g. accelerate's offloaded weights
            return ref(hidden_states, *args, **kwargs)
        if mask_padding is not None:
            hidden_states = mask_padding(hidden_states, kwargs.get("attention_mask"))
        return gdn_forward(self, hidden_states, fla)

    return forward


def _fast_device(t: torch.Tensor) -> bool:
    return t.is_cuda


def gdn_forward(m: nn.Module, hidden_states: torch.Tensor, fla) -> torch.Tensor:
    """transformers' Qwen3.5 Gated DeltaNet forward without a cache, with the conv on the (B, T, D) projection
    writing q / k / v directly (pitlm.kernels.conv, fast path "conv-split"; else fla's conv and a split copy), and
    the delta rule taking the key heads grouped (no repeat to the value heads) and
    the decay gate and beta computed inside its kernels from the raw projections."""
    batch, seq, _ = hidden_states.shape
    mixed = m.in_proj_qkv(hidden_states)
    z = m.in_proj_z(hidden_states)
    b = m.in_proj_b(hidden_states)
    a = m.in_proj_a(hidden_states)
    sizes = [m.key_dim, m.key_dim, m.value_dim]
    if registry.CONV_SILU_SPLIT.is_on(m) and conv.supported(mixed, m.conv1d.weight, m.activation):
        q, k, v = conv.conv_split(mixed, m.conv1d.weight.squeeze(1), m.conv1d.bias, m.activation, sizes)
    else:
        mixed, _ = fla.conv(mixed, m.conv1d.weight.squeeze(1), m.conv1d.bias, activation=m.activation)
        q, k, v = split_last(mixed, sizes)
    out, _ = fla.delta_rule(q.view(batch, seq, -1, m.head_k_dim), k.view(batch, seq, -1, m.head_k_dim),
                            v.view(batch, seq, -1, m.head_v_dim), g=a, beta=b, use_qk_l2norm_in_kernel=True,
                            use_gate_in_kernel=True, A_log=m.A_log, dt_bias=m.dt_bias,
                            use_beta_sigmoid_in_kernel=True)
    out = m.norm(out.reshape(-1, m.head_v_dim), z.reshape(-1, m.head_v_dim))
    return m.out_proj(out.reshape(batch, seq, -1))


def _experts_forward(ref):
    def forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        if not hidden_states.is_cuda or args or kwargs:
            return ref(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        return lora_experts_forward(self, hidden_states, top_k_index, top_k_weights, {})

    return forward


ROUTED = "triton-routed-experts"  # install_fast_kernels' names: pitlm.kernels.routed,
ROUTER = "triton-router-topk"  # pitlm.kernels.moe's router,
SHARED_GATE = "triton-shared-expert-gate"  # its shared-expert gate,
GDN = "fla-gated-deltanet-gva"  # the Gated DeltaNet forward above,
ROPE = "triton-partial-rope"  # pitlm.kernels.rope
CONV_SPLIT = "triton-conv-split"  # and the GDN's conv + SiLU + q/k/v split, pitlm.kernels.conv


def install_fast_kernels(model: nn.Module, experts: bool = False, routed: bool = True, rope: bool = True) -> list[str]:
    """Route `model`'s causal conv1d, RMSNorms and Gated DeltaNet layers through fla's fused kernels and, with
    `experts`, its routed experts through pitlm's grouped forward (CUDA tensors only); with `routed`, switch on the
    MoE block's Triton kernels where triton imports (the routed experts' `pitlm.kernels.routed`, the router's
    and the shared expert gate's `pitlm.kernels.moe`; off: switched off). Returns the names of what was
    installed: [] on a model without these layers, the Triton kernels alone where fla does not import. Each
    installed path has a switch: `set_fast_path(model, name, on)`. rope: also the Triton partial rotary embedding
    (`pitlm.kernels.rope`; a module-level function of the modeling module, so it reaches every model of the
    process; CUDA tensors only)."""
    installed = []
    n_routed = set_routed_kernels(model, routed)
    if n_routed and routed:
        installed.append(f"{ROUTED} x{n_routed}")
    n_router, n_block = install_moe_kernels(model, on=routed)
    if routed:
        installed += [f"{name} x{n}" for name, n in ((ROUTER, n_router), (SHARED_GATE, n_block)) if n]
    kinds = {type(m).__name__ for m in model.modules()}
    if rope:
        installed += _install_rope(kinds)
    if not kinds & (OFFSET_NORMS | GATED_NORMS) and not any("GatedDeltaNet" in k for k in kinds):
        return _log_installed(installed)
    fla = _fla()
    if fla is None:
        return _log_installed(installed)
    for name, prefix in MODELING.items():
        if f"{prefix}GatedDeltaNet" not in kinds:
            continue
        try:
            modeling = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        except ImportError:
            continue
        if _patch_conv(modeling, fla):
            installed.append(f"fla-causal-conv1d ({name})")
    triton_ok = has_triton()  # the conv + split kernel of the Gated DeltaNet forward
    n_norm = n_gated = n_experts = n_gdn = 0
    for m in model.modules():
        kind = type(m).__name__
        if getattr(m, "_pitlm_fast", False):
            continue
        if kind in GDN_SPLIT:
            m.forward = types.MethodType(_gdn_forward(fla, m.forward, importlib.import_module(type(m).__module__)), m)
            setattr(m, registry.GATED_DELTANET.attr, True)
            setattr(m, registry.CONV_SILU_SPLIT.attr, triton_ok)
            n_gdn += 1
        elif experts and kind.endswith("Experts") and experts_unsupported(m) is None:
            m.forward = types.MethodType(_experts_forward(m.forward), m)
            n_experts += 1
        elif kind in OFFSET_NORMS:
            m.forward = types.MethodType(_offset_norm_forward(fla, m.forward), m)
            n_norm += 1
        elif kind in GATED_NORMS:
            m.forward = types.MethodType(_gated_norm_forward(fla, m.forward), m)
            n_gated += 1
        else:
            continue
        m._pitlm_fast = True
    if n_norm:
        installed.append(f"fla-rmsnorm x{n_norm}")
    if n_gated:
        installed.append(f"fla-gated-rmsnorm x{n_gated}")
    if n_gdn:
        installed.append(f"{GDN} x{n_gdn}")
        if triton_ok:
            installed.append(f"{CONV_SPLIT} x{n_gdn}")
    if n_experts:
        installed.append(f"grouped-experts x{n_experts}")
    return _log_installed(installed)


def _install_rope(kinds: set[str]) -> list[str]:
    """The Triton partial rotary embedding for the attention layers of the hybrids' modeling modules (Triton only)."""
    names = []
    for name, prefix in MODELING.items():
        if f"{prefix}Attention" in kinds and has_triton():
            try:
                modeling = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
            except ImportError:
                continue
            if install_rope(modeling):
                names.append(f"{ROPE} ({name})")
    return names


def fast_path_switches() -> dict[str, str]:
    """{name: the module attribute that switches it} ("" for a process-wide switch): the fast paths that can be
    turned off on a built model (`pitlm.kernels.registry.FAST_PATHS`)."""
    return {name: path.attr for name, path in registry.FAST_PATHS.items()}


def set_fast_path(model: nn.Module, name: str, on: bool) -> int:
    """Switch one installed fast path (a `fast_path_switches()` name) on or off; returns how many modules (rope:
    a module-level function of the process, 1 when it is installed)."""
    path = registry.fast_path(name)
    n = path.set(model, on)
    if path.attr:
        return n
    return int(any(getattr(getattr(importlib.import_module(f"transformers.models.{m}.modeling_{m}"),
                                   "apply_rotary_pos_emb", None), "_pitlm_fast", False)
                   for m in MODELING if f"transformers.models.{m}.modeling_{m}" in sys.modules))


def _log_installed(installed: list[str]) -> list[str]:
    if installed:
        log.info("fast kernels: %s", ", ".join(installed))
    return installed

