"""`pitlm bench train`: tokens/s and peak memory of pitlm's own `train_step` on an arch preset with random weights.

    bench_train("qwen3.5-35b-a3b", "lora", seq_len=2048, batch_size=[4, 8], in_backward=[False, True])  # one GPU
    torchrun --nproc-per-node 8 -m pitlm.cli bench train --arch qwen3.5-35b-a3b --mode full --batch 1

lora: the model is built directly on the device in bf16 (fp32 on CPU), then the LoRA preset is applied with
lm_head/embed_tokens trained in full, as in the seed's recipe. full: meta device -> FSDP2 per block -> each block
initialised on the device and sharded before the next (no rank ever holds the whole model).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from pitlm.config import apply_overrides, build_config
from pitlm.errors import ConfigError
from pitlm.kernels import fast_path_switches, install_fast_kernels, set_fast_path
from pitlm.kernels.availability import fast_path_summary
from pitlm.train.activations import compile_blocks, enable_activation_checkpointing, set_uncheckpointed_layers
from pitlm.train.config import TrainConfig, check_activations
from pitlm.train.loop import quiet_transformers
from pitlm.train.model import (
    apply_lora,
    build_model_config,
    build_scratch_model,
    check_lora,
    count_params,
)
from pitlm.train.optim import build_optimizer
from pitlm.train.parallel import (
    build_fsdp_model_random,
    init_distributed,
    shutdown_distributed,
)
from pitlm.train.step import train_step

log = logging.getLogger("pitlm.bench")


def _as_list(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _bench_config(arch: str, mode: str, model_overrides: list[str] | None, lora_preset: str | None, lr: float,
                  optim: str, adapter_dtype: str, experts_path: str, full_modules: list[str] | None,
                  stochastic_round: str = "none", dense_path: str = "fused", activations: dict | None = None):
    """(model config, LoRA preset, TrainConfig) of a bench: the arch's preset LoRA list unless one is named.
    activations: the TrainConfig's checkpointing / offload / compile fields, checked by `check_activations`."""
    config = build_model_config(apply_overrides({"arch": arch}, model_overrides))
    preset = lora_preset or ("qwen3.5-moe" if "qwen3_5_moe" in config.model_type else "dense")
    cfg = build_config(TrainConfig, {
        "mode": mode, "corpus": "bench", "base": "random", **(activations or {}),
        "optim": {"lr": lr, "name": optim, "stochastic_round": stochastic_round},
        "lora": {"preset": preset, "adapter_dtype": adapter_dtype, "experts_path": experts_path,
                 "dense_path": dense_path, **({} if full_modules is None else {"full_modules": full_modules})}})
    return config, preset, cfg



def timed_steps(one_step, warmup: int, steps: int, on_gpu: bool) -> tuple[list[float], float, float]:
    """Run `one_step(i)` for `warmup` untimed then `steps` timed steps (peak memory counted from the first):
    (losses of the timed steps, their seconds, the warm-up's seconds). The GPU is synchronised around the
    timed steps, so queued kernels count where they ran."""
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t_warm = time.perf_counter()
    for i in range(warmup):
        one_step(i)
    if on_gpu:
        torch.cuda.synchronize()
    t_start = time.perf_counter()
    losses = [one_step(warmup + i) for i in range(steps)]
    if on_gpu:
        torch.cuda.synchronize()
    return losses, time.perf_counter() - t_start, t_start - t_warm

def bench_train(arch: str, mode: str = "lora", seq_len: int = 2048, batch_size: int | list[int] = 1, steps: int = 5,
                warmup: int = 2, device: str = "auto", lora_preset: str | None = None,
                activation_checkpointing: bool = True, model_overrides: list[str] | None = None,
                lr: float = 1e-5, ce_chunk: int | None = None, optim: str = "adamw",
                adapter_dtype: str = "fp32", full_modules: list[str] | None = None, experts_path: str = "grouped",
                profile_path: str | None = None, fast_kernels: bool = True, in_backward: bool | list[bool] = False,
                grad_accum: int = 1, memory_cap_gib: float | None = None,
                uncheckpointed_layers: int | list[int] = 0, stochastic_round: str = "none",
                offload_checkpoints: bool = False, compile: str = "none",
                routed_kernels: bool | list[bool] = True, dense_path: str = "fused",
                ablate: str | list[str] = "none", rope: bool = True,
                on_result: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]] | None:
    """Run warmup + steps training steps on random tokens for every (uncheckpointed layers, in_backward, batch size)
    combination, on one model built once; returns one measurement each on rank 0 (None elsewhere). One that runs out
    of memory is reported as such and the sweep goes on. memory_cap_gib: cap this process's GPU memory (e.g. an
    H100's budget on an H200). uncheckpointed_layers: the last N decoder layers keep their activations.
    offload_checkpoints: checkpointed blocks keep their input in pinned host memory. compile: torch.compile the MoE
    blocks (moe); the warm-up steps pay the compilation. routed_kernels: with the fast kernels, the experts' fused
    Triton kernels on or off (the MoE block's: pitlm.kernels.routed and moe); a list sweeps both on
    one model. ablate: with the fast kernels, one installed fast path switched off (a `pitlm.kernels` switch name:
    gdn, conv-split, router, shared-gate, routed-experts, lora-in-k, dense-one-node, rope) or none; a list measures
    each on one model.
    rope: install the Triton partial rotary embedding too (pitlm.kernels.install_fast_kernels; default on).
    on_result: called on rank 0 with each measurement as soon as it exists, so a sweep cut short by a time limit
    (a new shape's kernel autotuning can take minutes) still reports what it measured."""
    if mode not in ("lora", "full"):
        raise ValueError(f"mode must be lora or full, got {mode!r}")
    unknown = [a for a in _as_list(ablate) if a != "none" and a not in fast_path_switches()]
    if unknown:
        raise ConfigError(f"unknown --ablate {', '.join(unknown)}; known: none, {', '.join(fast_path_switches())}")
    if mode == "full" and any(_as_list(in_backward)):
        raise ValueError("in_backward is for one process (lora); FSDP2 frees gradients shard by shard")
    activations = {"gradient_checkpointing": activation_checkpointing,
                   "gradient_checkpointing_offload": offload_checkpoints, "compile": compile}
    config, preset, cfg = _bench_config(arch, mode, model_overrides, lora_preset, lr, optim, adapter_dtype,
                                        experts_path, full_modules, stochastic_round, dense_path, activations)
    check_activations(cfg, fsdp=mode == "full")  # the trainer's own rules, before a model is built
    quiet_transformers()
    env = init_distributed(device, need_group=mode == "full")
    try:
        on_gpu = env.device.type == "cuda"
        if memory_cap_gib and on_gpu:
            total_bytes = torch.cuda.get_device_properties(env.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, memory_cap_gib * 2**30 / total_bytes), env.device)
        dtype = torch.bfloat16 if on_gpu else torch.float32
        t0 = time.perf_counter()
        if mode == "lora":
            model = build_scratch_model(config, dtype, env.device)
            total = count_params(model)
            if activation_checkpointing:
                enable_activation_checkpointing(model, offload=offload_checkpoints)
            model = apply_lora(model, cfg.lora)
            check_lora(model, cfg.lora)
        else:
            model = build_fsdp_model_random(config, env, dtype, activation_checkpointing)
            total = count_params(model)
        kernels = []
        if fast_kernels and on_gpu and mode == "lora":  # FSDP2 (full) + these kernels: not verified yet
            kernels = install_fast_kernels(model, rope=rope)
        compile_blocks(model, compile)
        model.train()
        build_seconds = time.perf_counter() - t0
        log.info("bench %s %s on %s x%d: %s params, %s trainable, seq %d, built in %.1fs", arch, mode,
                 env.device.type, env.world_size, f"{total:,}", f"{count_params(model, True):,}", seq_len,
                 build_seconds)
        common = {
            "arch": arch, "mode": mode, "device": torch.cuda.get_device_name(env.device) if on_gpu else "cpu",
            "world_size": env.world_size, "seq_len": seq_len, "steps": steps, "grad_accum": grad_accum,
            "total_params": total, "trainable_params": count_params(model, True),
            "activation_checkpointing": activation_checkpointing, "lora_preset": preset if mode == "lora" else None,
            "build_seconds": round(build_seconds, 1), "ce_chunk": ce_chunk if mode == "lora" else None,
            "optim": optim, "stochastic_round": stochastic_round, "adapter_dtype": adapter_dtype if mode == "lora" else None,
            "experts_path": experts_path if mode == "lora" else None,
            "dense_path": dense_path if mode == "lora" else None,
            "full_modules": ",".join(cfg.lora.full_modules) if mode == "lora" else None,
            "memory_cap_gib": memory_cap_gib if on_gpu else None,
            "offload_checkpoints": offload_checkpoints, "compile": compile,
            "fast_paths": fast_path_summary(), "fast_kernels": ", ".join(kernels) or "none",
            "loss_path": _loss_path(model, mode, ce_chunk, env.device.type, dtype),
        }
        sweeps_checkpointing = activation_checkpointing and mode == "lora"
        skips = _as_list(uncheckpointed_layers) if sweeps_checkpointing else [0]
        if sweeps_checkpointing:
            for skip in skips:  # a bad count fails now, not after the sweep's first (slow) measurements
                set_uncheckpointed_layers(model, skip)
        routed_sweep = _as_list(routed_kernels) if kernels else [False]
        ablations = _as_list(ablate) if kernels else ["none"]
        combos = [(s, b, ib, r, a) for s in skips for r in routed_sweep for a in ablations
                  for ib in _as_list(in_backward) for b in _as_list(batch_size)]
        results = []
        for i, (skip, batch, ib, routed, ablated) in enumerate(combos):
            if sweeps_checkpointing:
                set_uncheckpointed_layers(model, skip)
            routed_on = _switch_fast_paths(model, bool(routed), ablated)
            last = i == len(combos) - 1
            result = _measure(model, cfg, env, config.vocab_size, batch, bool(ib), seq_len, steps, warmup, ce_chunk,
                              grad_accum, profile_path if last else None)
            results.append({"bench_config": f"{i + 1}/{len(combos)}", **common, "uncheckpointed_layers": skip,
                            "routed_kernels": "triton" if routed_on else "torch", "ablated": ablated, **result})
            if on_result is not None and env.is_main:
                on_result(results[-1])
        shutdown_distributed()
        return results if env.is_main else None
    finally:
        shutdown_distributed(wait=False)


# what one measurement found (the rest of a result is its configuration): printed for every config of a sweep
MEASURED_KEYS = ("tokens_per_second", "tokens_per_second_per_gpu", "step_seconds", "loss_last", "peak_vram_mb",
                 "peak_reserved_mb")
MOE_BLOCK_PATHS = ("routed-experts", "router", "shared-gate")  # --routed-kernels off switches all three off


def _switch_fast_paths(model, routed: bool, ablated: str) -> bool:
    """Every installed fast path on except `ablated`, and the MoE block's Triton kernels only with `routed`;
    returns whether any of those is on."""
    routed_on = False
    for name in fast_path_switches():
        on = name != ablated and (routed or name not in MOE_BLOCK_PATHS)
        if set_fast_path(model, name, on) and on and name in MOE_BLOCK_PATHS:
            routed_on = True
    return routed_on


def _autocast(device_type: str, mode: str) -> torch.dtype | None:
    """The autocast dtype of a bench step (as pitlm train: bf16 for LoRA on a GPU)."""
    return torch.bfloat16 if device_type == "cuda" and mode == "lora" else None


def _loss_path(model, mode: str, ce_chunk: int | None, device_type: str, dtype: torch.dtype) -> str:
    """Which LM-head loss a step takes (pitlm.train.step.chunked_cross_entropy's own decision)."""
    from pitlm.train.step import backbone_and_head, fused_ce_head

    if mode != "lora" or not ce_chunk:
        return "plain"
    fused = fused_ce_head(backbone_and_head(model)[1], dtype, device_type, _autocast(device_type, mode))
    return "liger fused linear cross-entropy" if fused is not None else "chunked (checkpointed)"


def _measure(model, cfg: TrainConfig, env, vocab: int, batch_size: int, in_backward: bool, seq_len: int,
             steps: int, warmup: int, ce_chunk: int | None, grad_accum: int,
             profile_path: str | None) -> dict[str, Any]:
    """Time one (batch size, in_backward) pair on `model` with a fresh optimizer; frees it afterwards."""
    import gc

    on_gpu = env.device.type == "cuda"
    cfg = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"in_backward": in_backward})})
    optimizer = build_optimizer(model, cfg)
    generator = torch.Generator().manual_seed(1234 + env.rank)
    autocast = _autocast(env.device.type, cfg.mode)
    clip = 0.0 if in_backward else 1.0  # in_backward cannot clip by the global norm (pitlm.train.in_backward)
    out: dict[str, Any] = {"batch_per_rank": batch_size, "in_backward": in_backward, "profile": profile_path}

    def one_step(i: int) -> float:
        blocks = [torch.randint(0, vocab, (batch_size, seq_len + 1), generator=generator) for _ in range(grad_accum)]
        return train_step(model, blocks, optimizer, step=i, grad_clip=clip, autocast_dtype=autocast,
                          env=env, ce_chunk=ce_chunk if cfg.mode == "lora" else None).loss

    try:
        losses, seconds, _ = timed_steps(one_step, warmup, steps, on_gpu)
        classes = {}
        if profile_path:
            from pitlm.kernels.profiling import profile_call

            classes = profile_call(lambda: one_step(warmup + steps), profile_path, on_gpu)
        tokens = steps * batch_size * grad_accum * seq_len * env.world_size
        out.update({"tokens_per_second": round(tokens / seconds, 1),
                    "tokens_per_second_per_gpu": round(tokens / seconds / env.world_size, 1),
                    "step_seconds": round(seconds / steps, 4), "loss_last": round(losses[-1], 4)})
        out.update(_projection(classes, tokens / env.world_size / steps, seconds / steps, env.device))
    except torch.cuda.OutOfMemoryError as e:  # the sweep goes on: this pair does not fit
        out.update({"tokens_per_second": "oom", "oom": str(e).split(".")[0]})
        log.warning("batch %d in_backward=%s: out of memory", batch_size, in_backward)
    if on_gpu:
        out["peak_vram_mb"] = round(torch.cuda.max_memory_allocated(env.device) / 2**20, 1)
        out["peak_reserved_mb"] = round(torch.cuda.max_memory_reserved(env.device) / 2**20, 1)
    else:
        out["peak_vram_mb"] = 0.0
    if hasattr(optimizer, "remove_hooks"):
        optimizer.remove_hooks()
    optimizer.zero_grad(set_to_none=True)
    optimizer = None  # the closure holds this cell: drop the state before the next pair
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return out


def _projection(classes: dict[str, float], tokens_per_step: float, step_seconds: float, device) -> dict[str, Any]:
    """The profiled step's device time by class (ms) and, measured on an H200, the tokens/s an H100 would run by
    pitlm.kernels.profiling.h100_step_range (a range: an estimate, not a measurement)."""
    from pitlm.kernels.profiling import h100_step_range

    out: dict[str, Any] = {f"gpu_ms_{k}": v for k, v in classes.items()}
    if classes and "H200" in torch.cuda.get_device_name(device):
        shortest, longest = h100_step_range(classes, step_seconds)
        out["h100_projected_tokens_per_second"] = f"{tokens_per_step / longest:.0f}-{tokens_per_step / shortest:.0f}"
    return out


def bench_optim(arch: str, optim: str = "adamw8bit", steps: int = 10, warmup: int = 2, device: str = "auto",
                lora_preset: str | None = None, adapter_dtype: str = "base", full_modules: list[str] | None = None,
                model_overrides: list[str] | None = None) -> dict[str, Any]:
    """Time one optimizer step over the trainable tensors of `arch`'s LoRA recipe (shapes from a model built on
    the meta device: no forward, no kernels to compile). adamw8bit: bitsandbytes' own AdamW8bit against pitlm's
    (the same loop without a device synchronisation per tensor), on identical weights and gradients; the
    `max_abs_diff` of the weights afterwards must be 0."""
    from pitlm.train.optim import bnb_adamw8bit_class, param_groups
    from pitlm.train.parallel import pick_device

    dev = pick_device(device)
    on_gpu = dev.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    config, _, cfg = _bench_config(arch, "lora", model_overrides, lora_preset, 1e-4, optim, adapter_dtype, "peft",
                                   full_modules)
    quiet_transformers()
    meta = apply_lora(build_scratch_model(config, dtype, "meta"), cfg.lora)
    groups_meta = param_groups(meta, cfg)  # the trainer's groups (LR, weight decay), their tensors' shapes
    shapes = [[(tuple(p.shape), p.dtype) for p in g["params"]] for g in groups_meta]
    del meta
    gen = torch.Generator(device=dev).manual_seed(0)
    weights = [[torch.randn(s, dtype=dt, device=dev, generator=gen) * 0.02 for s, dt in g] for g in shapes]
    grads = [[torch.randn(s, dtype=dt, device=dev, generator=gen) * 1e-3 for s, dt in g] for g in shapes]
    if optim == "adamw8bit":
        import bitsandbytes as bnb

        impls = {"bitsandbytes": bnb.optim.AdamW8bit, "pitlm": bnb_adamw8bit_class()}
    else:
        impls = {"torch": torch.optim.AdamW}
    out: dict[str, Any] = {"arch": arch, "optim": optim, "device": torch.cuda.get_device_name(dev) if on_gpu else "cpu",
                           "tensors": sum(len(g) for g in shapes),
                           "trainable_params": sum(torch.Size(s).numel() for g in shapes for s, _ in g),
                           "steps": steps}
    finals = {}
    for name, cls in impls.items():
        params = [[torch.nn.Parameter(w.clone()) for w in g] for g in weights]
        opt = cls([{**{k: v for k, v in gm.items() if k != "params"}, "params": ps}
                   for gm, ps in zip(groups_meta, params, strict=True)], betas=(0.9, 0.95), eps=1e-8)

        for _ in range(warmup):
            _optim_step(opt, params, grads)
        if on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            _optim_step(opt, params, grads)
        if on_gpu:
            torch.cuda.synchronize()
        out[f"{name}_ms_per_step"] = round((time.perf_counter() - t0) / steps * 1e3, 2)
        finals[name] = [p.detach() for ps in params for p in ps]
    if len(finals) == 2:
        a, b = finals.values()
        out["max_abs_diff"] = max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b, strict=True))
        first, second = impls
        out["speedup"] = round(out[f"{first}_ms_per_step"] / out[f"{second}_ms_per_step"], 2)
    return out


def _optim_step(opt, params: list[list[torch.nn.Parameter]], grads: list[list[torch.Tensor]]) -> None:
    for ps, gs in zip(params, grads, strict=True):
        for p, g in zip(ps, gs, strict=True):
            p.grad = g
    opt.step()
