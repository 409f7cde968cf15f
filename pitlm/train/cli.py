"""CLI: `pitlm train`, `pitlm merge`, `pitlm bench train`. Thin: parse flags, load the config, call the library."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from pitlm.cliutil import RecipeOpt, SetOpt, guarded_volume, state, volume
from pitlm.errors import PitlmError
from pitlm.volume import held_locks_env


def _run_name(name: str | None, cfg_name: str | None, recipe: str | None) -> str:
    if name or cfg_name:
        return name or cfg_name  # type: ignore[return-value]
    if recipe:
        return Path(recipe).stem
    raise PitlmError("no run name: pass --name RUN_NAME (or a --recipe, whose name is the default)")


def _relaunch(nproc: int, root_args: list[str], args: list[str], home: Path, run_dir: Path, lock: Path) -> None:
    """Re-run this command under torchrun with `nproc` ranks; rank 0's stdout is passed through. A watchdog abort
    (exit 42 on the ranks, which torchrun reports as 1) is recovered from the run's failed.json. This process holds
    the run's write lock (`lock`) for the ranks."""
    from pitlm.train.loop import FAILED_MARKER

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "pitlm.cli", *root_args, "train", *args]
    # One intra-op thread pool per rank sized to this process's share of the CPUs: more threads than cores makes
    # every small op wait for a descheduled thread (a 20x slowdown for the demo's model on 2 cores).
    threads = max(1, len(os.sched_getaffinity(0)) // nproc)
    env = {**os.environ, "PITLM_HOME": str(home), "OMP_NUM_THREADS": str(threads), **held_locks_env(lock)}
    marker = run_dir / FAILED_MARKER
    marker.unlink(missing_ok=True)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
    if proc.returncode:
        code = json.loads(marker.read_text()).get("exit_code", 1) if marker.is_file() else proc.returncode
        raise typer.Exit(code)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command()
    def train(ctx: typer.Context, recipe: RecipeOpt = None, set_: SetOpt = None,
              name: Annotated[str | None, typer.Option("--name", help="Run name: PITLM_HOME/models/<name>/ (default: the recipe's run_name, else the recipe name).")] = None,
              resume: Annotated[bool, typer.Option("--resume", help="Continue from the run's last checkpoint (same data order, optimizer, RNG).")] = False,
              overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete models/<name>/ first and train from scratch.")] = False,
              nproc: Annotated[int | None, typer.Option("--nproc", help="Ranks: >1 relaunches through torchrun (default: the recipe's nproc).")] = None) -> None:
        """Train a model: scratch (from a config), lora (peft on a base), full (FSDP2 on a base). Ends with
        val_loss_final/train_loss_final/peak_vram_mb/tokens_per_second/training_seconds/trainable_params lines."""
        from pitlm.config import load_config
        from pitlm.log import emit_summary
        from pitlm.train.config import TrainConfig
        from pitlm.train.loop import train as run_train
        from pitlm.train.parallel import launched_by_torchrun
        from pitlm.train.paths import model_dir

        cfg = load_config(TrainConfig, recipe=recipe, overrides=set_)
        run_name = _run_name(name, cfg.run_name, recipe)
        vol = guarded_volume(ctx, "train")
        ranks = nproc if nproc is not None else cfg.nproc
        if ranks > 1 and not launched_by_torchrun():
            args = [*(["--recipe", recipe] if recipe else []), *[a for s in set_ or [] for a in ("--set", s)],
                    "--name", run_name, *(["--resume"] if resume else []), *(["--overwrite"] if overwrite else [])]
            st = state(ctx)
            root_args = [*(["-v"] if st.verbose else []), *(["--require-persistent"] if st.require_persistent else [])]
            md = model_dir(vol, run_name)
            with vol.lock("models", run_name):
                _relaunch(ranks, root_args, args, vol.root, md.root, vol.lock_path("models", run_name))
            return
        summary = run_train(cfg, vol, run_name, resume=resume, overwrite=overwrite)
        if summary is not None and summary.get("skipped"):
            emit_summary(summary)

    @app.command()
    def merge(ctx: typer.Context,
              target: Annotated[str, typer.Argument(help="A run name (models/<run>: its latest checkpoint), a checkpoint dir, or a peft adapter dir.")],
              out: Annotated[Path | None, typer.Option("--out", help="Write here instead of beside the checkpoints (final/, merged/).")] = None) -> None:
        """Turn a sharded (DCP) checkpoint into one HF checkpoint, and fold a LoRA adapter into its base. A
        single-process step: run it as its own job after an FSDP2 run."""
        import time

        from pitlm.log import emit_summary
        from pitlm.runs import start_run
        from pitlm.train.loop import quiet_transformers
        from pitlm.train.merge import merge_target

        quiet_transformers()
        vol = volume(ctx)
        t0 = time.time()
        with start_run(vol, "merge", {"target": target, "out": str(out) if out else None}) as run:
            written = merge_target(target, vol, out)
            run.finish({"merged_dirs": ",".join(str(p) for p in written), "merge_seconds": round(time.time() - t0, 2)},
                       print_lines=False)
        emit_summary({"merged_dir": str(written[-1]), "written": ",".join(str(p) for p in written),
                      "merge_seconds": round(time.time() - t0, 2)})

    @bench_app.command("optim")
    def bench_optim_cmd(
            arch: Annotated[str, typer.Option("--arch", help="Arch preset whose LoRA recipe's trainable tensors are stepped.")] = "tiny-qwen3.5-moe",
            optim: Annotated[str, typer.Option("--optim", help="adamw8bit: bitsandbytes' step vs pitlm's (no per-tensor sync) | adamw.")] = "adamw8bit",
            steps: Annotated[int, typer.Option("--steps")] = 10,
            warmup: Annotated[int, typer.Option("--warmup")] = 2,
            device: Annotated[str, typer.Option("--device")] = "auto",
            adapter_dtype: Annotated[str, typer.Option("--adapter-dtype")] = "base",
            full_modules: Annotated[str | None, typer.Option("--full-modules")] = None,
            set_: SetOpt = None) -> None:
        """Optimizer step time over a LoRA recipe's trainable tensors (no model forward)."""
        from pitlm.log import emit_summary
        from pitlm.train.bench import bench_optim

        emit_summary(bench_optim(arch, optim, steps=steps, warmup=warmup, device=device, adapter_dtype=adapter_dtype,
                                 full_modules=None if full_modules is None else [m for m in full_modules.split(",") if m],
                                 overrides=set_))

    @bench_app.command("train")
    def bench_train_cmd(
            recipe: RecipeOpt = None, set_: SetOpt = None,
            arch: Annotated[str | None, typer.Option("--arch", help="model.arch: tiny-qwen3, tiny-qwen3_5_moe (= tiny-qwen3.5-moe), demo-qwen3, qwen3.5-35b-a3b, pit-1b (default without a recipe: tiny-qwen3.5-moe).")] = None,
            mode: Annotated[str | None, typer.Option("--mode", help="lora (one process), full (FSDP2; torchrun for several GPUs) or scratch (one process: tokens/s, MFU, memory of --path).")] = None,
            seq: Annotated[int | None, typer.Option("--seq", help="seq_len (default without a recipe: 2048).")] = None,
            batch: Annotated[str | None, typer.Option("--batch", help="Sequences per micro-batch per rank; a comma list sweeps them on one model (4,6,8). Default: 1 without a recipe, else its batch_size / (ranks x grad_accum_steps).")] = None,
            steps: Annotated[int, typer.Option("--steps", help="Timed steps (after --warmup).")] = 5,
            warmup: Annotated[int, typer.Option("--warmup", help="Untimed steps first (compilation, allocator).")] = 2,
            device: Annotated[str | None, typer.Option("--device")] = None,
            lora_preset: Annotated[str | None, typer.Option("--lora-preset", help="lora.preset (default without a recipe: qwen3.5-moe for the Qwen3.5 MoE archs, else dense).")] = None,
            activation_checkpointing: Annotated[bool | None, typer.Option("--activation-checkpointing/--no-activation-checkpointing", help="gradient_checkpointing and fsdp.activation_checkpointing (default without a recipe: on).")] = None,
            ce_chunk: Annotated[int | None, typer.Option("--ce-chunk", help="ce_chunk (lora): LM head + loss this many tokens at a time (logits recomputed in backward).")] = None,
            optim: Annotated[str | None, typer.Option("--optim", help="optim.name: adamw | adamw8bit (bitsandbytes: 2 bytes of state per parameter instead of 4-8).")] = None,
            adapter_dtype: Annotated[str | None, typer.Option("--adapter-dtype", help="lora.adapter_dtype: fp32 (peft's default) | base (bf16 adapters on a bf16 base).")] = None,
            full_modules: Annotated[str | None, typer.Option("--full-modules", help="lora.full_modules: comma list trained in full (default lm_head,embed_tokens as the seed; '' for none).")] = None,
            experts_path: Annotated[str | None, typer.Option("--experts-path", help="lora.experts_path: grouped (LoRA on routed tokens, grouped GEMMs) | peft (peft materialises W + B·A).")] = None,
            dense_path: Annotated[str | None, typer.Option("--dense-path", help="lora.dense_path: fused (scale on the rank side, add in the GEMM) | peft (peft's lora.Linear forward).")] = None,
            profile: Annotated[str | None, typer.Option("--profile", help="Write a torch.profiler table of one extra step to this file.")] = None,
            fast_kernels: Annotated[bool | None, typer.Option("--fast-kernels/--no-fast-kernels", help="fast_kernels (GPU): fla's fused kernels and pitlm's Triton paths (pitlm.kernels).")] = None,
            in_backward: Annotated[str | None, typer.Option("--in-backward", help="optim.in_backward: off | on | off,on -- each parameter's optimizer step inside backward, its gradient freed at once (no clipping).")] = None,
            grad_accum: Annotated[int | None, typer.Option("--grad-accum", min=1, help="grad_accum_steps: micro-batches per optimizer step.")] = None,
            memory_cap_gib: Annotated[float | None, typer.Option("--memory-cap-gib", help="GPU: cap this process's memory (79.0 ~ an 80 GB H100 on an H200).")] = None,
            stochastic_round: Annotated[str | None, typer.Option("--stochastic-round", help="optim.stochastic_round (adamw8bit): none | full_modules | all -- bf16 weights written back with stochastic rounding.")] = None,
            uncheckpointed: Annotated[str | None, typer.Option("--uncheckpointed-layers", help="gradient_checkpointing_skip_last (lora): the last N decoder layers keep their activations (no recompute); a comma list sweeps (0,4,8).")] = None,
            offload_checkpoints: Annotated[bool | None, typer.Option("--offload-checkpoints/--no-offload-checkpoints", help="gradient_checkpointing_offload (lora): checkpointed blocks keep their input in pinned host memory (copied back one block ahead).")] = None,
            compile_: Annotated[str | None, typer.Option("--compile", help="compile (lora): none | moe -- torch.compile each MoE block (the warm-up compiles).")] = None,
            routed_kernels: Annotated[str, typer.Option("--routed-kernels", help="GPU, with the fast kernels: on | off | on,off -- the MoE block's fused Triton kernels (routed experts, router, shared-expert gate).")] = "on",
            ablate: Annotated[str, typer.Option("--ablate", help="GPU, with the fast kernels: none | gdn | conv-split | router | shared-gate | routed-experts | lora-in-k | dense-one-node | rope -- that fast path off; a comma list measures each on one model.")] = "none",
            path: Annotated[str, typer.Option("--path", help="scratch: comma list of reference (eager trainer step) | pitlm (compile: blocks + fused AdamW) | baseline (transformers + torch.compile + fused AdamW).")] = "pitlm",
            sdpa: Annotated[str, typer.Option("--sdpa", help="scratch: comma list of SDPA backends, auto | flash | cudnn | efficient.")] = "auto",
            peak_tflops: Annotated[float | None, typer.Option("--peak-tflops", help="scratch: dense bf16 peak for MFU (default: pitlm.train.mfu's table, H100/H200 SXM 989).")] = None) -> None:
        """Training throughput and peak memory of pitlm's own train_step on random weights and tokens: the model of
        a TrainConfig (--recipe, or the bench's defaults; the flags and --set key=value override it as in `pitlm
        train`; transformers config keys as --set model.KEY=VALUE), assembled as `pitlm train` assembles it."""
        from pitlm.errors import ConfigError
        from pitlm.log import emit_summary
        from pitlm.train.bench import MEASURED_KEYS, Sweep, bench_config, bench_train

        def split(value: str | None, parse, flag: str, what: str) -> list | None:
            if value is None:
                return None
            try:
                items = [parse(v.strip()) for v in value.split(",") if v.strip()]
            except (ValueError, KeyError):
                raise ConfigError(f"{flag} takes a comma list of {what}, got {value!r}") from None
            if not items:
                raise ConfigError(f"{flag} needs at least one of {what}")
            return items

        on_off = {"off": False, "on": True}.__getitem__
        batches = split(batch, int, "--batch", "integers") or (None if recipe else [1])
        skips = split(uncheckpointed, int, "--uncheckpointed-layers", "integers")
        if (batches and min(batches) < 1) or (skips and min(skips) < 0):
            raise ConfigError("--batch needs positive integers and --uncheckpointed-layers integers >= 0")
        flags = {"model.arch": arch, "mode": mode, "seq_len": seq, "device": device, "lora.preset": lora_preset,
                 "gradient_checkpointing": activation_checkpointing,
                 "fsdp.activation_checkpointing": activation_checkpointing, "ce_chunk": ce_chunk,
                 "optim.name": optim, "lora.adapter_dtype": adapter_dtype,
                 "lora.full_modules": None if full_modules is None else [m for m in full_modules.split(",") if m],
                 "lora.experts_path": experts_path, "lora.dense_path": dense_path, "fast_kernels": fast_kernels,
                 "grad_accum_steps": grad_accum, "optim.stochastic_round": stochastic_round,
                 "gradient_checkpointing_offload": offload_checkpoints, "compile": compile_}
        overrides = [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None] + list(set_ or [])
        cfg = bench_config(recipe, overrides)
        if cfg.mode == "scratch":
            from pitlm.train.bench_scratch import bench_scratch

            model = dict(cfg.model)
            bench_scratch(model.pop("arch"), seq_len=cfg.seq_len, batch_size=batches or [cfg.batch_size],
                          steps=steps, warmup=warmup, device=cfg.device,
                          model_overrides=[f"{k}={json.dumps(v)}" for k, v in model.items()],
                          paths=[p.strip() for p in path.split(",") if p.strip()],
                          sdpa=[b.strip() for b in sdpa.split(",") if b.strip()], peak_tflops=peak_tflops,
                          on_result=emit_summary)
            return
        sweep = Sweep(batch_size=batches, uncheckpointed_layers=skips,
                      in_backward=split(in_backward, on_off, "--in-backward", "off, on"),
                      routed_kernels=split(routed_kernels, on_off, "--routed-kernels", "off, on"),
                      ablate=split(ablate, str, "--ablate", "fast path names or none"))
        first: dict = {}

        def emit(result: dict) -> None:  # as each one is measured: the first in full, then what changes
            if not first:
                first.update(result)
                emit_summary(result)
            else:  # the measurements always (two configs may measure the same rounded value)
                emit_summary({k: v for k, v in result.items()
                              if k == "bench_config" or k in MEASURED_KEYS or first.get(k) != v})

        bench_train(cfg, sweep, steps=steps, warmup=warmup, memory_cap_gib=memory_cap_gib, profile_path=profile,
                    on_result=emit)
