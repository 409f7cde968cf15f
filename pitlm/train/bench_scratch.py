"""`pitlm bench train --mode scratch`: tokens/s, MFU and peak memory of from-scratch pretraining steps on one process,
for three paths on the identical model (same seed, same weights) and the identical random batches:

    reference  pitlm train's eager scratch step: fp32 parameters, bf16 autocast on a GPU, torch AdamW (foreach)
    pitlm      the same train_step with the recipes' fast path: compile: blocks (pitlm.train.scratch) + fused AdamW
    baseline   a plain loop: transformers' model under torch.compile(model), its own loss (labels), fused AdamW,
               clip_grad_norm_, under the same autocast

    bench_scratch("pit-1b", seq_len=2048, batch_size=[8, 16], paths=["reference", "pitlm", "baseline"])

Each (path, SDPA backend) gets a freshly built model and a fresh dynamo cache; batch sizes are swept on it (one
static compilation per shape). MFU: pitlm.train.mfu (formula and peak there). Memory: torch's peak allocated and
reserved bytes / 2**20 (MiB), from a reset before the warm-up.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
import torch._dynamo

from pitlm.config import apply_overrides, build_config
from pitlm.errors import ConfigError
from pitlm.train.assembly import ModelSource, assemble
from pitlm.train.bench import timed_steps
from pitlm.train.config import TrainConfig
from pitlm.train.mfu import count_flops, mfu_fields, peak_bf16_tflops
from pitlm.train.model import build_model_config, build_scratch_model, count_params
from pitlm.train.optim import build_optimizer
from pitlm.train.parallel import init_distributed, shutdown_distributed
from pitlm.train.scratch import SDPA_CHOICES, sdpa_backend
from pitlm.train.step import train_step

log = logging.getLogger("pitlm.bench")
PATHS = ("reference", "pitlm", "baseline")


def bench_scratch(arch: str, seq_len: int = 2048, batch_size: list[int] | int = 8, steps: int = 10, warmup: int = 3,
                  device: str = "auto", model_overrides: list[str] | None = None,
                  paths: list[str] | None = None, sdpa: list[str] | None = None, lr: float = 3e-4,
                  peak_tflops: float | None = None, seed: int = 0,
                  on_result: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """One measurement per (path, SDPA backend, batch size); a pair that runs out of memory or that the backend
    cannot run is reported as such and the sweep goes on."""
    paths = list(paths or ["pitlm"])
    sdpa = list(sdpa or ["auto"])
    batches = batch_size if isinstance(batch_size, list) else [batch_size]
    bad = [p for p in paths if p not in PATHS] + [s for s in sdpa if s not in SDPA_CHOICES]
    if bad:
        raise ConfigError(f"unknown --path/--sdpa {', '.join(bad)}; paths: {', '.join(PATHS)}; "
                          f"sdpa: {', '.join(SDPA_CHOICES)}")
    env = init_distributed(device, need_group=False)
    if env.world_size > 1:
        raise ConfigError("bench train --mode scratch runs on one process; FSDP2 scratch runs are `pitlm train` "
                          "with nproc > 1 (this bench's multi-GPU arm is --mode full)")
    config = build_model_config(apply_overrides({"arch": arch}, model_overrides))
    on_gpu = env.device.type == "cuda"
    name = torch.cuda.get_device_name(env.device) if on_gpu else "cpu"
    peak = peak_tflops or (peak_bf16_tflops(name) if on_gpu else None)
    results: list[dict[str, Any]] = []
    try:
        for path in paths:
            for backend in sdpa:
                results += _bench_path(path, backend, config, env, batches, seq_len, steps, warmup, lr, peak, seed,
                                       name, arch, on_result)
    finally:
        shutdown_distributed(wait=False)
    return results


def _train_config(path: str, lr: float) -> TrainConfig:
    fast = path == "pitlm"
    return build_config(TrainConfig, {"mode": "scratch", "corpus": "bench", "model": {"arch": "bench"},
                                      "compile": "blocks" if fast else "none",
                                      "optim": {"lr": lr, "fused": fast, "warmup_steps": 0}})


def _bench_path(path, backend, config, env, batches, seq_len, steps, warmup, lr, peak, seed, device_name, arch,
                on_result) -> list[dict[str, Any]]:
    on_gpu = env.device.type == "cuda"
    torch._dynamo.reset()
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    cfg = _train_config(path, lr)
    if path == "baseline":  # a plain transformers model (the trainer's scratch dtype: fp32), compiled whole
        model = build_scratch_model(config, torch.float32, env.device).train()
        compiled = torch.compile(model)
    else:  # the model pitlm train assembles for this config (pitlm: compile blocks)
        model = compiled = assemble(ModelSource(torch.float32, config=config), cfg, env, fsdp=False).model
    build_seconds = time.perf_counter() - t0
    flops = count_flops(model, seq_len)
    autocast = torch.bfloat16 if on_gpu else None
    common = {"arch": arch, "mode": "scratch", "path": path, "sdpa": backend, "device": device_name,
              "torch": torch.__version__, "seq_len": seq_len, "steps": steps, "warmup": warmup,
              "total_params": count_params(model), "param_dtype": "fp32",
              "autocast": "bf16" if autocast else "none", "activation_checkpointing": False,
              "compile": {"reference": "none", "pitlm": "blocks", "baseline": "model"}[path],
              "optimizer": "adamw fused" if path != "reference" else "adamw foreach",
              "build_seconds": round(build_seconds, 1)}
    out = []
    # one static graph per batch shape: a second shape would otherwise be recompiled with dynamic sizes
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False), sdpa_backend(backend):
        for batch in batches:
            result = {**common, "batch": batch,
                      **_measure(model, compiled, cfg, path, env, config.vocab_size, batch, seq_len, steps, warmup,
                                 autocast, seed)}
            if isinstance(result.get("tokens_per_second"), float):
                result.update(mfu_fields(flops, result["tokens_per_second"], peak))
            out.append(result)
            if on_result is not None:
                on_result(result)
    del model, compiled
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return out


def _baseline_step(compiled, model, optimizer, block: torch.Tensor, autocast) -> float:
    """A plain transformers training step: the model's own loss on shifted labels, clip 1.0, fused AdamW."""
    block = block.to(next(model.parameters()).device, non_blocking=True)
    inputs, targets = block[:, :-1], block[:, 1:]
    ctx = torch.autocast(inputs.device.type, dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        loss = compiled(input_ids=inputs, labels=inputs, shift_labels=targets.contiguous(),
                        use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def _measure(model, compiled, cfg, path, env, vocab, batch, seq_len, steps, warmup, autocast, seed) -> dict:
    on_gpu = env.device.type == "cuda"
    generator = torch.Generator().manual_seed(seed + 1234)
    optimizer = (torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(0.9, 0.95), weight_decay=0.1,
                                   fused=True) if path == "baseline" else build_optimizer(model, cfg))

    def one_step(i: int) -> float:
        block = torch.randint(0, vocab, (batch, seq_len + 1), generator=generator)
        if path == "baseline":
            return _baseline_step(compiled, model, optimizer, block, autocast)
        return train_step(model, [block], optimizer, step=i, grad_clip=1.0, autocast_dtype=autocast, env=env).loss

    out: dict[str, Any] = {}
    try:
        losses, seconds, warmup_seconds = timed_steps(one_step, warmup, steps, on_gpu)
        tokens = steps * batch * seq_len
        out.update({"tokens_per_second": round(tokens / seconds, 1), "step_seconds": round(seconds / steps, 4),
                    "warmup_seconds": round(warmup_seconds, 1), "loss_first": round(losses[0], 4),
                    "loss_last": round(losses[-1], 4)})
    except torch.cuda.OutOfMemoryError as e:
        out.update({"tokens_per_second": "oom", "error": str(e).split(".")[0]})
        log.warning("%s batch %d: out of memory", path, batch)
    except RuntimeError as e:  # e.g. an SDPA backend that cannot run these inputs
        out.update({"tokens_per_second": "failed", "error": str(e).splitlines()[0][:300]})
        log.warning("%s batch %d failed: %s", path, batch, out["error"])
    if on_gpu:
        out["peak_allocated_mib"] = round(torch.cuda.max_memory_allocated(env.device) / 2**20, 1)
        out["peak_reserved_mib"] = round(torch.cuda.max_memory_reserved(env.device) / 2**20, 1)
    optimizer.zero_grad(set_to_none=True)
    optimizer.state.clear()  # the AdamW state goes before the next measurement's
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return out
