"""One training step and one evaluation pass: the functions the training loop and `pitlm bench train` share."""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft.utils.other import ModulesToSaveWrapper
from torch import nn
from torch.utils.checkpoint import checkpoint

from pitlm.errors import PitlmError
from pitlm.train.in_backward import InBackwardOptimizer
from pitlm.train.parallel import DistEnv, all_reduce_mean
from pitlm.train.scratch import compiled_head_loss

NONFINITE_EXIT_CODE = 42


class NonFiniteLossError(PitlmError):
    """The NaN/inf watchdog fired: exit code 42 (the seed's convention) so a job wrapper can tell it apart."""

    exit_code = NONFINITE_EXIT_CODE

    def __init__(self, step: int, what: str, value: float, applied: bool = False):
        self.step = step
        where = " (optim.in_backward: this step's updates were already applied)" if applied else ""
        super().__init__(f"non-finite {what} ({value}) at step {step}{where}: training aborted by the NaN/inf "
                         "watchdog; lower optim.lr, check the data, or --resume from the last good checkpoint")


@dataclass
class StepResult:
    loss: float  # mean over the global batch (all ranks, all micro-batches)
    grad_norm: float  # before clipping
    tokens: int  # tokens this rank trained on


def forward_loss(model: nn.Module, tokens: torch.Tensor, autocast_dtype: torch.dtype | None = None,
                 ce_chunk: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of a (B, T+1) token block: inputs tokens[:, :-1], targets tokens[:, 1:].

    ce_chunk: compute the LM head and the loss `ce_chunk` tokens at a time under activation checkpointing, so the
    (tokens x vocab) logits never exist at once. With Qwen3.5's 248k vocabulary the fp32 logits of one batch of
    4 x 2048 tokens are 8 GB, plus as much again for their gradient. Not for FSDP2 models (their root parameters,
    lm_head included, are gathered by the root module's forward, which this path bypasses)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    ctx = (torch.autocast(device_type=inputs.device.type, dtype=autocast_dtype) if autocast_dtype
           else contextlib.nullcontext())
    with ctx:
        if ce_chunk:
            backbone, head = backbone_and_head(model)
            hidden = backbone(input_ids=inputs, use_cache=False).last_hidden_state
            return chunked_cross_entropy(hidden, head, targets, ce_chunk)
        compiled_loss = compiled_head_loss(model)  # compile: blocks (pitlm.train.scratch)
        if compiled_loss is not None:
            backbone, head = backbone_and_head(model)
            return compiled_loss(head, backbone(input_ids=inputs, use_cache=False).last_hidden_state, targets)
        logits = model(input_ids=inputs, use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder backbone, LM head) of a transformers causal LM, through a peft wrapper when there is one (peft
    injects its layers in place, so the base model's modules are the adapted ones)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def _ce_sum(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean cross-entropy of head(hidden) against targets, `chunk` rows at a time, each chunk's logits recomputed
    in the backward pass instead of stored (the memory of one chunk's logits instead of all of them).

    On a GPU with liger-kernel, a bias-free Linear head (peft's trained copy included) takes liger's fused linear
    cross-entropy instead: it computes the gradients of hidden and of the head's weight chunk by chunk during the
    forward, so the 248k-vocabulary head GEMM is not recomputed in backward and the fp32 logit passes of
    F.cross_entropy disappear (predicted ~75 ms of a 1.6 s batch-8 step of Qwen3.5-35B-A3B; not measured yet)."""
    h, t = hidden.flatten(0, 1), targets.flatten()
    autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
    linear = fused_ce_head(head, h.dtype, h.device.type, autocast)
    if linear is not None:
        from liger_kernel.transformers.functional import (  # noqa: PLC0415 - optional dependency liger_kernel
            liger_fused_linear_cross_entropy,
        )

        # liger sizes its chunks from chunk_mem_const: with this value its chunk is ~`chunk` tokens (a power of 2)
        mem_const = max(1, chunk * linear.weight.shape[0] // max(1, h.shape[0] * h.shape[1]))
        return liger_fused_linear_cross_entropy(h, linear.weight, t, chunk_mem_const=mem_const)
    total = torch.zeros((), device=h.device, dtype=torch.float32)
    for i in range(0, h.shape[0], chunk):
        total = total + checkpoint(_ce_sum, h[i:i + chunk], t[i:i + chunk], head, use_reentrant=False)
    return total / t.numel()


def head_linear(head: nn.Module) -> nn.Linear | None:
    """The bias-free nn.Linear that computes head(x): the head itself, or the module peft's ModulesToSaveWrapper
    routes to (the active trained copy, or the original when adapters are off). None for anything else, e.g. a
    LoRA-adapted head, whose output is not one weight's."""
    if isinstance(head, ModulesToSaveWrapper):
        active = head.active_adapters
        if head.disable_adapters or not active or any(a not in head.modules_to_save for a in active):
            head = head.original_module
        else:
            head = head.modules_to_save[active[0]]
    return head if type(head) is nn.Linear and head.bias is None else None


def fused_ce_head(head: nn.Module, dtype: torch.dtype, device_type: str,
                  autocast_dtype: torch.dtype | None = None) -> nn.Linear | None:
    """The head's Linear when liger's fused linear cross-entropy can replace the chunked loss for hidden states of
    `dtype` on `device_type`: CUDA, liger-kernel importable, a plain bias-free Linear of that dtype, and autocast
    either off or computing in that same dtype (pitlm's bf16 LoRA runs under bf16 autocast: the head GEMM sees the
    same operands either way). None otherwise."""
    if device_type != "cuda" or autocast_dtype not in (None, dtype) or not liger_available():
        return None
    linear = head_linear(head)
    return linear if linear is not None and linear.weight.dtype == dtype else None


@functools.lru_cache(maxsize=1)
def liger_available() -> bool:
    try:
        from liger_kernel.transformers.functional import (  # noqa: F401, PLC0415 - optional dependency liger_kernel
            liger_fused_linear_cross_entropy,
        )
    except Exception:  # ImportError, or a Triton/CUDA mismatch at import
        return False
    return True


def train_step(model: nn.Module, batches: list[torch.Tensor], optimizer, *,
               step: int = 0, grad_clip: float = 1.0, autocast_dtype: torch.dtype | None = None,
               env: DistEnv | None = None, inject_nan: bool = False, ce_chunk: int | None = None) -> StepResult:
    """Forward/backward over this rank's micro-batches (gradient accumulation), clip, watchdog, optimizer step.

    The watchdog runs before optimizer.step(): a NaN loss or gradient never reaches the weights or a checkpoint.
    With an InBackwardOptimizer the updates happen inside backward: the loss is checked before backward (one host
    sync), the gradient norm after it (a non-finite one has then reached the weights: resume from a checkpoint)."""
    in_backward = isinstance(optimizer, InBackwardOptimizer)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    total_loss = torch.zeros((), device=device)
    tokens = 0

    # ---- forward / backward, averaged over micro-batches
    for tokens_cpu in batches:
        block = tokens_cpu.to(device, non_blocking=True)
        loss = forward_loss(model, block, autocast_dtype, ce_chunk)
        if inject_nan:
            loss = loss * float("nan")
        if in_backward and not math.isfinite(value := float(loss.detach())):
            raise NonFiniteLossError(step, "loss", value)  # before backward: no update has happened
        (loss / len(batches)).backward()
        total_loss += loss.detach() / len(batches)
        tokens += block[:, 1:].numel()

    # ---- gradient norm (computed even without clipping: the watchdog needs it) and the loss over all ranks
    if in_backward:
        grad_norm = optimizer.take_grad_norm()
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor
        grad_norm = grad_norm.full_tensor()
    if env is not None:
        total_loss = all_reduce_mean(total_loss, env)
    loss_value, norm_value = float(total_loss), float(grad_norm)

    # ---- watchdog, then the update
    if not math.isfinite(loss_value):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(step, "loss", loss_value)
    if not math.isfinite(norm_value):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(step, "gradient norm", norm_value,
                                 applied=in_backward)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_value, norm_value, tokens)


@torch.no_grad()
def validation_loss(model: nn.Module, batches: list[torch.Tensor], autocast_dtype: torch.dtype | None = None,
                    env: DistEnv | None = None) -> float:
    """Mean loss over fixed validation batches (every rank holds an equal share)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros((), device=device)
    for tokens_cpu in batches:
        total += forward_loss(model, tokens_cpu.to(device), autocast_dtype)
    total /= max(1, len(batches))
    if env is not None:
        total = all_reduce_mean(total, env)
    model.train(was_training)
    return float(total)


@torch.no_grad()
def probe_logits(model: nn.Module, tokens: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Logits of a fixed batch (every rank passes the same tokens; FSDP2 needs all ranks in the forward)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ctx = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype
           else contextlib.nullcontext())
    with ctx:
        out = model(input_ids=tokens.to(device), use_cache=False).logits.float().cpu()
    model.train(was_training)
    return out
