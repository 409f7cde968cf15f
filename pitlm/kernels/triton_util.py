"""What every pitlm Triton kernel asks before it launches: does Triton import, is it interpreting, may these
tensors take the kernels, and on which GPU to launch.

The kernels run on CUDA tensors where Triton imports, and on CPU tensors under Triton's interpreter when asked
(TRITON_INTERPRET=1 set before triton's import, and PITLM_ROUTED_KERNELS_CPU=1: how the tests run the same kernel
code without a GPU; tests/conftest.py sets both on a machine without a GPU).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch


@functools.cache
def has_triton() -> bool:
    """Whether triton imports here (cached: the answer does not change within a process)."""
    try:
        import triton  # noqa: F401, PLC0415 - optional dependency triton
    except Exception:  # noqa: BLE001 - any import failure means: not usable here
        return False
    return True


def interpreting() -> bool:
    """Whether Triton runs its interpreter (TRITON_INTERPRET=1): `triton.jit` reads it when a kernel is decorated,
    so each kernel family keeps one build per mode."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


CPU_ENV = "PITLM_ROUTED_KERNELS_CPU"  # =1 with TRITON_INTERPRET=1: CPU tensors take the kernels too (tests)


def available(t: torch.Tensor) -> bool:
    """Whether the kernels run on tensors like `t`: CUDA tensors where Triton imports; CPU tensors only under
    Triton's interpreter and with PITLM_ROUTED_KERNELS_CPU=1 (how the tests run the kernel code without a GPU)."""
    if t.is_cuda:
        return has_triton()
    return t.device.type == "cpu" and os.environ.get(CPU_ENV) == "1" and interpreting() and has_triton()


def on_device(t: torch.Tensor):
    """Launch on t's GPU (Triton launches on the current device, which need not be t's)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
