"""The one model assembly of `pitlm train` and `pitlm bench train` (torchtitan style: plain `apply_*` functions on a
built model, composed in one order by `assemble`), so the bench measures the model that trains.

    source = ModelSource(torch.bfloat16, path=base_path)          # or config=..., seed=cfg.seed (scratch)
    built = assemble(source, cfg, env, fsdp=uses_fsdp(cfg, env.world_size))   # built.model, built.total_params

One process (lora; scratch on one rank):
    build on the device -> fast kernels -> activation checkpointing -> LoRA -> compile
FSDP2 (full; scratch on several ranks or with fsdp.force):
    build on the meta device -> activation checkpointing -> fully_shard each block, then the root -> weights -> compile

Why this order:
- fast kernels on the base model, before LoRA: they patch the base's own modules (norms, Gated DeltaNet, the MoE
  router and block) and set the experts' switches; peft's wrappers keep those modules and call them, so the forward
  is the same whichever comes first. (`pitlm bench train` installed them after LoRA until issue 26; same paths.)
- activation checkpointing before LoRA: peft sees a checkpointed model and hooks the embeddings' output to require
  grad (`PeftModel._prepare_model_for_gradient_checkpointing`), which a checkpointed block over frozen embeddings
  needs to get its adapters' gradients.
- under FSDP2, checkpointing wraps the blocks before `fully_shard` (torchtitan's order), and the blocks compile
  after it: FSDP2's hooks run eagerly around each compiled block.
- compile last, on the finished blocks (LoRA-wrapped projections included).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig

from pitlm.kernels.install import install_fast_kernels, set_fast_path
from pitlm.train.activations import compile_blocks, enable_activation_checkpointing
from pitlm.train.config import TrainConfig
from pitlm.train.model import (
    LoraReport,
    apply_lora,
    build_scratch_model,
    check_lora,
    count_params,
    load_pretrained_model,
)
from pitlm.train.parallel import DistEnv, apply_fsdp, build_meta_model, load_full_state, shard_random

log = logging.getLogger("pitlm.train")


@dataclass(frozen=True)
class ModelSource:
    """Where the assembled model's weights come from: a pretrained checkpoint (`path`), or fresh ones from `config`.

    Under FSDP2, rank 0 draws a fresh model after torch.manual_seed(`seed`) and broadcasts it (the same weights at
    any world size); `seed` None (the bench) lets each rank initialise its own shards, so no rank ever holds the
    whole model. On one process the caller seeds: `pitlm train` seeds once, before the model and its LoRA init."""

    dtype: torch.dtype
    config: Any = None  # a transformers config; None: the checkpoint's
    path: str | None = None
    seed: int | None = None
    attn_implementation: str | None = None

    def model_config(self):
        return self.config if self.config is not None else AutoConfig.from_pretrained(self.path)

    def build(self, device: torch.device | str) -> nn.Module:
        """The whole model on `device`."""
        if self.path:
            return load_pretrained_model(self.path, self.dtype, device, self.attn_implementation)
        return build_scratch_model(self.config, self.dtype, device, self.attn_implementation)

    def full_state_dict(self) -> dict:
        """Rank 0's full state dict, built on the CPU (the checkpoint, or the seeded fresh model)."""
        if not self.path:
            torch.manual_seed(self.seed)
        return self.build("cpu").state_dict()


@dataclass
class Assembled:
    model: nn.Module
    total_params: int  # the base model's, before LoRA
    fast_kernels: list[str]  # what apply_fast_kernels installed
    lora: LoraReport | None


def param_dtype(cfg: TrainConfig, device: torch.device) -> str:
    """The parameters' dtype name: cfg.dtype, or (auto) bf16 for lora/full on a GPU, else fp32."""
    if cfg.dtype != "auto":
        return cfg.dtype
    return "bf16" if device.type == "cuda" and cfg.mode != "scratch" else "fp32"


def autocast_dtype(device: torch.device, fsdp: bool) -> torch.dtype | None:
    """bf16 autocast on one GPU; sharded, FSDP2's mixed-precision policy (or bf16 parameters) sets the compute."""
    return torch.bfloat16 if device.type == "cuda" and not fsdp else None


# ----------------------------------------------------------------------------- the steps

def apply_fast_kernels(model: nn.Module, cfg: TrainConfig, env: DistEnv, fsdp: bool) -> list[str]:
    """pitlm.kernels' fused GPU paths on one GPU (FSDP2 + these kernels: not verified yet), the experts' LoRA-in-K
    switch per lora.experts_in_k; returns what was installed."""
    if not cfg.fast_kernels or env.device.type != "cuda" or fsdp:
        return []
    installed = install_fast_kernels(model)
    set_fast_path(model, "lora-in-k", cfg.lora.experts_in_k)
    return installed


def apply_activation_checkpointing(model: nn.Module, cfg: TrainConfig, fsdp: bool) -> None:
    """Recompute blocks in backward: fsdp.activation_checkpointing when sharded, else gradient_checkpointing (with
    its uncheckpointed last layers and host offload)."""
    if fsdp:
        if cfg.fsdp.activation_checkpointing:
            enable_activation_checkpointing(model)
    elif cfg.gradient_checkpointing:
        enable_activation_checkpointing(model, cfg.gradient_checkpointing_skip_last,
                                        offload=cfg.gradient_checkpointing_offload)


def apply_adapters(model: nn.Module, cfg: TrainConfig) -> tuple[nn.Module, LoraReport]:
    """peft LoRA per cfg.lora, refused by the guard when it would train almost nothing (pitlm.train.model)."""
    model = apply_lora(model, cfg.lora)
    rep = check_lora(model, cfg.lora)
    log.info("LoRA: %s adapter parameters (%.4f%% of %s), %d of %d decoder layers adapted, %s trained in full",
             f"{rep.adapter_params:,}", 100 * rep.fraction, f"{rep.total_params:,}", rep.layers_adapted,
             rep.layers_total, f"{rep.full_params:,}")
    return model, rep


def apply_compile(model: nn.Module, cfg: TrainConfig, fsdp: bool) -> int:
    """torch.compile per cfg.compile. FSDP2: the LM-head loss stays the model's forward, whose root hook gathers the
    sharded embeddings, norm and lm_head."""
    return compile_blocks(model, cfg.compile, head_loss=not fsdp)


def build_sharded(source: ModelSource, cfg: TrainConfig, env: DistEnv) -> nn.Module:
    """FSDP2: meta model -> activation checkpointing -> fully_shard per block and root -> weights on the device."""
    model = build_meta_model(source.model_config(), source.dtype, source.attn_implementation)
    apply_activation_checkpointing(model, cfg, fsdp=True)
    if source.path is None and source.seed is None:
        shard_random(model, env)
        return model
    # fp32 scratch parameters on a GPU compute in bf16 and reduce in fp32; lora/full keep their parameters' dtype
    compute = torch.bfloat16 if env.device.type == "cuda" and cfg.mode == "scratch" else None
    apply_fsdp(model, param_dtype=compute if compute not in (None, source.dtype) else None)
    load_full_state(model, env, source.full_state_dict)
    return model


def assemble(source: ModelSource, cfg: TrainConfig, env: DistEnv, fsdp: bool) -> Assembled:
    """The model `pitlm train` trains and `pitlm bench train` measures, in training mode (order: module docstring)."""
    if fsdp:
        assert cfg.mode != "lora", "LoRA runs on one process (check_config)"
        model, kernels = build_sharded(source, cfg, env), []
    else:
        model = source.build(env.device)
        kernels = apply_fast_kernels(model, cfg, env, fsdp)
        apply_activation_checkpointing(model, cfg, fsdp)
    total = count_params(model)
    report = None
    if cfg.mode == "lora":
        model, report = apply_adapters(model, cfg)
    apply_compile(model, cfg, fsdp)
    model.train()
    return Assembled(model, total, kernels, report)
