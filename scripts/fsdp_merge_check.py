"""Multi-process full-weight run end to end, as a user runs it (issue 10): `pitlm train` with nproc ranks (FSDP2,
torchrun relaunch) on a small generated corpus, sharded DCP checkpoints on the volume, then `pitlm merge` as a
separate single-process step, then the merged model's logits against the sharded model's on the fixed probe batch
(`debug.probe_logits`: saved by the live sharded model at the end of training).

    PITLM_HOME=/tmp/h python scripts/fsdp_merge_check.py --arch qwen3.5-35b-a3b --layers 4 --nproc 2

Prints grep-able lines: train_seconds, merge_seconds, checkpoint shards, and the logits comparison (max abs
difference, ||merged - sharded|| / ||sharded||, argmax agreement). On a GPU the sharded model computes in bf16
(FSDP2 mixed precision over fp32 master weights), so the merged model is compared in bf16 as well.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="tiny-qwen3.5-moe")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    home = Path(os.environ["PITLM_HOME"])
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_train import build_corpus  # the test suite's generated corpus in the real shard format

    build_corpus(home)
    model = {"arch": args.arch, **({"num_hidden_layers": args.layers} if args.layers else {})}
    recipe = {"stage": "train", "mode": "scratch", "corpus": "tiny", "tokenizer": "pit:tiny", "model": model,
              "seq_len": args.seq, "batch_size": args.batch, "steps": args.steps, "log_every": 1, "nproc": args.nproc,
              "optim": {"lr": 1e-4, "warmup_steps": 1}, "eval": {"every": 2, "batches": 1},
              "checkpoint": {"every": 2, "keep_last": 1}, "fsdp": {"merge_on_exit": False},
              "debug": {"probe_logits": True}}
    path = home / "fsdp_check.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cli = [sys.executable, "-m", "pitlm.cli"]
    t0 = time.perf_counter()
    train = subprocess.run([*cli, "train", "--recipe", str(path), "--name", "fsdp_check"], text=True,
                           capture_output=True)
    print(train.stdout[-2500:])
    if train.returncode:
        print(train.stderr[-4000:])
        return 1
    print(f"train_seconds: {time.perf_counter() - t0:.1f}")
    md = home / "models" / "fsdp_check"
    last = sorted((md / "checkpoints").glob("step_*"))[-1]
    shards = sorted(p.name for p in (last / "dcp").glob("*.distcp"))
    print(f"checkpoint: {last.name} shards: {len(shards)} ({', '.join(shards)}) "
          f"bytes: {sum(p.stat().st_size for p in (last / 'dcp').iterdir())}")
    t0 = time.perf_counter()
    merge = subprocess.run([*cli, "merge", "fsdp_check"], text=True, capture_output=True)
    if merge.returncode:
        print(merge.stderr[-3000:])
        return 1
    print(f"merge_seconds: {time.perf_counter() - t0:.1f}")

    from transformers import AutoModelForCausalLM

    probe = torch.load(md / "probe_logits.pt")
    gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if gpu else torch.float32
    merged = AutoModelForCausalLM.from_pretrained(md / "final", dtype=dtype).to("cuda" if gpu else "cpu").eval()
    with torch.no_grad():
        logits = merged(input_ids=probe["tokens"].to(merged.device)).logits.float().cpu()
    ref = probe["logits"].float()
    diff = (logits - ref)
    print(f"probe_tokens: {tuple(probe['tokens'].shape)} dtype: {dtype}")
    print(f"logits_max_abs_diff: {diff.abs().max().item():.3e}")
    print(f"logits_rel_norm_diff: {(diff.norm() / ref.norm()).item():.3e}")
    print(f"logits_argmax_agreement: {(logits.argmax(-1) == ref.argmax(-1)).float().mean().item():.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
