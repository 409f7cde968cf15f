"""Where a decoder block's activations live between forward and backward, and how its forward is compiled.

- `enable_activation_checkpointing(model, skip_last, offload)`: recompute each decoder block in backward
  (transformers' own per-layer switch), except the last `skip_last` blocks. `offload`: the one tensor a checkpointed
  block keeps (its input hidden states, 64 MiB per block at 8 x 2048 x 2048 bf16) goes to pinned host memory during
  forward and comes back one block ahead of the backward that needs it (Unsloth's offloaded checkpointing). With
  the 8-bit step inside backward it brings the seed's ~945 M LoRA under 74 GiB (BENCHMARKS.md, session 7).
- `compile_blocks(model, "moe")`: torch.compile each decoder block's MoE block, so inductor fuses the memory-bound
  elementwise chains around the GEMMs (routing, LoRA scale-and-add, gating); the grouped GEMMs stay eager calls
  (`pitlm.kernels.experts.grouped_linear`, excluded from the graph). Measured: no gain on the 35B model (session 7).
  `compile_blocks(model, "blocks")`: every dense decoder block and the LM-head loss (pitlm.train.scratch; scratch).
"""

from __future__ import annotations

import contextlib
import logging
import weakref

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pitlm.errors import ConfigError
from pitlm.kernels import experts
from pitlm.train.model import decoder_layers
from pitlm.train.scratch import compile_dense_blocks

log = logging.getLogger("pitlm.train")


def enable_activation_checkpointing(model: nn.Module, skip_last: int = 0, offload: bool = False) -> None:
    """Recompute each decoder block in backward (transformers' own hook; non-reentrant works with FSDP2).

    skip_last: the last N decoder blocks keep their activations instead (no recompute: faster, more memory). The
    recompute is ~23% of a step of Qwen3.5-35B-A3B at batch 8 (BENCHMARKS.md); the memory a block's activations
    take decides how many fit. offload: checkpointed blocks keep their input on the host (`offloaded_checkpoint`);
    one process only (not under FSDP2)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the transformers >= 5.2x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if skip_last:
        set_uncheckpointed_layers(model, skip_last)
    if offload:
        layers = decoder_layers(model)
        if layers is None:
            raise ConfigError("gradient_checkpointing_offload needs a decoder-only model (model.model.layers)")
        for layer in layers:
            layer._gradient_checkpointing_func = offloaded_checkpoint


def set_uncheckpointed_layers(model: nn.Module, skip_last: int) -> None:
    """On a model with activation checkpointing enabled: checkpoint every decoder layer but the last `skip_last`."""
    layers = decoder_layers(model)
    if layers is None:
        raise ConfigError("gradient_checkpointing_skip_last needs a decoder-only model (model.model.layers)")
    if skip_last > len(layers):
        raise ConfigError(f"gradient_checkpointing_skip_last={skip_last}: the model has only {len(layers)} "
                          "decoder layers")
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < len(layers) - skip_last  # transformers' per-layer switch


# ----------------------------------------------------------------------------- offloaded checkpointing

class _HostCopy:
    """One block's input in pinned host memory, and (once prefetched) back on its device."""

    def __init__(self, tensor: torch.Tensor, previous: _HostCopy | None):
        self.device, self.requires_grad = tensor.device, tensor.requires_grad
        self.previous = weakref.ref(previous) if previous is not None else None  # the block before, in forward order
        self.on_device: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None
        if tensor.device.type == "cuda":
            stream = _side_stream(tensor.device)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            with torch.cuda.stream(stream):
                self.host.copy_(tensor, non_blocking=True)
                self.copied = stream.record_event()
            tensor.record_stream(stream)  # its memory is not reused before the copy has read it
        else:
            self.host, self.copied = tensor.detach().clone(), None

    def prefetch(self) -> None:
        """Start the copy back on the side stream (the backward of the block after this one is running)."""
        if self.on_device is not None or self.device.type != "cuda":
            return
        stream = _side_stream(self.device)
        with torch.cuda.stream(stream):
            stream.wait_event(self.copied)
            self.on_device = self.host.to(self.device, non_blocking=True)
            self.ready = stream.record_event()

    def fetch(self) -> torch.Tensor:
        if self.device.type != "cuda":
            return self.host  # already a private copy, used by this one backward
        self.prefetch()
        current = torch.cuda.current_stream(self.device)
        current.wait_event(self.ready)
        out, self.on_device = self.on_device, None
        out.record_stream(current)  # allocated on the side stream, used and freed on this one
        return out


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
_LAST_COPY: weakref.ref | None = None  # the most recent block input offloaded (the chain for prefetching)


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class _OffloadedCheckpoint(torch.autograd.Function):
    """Reentrant-style checkpoint of one block: forward without a graph, the input kept on the host; backward
    brings it back, recomputes the block under the forward's autocast and RNG state, and backpropagates."""

    @staticmethod
    def forward(ctx, run, hidden, *args):
        global _LAST_COPY
        previous = _LAST_COPY() if _LAST_COPY is not None else None
        ctx.copy = _HostCopy(hidden, previous)
        _LAST_COPY = weakref.ref(ctx.copy)
        ctx.run, ctx.args = run, args
        ctx.autocast = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")]
        ctx.rng = _rng_state(hidden.device)
        return run(hidden, *args)  # a Function's forward records no graph

    @staticmethod
    def backward(ctx, *grads):
        previous = ctx.copy.previous() if ctx.copy.previous is not None else None
        hidden = ctx.copy.fetch().detach().requires_grad_(ctx.copy.requires_grad)
        if previous is not None:
            previous.prefetch()  # the next backward's input crosses while this block recomputes
        with torch.random.fork_rng(devices=[hidden.device] if hidden.device.type == "cuda" else [],
                                   device_type=hidden.device.type):
            _set_rng_state(hidden.device, ctx.rng)
            with torch.enable_grad(), _autocast_as(ctx.autocast):
                out = ctx.run(hidden, *ctx.args)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads, strict=False)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        ctx.copy = ctx.run = ctx.args = None
        return (None, hidden.grad if ctx.needs_input_grad[1] else None) + (None,) * (len(ctx.needs_input_grad) - 2)


def _rng_state(device: torch.device):
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(device: torch.device, state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _autocast_as(states) -> contextlib.ExitStack:
    """Re-enter the autocast state recorded in forward (the backward runs outside the step's autocast)."""
    stack = contextlib.ExitStack()
    for device_type, on, dtype in states:
        if on or torch.is_autocast_enabled(device_type):
            stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=on))
    return stack


def offloaded_checkpoint(run, hidden: torch.Tensor, *args):
    """transformers' `_gradient_checkpointing_func(partial(forward, **kwargs), hidden_states, ...)` with the block's
    input offloaded to the host. Falls back to torch's checkpoint when the hidden states need no gradient (the
    block's own parameters would then get none from a reentrant-style function: frozen embeddings without peft's
    input-grad hook) or another input needs one (only the hidden states get one here)."""
    others = list(args) + list(getattr(run, "keywords", {}).values())
    if (not isinstance(hidden, torch.Tensor) or not hidden.requires_grad
            or any(isinstance(t, torch.Tensor) and t.requires_grad for t in others)):
        return checkpoint(run, hidden, *args, use_reentrant=False)
    return _OffloadedCheckpoint.apply(run, hidden, *args)


# ----------------------------------------------------------------------------- torch.compile of the blocks

def compile_blocks(model: nn.Module, what: str, head_loss: bool = True) -> int:
    """torch.compile each decoder block's MoE block in place (`what="moe"`); returns how many were compiled. The
    blocks share one compiled graph (their parameters are graph inputs), which runs inside the checkpointed layer
    forward and its recompute alike. (A whole checkpointed layer cannot be compiled this way: transformers calls
    the class's uncompiled forward inside the checkpoint.) `what="blocks"`: every dense decoder block, and the
    LM-head loss unless `head_loss` is false (FSDP2, whose root forward must gather the head)."""
    if what == "none":
        return 0
    if what == "blocks":  # dense decoder blocks + the LM-head loss (pitlm.train.scratch)
        return compile_dense_blocks(model, with_head_loss=head_loss)
    if what != "moe":
        raise ConfigError(f"compile={what!r}: use none, moe or blocks")
    layers = decoder_layers(model)
    if layers is None:
        raise ConfigError("compile needs a decoder-only model (model.model.layers)")
    blocks = [layer.mlp for layer in layers if hasattr(getattr(layer, "mlp", None), "experts")]
    if not blocks:
        raise ConfigError("compile=moe: the model has no MoE blocks (mlp.experts)")
    experts.exclude_grouped_gemm_from_compile()
    for block in blocks:
        block.compile()
    log.info("torch.compile: %d MoE blocks", len(blocks))
    return len(blocks)
