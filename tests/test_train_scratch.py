"""From-scratch pretraining (issue 27): the fast path (compile: blocks + fused AdamW) trains the same loss curve as
the eager reference (CPU in fp32 exactly; a GPU in bf16 within rounding), the MFU formula, the scratch recipes load,
resume exactly, and run under FSDP2 on 2 gloo ranks."""

import json
import os
import subprocess
import sys

import pytest
import torch
from test_train import build_corpus, summary_of

from pitlm.config import build_config
from pitlm.train.config import TrainConfig
from pitlm.volume import Volume

SMALL = {"arch": "pit-150m", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("scratchhome")
    build_corpus(home)
    return home


def _cfg(fast: bool, steps: int, **kw) -> TrainConfig:
    base = {"mode": "scratch", "corpus": "tiny", "tokenizer": "pit:tiny", "model": SMALL, "seq_len": 32,
            "batch_size": 8, "steps": steps, "log_every": 1, "eval": {"every": 10**6, "batches": 1},
            "checkpoint": {"every": 10**6}, "compile": "blocks" if fast else "none",
            "optim": {"lr": 3e-3, "warmup_steps": 2, "fused": fast}}
    return build_config(TrainConfig, {**base, **kw})


def _loss_curve(home, name: str, cfg: TrainConfig) -> list[float]:
    from pitlm.train.loop import train

    train(cfg, Volume(home), name)
    md = home / "models" / name
    run_dir = home / "runs" / json.loads((md / "manifest.json").read_text())["run_id"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r]


def test_fast_path_trains_the_reference_loss_curve_on_cpu(home):
    from torch._dynamo.utils import counters

    ref = _loss_curve(home, "ref", _cfg(False, 12))
    counters.clear()
    fast = _loss_curve(home, "fast", _cfg(True, 12))
    assert counters["stats"]["unique_graphs"] > 0  # the blocks and the head loss were compiled, not run eagerly
    assert len(ref) == len(fast) == 12 and ref[-1] < ref[0]
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(ref), rtol=1e-4, atol=1e-5)


def test_compiled_blocks_under_fsdp2_on_one_rank_train_the_reference_loss_curve_on_cpu(home):
    """fsdp.force: FSDP2 at world size 1 (a gloo group of one); compile: blocks compiles the sharded blocks (FSDP2's
    hooks run eagerly around them) and keeps the model's forward for the loss (its root hook gathers the head)."""
    from torch._dynamo.utils import counters

    ref = _loss_curve(home, "ref-fsdp1", _cfg(False, 6))
    counters.clear()
    fast = _loss_curve(home, "fast-fsdp1", _cfg(True, 6, fsdp={"force": True}))
    assert counters["stats"]["unique_graphs"] > 0
    md = home / "models" / "fast-fsdp1"
    state = json.loads(next((md / "checkpoints").glob("step_*/trainer_state.json")).read_text())
    assert state["fsdp"] is True and (md / "final" / "model.safetensors").is_file()  # merged after the run
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(ref), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fast_path_loss_curve_matches_the_reference_for_200_steps_in_bf16_on_a_gpu(home, tmp_path):
    """fp32 master weights under bf16 autocast on both paths; the compiled blocks round differently from eager
    kernels, so the curves agree within bf16 rounding, not bitwise."""
    model = {**SMALL, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64}
    kw = {"model": model, "seq_len": 128, "batch_size": 16, "device": "cuda", "optim": {"lr": 1e-3, "warmup_steps": 20}}
    ref = _loss_curve(home, "gpu-ref", _cfg(False, 200, **{**kw, "optim": {**kw["optim"], "fused": False}}))
    fast = _loss_curve(home, "gpu-fast", _cfg(True, 200, **{**kw, "optim": {**kw["optim"], "fused": True}}))
    diff = [abs(f - r) for f, r in zip(fast, ref, strict=True)]
    print(f"loss ref {ref[0]:.4f} -> {ref[-1]:.4f}, fast {fast[0]:.4f} -> {fast[-1]:.4f}; |difference| mean "
          f"{sum(diff) / len(diff):.2e} max {max(diff):.2e} (step {diff.index(max(diff)) + 1})")
    assert len(diff) == 200 and ref[-1] < 0.5 * ref[0]
    assert diff[0] < 1e-2 * ref[0]  # the same weights and batch: one step of bf16 rounding apart
    # the tiny corpus is memorised (loss 5.8 -> ~0.02), so the bound is relative to each step's loss plus a floor
    # (measured on an H200: mean |difference| 5.6e-3, max 3.4e-2 at step 130)
    assert all(d <= 0.1 * r + 0.05 for d, r in zip(diff, ref, strict=True))
    assert sum(diff) / len(diff) < 0.02 * sum(ref) / len(ref)


def test_mfu_formula_and_peak_table():
    from pitlm.train.mfu import count_flops, mfu_fields, peak_bf16_tflops
    from pitlm.train.model import build_model_config, build_scratch_model

    model = build_scratch_model(build_model_config("pit-1b"), torch.float32, "meta")
    f = count_flops(model, 2048)
    assert f.matmul_params == 1_073_813_504 - 65536 * 2048  # untied: everything but the input embedding
    assert f.attention_flops_per_token == 6 * 16 * 2048 * 2048  # 12 * L * seq * d_attn, halved (causal)
    assert f.flops_per_token == 6 * f.matmul_params + f.attention_flops_per_token
    tied = build_scratch_model(build_model_config("pit-150m"), torch.float32, "meta")
    assert count_flops(tied, 2048).matmul_params == 149_442_816  # the tied head is counted as a matmul
    assert peak_bf16_tflops("NVIDIA H200") == peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0 and peak_bf16_tflops("cpu") is None
    m = mfu_fields(f, 1e5, 989.0)
    assert m["mfu"] == round(1e5 * f.flops_per_token / 989e12, 4)
    assert m["mfu_attn_unhalved"] > m["mfu"] and mfu_fields(f, 1e5, None)["mfu"] is None


@pytest.mark.parametrize("recipe, params", [("scratch-pit-1b", 1_073_813_504), ("scratch-pit-150m", 149_442_816)])
def test_scratch_recipes_load_and_build_their_model(recipe, params):
    from pitlm.config import load_config
    from pitlm.train.config import check_config
    from pitlm.train.model import build_model_config, build_scratch_model, count_params

    cfg = load_config(TrainConfig, recipe, [])
    check_config(cfg)
    assert cfg.mode == "scratch" and cfg.seq_len == 2048 and cfg.compile == "blocks" and cfg.optim.fused
    assert not cfg.gradient_checkpointing
    model = build_scratch_model(build_model_config(cfg.model, vocab_size=65536), torch.float32, "meta")
    assert count_params(model) == params


def _small_recipe_args(steps: int) -> list[str]:
    sets = {"corpus": "tiny", "tokenizer": "pit:tiny", "seq_len": 32, "batch_size": 8, "grad_accum_steps": 1,
            "steps": steps, "log_every": 2, "eval.every": 4, "eval.batches": 2, "checkpoint.every": 4,
            "checkpoint.keep_last": 3, "compile": "none", "optim.warmup_steps": 2,
            **{f"model.{k}": v for k, v in SMALL.items() if k != "arch"}}
    return ["--recipe", "scratch-pit-150m", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]


def test_scratch_recipe_kill_and_resume_is_exact(cli, home):
    """The recipe's optimizer (fused AdamW) and data order resume exactly (compile off: it changes no state)."""
    args = _small_recipe_args(8)
    code, out, err = cli("--home", str(home), "train", *args, "--name", "r-straight")
    assert code == 0, err
    env = {**os.environ, "PITLM_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-m", "pitlm.cli", "train", *args, "--name", "r-killed",
                           "--set", "debug.kill_at_step=6"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 137, proc.stderr[-2000:]
    code, out2, err = cli("--home", str(home), "train", *args, "--name", "r-killed", "--resume")
    assert code == 0, err
    a, b = summary_of(out), summary_of(out2)
    assert a["train_loss_final"] == b["train_loss_final"] and a["val_loss_final"] == b["val_loss_final"]


def test_scratch_recipe_trains_under_fsdp2_on_two_gloo_ranks(home):
    env = {**os.environ, "PITLM_HOME": str(home), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "pitlm.cli", "train", *_small_recipe_args(4), "--name", "r-fsdp"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary_of(proc.stdout)
    assert s["world_size"] == "2" and s["mode"] == "scratch" and float(s["val_loss_final"]) > 0
