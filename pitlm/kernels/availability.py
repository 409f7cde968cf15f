"""Which GPU fast paths this machine can use, without running one: the installed packages (fla, tilelang, triton,
liger-kernel, flash-attn), the GPUs and their capability. `pitlm doctor` prints these checks; training and the bench
log `fast_path_summary()`.

Each check is (name, status, detail, hint); status is ok | warn | fail | info.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata

import torch


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail | info
    detail: str
    hint: str = ""


def version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _vtuple(v: str | None) -> tuple[int, ...]:
    if not v:
        return ()
    out = []
    for part in v.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _imports(module: str, timeout: float = 120.0) -> tuple[bool, str]:
    """Whether `module` really imports (in a subprocess: a broken native library must not crash doctor).
    tilelang, for one, is found by find_spec but fails at import without its z3 shared library."""
    try:
        proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"import {module} timed out"
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return proc.returncode == 0, (lines[-1] if lines else "")


def gpu_info() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                    "capability": f"{p.major}.{p.minor}"})
    return out


def fast_kernel_checks(gpus: list[dict]) -> list[Check]:
    """Which fast paths are usable. fla on Hopper needs Triton >= 3.7.1 (3.6 has a wrong-result bug there and
    fla refuses it) or the tilelang backend."""
    checks = []
    hopper = any(g["capability"].startswith("9.") for g in gpus)
    triton_v = _vtuple(version("triton"))
    fla = _has("fla")
    tilelang, tilelang_err = _imports("tilelang") if (fla and hopper and _has("tilelang")) else (False, "")
    if not fla:
        checks.append(Check("flash-linear-attention", "info", "not installed (Gated DeltaNet falls back to torch)",
                            "pip install 'pitlm[gpu]' for the fast DeltaNet kernels"))
    elif not gpus:
        checks.append(Check("flash-linear-attention", "info", "installed; no GPU here, so unused"))
    elif hopper and triton_v < (3, 7, 1) and not tilelang:
        why = f"; tilelang fails to import: {tilelang_err}" if tilelang_err else ""
        checks.append(Check("flash-linear-attention", "warn",
                            f"installed but unusable on Hopper with triton {version('triton')} (needs >= 3.7.1){why}",
                            "install tilelang (+ apache-tvm-ffi, z3-solver) or upgrade triton to >= 3.7.1"))
    else:
        ok, err = _imports("fla")
        backend = "tilelang" if hopper and triton_v < (3, 7, 1) else "triton"
        checks.append(Check("flash-linear-attention", "ok" if ok else "warn",
                            f"usable (backend {backend})" if ok else f"fails to import: {err}",
                            "" if ok else "reinstall flash-linear-attention / fla-core"))
    fla_ok = bool(checks) and checks[-1].status == "ok"
    # pitlm.kernels: fla's Triton causal conv1d (instead of Dao's CUDA package), fused RMSNorms and the Gated
    # DeltaNet forward with grouped key heads and the gates inside the delta rule, on a GPU
    checks.append(Check("fused conv1d + RMSNorm", "ok" if fla_ok else "info",
                        "fla's Triton kernels via pitlm.kernels" if fla_ok else "off (needs a usable fla on a GPU)",
                        "" if fla_ok else "make flash-linear-attention usable (above)"))
    checks.append(Check("grouped-head delta rule", "ok" if fla_ok else "info",
                        "fla's delta rule without repeated key heads, gates in its kernels" if fla_ok else
                        "off (needs a usable fla on a GPU)", "" if fla_ok else "make flash-linear-attention usable"))
    # pitlm.kernels.routed / moe / rope: need only Triton (the routed experts' LoRA adds, SwiGLU,
    # weight, top-k sum; the router's softmax / top-k; the shared expert's gate; the partial rotary embedding)
    has_triton = version("triton") is not None
    routed_ok = has_triton and bool(gpus)
    # pitlm.kernels.conv: the Gated DeltaNet's conv + SiLU writing q, k, v, inside the fla-based forward above
    conv_ok = fla_ok and has_triton
    checks.append(Check("fused DeltaNet conv + q/k/v split", "ok" if conv_ok else "info",
                        "pitlm's Triton kernels (pitlm.kernels.conv)" if conv_ok else
                        "off (needs a usable fla and triton on a GPU)", ""))
    for name in ("fused routed experts", "fused MoE router + shared gate", "partial rotary embedding"):
        checks.append(Check(name, "ok" if routed_ok else "info",
                            f"pitlm's Triton kernels (triton {version('triton')})" if routed_ok else
                            ("off (no GPU here)" if has_triton else "off (triton not installed)"),
                            "" if routed_ok or not gpus else "install triton (it comes with CUDA builds of torch)"))
    for mod, label, hint in (("causal_conv1d", "causal-conv1d", "optional: pitlm uses fla's conv kernel"),
                             ("flash_attn", "flash-attn", "pip install flash-attn (optional; sdpa is used otherwise)"),
                             ("liger_kernel", "liger-kernel",
                              "pip install liger-kernel: the chunked loss (ce_chunk) then takes its fused linear "
                              "cross-entropy on a GPU")):
        if not _has(mod):
            checks.append(Check(label, "info", "not installed", hint))
        else:
            use = " (fused linear cross-entropy for ce_chunk)" if mod == "liger_kernel" and gpus else ""
            checks.append(Check(label, "ok" if gpus else "info", "installed" + use + ("" if gpus else "; no GPU here")))
    grouped = hasattr(torch, "_grouped_mm")
    usable = grouped and hopper
    checks.append(Check("torch grouped_mm", "ok" if usable else "info",
                        "available (MoE experts grouped GEMM)" if usable else
                        ("present but needs a Hopper (sm_90) GPU" if grouped else "not in this torch"),
                        "" if usable else "experts fall back to a per-expert loop"))
    return checks


def fast_path_summary() -> str:
    """One line for training/eval logs: which fast kernels this process would use (GPU only; 'cpu' otherwise)."""
    gpus = gpu_info()
    if not gpus:
        return "cpu"
    return ", ".join(f"{c.name}={'on' if c.status == 'ok' else 'off'}" for c in fast_kernel_checks(gpus))
