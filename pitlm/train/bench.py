"""`pitlm bench train`: tokens/s and peak memory of pitlm's own `train_step` on a TrainConfig's model with random
weights and tokens, assembled as `pitlm train` assembles it (pitlm.train.assembly).

    cfg = bench_config("lora-qwen35-35b-74gb", ["model.arch=qwen3.5-35b-a3b"])        # a recipe, or None
    bench_train(cfg, Sweep(batch_size=[4, 8], in_backward=[False, True]))             # one GPU
    torchrun --nproc-per-node 8 -m pitlm.cli bench train --mode full --arch qwen3.5-35b-a3b --batch 1

The model comes from `model:` (an arch preset and transformers keys; a recipe that trains a `base` names its arch
with --arch), built once: lora on the device (bf16 on a GPU, fp32 on CPU: the trainer's dtype), full on the meta
device, each block initialised on the device and sharded before the next (no rank ever holds the whole model). A
Sweep varies what can change on the built model; everything else is the config's.
"""

from __future__ import annotations

import copy
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pitlm.config import apply_overrides, build_config, load_recipe, parse_override
from pitlm.errors import ConfigError
from pitlm.kernels.availability import fast_path_summary
from pitlm.kernels.install import fast_path_switches, set_fast_path
from pitlm.kernels.profiling import h100_step_range, profile_call
from pitlm.train.activations import set_uncheckpointed_layers
from pitlm.train.assembly import ModelSource, assemble, autocast_dtype, param_dtype
from pitlm.train.config import TrainConfig, check_config, micro_batch_size, uses_fsdp
from pitlm.train.loop import quiet_transformers
from pitlm.train.model import apply_lora, build_model_config, build_scratch_model, count_params, torch_dtype
from pitlm.train.optim import bnb_adamw8bit_class, build_optimizer, param_groups
from pitlm.train.parallel import init_distributed, pick_device, shutdown_distributed
from pitlm.train.step import backbone_and_head, fused_ce_head, train_step

log = logging.getLogger("pitlm.bench")

# the bench's config without a recipe: LoRA on the tiny MoE hybrid, checkpointed, seq 2048, one sequence per rank
BENCH_DEFAULTS: dict[str, Any] = {
    "mode": "lora", "corpus": "bench", "base": "random", "model": {"arch": "tiny-qwen3.5-moe"}, "seq_len": 2048,
    "batch_size": 1, "gradient_checkpointing": True, "fsdp": {"activation_checkpointing": True},
    "optim": {"lr": 1e-5},
}


def bench_config(recipe: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The TrainConfig a bench measures: a recipe (or BENCH_DEFAULTS) with `--set key=value` overrides, as `pitlm
    train` reads them. Without a recipe, and unless lora.preset is set, the arch picks the LoRA preset (qwen3.5-moe
    for the Qwen3.5 MoE archs, else dense)."""
    for item in overrides or []:
        key = parse_override(item)[0][0]
        if key not in TrainConfig.model_fields:
            raise ConfigError(f"--set {item}: '{key}' is not a train config key; a transformers config key of the "
                              f"bench's model goes under model: --set model.{item}")
    data = load_recipe(recipe) if recipe else copy.deepcopy(BENCH_DEFAULTS)
    data.pop("stage", None)
    cfg = build_config(TrainConfig, apply_overrides(data, overrides))
    if not cfg.model:
        raise ConfigError("the bench builds its model from an arch with random weights: pass --arch (or --set "
                          "model.arch=...)")
    if recipe is None and not any(o.startswith("lora.preset=") for o in overrides or []):
        preset = "qwen3.5-moe" if "qwen3_5_moe" in build_model_config(cfg.model).model_type else "dense"
        cfg = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"preset": preset})})
    return cfg


@dataclass
class Sweep:
    """What one bench varies on its one built model, every combination measured in turn; None keeps the config's
    value. batch_size: sequences per micro-batch per rank (the config's: batch_size / (world size x
    grad_accum_steps)). uncheckpointed_layers: gradient_checkpointing_skip_last (one process, checkpointed).
    in_backward: optim.in_backward (on: no gradient clipping, pitlm.train.in_backward). routed_kernels: with the
    fast kernels, the MoE block's Triton kernels (routed experts, router, shared-expert gate) on or off. ablate: with
    the fast kernels, one installed fast path switched off (a `pitlm.kernels` switch name) or none."""

    batch_size: list[int] | None = None
    uncheckpointed_layers: list[int] | None = None
    in_backward: list[bool] | None = None
    routed_kernels: list[bool] = field(default_factory=lambda: [True])
    ablate: list[str] = field(default_factory=lambda: ["none"])


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


def bench_train(cfg: TrainConfig, sweep: Sweep | None = None, steps: int = 5, warmup: int = 2,
                memory_cap_gib: float | None = None, profile_path: str | None = None,
                on_result: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]] | None:
    """Run warmup + steps training steps on random tokens for every combination of `sweep` on one model assembled
    from `cfg` as `pitlm train` assembles it; returns one measurement each on rank 0 (None elsewhere). Each
    combination is checked by the trainer's own rules (check_config) before the model is built; one that runs out
    of memory is reported as such and the sweep goes on. memory_cap_gib: cap this process's GPU memory (e.g. an
    H100's budget on an H200). profile_path: a torch.profiler table of one extra step of the last combination.
    on_result: called on rank 0 with each measurement as soon as it exists, so a sweep cut short by a time limit
    (a new shape's kernel autotuning can take minutes) still reports what it measured."""
    sweep = sweep or Sweep()
    if cfg.mode not in ("lora", "full"):
        raise ConfigError(f"bench_train measures mode lora or full, got {cfg.mode}; mode scratch is "
                          "pitlm.train.bench_scratch (bench train --mode scratch)")
    unknown = [a for a in sweep.ablate if a != "none" and a not in fast_path_switches()]
    if unknown:
        raise ConfigError(f"unknown --ablate {', '.join(unknown)}; known: none, {', '.join(fast_path_switches())}")
    quiet_transformers()
    env = init_distributed(cfg.device, need_group=uses_fsdp(cfg, 1))
    try:
        fsdp = uses_fsdp(cfg, env.world_size)
        combos = _combos(cfg, sweep, env.world_size)
        on_gpu = env.device.type == "cuda"
        if memory_cap_gib and on_gpu:
            total_bytes = torch.cuda.get_device_properties(env.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, memory_cap_gib * 2**30 / total_bytes), env.device)
        dtype = torch_dtype(param_dtype(cfg, env.device))
        config = build_model_config(cfg.model)
        torch.manual_seed(cfg.seed)
        t0 = time.perf_counter()
        built = assemble(ModelSource(dtype, config=config, attn_implementation=cfg.attn_implementation), cfg, env,
                         fsdp)
        model = built.model
        build_seconds = time.perf_counter() - t0
        log.info("bench %s %s on %s x%d: %s params, %s trainable, seq %d, built in %.1fs", _arch(cfg), cfg.mode,
                 env.device.type, env.world_size, f"{built.total_params:,}", f"{count_params(model, True):,}",
                 cfg.seq_len, build_seconds)
        common = _common(cfg, env, built, fsdp, memory_cap_gib, build_seconds, dtype)
        if not built.fast_kernels:  # nothing to switch: the kernel sweeps measure the same model
            first = (sweep.routed_kernels[0], sweep.ablate[0])
            combos = [c for c in combos if (c["routed"], c["ablate"]) == first]
        sweeps_checkpointing = cfg.gradient_checkpointing and not fsdp
        if sweeps_checkpointing:
            for combo in combos:  # a bad count fails now, not after the sweep's first (slow) measurements
                set_uncheckpointed_layers(model, combo["cfg"].gradient_checkpointing_skip_last)
        results = []
        for i, combo in enumerate(combos):
            c = combo["cfg"]
            if sweeps_checkpointing:
                set_uncheckpointed_layers(model, c.gradient_checkpointing_skip_last)
            routed_on = bool(built.fast_kernels) and _switch_fast_paths(model, combo["routed"], combo["ablate"],
                                                                        cfg.lora.experts_in_k)
            last = i == len(combos) - 1
            result = _measure(model, c, env, config.vocab_size, combo["batch"], autocast_dtype(env.device, fsdp),
                              steps, warmup, profile_path if last else None)
            results.append({"bench_config": f"{i + 1}/{len(combos)}", **common,
                            "uncheckpointed_layers": c.gradient_checkpointing_skip_last if sweeps_checkpointing else 0,
                            "routed_kernels": "triton" if routed_on else "torch",
                            "ablated": combo["ablate"] if built.fast_kernels else "none", **result})
            if on_result is not None and env.is_main:
                on_result(results[-1])
        shutdown_distributed()
        return results if env.is_main else None
    finally:
        shutdown_distributed(wait=False)


def _arch(cfg: TrainConfig) -> str:
    return str(cfg.model.get("arch") or cfg.model.get("model_type"))


def _combos(cfg: TrainConfig, sweep: Sweep, world_size: int) -> list[dict[str, Any]]:
    """Every (uncheckpointed layers, routed kernels, ablation, in_backward, batch size) of the sweep, in that
    nesting, each with its TrainConfig checked by check_config."""
    batches = sweep.batch_size or [micro_batch_size(cfg, world_size)]
    if min(batches) < 1:
        raise ConfigError(f"batch_size={cfg.batch_size} is less than one sequence per rank at world size "
                          f"{world_size} x grad_accum_steps {cfg.grad_accum_steps}; set batch_size (or --batch)")
    skips = sweep.uncheckpointed_layers or [cfg.gradient_checkpointing_skip_last]
    in_backward = sweep.in_backward or [cfg.optim.in_backward]
    combos = []
    for skip in skips:
        for routed in sweep.routed_kernels:
            for ablated in sweep.ablate:
                for ib in in_backward:
                    for batch in batches:
                        # an update inside backward cannot wait for the global gradient norm: no clipping
                        optim = cfg.optim.model_copy(update={"in_backward": ib,
                                                             "grad_clip": 0.0 if ib else cfg.optim.grad_clip})
                        c = cfg.model_copy(update={"gradient_checkpointing_skip_last": skip, "optim": optim,
                                                   "batch_size": batch * world_size * cfg.grad_accum_steps})
                        check_config(c, world_size)
                        combos.append({"cfg": c, "batch": batch, "routed": routed, "ablate": ablated})
    return combos


def _common(cfg: TrainConfig, env, built, fsdp: bool, memory_cap_gib: float | None, build_seconds: float,
            dtype: torch.dtype) -> dict[str, Any]:
    """What every measurement of one bench shares: the config and the built model."""
    on_gpu = env.device.type == "cuda"
    lora = cfg.mode == "lora"
    return {
        "arch": _arch(cfg), "mode": cfg.mode,
        "device": torch.cuda.get_device_name(env.device) if on_gpu else "cpu",
        "world_size": env.world_size, "seq_len": cfg.seq_len, "grad_accum": cfg.grad_accum_steps,
        "total_params": built.total_params, "trainable_params": count_params(built.model, True),
        "activation_checkpointing": cfg.fsdp.activation_checkpointing if fsdp else cfg.gradient_checkpointing,
        "lora_preset": cfg.lora.preset if lora else None, "build_seconds": round(build_seconds, 1),
        "ce_chunk": cfg.ce_chunk, "optim": cfg.optim.name, "stochastic_round": cfg.optim.stochastic_round,
        "adapter_dtype": cfg.lora.adapter_dtype if lora else None,
        "experts_path": cfg.lora.experts_path if lora else None,
        "dense_path": cfg.lora.dense_path if lora else None,
        "full_modules": ",".join(cfg.lora.full_modules) if lora else None,
        "memory_cap_gib": memory_cap_gib if on_gpu else None,
        "offload_checkpoints": cfg.gradient_checkpointing_offload, "compile": cfg.compile,
        "fast_paths": fast_path_summary(), "fast_kernels": ", ".join(built.fast_kernels) or "none",
        "loss_path": _loss_path(built.model, cfg, env.device.type, dtype, autocast_dtype(env.device, fsdp)),
    }


# what one measurement found (the rest of a result is its configuration): printed for every config of a sweep
MEASURED_KEYS = ("tokens_per_second", "tokens_per_second_per_gpu", "step_seconds", "loss_last", "peak_vram_mb",
                 "peak_reserved_mb")
MOE_BLOCK_PATHS = ("routed-experts", "router", "shared-gate")  # --routed-kernels off switches all three off


def _switch_fast_paths(model, routed: bool, ablated: str, experts_in_k: bool = True) -> bool:
    """Every installed fast path on except `ablated` (lora-in-k per the config's lora.experts_in_k), and the MoE
    block's Triton kernels only with `routed`; returns whether any of those is on."""
    routed_on = False
    for name in fast_path_switches():
        on = name != ablated and (routed or name not in MOE_BLOCK_PATHS) and (name != "lora-in-k" or experts_in_k)
        if set_fast_path(model, name, on) and on and name in MOE_BLOCK_PATHS:
            routed_on = True
    return routed_on


def _loss_path(model, cfg: TrainConfig, device_type: str, dtype: torch.dtype, autocast: torch.dtype | None) -> str:
    """Which LM-head loss a step takes (pitlm.train.step.chunked_cross_entropy's own decision)."""
    if not cfg.ce_chunk:
        return "plain"
    fused = fused_ce_head(backbone_and_head(model)[1], dtype, device_type, autocast)
    return "liger fused linear cross-entropy" if fused is not None else "chunked (checkpointed)"


def _measure(model, cfg: TrainConfig, env, vocab: int, batch_size: int, autocast: torch.dtype | None, steps: int,
             warmup: int, profile_path: str | None) -> dict[str, Any]:
    """Time one combination (`cfg`: its optimizer, clipping, ce_chunk, accumulation) on `model` with a fresh
    optimizer; frees it afterwards."""
    on_gpu = env.device.type == "cuda"
    optimizer = build_optimizer(model, cfg)
    generator = torch.Generator().manual_seed(1234 + env.rank)
    in_backward, accum = cfg.optim.in_backward, cfg.grad_accum_steps
    out: dict[str, Any] = {"batch_per_rank": batch_size, "in_backward": in_backward, "steps": steps,
                           "profile": profile_path}

    def one_step(i: int) -> float:
        blocks = [torch.randint(0, vocab, (batch_size, cfg.seq_len + 1), generator=generator) for _ in range(accum)]
        return train_step(model, blocks, optimizer, step=i, grad_clip=cfg.optim.grad_clip, autocast_dtype=autocast,
                          env=env, ce_chunk=cfg.ce_chunk).loss

    try:
        losses, seconds, _ = timed_steps(one_step, warmup, steps, on_gpu)
        classes = profile_call(lambda: one_step(warmup + steps), profile_path, on_gpu) if profile_path else {}
        tokens = steps * batch_size * accum * cfg.seq_len * env.world_size
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
    out: dict[str, Any] = {f"gpu_ms_{k}": v for k, v in classes.items()}
    if classes and "H200" in torch.cuda.get_device_name(device):
        shortest, longest = h100_step_range(classes, step_seconds)
        out["h100_projected_tokens_per_second"] = f"{tokens_per_step / longest:.0f}-{tokens_per_step / shortest:.0f}"
    return out


def bench_optim(arch: str, optim: str = "adamw8bit", steps: int = 10, warmup: int = 2, device: str = "auto",
                lora_preset: str | None = None, adapter_dtype: str = "base", full_modules: list[str] | None = None,
                overrides: list[str] | None = None) -> dict[str, Any]:
    """Time one optimizer step over the trainable tensors of `arch`'s LoRA recipe (shapes from a model built on
    the meta device: no forward, no kernels to compile). adamw8bit: bitsandbytes' own AdamW8bit against pitlm's
    (the same loop without a device synchronisation per tensor), on identical weights and gradients; the
    `max_abs_diff` of the weights afterwards must be 0. `overrides`: `--set key=value` on the TrainConfig, as
    `bench train` takes them (`model.num_hidden_layers=20`)."""
    dev = pick_device(device)
    on_gpu = dev.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    cfg = bench_config(None, [f"model.arch={arch}", *(overrides or [])])
    lora = {"adapter_dtype": adapter_dtype, "experts_path": "peft", **({"preset": lora_preset} if lora_preset else {}),
            **({} if full_modules is None else {"full_modules": full_modules})}
    cfg = build_config(TrainConfig, {**cfg.model_dump(), "mode": "lora", "optim": {**cfg.optim.model_dump(), "lr": 1e-4,
                                                                                   "name": optim},
                                     "lora": {**cfg.lora.model_dump(), **lora}})
    config = build_model_config(cfg.model)
    quiet_transformers()
    meta = apply_lora(build_scratch_model(config, dtype, "meta"), cfg.lora)
    groups_meta = param_groups(meta, cfg)  # the trainer's groups (LR, weight decay), their tensors' shapes
    shapes = [[(tuple(p.shape), p.dtype) for p in g["params"]] for g in groups_meta]
    del meta
    gen = torch.Generator(device=dev).manual_seed(0)
    weights = [[torch.randn(s, dtype=dt, device=dev, generator=gen) * 0.02 for s, dt in g] for g in shapes]
    grads = [[torch.randn(s, dtype=dt, device=dev, generator=gen) * 1e-3 for s, dt in g] for g in shapes]
    if optim == "adamw8bit":
        import bitsandbytes as bnb  # noqa: PLC0415 - optional dependency bitsandbytes

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
