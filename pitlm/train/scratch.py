"""The from-scratch fast path (`compile: blocks`, one process): torch.compile each dense decoder block, and the LM
head with its cross-entropy as one compiled function.

    compile_dense_blocks(model)          # the trainer does this for compile: blocks
    forward_loss(model, tokens, bf16)    # pitlm.train.step then takes the compiled head loss

Inductor fuses each block's memory-bound chains (RMSNorms, QK-norm, rotary, SwiGLU, residual adds) around the
cuBLAS GEMMs and SDPA; the blocks share one graph (their parameters are graph inputs), so the first step compiles
one block, not the whole model. The head loss computes the logits in the autocast dtype and the log-softmax in fp32
inside one fused kernel each way, so the (tokens x vocab) fp32 logits of the eager path are never written. The
numbers are the eager path's within bf16 rounding (tests/test_train_scratch.py); recipes scratch-pit-1b and
scratch-pit-150m use it, and `pitlm bench train --mode scratch` measures it against the eager reference and a plain
transformers + torch.compile baseline.
"""

from __future__ import annotations

import contextlib
import logging
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from pitlm.errors import ConfigError
from pitlm.train.model import decoder_layers

log = logging.getLogger("pitlm.train")

_HEAD_LOSS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its compiled head loss


def head_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of head(hidden) against targets (logits upcast to fp32, as the eager path)."""
    return F.cross_entropy(head(hidden).float().flatten(0, 1), targets.flatten())


def compile_dense_blocks(model: nn.Module, with_head_loss: bool = True) -> int:
    """torch.compile every decoder block in place and (`with_head_loss`) register a compiled head loss for `model`;
    returns the number of blocks compiled. Under FSDP2 (`with_head_loss=False`) the blocks compile after fully_shard:
    FSDP2's forward hooks are dynamo-disabled, so they run eagerly around each compiled block, and the loss stays the
    model's own forward, whose root hook gathers the sharded embeddings, final norm and LM head."""
    layers = decoder_layers(model)
    if layers is None or hasattr(model, "get_base_model"):
        raise ConfigError("compile=blocks is for a plain transformers decoder (mode scratch): model.model.layers")
    if any(hasattr(getattr(layer, "mlp", None), "experts") for layer in layers):
        raise ConfigError("compile=blocks compiles dense decoder blocks; for an MoE model use compile=moe")
    for layer in layers:
        layer.compile()
    if with_head_loss:
        _HEAD_LOSS[model] = torch.compile(head_loss)
    log.info("torch.compile: %d decoder blocks%s", len(layers), " and the LM-head loss" if with_head_loss else "")
    return len(layers)


def compiled_head_loss(model: nn.Module):
    """The compiled head loss `compile_dense_blocks` registered for `model`, or None."""
    return _HEAD_LOSS.get(model)


SDPA_CHOICES = ("auto", "flash", "cudnn", "efficient")


def sdpa_backend(name: str) -> contextlib.AbstractContextManager:
    """A context that restricts torch's scaled_dot_product_attention to one backend (auto: torch's own choice). A
    backend that cannot run the inputs raises instead of falling back, so a measurement names what it ran."""
    if name not in SDPA_CHOICES:
        raise ConfigError(f"unknown SDPA backend {name!r}; known: {', '.join(SDPA_CHOICES)}")
    if name == "auto":
        return contextlib.nullcontext()
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]
    return sdpa_kernel([backend])
