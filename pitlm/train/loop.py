"""`pitlm train`: a plain, readable torch loop over transformers models (nanoGPT style).

    summary = train(cfg, vol, run_name="demo-scratch-pit")

Set-up (corpus, tokenizer, model for the mode, optimizer, resume) -> the loop (one `train_step` per step, a log
line every `log_every`, val loss every `eval.every`, a DCP checkpoint every `checkpoint.every`) -> final eval,
final checkpoint, export (final/, merged/) -> manifest.json and the grep-able summary lines.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import logging as hf_logging

try:
    from torch.utils.tensorboard import SummaryWriter
except ImportError:  # tensorboard is a dependency of pitlm, but a bare GPU image may lack it
    SummaryWriter = None

from pitlm.config import dump_config
from pitlm.corpus.tokenizer import load_tokenizer
from pitlm.errors import PitlmError
from pitlm.kernels.availability import fast_path_summary
from pitlm.log import make_progress
from pitlm.runs import Run, start_run
from pitlm.train.assembly import ModelSource, assemble, autocast_dtype, param_dtype
from pitlm.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from pitlm.train.config import TrainConfig, check_config, micro_batch_size, uses_fsdp
from pitlm.train.data import PackedWindows
from pitlm.train.merge import export_hf_model, export_lora, merge_adapter, merge_checkpoint
from pitlm.train.mfu import count_flops, mfu_fields, peak_bf16_tflops
from pitlm.train.model import build_model_config, count_params, torch_dtype
from pitlm.train.optim import build_optimizer
from pitlm.train.parallel import DistEnv, barrier, init_distributed, shutdown_distributed
from pitlm.train.paths import (
    MEMBER,
    ModelDir,
    corpus_tokenizer_spec,
    model_dir,
    open_train_corpus,
    resolve_model_path,
    resolve_tokenizer_path,
)
from pitlm.train.schedule import Schedule, Segment, build_schedule
from pitlm.train.step import NonFiniteLossError, probe_logits, train_step, validation_loss
from pitlm.volume import atomic_write_json, build_manifest, read_manifest, sha256_file, write_manifest

log = logging.getLogger("pitlm.train")
FAILED_MARKER = "failed.json"  # rank 0 writes it when the watchdog fires; `--nproc` relaunch turns it into exit 42


@dataclass
class Setup:
    """Everything the loop needs, built by `prepare`."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    tokenizer: Any
    schedule: Schedule
    val_windows: PackedWindows  # the last segment's held-out split (probe_logits)
    autocast_dtype: torch.dtype | None
    fsdp: bool
    total_params: int
    trainable_params: int
    inputs: dict[str, Any] = field(default_factory=dict)  # resolved paths, for checkpoints and the manifest


# ----------------------------------------------------------------------------- set-up

def _tokenizer_path(cfg: TrainConfig, vol, corpus_dir: Path, base_path: str | None) -> str:
    spec = cfg.tokenizer or base_path or corpus_tokenizer_spec(corpus_dir)
    if not spec:
        raise PitlmError(f"no tokenizer: set tokenizer=pit:NAME (or an HF name/path); corpus {corpus_dir.name} "
                         "records none")
    return resolve_tokenizer_path(spec, vol)


def model_source(cfg: TrainConfig, base_path: str | None, vocab_size: int, tokenizer: Any,
                 dtype: torch.dtype) -> ModelSource:
    """The model for the mode, before LoRA: a fresh one (scratch: rank 0's seeded init under FSDP2, the same weights
    at any world size), or the base (lora/full)."""
    if cfg.mode == "scratch":
        return ModelSource(dtype, config=build_model_config(cfg.model, vocab_size, tokenizer), seed=cfg.seed,
                           attn_implementation=cfg.attn_implementation)
    return ModelSource(dtype, path=base_path, attn_implementation=cfg.attn_implementation)


def prepare(cfg: TrainConfig, vol, env: DistEnv) -> Setup:
    index = open_train_corpus(cfg.corpus, vol)
    corpus_dir = index.root
    schedule = build_schedule(cfg, index, env.world_size)  # checks the corpus and the schedule before any model
    base_path = resolve_model_path(cfg.base, vol) if cfg.base else None
    tok_path = _tokenizer_path(cfg, vol, corpus_dir, base_path)
    tokenizer = load_tokenizer(tok_path, vol)
    dtype_name = param_dtype(cfg, env.device)
    fsdp = uses_fsdp(cfg, env.world_size)
    torch.manual_seed(cfg.seed)

    source = model_source(cfg, base_path, max(len(tokenizer), index.vocab_size), tokenizer, torch_dtype(dtype_name))
    built = assemble(source, cfg, env, fsdp)
    model = built.model
    vocab = _unwrapped_config(model).vocab_size
    if index.vocab_size > vocab:
        raise PitlmError(f"corpus {corpus_dir.name} was tokenized with a {index.vocab_size}-token vocabulary but the "
                         f"model has {vocab}; tokenize the corpus with the model's tokenizer")

    val_windows = PackedWindows.from_index(index, "val", cfg.seq_len)
    inputs = {"corpus": str(corpus_dir), "corpus_cutoff": str(index.cutoff) if index.cutoff else None,
              "corpus_tokens_train": index.num_tokens("train"),
              "corpus_tokens_val": index.num_tokens("val"), "base_path": base_path, "tokenizer_path": tok_path,
              "param_dtype": dtype_name, "mode": cfg.mode, "fsdp": fsdp}
    if (corpus_dir / "manifest.json").is_file():
        inputs["corpus_manifest_sha256"] = sha256_file(corpus_dir / "manifest.json")
    return Setup(model=model, optimizer=build_optimizer(model, cfg), tokenizer=tokenizer, schedule=schedule,
                 val_windows=val_windows, autocast_dtype=autocast_dtype(env.device, fsdp), fsdp=fsdp,
                 total_params=built.total_params, trainable_params=count_params(model, trainable_only=True),
                 inputs=inputs)


# ----------------------------------------------------------------------------- helpers for the loop

def peak_memory_mb(device: torch.device) -> tuple[float, float]:
    """(peak GPU memory allocated, peak resident set size of this process), in MB."""
    vram = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    return vram, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Metrics:
    """Rank-0 sinks: the run's metrics.jsonl and TensorBoard."""

    def __init__(self, run: Run | None, tb_dir: Path | None):
        self.run = run
        self.tb = None
        if tb_dir is not None:
            if SummaryWriter is None:
                log.warning("tensorboard is not installed: metrics go to the run's metrics.jsonl only")
            else:
                self.tb = SummaryWriter(str(tb_dir))

    def log(self, step: int, **values: float) -> None:
        if self.run is not None:
            self.run.log_metrics(step=step, **values)
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k.replace("_", "/", 1) if k.startswith(("train_", "val_")) else k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def quiet_transformers() -> None:
    """Our own progress bar and log lines replace transformers' per-load tqdm bars."""
    hf_logging.disable_progress_bar()


def _unwrapped_model(model: nn.Module) -> nn.Module:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, "_orig_mod", inner)


def _unwrapped_config(model: nn.Module):
    return _unwrapped_model(model).config


# ----------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig, vol, run_name: str, resume: bool = False, overwrite: bool = False) -> dict[str, Any] | None:
    """Train per `cfg` into PITLM_HOME/models/<run_name>/; returns the summary on rank 0 (None elsewhere)."""
    cfg = cfg.model_copy(update={"run_name": run_name})
    quiet_transformers()
    env = init_distributed(cfg.device, need_group=uses_fsdp(cfg, 1))
    try:
        check_config(cfg, env.world_size)
        md = model_dir(vol, run_name)
        # one writer of models/<run> at a time: a second `train --name X` fails before it touches the first's files
        with vol.lock("models", run_name) if env.is_main else contextlib.nullcontext():
            done = _finished_summary(cfg, md, overwrite, resume, env)
            if done is not None:
                return done if env.is_main else None
            with (start_run(vol, "train", cfg) if env.is_main else contextlib.nullcontext()) as run:
                summary, merges = _train(cfg, vol, md, env, run, resume)
                shutdown_distributed()
                if env.is_main:
                    # FSDP2: rank 0 writes final/ (and a chronological run's members) from the sharded checkpoints
                    # after the process group is gone (one process, no collectives, no NCCL watchdog): exactly what
                    # `pitlm merge` does as a job.
                    for merge in merges:
                        merge.run()
                    _finish(cfg, md, run, summary)
    finally:
        shutdown_distributed(wait=False)
    return summary if env.is_main else None


def _finished_summary(cfg: TrainConfig, md: ModelDir, overwrite: bool, resume: bool, env: DistEnv) -> dict | None:
    """Skip a finished run with the same config; refuse to silently mix runs in one model dir."""
    if overwrite:
        if env.is_main and md.root.exists():
            shutil.rmtree(md.root)
        barrier(env)
        return None
    if md.manifest.is_file():
        manifest = read_manifest(md.root)
        if manifest.get("config") == cfg.model_dump(mode="json"):
            log.info("%s is already trained with this config; skipping (--overwrite to retrain)", md.root)
            return {**manifest.get("summary", {}), "skipped": True}
        raise PitlmError(f"{md.root} holds a finished run with a different config; use --name NEW_NAME, or "
                         "--overwrite to replace it")
    if md.latest_checkpoint() is not None and not resume:
        raise PitlmError(f"{md.root} has checkpoints from an unfinished run; pass --resume to continue it or "
                         "--overwrite to start over")
    return None


def _train(cfg: TrainConfig, vol, md: ModelDir, env: DistEnv, run: Run | None,
           resume: bool) -> tuple[dict[str, Any], list[Merge]]:
    if env.device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)  # CPU runs are bit-reproducible (resume test)
    if env.is_main:
        md.root.mkdir(parents=True, exist_ok=True)
        (md.root / FAILED_MARKER).unlink(missing_ok=True)
        md.config.write_text(dump_config(cfg))
    config_yaml = dump_config(cfg)
    s = prepare(cfg, vol, env)
    sched = s.schedule
    total_steps = sched.total_steps
    log.info("mode %s on %s x%d: %s parameters, %s trainable; %s train tokens, seq %d, batch %d (micro %d x %d "
             "accum x %d ranks)", cfg.mode, env.device.type, env.world_size, f"{s.total_params:,}",
             f"{s.trainable_params:,}", f"{s.inputs['corpus_tokens_train']:,}", cfg.seq_len, cfg.batch_size,
             micro_batch_size(cfg, env.world_size), cfg.grad_accum_steps, env.world_size)
    for line in sched.describe():
        log.info("%s", line)
    if env.device.type == "cuda":
        log.info("fast paths: %s", fast_path_summary())

    # ---- resume
    start_step, tokens_seen = 0, 0
    ckpt = latest_checkpoint(md, env, verify=cfg.checkpoint.verify) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, s.model, s.optimizer, env)
        start_step, tokens_seen = int(state["step"]), int(state.get("tokens_seen", 0))
        log.info("resumed from %s (step %d)", ckpt, start_step)
    elif resume and md.list_checkpoints():
        raise PitlmError(f"--resume: no intact checkpoint in {md.checkpoints} (each one is damaged, see the warnings "
                         "above); restore one, or start over with --overwrite")
    elif resume:
        log.info("--resume: no checkpoint in %s, starting from step 0", md.checkpoints)
    if start_step > total_steps:
        raise PitlmError(f"--resume: the checkpoint is at step {start_step}, past this config's {total_steps} steps; "
                         "resume with the config it was written with")

    metrics = Metrics(run, md.tensorboard if env.is_main else None)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    last_loss, last_val, grad_norm = float("nan"), float("nan"), float("nan")
    step_seconds, steps_done = 0.0, 0
    t_start = time.perf_counter()
    boundaries = sched.boundaries
    # a sharded chronological run keeps each member's checkpoint until rank 0 merges it after the run
    keep = frozenset(boundaries) if s.fsdp else frozenset()
    merges: list[Merge] = []

    def checkpoint(step: int) -> Path:
        state = {"tokens_seen": tokens_seen, "train_loss": last_loss, "val_loss": last_val, **s.inputs}
        path = save_checkpoint(md, step, s.model, s.optimizer, state, config_yaml, env, cfg.checkpoint.keep_last,
                               keep=keep)
        if env.is_main and cfg.mode != "lora":
            _unwrapped_config(s.model).save_pretrained(path)  # config.json: what `pitlm merge` builds
        return path

    def member_record(seg: Segment, step: int) -> dict[str, Any]:
        return {"run": md.root.name, "cutoff": str(seg.cutoff), "segment": seg.k + 1, "step": step,
                "tokens_seen": tokens_seen, "val_loss": last_val, "train_loss": last_loss,
                "corpus": s.inputs["corpus"], "spec": f"model:{md.root.name}@{seg.cutoff}"}

    def end_segment(seg: Segment, step: int) -> None:
        """A family member: the model now has read documents crawled on or before seg.cutoff only. Exported
        before the boundary's checkpoint, so a run resumed from that checkpoint finds its member written."""
        member = md.member(seg.cutoff)
        if s.fsdp:  # rank 0 merges it from the boundary checkpoint once the process group is gone
            merges.append(Merge(md.checkpoint(step), member, member_record(seg, step)))
            return
        if env.is_main:
            shutil.rmtree(member.root, ignore_errors=True)  # a resumed run re-exports an interrupted member
            if cfg.mode == "lora":
                export_hf_model(s.model, member.final, s.tokenizer, config_yaml)  # the peft adapter dir
                if cfg.lora.merge_on_exit:
                    merge_adapter(member.final, member.merged, vol)
            else:
                export_hf_model(s.model, member.final, s.tokenizer, config_yaml)
            atomic_write_json(member.root / MEMBER, member_record(seg, step))
            log.info("member %s (step %d, val_loss %.4f): %s", seg.cutoff, step, last_val, member.root)
        barrier(env)

    try:
        with make_progress() as bar:
            task = bar.add_task(f"train {md.root.name}", total=total_steps, completed=start_step, rate="")
            interval_t, interval_tokens = time.perf_counter(), 0
            for step in range(start_step, total_steps):
                # ---- one optimizer step
                factor = sched.lr_factor(step)
                for group in s.optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor
                batches = sched.micro_batches(step, env.rank)
                t0 = time.perf_counter()
                result = train_step(s.model, batches, s.optimizer, step=step + 1, grad_clip=cfg.optim.grad_clip,
                                    ce_chunk=cfg.ce_chunk,
                                    autocast_dtype=s.autocast_dtype, env=env,
                                    inject_nan=cfg.debug.inject_nan_at_step == step + 1)
                step_seconds += time.perf_counter() - t0
                steps_done += 1
                done = step + 1
                tokens_seen += tokens_per_step
                interval_tokens += tokens_per_step
                last_loss, grad_norm = result.loss, result.grad_norm
                bar.update(task, completed=done, rate=f"loss {last_loss:.3f}")

                # ---- log line
                if done % cfg.log_every == 0 or done == total_steps:
                    now = time.perf_counter()
                    tok_s = interval_tokens / max(1e-9, now - interval_t)
                    interval_t, interval_tokens = now, 0
                    eta = (now - t_start) / steps_done * (total_steps - done)
                    vram, rss = peak_memory_mb(env.device)
                    lr = s.optimizer.param_groups[0]["lr"]
                    mem = f"{vram:.0f} MB GPU" if env.device.type == "cuda" else f"{rss:.0f} MB RSS"
                    log.info("step %6d/%d | loss %.4f | lr %.2e | %s tok/s | ETA %s | peak %s", done, total_steps,
                             last_loss, lr, f"{tok_s / 1000:.1f}k", format_duration(eta), mem)
                    metrics.log(done, train_loss=last_loss, lr=lr, grad_norm=grad_norm, tokens_per_second=tok_s,
                                peak_vram_mb=vram, tokens_seen=tokens_seen)

                # ---- a family member at a chronological boundary (the last one is the run's final model too)
                if done in boundaries:
                    last_val = validation_loss(s.model, sched.val(step, env.rank), s.autocast_dtype, env)
                    log.info("step %6d | val_loss %.4f (period to %s)", done, last_val, boundaries[done].cutoff)
                    metrics.log(done, val_loss=last_val)
                    end_segment(boundaries[done], done)
                    if done != total_steps:
                        checkpoint(done)

                # ---- validation
                elif done % cfg.eval.every == 0 and done != total_steps:
                    last_val = validation_loss(s.model, sched.val(step, env.rank), s.autocast_dtype, env)
                    log.info("step %6d | val_loss %.4f", done, last_val)
                    metrics.log(done, val_loss=last_val)

                # ---- checkpoint (the final one is written below, after the final eval)
                if done % cfg.checkpoint.every == 0 and done != total_steps and done not in boundaries:
                    checkpoint(done)
                if cfg.debug.kill_at_step == done:
                    log.warning("debug.kill_at_step=%d: hard exit", done)
                    os._exit(137)
        # ---- final eval and checkpoint
        training_seconds = time.perf_counter() - t_start
        if total_steps not in boundaries or start_step == total_steps:
            last_val = validation_loss(s.model, sched.val(total_steps - 1, env.rank), s.autocast_dtype, env)
            metrics.log(total_steps, val_loss=last_val)
            log.info("step %6d | val_loss %.4f (final)", total_steps, last_val)
    except NonFiniteLossError as e:
        if env.is_main:
            md.root.joinpath(FAILED_MARKER).write_text(json.dumps({"exit_code": e.exit_code, "step": e.step,
                                                                   "error": str(e)}))
        raise
    finally:
        metrics.close()
    final_ckpt = checkpoint(total_steps)
    if cfg.debug.probe_logits:  # logits of the live (possibly sharded) model, to check merges against
        probe = s.val_windows.batch([0, 1])[:, :-1]
        logits = probe_logits(s.model, probe, s.autocast_dtype)
        if env.is_main:
            torch.save({"tokens": probe, "logits": logits}, md.root / "probe_logits.pt")
    vram, rss = peak_memory_mb(env.device)
    summary = {
        "val_loss_final": last_val, "train_loss_final": last_loss, "peak_vram_mb": round(vram, 1),
        "peak_rss_mb": round(rss, 1),
        "tokens_per_second": round(steps_done * tokens_per_step / max(1e-9, step_seconds), 1),
        "training_seconds": round(training_seconds, 2), "trainable_params": s.trainable_params,
        "total_params": s.total_params, "steps": total_steps, "tokens_seen": tokens_seen, "mode": cfg.mode,
        "world_size": env.world_size, "model_dir": str(md.root),
    }
    if cfg.mode == "scratch" and env.device.type == "cuda":  # the formula and the peak of pitlm/train/mfu.py
        peak = peak_bf16_tflops(torch.cuda.get_device_name(env.device))
        fields = mfu_fields(count_flops(_unwrapped_model(s.model), cfg.seq_len),
                            summary["tokens_per_second"] / env.world_size, peak)
        summary.update({"mfu": fields["mfu"], "achieved_tflops_per_gpu": fields["achieved_tflops"],
                        "peak_tflops": peak})
    if sched.chronological:
        summary["schedule"] = "chronological"
        summary["members"] = len(boundaries)
        summary["member_cutoffs"] = ",".join(str(seg.cutoff) for seg in boundaries.values())
    if env.is_main and not s.fsdp:
        if cfg.mode == "lora":
            export_lora(s.model, md, s.tokenizer, config_yaml, merge=cfg.lora.merge_on_exit)
        else:
            export_hf_model(s.model, md.final, s.tokenizer, config_yaml)
    if s.fsdp:
        if cfg.fsdp.merge_on_exit:
            merges.append(Merge(final_ckpt, md, None))
        elif merges:
            raise PitlmError("schedule=chronological with FSDP2 needs fsdp.merge_on_exit=true (each member is "
                             "merged from its checkpoint when the run ends)")
        else:
            log.info("sharded checkpoint at %s; write final/ with `pitlm merge %s` (a separate single-process job)",
                     final_ckpt, md.root.name)
    return summary, merges


@dataclass
class Merge:
    """A sharded checkpoint rank 0 turns into an HF dir after the process group is gone (FSDP2)."""

    checkpoint: Path
    out: ModelDir
    member: dict[str, Any] | None  # a chronological member's record (member.json), None for the run's final/

    def run(self) -> None:
        merge_checkpoint(self.checkpoint, self.out.root)
        if self.member is not None:
            atomic_write_json(self.out.root / MEMBER, self.member)
            log.info("member %s: merged %s into %s", self.member["cutoff"], self.checkpoint.name, self.out.root)


def _finish(cfg: TrainConfig, md: ModelDir, run: Run | None, summary: dict[str, Any]) -> None:
    """manifest.json last (its presence marks the run done), then the run's summary lines."""
    payload = [p for d in (md.final, md.merged) if d.is_dir() for p in sorted(d.rglob("*")) if p.is_file()]
    summary = {**summary, "final_dir": str(md.final) if md.final.is_dir() else None}
    ckpt = md.latest_checkpoint()
    inputs = json.loads((ckpt / "trainer_state.json").read_text()) if ckpt else {}
    manifest = build_manifest("model", inputs={k: inputs.get(k) for k in ("corpus", "corpus_manifest_sha256",
                                                                          "base_path", "tokenizer_path")},
                              payload=payload, root=md.root, config=cfg, run_id=run.id if run else None,
                              wall_seconds=round(time.time() - run.t0, 2) if run else None, summary=summary,
                              mode=cfg.mode)
    write_manifest(md.root, manifest)
    if run is not None:
        run.finish(summary)
