"""The peer: litgpt's own pretraining loop (`litgpt.pretrain.setup`: Lightning Fabric with bf16-mixed precision,
torch.compile of the whole GPT, fused AdamW, gradient clipping, its chunked cross-entropy) on the shape of a pitlm arch
preset, over random tokens. Prints pitlm-style `key: value` lines: tok/s from litgpt's own per-iteration times
(median after the warm-up), MFU by pitlm.train.mfu's formula and peak, peak memory in MiB.

    python3 scripts/litgpt_pretrain_bench.py --arch pit-1b --seq 2048 --batch 8 --steps 10 --warmup 4

Only litgpt's checkpoint saving is switched off (a 1 B model's weights and AdamW state are ~13 GB of disk writes that
a throughput run does not need). Needs litgpt (carried as a wheel to the GPU machine, `scripts/gpu_scratch.sh`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import re
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class RandomTokens(Dataset):
    def __init__(self, n: int, seq_len: int, vocab: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab, (n, seq_len + 1), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


def make_data_module(n_train: int, vocab: int):
    from litgpt.data import DataModule

    class RandomData(DataModule):
        def connect(self, tokenizer=None, batch_size: int = 1, max_seq_length: int | None = None, **kwargs) -> None:
            self.batch_size, self.seq_len = batch_size, max_seq_length

        def train_dataloader(self) -> DataLoader:
            return DataLoader(RandomTokens(n_train, self.seq_len, vocab, 1234), batch_size=self.batch_size)

        def val_dataloader(self) -> DataLoader:
            return DataLoader(RandomTokens(2 * self.batch_size, self.seq_len, vocab, 99), batch_size=self.batch_size)

    return RandomData()


def litgpt_config(hf, seq_len: int):
    """litgpt's Config of the same Qwen3-style shape (its Qwen3 entries use these fields)."""
    from litgpt import Config

    return Config(name="pitlm-scratch", block_size=seq_len, vocab_size=hf.vocab_size, padded_vocab_size=hf.vocab_size,
                  n_layer=hf.num_hidden_layers, n_head=hf.num_attention_heads, n_embd=hf.hidden_size,
                  n_query_groups=hf.num_key_value_heads, head_size=hf.head_dim, rotary_percentage=1.0,
                  parallel_residual=False, bias=False, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP",
                  intermediate_size=hf.intermediate_size, norm_eps=hf.rms_norm_eps,
                  rope_base=int(hf.rope_parameters["rope_theta"]), norm_qk=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="pit-1b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--set", action="append", default=[], help="transformers config keys, as bench train's --set model.KEY=VALUE without model.")
    ap.add_argument("--precision", default=None, help="default: bf16-mixed on a GPU, 32-true on a CPU")
    args = ap.parse_args()

    import litgpt.pretrain as lp
    from litgpt.args import EvalArgs, TrainArgs

    from pitlm.config import apply_overrides
    from pitlm.train.mfu import count_flops, mfu_fields, peak_bf16_tflops
    from pitlm.train.model import build_model_config, build_scratch_model

    hf = build_model_config(apply_overrides({"arch": args.arch}, args.set))
    flops = count_flops(build_scratch_model(hf, torch.float32, "meta"), args.seq)  # same shapes as litgpt's GPT
    iters = args.warmup + args.steps
    on_gpu = torch.cuda.is_available()
    lp.save_checkpoint = lambda *a, **k: None  # see the module docstring
    out = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, s):
            out.write(s)
            return sys.__stdout__.write(s)

    with contextlib.redirect_stdout(Tee()), tempfile.TemporaryDirectory() as tmp:
        lp.setup(model_name="pitlm-scratch", model_config=litgpt_config(hf, args.seq), out_dir=Path(tmp),
                 precision=args.precision or ("bf16-mixed" if on_gpu else "32-true"),
                 data=make_data_module(iters * args.batch, hf.vocab_size),
                 train=TrainArgs(save_interval=None, log_interval=1, global_batch_size=args.batch,
                                 micro_batch_size=args.batch, max_tokens=iters * args.batch * args.seq,
                                 max_seq_length=args.seq, lr_warmup_steps=1, max_norm=1.0, min_lr=3e-5,
                                 tie_embeddings=bool(hf.tie_word_embeddings)),
                 eval=EvalArgs(interval=10**9, max_iters=1, initial_validation=False, final_validation=False),
                 optimizer={"class_path": "torch.optim.AdamW",
                            "init_args": {"lr": 3e-4, "weight_decay": 0.1, "betas": [0.9, 0.95]}},
                 devices=1, logger_name="csv", seed=0)
    times = [float(t) for t in re.findall(r"iter time: ([0-9.]+) ms", out.getvalue())]
    losses = [float(x) for x in re.findall(r"loss train: ([0-9.]+)", out.getvalue())]
    timed = times[args.warmup:]
    if not timed:
        raise SystemExit(f"litgpt printed {len(times)} iteration times; need more than --warmup {args.warmup}")
    step = statistics.median(timed)
    tps = args.batch * args.seq / (step / 1e3)
    name = torch.cuda.get_device_name() if on_gpu else "cpu"
    result = {"path": "litgpt", "litgpt": importlib.metadata.version("litgpt"), "arch": args.arch, "device": name,
              "torch": torch.__version__, "seq_len": args.seq, "batch": args.batch, "steps": len(timed),
              "step_seconds": round(step / 1e3, 4), "tokens_per_second": round(tps, 1),
              "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
              **mfu_fields(flops, tps, peak_bf16_tflops(name) if on_gpu else None)}
    if on_gpu:
        result["peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["peak_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    for k, v in result.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
