"""Distributed set-up and FSDP2, as plain functions (torchtitan style): init the process group, build the model on
the meta device, `fully_shard` each decoder block then the root, materialise on the device, load weights (composed
with activation checkpointing and compile in one order by pitlm.train.assembly).

The seed's FSDP2 lessons, enforced elsewhere (config.check_config) and relied on here: gradient accumulation stays 1,
no 8-bit optimizer on DTensor parameters, sharded (DCP) checkpoints only — no in-job gather of a full state dict.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from accelerate import init_empty_weights
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import AutoModelForCausalLM

from pitlm.errors import PitlmError
from pitlm.train.model import decoder_layers

log = logging.getLogger("pitlm.train")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool  # a process group is initialised (torchrun, or a single-rank group for FSDP2)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise PitlmError("device=cuda but no CUDA GPU is visible; use device=auto or cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ)


def init_distributed(device_pref: str = "auto", need_group: bool = False) -> DistEnv:
    """Join the torchrun group (nccl on GPU, gloo on CPU); without torchrun, make a single-rank group only when
    `need_group` (FSDP2 needs one even at world size 1)."""
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        return DistEnv(rank, world, local, pick_device(device_pref, local), True)
    if launched_by_torchrun():
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = pick_device(device_pref, local)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
        return DistEnv(dist.get_rank(), dist.get_world_size(), local, device, True)
    device = pick_device(device_pref)
    if need_group:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                device_id=device if device.type == "cuda" else None)
        return DistEnv(0, 1, 0, device, True)
    return DistEnv(0, 1, 0, device, False)


def shutdown_distributed(wait: bool = True) -> None:
    """Leave the process group; `wait`: after a barrier (nobody leaves while another rank still writes). After an
    error, leave without one: the other ranks may never reach it."""
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed and env.world_size > 1:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed and env.world_size > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= env.world_size
    return value


def broadcast_object(obj, env: DistEnv):
    if not (env.distributed and env.world_size > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------- FSDP2

def apply_fsdp(model: nn.Module, param_dtype: torch.dtype | None = None) -> nn.Module:
    """fully_shard every decoder block, then the root (embeddings, final norm, lm_head). With fp32 parameters on a
    GPU, compute in `param_dtype` (bf16) and reduce gradients in fp32."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs = {"mp_policy": mp} if mp else {}
    layers = decoder_layers(model)
    assert layers is not None, "FSDP2 needs model.model.layers (an HF decoder-only model)"
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def build_meta_model(config, dtype: torch.dtype, attn_implementation: str | None = None) -> nn.Module:
    """Parameters on the meta device (no memory), buffers real (rotary tables are computed in __init__ and are not
    in the state dict, so they must survive materialisation)."""
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    model.tie_weights()  # the meta init unties lm_head from embed_tokens in tied models; FSDP2 keeps the tie after
    return model


def materialize(model: nn.Module, device: torch.device) -> None:
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, b in buffers.items():
            model.get_buffer(name).copy_(b)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # a plain to_empty gives each module its own tensor


def load_full_state(model: nn.Module, env: DistEnv, full_state_dict: Callable[[], dict]) -> None:
    """Materialise a sharded meta model on the device, then load weights that only rank 0 holds in full
    (`full_state_dict()` is called on rank 0 only: from_pretrained on CPU, or a seeded fresh model), broadcast shard
    by shard."""
    materialize(model, env.device)
    state = full_state_dict() if env.is_main else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del state


def shard_random(model: nn.Module, env: DistEnv) -> None:
    """Random weights at any size (the bench) for a meta model: each block is materialised and initialised on the
    device, then sharded before the next one, so no rank ever holds more than one full block. Shards come from
    different ranks' draws, which is a valid random init (not bitwise reproducible across world sizes; training
    loads a rank-0 state with `load_full_state`)."""
    layers = decoder_layers(model)
    inside = {id(m) for layer in layers for m in layer.modules()}
    with torch.no_grad():
        for layer in layers:
            materialize(layer, env.device)
            for m in layer.modules():
                model._init_weights(m)
            fully_shard(layer)
        for m in model.modules():
            if id(m) not in inside and (any(True for _ in m.parameters(recurse=False))
                                        or any(True for _ in m.buffers(recurse=False))):
                bufs = {n: b.detach().clone() for n, b in m.named_buffers(recurse=False)}
                m.to_empty(device=env.device, recurse=False)
                for n, b in bufs.items():
                    getattr(m, n).copy_(b)
                model._init_weights(m)
    model.tie_weights()
    fully_shard(model)
