"""Training on CPU with a tiny tokenizer, corpus and model built here: loss falls, LoRA adapters round-trip, the
LoRA guard, config rules, the NaN watchdog, kill-and-resume equality, merge, bench. The 2-rank FSDP2 run is in
test_train_fsdp.py."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pitlm.corpus.shards import ShardIndex, dtype_for_vocab, write_shard

TINY_MODEL = {"arch": "demo-qwen3", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}


def make_docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    names = ["Alpha", "Beta", "Gamma", "Delta", "Omega", "Sigma"]
    return [f"On 2019-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}, {rng.choice(names)} Corp (code "
            f"{rng.randint(1000, 1010)}) shares {rng.choice(['rose', 'fell', 'slid'])} {rng.randint(1, 9)} percent."
            for _ in range(n)]


def build_corpus(home: Path, name: str = "tiny", tokenizer: str = "tiny") -> Path:
    """A byte-level BPE tokenizer at corpus/_tokenizers/<tokenizer>/ and a corpus in the shard format (two train
    shards, so windows cross a shard boundary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    docs, val = make_docs(400, 0), make_docs(60, 1)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.save_pretrained(home / "corpus" / "_tokenizers" / tokenizer)
    root = home / "corpus" / name
    dtype = dtype_for_vocab(len(tok))
    splits = {}
    for split, texts, num_shards in (("train", docs, 2), ("val", val, 1)):
        ids = np.concatenate([np.array(tok.encode(t) + [tok.eos_token_id]) for t in texts])
        splits[split] = []
        for i, part in enumerate(np.array_split(ids, num_shards)):
            entry = write_shard(root / f"{split}/shard_{i:05d}.bin", part, dtype)
            splits[split].append({**entry, "file": f"{split}/shard_{i:05d}.bin"})
    index = ShardIndex(root, dtype.name, len(tok), tok.eos_token_id, splits)
    (root / "index.json").write_text(json.dumps(index.to_json()))
    return root


def write_recipe(path: Path, **cfg) -> str:
    base = {"stage": "train", "mode": "scratch", "corpus": "tiny", "tokenizer": "pit:tiny", "model": TINY_MODEL,
            "seq_len": 32, "batch_size": 8, "steps": 12, "log_every": 4,
            "optim": {"lr": 3e-3, "warmup_steps": 2}, "eval": {"every": 4, "batches": 2},
            "checkpoint": {"every": 4, "keep_last": 2}}
    for k, v in cfg.items():
        if v is None:
            base.pop(k, None)
        elif isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    path.write_text(yaml.safe_dump(base))
    return str(path)


def summary_of(out: str) -> dict:
    lines = [line.split(": ", 1) for line in out.splitlines() if ": " in line]
    return {k: v for k, v in lines}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A volume with the tiny corpus and a tiny scratch base model (models/base) for lora/full runs."""
    from pitlm.train.config import TrainConfig
    from pitlm.train.loop import train
    from pitlm.volume import Volume

    home = tmp_path_factory.mktemp("trainhome")
    build_corpus(home)
    recipe = write_recipe(home / "base.yaml", steps=30, eval={"every": 10}, checkpoint={"every": 10})
    cfg = TrainConfig.model_validate({k: v for k, v in yaml.safe_load(Path(recipe).read_text()).items()
                                      if k != "stage"})
    summary = train(cfg, Volume(home), "base")
    return {"home": home, "base_summary": summary}


@pytest.fixture
def run(cli, world):
    def go(*args):
        return cli("--home", str(world["home"]), *args)
    return go


# ----------------------------------------------------------------------------- data

def test_packed_windows_cross_shards_and_order_is_seeded(world):
    from pitlm.train.data import PackedWindows, TrainOrder

    index = ShardIndex.load(world["home"] / "corpus" / "tiny")
    w = PackedWindows.from_index(index, "train", 32)
    stream = np.concatenate([np.asarray(a) for a in index.arrays("train")])
    first_len = len(index.arrays("train")[0])
    i = first_len // 32  # a window that straddles the shard boundary
    assert np.array_equal(w.window(i), stream[i * 32:i * 32 + 33])
    assert w.num_windows == (len(stream) - 1) // 32
    a, b = TrainOrder(w.num_windows, 7), TrainOrder(w.num_windows, 7)
    ids = a.window_ids(0, w.num_windows)
    assert sorted(ids) == list(range(w.num_windows))  # one epoch = a permutation
    assert np.array_equal(ids, b.window_ids(0, w.num_windows))
    assert not np.array_equal(ids, TrainOrder(w.num_windows, 8).window_ids(0, w.num_windows))
    # the plain schedule reads that order, and the global batch does not depend on the world size: 2 ranks x 2
    # accum slices == the 1-rank batch
    from pitlm.train.config import TrainConfig
    from pitlm.train.schedule import build_schedule

    def cfg(accum):
        return TrainConfig(corpus="tiny", seq_len=32, batch_size=8, seed=7, grad_accum_steps=accum)

    whole = build_schedule(cfg(1), index, 1).micro_batches(3, 0)[0]
    assert torch.equal(whole, w.batch(a.window_ids(3 * 8, 8)))
    two = build_schedule(cfg(2), index, 2)
    parts = [two.micro_batches(3, r) for r in range(2)]
    stitched = torch.cat([parts[r][k] for k in range(2) for r in range(2)])
    assert torch.equal(whole, stitched)


# ----------------------------------------------------------------------------- scratch

def test_scratch_loss_falls_and_writes_the_model_dir(world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = world["base_summary"]
    md = world["home"] / "models" / "base"
    run_dir = world["home"] / "runs" / json.loads((md / "manifest.json").read_text())["run_id"]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["train_loss"] for m in metrics if "train_loss" in m]
    assert losses[-1] < losses[0] - 1.0, losses
    assert s["val_loss_final"] < 4.0 and s["train_loss_final"] < 4.0
    for key in ("val_loss_final", "train_loss_final", "peak_vram_mb", "tokens_per_second", "training_seconds",
                "trainable_params", "total_params", "steps", "tokens_seen", "model_dir"):
        assert key in s
    assert s["trainable_params"] == s["total_params"] > 0 and s["tokens_seen"] == 30 * 8 * 32
    # layout: final/ loads with transformers; last K checkpoints, each with its config; tensorboard; manifest
    model = AutoModelForCausalLM.from_pretrained(md / "final")
    assert sum(p.numel() for p in model.parameters()) == s["total_params"]
    assert AutoTokenizer.from_pretrained(md / "final").eos_token == "<|endoftext|>"
    ckpts = sorted(p.name for p in (md / "checkpoints").iterdir())
    assert ckpts == ["step_000020", "step_000030"]
    for c in ckpts:
        assert (md / "checkpoints" / c / "train_config.yaml").is_file()
        assert (md / "checkpoints" / c / "dcp" / ".metadata").is_file()
    assert list((md / "tb").glob("events.out.tfevents.*"))
    manifest = json.loads((md / "manifest.json").read_text())
    assert manifest["summary"]["val_loss_final"] == s["val_loss_final"]
    assert any(p["path"] == "final/model.safetensors" for p in manifest["payload"])


def test_rerun_skips_and_a_changed_config_is_refused(run, world, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", steps=30, eval={"every": 10}, checkpoint={"every": 10})
    code, out, err = run("train", "--recipe", recipe, "--name", "base")
    assert code == 0, err
    assert "skipped: true" in out and "val_loss_final:" in out
    code, out, err = run("train", "--recipe", recipe, "--name", "base", "--set", "steps=31")
    assert code == 2 and "different config" in err


# ----------------------------------------------------------------------------- LoRA

def test_lora_adapter_save_load_identical_logits(run, world, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = write_recipe(tmp_path / "lora.yaml", mode="lora", base="model:base", tokenizer=None, model=None,
                          steps=6, optim={"lr": 1e-2}, lora={"preset": "dense", "r": 4},
                          debug={"probe_logits": True})
    code, out, err = run("train", "--recipe", recipe, "--name", "lora1")
    assert code == 0, err
    s = summary_of(out)
    md = world["home"] / "models" / "lora1"
    probe = torch.load(md / "probe_logits.pt")
    base_dir = world["home"] / "models" / "base" / "final"
    with torch.no_grad():
        adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), md / "final").eval()
        reloaded = adapter(input_ids=probe["tokens"]).logits
        merged = AutoModelForCausalLM.from_pretrained(md / "merged").eval()(input_ids=probe["tokens"]).logits
        base = AutoModelForCausalLM.from_pretrained(base_dir).eval()(input_ids=probe["tokens"]).logits
    assert torch.equal(reloaded, probe["logits"])  # adapter save -> load: the very same function
    torch.testing.assert_close(merged, probe["logits"], atol=1e-5, rtol=1e-5)
    assert (base - probe["logits"]).abs().max() > 1e-3  # and training changed it
    # lm_head and embed_tokens trained in full (peft modules_to_save) beside the adapters
    assert int(s["trainable_params"]) > 4 * 2 * 32 * 7 and int(s["total_params"]) == world["base_summary"][
        "total_params"]
    # `pitlm merge` on the run rebuilds final/ + merged/ from the DCP checkpoint: same logits again
    code, out, err = run("merge", "lora1", "--out", str(tmp_path / "remerged"))
    assert code == 0, err
    with torch.no_grad():
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "remerged" / "merged").eval()(
            input_ids=probe["tokens"]).logits
    torch.testing.assert_close(again, merged, atol=1e-6, rtol=1e-6)
    # ... and on a bare adapter dir: folded into the base its adapter_config names
    code, out, err = run("merge", str(md / "final"), "--out", str(tmp_path / "from_adapter"))
    assert code == 0, err
    with torch.no_grad():
        folded = AutoModelForCausalLM.from_pretrained(tmp_path / "from_adapter").eval()(
            input_ids=probe["tokens"]).logits
    torch.testing.assert_close(folded, merged, atol=1e-6, rtol=1e-6)


def test_bf16_full_modules_train_with_stochastic_rounding(run, world, tmp_path):
    """The seed recipe's setting end to end (pitlm train, bf16, 8-bit AdamW, lm_head + embed_tokens in full at a
    small LR): with round-to-nearest most lm_head weights never move; with optim.stochastic_round=full_modules
    many more do."""
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    base_head = load_file(world["home"] / "models" / "base" / "final" / "model.safetensors")["lm_head.weight"]
    moved = {}
    for sr in ("none", "full_modules"):
        recipe = write_recipe(tmp_path / f"{sr}.yaml", mode="lora", base="model:base", tokenizer=None, model=None,
                              steps=4, dtype="bf16", eval={"every": 4, "batches": 1}, checkpoint={"every": 4},
                              optim={"name": "adamw8bit", "lr": 1e-3, "warmup_steps": 0, "stochastic_round": sr},
                              lora={"preset": "dense", "r": 4, "full_modules_lr": 1e-5, "merge_on_exit": False})
        code, out, err = run("train", "--recipe", recipe, "--name", f"sr-{sr}")
        assert code == 0, err
        saved = load_file(world["home"] / "models" / f"sr-{sr}" / "final" / "adapter_model.safetensors")
        (head,) = [t for k, t in saved.items() if "lm_head" in k]
        assert head.dtype == torch.bfloat16
        moved[sr] = (head != base_head.bfloat16()).float().mean().item()
    # an lr-1e-5 AdamW step is ~1/12 of a bf16 ulp at 0.02: round-to-nearest moves only the smallest weights
    # (measured 2.7% of lm_head after 4 steps), stochastic rounding each weight with p ~ step / ulp (16%)
    assert moved["none"] < 0.06 and moved["full_modules"] > 3 * moved["none"], moved


def tiny_hybrid():
    from pitlm.train.model import build_model_config, build_scratch_model

    return build_scratch_model(build_model_config("tiny-qwen3.5-moe"), torch.float32)


def test_lora_preset_matches_every_target_of_the_hybrid_moe():
    from pitlm.train.config import LoraConfig
    from pitlm.train.model import LORA_PRESETS, apply_lora, check_lora

    cfg = LoraConfig(preset="qwen3.5-moe")
    model = apply_lora(tiny_hybrid(), cfg)
    rep = check_lora(model, cfg)
    assert rep.layers_adapted == rep.layers_total == 4
    names = [n for n, _ in model.named_parameters() if "lora_A" in n]
    for kind in LORA_PRESETS["qwen3.5-moe"]["target_modules"]:
        assert any(f".{kind}.lora_A" in n for n in names), kind
    assert sum(".mlp.experts." in n for n in names) == 2 * 4  # both fused 3-D expert params, every layer
    assert any("modules_to_save" in n and "lm_head" in n for n, p in model.named_parameters() if p.requires_grad)
    assert len(LORA_PRESETS["qwen3.5-moe"]["target_modules"]) + len(
        LORA_PRESETS["qwen3.5-moe"]["target_parameters"]) == 12


@pytest.mark.parametrize("adapter_dtype,expected", [("fp32", torch.float32), ("base", torch.bfloat16)])
def test_lora_adapter_dtype_on_a_bf16_base(adapter_dtype, expected):
    """peft upcasts adapters to fp32 on a bf16 base unless lora.adapter_dtype=base (the memory lever of the 35B
    recipe); the expert (3-D parameter) adapters follow the same rule."""
    from pitlm.train.config import LoraConfig
    from pitlm.train.model import apply_lora

    model = apply_lora(tiny_hybrid().to(torch.bfloat16), LoraConfig(preset="qwen3.5-moe", adapter_dtype=adapter_dtype))
    dtypes = {n: p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert any(".mlp.experts." in n for n in dtypes)
    assert set(dtypes.values()) == {expected}


def test_lora_guard_refuses_attention_only_on_a_hybrid_model():
    from pitlm.errors import ConfigError
    from pitlm.train.config import LoraConfig
    from pitlm.train.model import apply_lora, check_lora

    cfg = LoraConfig(preset="attention")
    with pytest.raises(ConfigError, match="targets matched only attention in a hybrid model"):
        check_lora(apply_lora(tiny_hybrid(), cfg), cfg)
    check_lora(apply_lora(tiny_hybrid(), cfg.model_copy(update={"guard": False})), cfg.model_copy(
        update={"guard": False}))  # an explicit opt-out


def test_lora_guard_fraction_on_the_real_35b_architecture():
    """On the meta device (no memory): the seed's failed attention-only list adapts 0.0099% of Qwen3.5-35B-A3B."""
    from pitlm.errors import ConfigError
    from pitlm.train.config import LoraConfig
    from pitlm.train.model import apply_lora, build_model_config, build_scratch_model, check_lora

    model = build_scratch_model(build_model_config("qwen3.5-35b-a3b"), torch.bfloat16, "meta")
    cfg = LoraConfig(preset="attention", full_modules=[])
    with pytest.raises(ConfigError, match=r"0\.0099% of the model's 34,660,610,688 \(< 0\.01%\)"):
        check_lora(apply_lora(model, cfg), cfg)


# ----------------------------------------------------------------------------- config rules

def test_full_mode_rules_are_one_line_errors(run, world, tmp_path):
    recipe = write_recipe(tmp_path / "full.yaml", mode="full", base="model:base", tokenizer=None, model=None)
    code, out, err = run("train", "--recipe", recipe, "--name", "x", "--set", "grad_accum_steps=4")
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: grad_accum_steps=4 with mode full") and "unsharded gradients" in line
    code, out, err = run("train", "--recipe", recipe, "--name", "x", "--set", "optim.name=adamw8bit")
    assert code == 2 and "8-bit optimizers fail on FSDP2" in err
    scratch = write_recipe(tmp_path / "s.yaml", batch_size=7, grad_accum_steps=2)
    code, out, err = run("train", "--recipe", scratch, "--name", "x")
    assert code == 2 and "batch_size=7 must be divisible" in err


# ----------------------------------------------------------------------------- reliability

def test_injected_nan_exits_42_naming_the_step(run, tmp_path):
    recipe = write_recipe(tmp_path / "nan.yaml", debug={"inject_nan_at_step": 3})
    code, out, err = run("train", "--recipe", recipe, "--name", "nan")
    assert code == 42, err
    assert "at step 3" in err and "NaN/inf watchdog" in err


def test_kill_and_resume_ends_with_exactly_the_uninterrupted_loss(run, world, tmp_path):
    recipe = write_recipe(tmp_path / "kr.yaml", steps=12, checkpoint={"every": 4, "keep_last": 3})
    code, out, err = run("train", "--recipe", recipe, "--name", "straight")
    assert code == 0, err
    straight = summary_of(out)
    # a separate process dies hard at step 10 (after the step-8 checkpoint, before the step-12 one)
    env = {**os.environ, "PITLM_HOME": str(world["home"])}
    proc = subprocess.run([sys.executable, "-m", "pitlm.cli", "train", "--recipe", recipe, "--name", "killed",
                           "--set", "debug.kill_at_step=10"], env=env, capture_output=True, text=True)
    assert proc.returncode == 137, proc.stderr
    md = world["home"] / "models" / "killed"
    assert [p.name for p in (md / "checkpoints").iterdir() if p.name.startswith("step_")] != []
    assert not (md / "final").exists()
    code, out, err = run("train", "--recipe", recipe, "--name", "killed")  # refuses to mix without --resume
    assert code == 2 and "--resume" in err
    # the newest checkpoint is truncated afterwards (a copy cut short): resume names the bad file and falls back
    # to the newest intact one, step 4, from which the run is still exact
    shard = max((md / "checkpoints" / "step_000008" / "dcp").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:100])
    code, out, err = run("train", "--recipe", recipe, "--name", "killed", "--resume")
    assert code == 0, err
    assert "Traceback" not in err
    resumed = summary_of(out)
    run_id = json.loads((md / "manifest.json").read_text())["run_id"]
    log = (world["home"] / "runs" / run_id / "log.txt").read_text()
    assert f"checkpoint step_000008 is damaged: {shard} has 100 bytes" in log
    assert f"resumed from {md / 'checkpoints' / 'step_000004'}" in log
    assert resumed["train_loss_final"] == straight["train_loss_final"]
    assert resumed["val_loss_final"] == straight["val_loss_final"]
    assert resumed["tokens_seen"] == straight["tokens_seen"]


def test_resume_with_no_intact_checkpoint_is_one_line_and_corruption_is_caught(run, world, tmp_path):
    from pitlm.train.checkpoint import checkpoint_damage

    recipe = write_recipe(tmp_path / "bad.yaml", steps=8, checkpoint={"every": 4, "keep_last": 2})
    env = {**os.environ, "PITLM_HOME": str(world["home"])}
    proc = subprocess.run([sys.executable, "-m", "pitlm.cli", "train", "--recipe", recipe, "--name", "bad",
                           "--set", "debug.kill_at_step=6"], env=env, capture_output=True, text=True)
    assert proc.returncode == 137, proc.stderr
    ckpt = world["home"] / "models" / "bad" / "checkpoints" / "step_000004"
    assert checkpoint_damage(ckpt) is None
    shard = next((ckpt / "dcp").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte: only the sha256 check sees it
    shard.write_bytes(bytes(data))
    assert checkpoint_damage(ckpt, "size") is None
    assert checkpoint_damage(ckpt) == f"{shard} does not match the sha256 recorded when it was written (corrupt)"
    code, out, err = run("train", "--recipe", recipe, "--name", "bad", "--resume")
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: --resume: no intact checkpoint in ")


def test_second_writer_of_a_run_gets_one_line_and_touches_nothing(run, world, tmp_path):
    """While another process holds models/<run>'s lock (a run in progress), `pitlm train --name run` -- one process
    or a torchrun relaunch -- exits 2 with one line before writing anything."""
    from pitlm.volume import Volume

    recipe = write_recipe(tmp_path / "busy.yaml", steps=4)
    with Volume(world["home"]).lock("models", "busy"):
        for extra in ([], ["--nproc", "2"]):
            code, out, err = run("train", "--recipe", recipe, "--name", "busy", *extra)
            assert code == 2 and "Traceback" not in err, err
            assert err.strip().splitlines()[-1].startswith("error: another pitlm process is writing model 'busy'")
            assert not (world["home"] / "models" / "busy").exists()
    code, out, err = run("train", "--recipe", recipe, "--name", "busy")  # the lock is gone with its holder
    assert code == 0, err


def test_train_without_a_recipe_names_the_missing_key(run):
    code, out, err = run("train")
    assert code == 2 and err.strip().splitlines() == [
        "error: missing config key 'corpus': give a --recipe that sets it (see `pitlm recipes`) or --set corpus=..."]


# ----------------------------------------------------------------------------- bench

def test_bench_train_runs_on_cpu_with_a_tiny_arch(run):
    code, out, err = run("bench", "train", "--arch", "tiny-qwen3.5-moe", "--mode", "lora", "--seq", "32",
                         "--batch", "2", "--steps", "2", "--warmup", "1")
    assert code == 0, err
    s = summary_of(out)
    assert float(s["tokens_per_second"]) > 0 and s["lora_preset"] == "qwen3.5-moe"
    assert int(s["trainable_params"]) > 0 and s["full_modules"] == "lm_head,embed_tokens"


def test_bench_train_profile_and_lora_only(run, tmp_path):
    """--full-modules '' trains the adapters alone (fewer trainable parameters); --profile writes an operator
    table of one extra step."""
    args = ["bench", "train", "--arch", "tiny-qwen3.5-moe", "--mode", "lora", "--seq", "16", "--batch", "1",
            "--steps", "1", "--warmup", "0"]
    code, out, err = run(*args)
    full = summary_of(out)
    code, out, err = run(*args, "--full-modules", "", "--profile", str(tmp_path / "prof.txt"))
    assert code == 0, err
    s = summary_of(out)
    assert s["full_modules"] == "" and int(s["trainable_params"]) < int(full["trainable_params"])
    table = (tmp_path / "prof.txt").read_text()
    assert "Name" in table and "aten::" in table
    assert table.count("Input Shapes") == 2 and "# by own (self) time and input shapes" in table


def test_bench_train_sweeps_batches_and_in_backward_on_one_model(run):
    """--batch 1,2 --in-backward off,on: four measured pairs from one built model, the later ones printed as what
    changes; bad values give one error line."""
    code, out, err = run("bench", "train", "--arch", "tiny-qwen3.5-moe", "--mode", "lora", "--seq", "16",
                         "--batch", "1,2", "--in-backward", "off,on", "--steps", "1", "--warmup", "0")
    assert code == 0, err
    configs = [line.split(": ")[1] for line in out.splitlines() if line.startswith("bench_config: ")]
    assert configs == ["1/4", "2/4", "3/4", "4/4"]
    pairs = [line.split(": ")[1] for line in out.splitlines() if line.startswith(("batch_per_rank: ", "in_backward: "))]
    assert pairs == ["1", "false", "2", "true", "2", "true"]  # (1,off) in full, then (2,off), (1,on), (2,on): changes
    tps = [float(line.split(": ")[1]) for line in out.splitlines() if line.startswith("tokens_per_second: ")]
    assert len(tps) == 4 and min(tps) > 0
    assert out.count("arch: ") == 1  # shared keys once
    code, out, err = run("bench", "train", "--arch", "tiny-qwen3.5-moe", "--batch", "2,x")
    assert code != 0 and "error:" in err and "--batch" in err
    code, out, err = run("bench", "train", "--arch", "tiny-qwen3.5-moe", "--in-backward", "on", "--grad-accum", "2")
    assert code != 0 and "use grad_accum_steps=1" in err  # the trainer's own rule (check_config)


def test_bench_train_sweeps_uncheckpointed_layers_and_reports_the_loss_path(run):
    code, out, err = run("bench", "train", "--arch", "tiny-qwen3.5-moe", "--seq", "16", "--batch", "1",
                         "--uncheckpointed-layers", "0,4", "--ce-chunk", "8", "--steps", "1", "--warmup", "0")
    assert code == 0, err
    skips = [line.split(": ")[1] for line in out.splitlines() if line.startswith("uncheckpointed_layers: ")]
    assert skips == ["0", "4"]
    assert summary_of(out)["loss_path"] == "chunked (checkpointed)"  # no GPU here: liger's fused loss is off
    code, out, err = run("bench", "train", "--arch", "tiny-qwen3.5-moe", "--uncheckpointed-layers", "9")
    assert code != 0 and "has only 4 decoder layers" in err


def test_bench_ablation_switches_one_fast_path_off_and_refuses_unknown_names(run, monkeypatch):
    """--ablate: every installed fast path on but the named one; --routed-kernels off turns the MoE block's three
    Triton paths off together. On a CPU nothing is installed, so the sweep is the plain model; a bad name is one
    error line before any model is built."""
    pytest.importorskip("triton")
    from pitlm.kernels import install as kernels
    from pitlm.train import bench
    from pitlm.train.model import build_model_config, build_scratch_model

    model = build_scratch_model(build_model_config("tiny-qwen3.5-moe"), torch.float32)
    monkeypatch.setattr(kernels, "_fla", lambda: None)
    assert kernels.install_fast_kernels(model)
    switches = kernels.fast_path_switches()

    def state():
        return {name: sorted({getattr(m, attr) for m in model.modules() if hasattr(m, attr)})
                for name, attr in switches.items() if any(hasattr(m, attr) for m in model.modules())}

    assert bench._switch_fast_paths(model, True, "router") is True
    assert state() == {"routed-experts": [True], "lora-in-k": [True], "router": [False], "shared-gate": [True]}
    assert bench._switch_fast_paths(model, False, "none") is False
    assert state() == {"routed-experts": [False], "lora-in-k": [True], "router": [False], "shared-gate": [False]}
    assert bench._switch_fast_paths(model, True, "lora-in-k") is True
    assert state() == {"routed-experts": [True], "lora-in-k": [False], "router": [True], "shared-gate": [True]}
    assert bench._switch_fast_paths(model, True, "none", experts_in_k=False) is True  # a config's lora.experts_in_k
    assert state() == {"routed-experts": [True], "lora-in-k": [False], "router": [True], "shared-gate": [True]}
    code, out, err = run("bench", "train", "--arch", "tiny-qwen3.5-moe", "--ablate", "none,fast")
    assert code != 0 and "unknown --ablate fast" in err and "Traceback" not in err


def test_bench_train_reports_each_measurement_before_the_next_starts(monkeypatch):
    """A sweep cut short by a job's time limit (a new shape's kernel autotuning can take minutes on a GPU) must
    already have reported what it measured."""
    from pitlm.train import bench

    events, real_measure = [], bench._measure

    def recording_measure(model, cfg, env, vocab, batch_size, *args, **kwargs):
        events.append(("measure", batch_size))
        return real_measure(model, cfg, env, vocab, batch_size, *args, **kwargs)

    monkeypatch.setattr(bench, "_measure", recording_measure)
    cfg = bench.bench_config(overrides=["seq_len=16", "device=cpu"])
    results = bench.bench_train(cfg, bench.Sweep(batch_size=[1, 2]), steps=1, warmup=0,
                                on_result=lambda r: events.append(("result", r["batch_per_rank"])))
    assert events == [("measure", 1), ("result", 1), ("measure", 2), ("result", 2)]
    assert [r["batch_per_rank"] for r in results] == [1, 2]


def test_bench_train_of_a_recipe_measures_the_model_that_trains(run, world, tmp_path):
    """`bench train --recipe R` assembles R's model as `pitlm train --recipe R` does (random weights of the same
    architecture): the same parameter counts, the recipe's checkpointing and LoRA; its batch by default."""
    recipe = write_recipe(tmp_path / "lora.yaml", mode="lora", base="model:base", tokenizer=None, steps=2,
                          batch_size=4, eval={"every": 2, "batches": 1}, checkpoint={"every": 2},
                          gradient_checkpointing=True, gradient_checkpointing_skip_last=1,
                          lora={"preset": "dense", "r": 4, "full_modules": ["lm_head"], "merge_on_exit": False})
    code, out, err = run("train", "--recipe", recipe, "--name", "bench-twin")
    assert code == 0, err
    trained = summary_of(out)
    vocab = json.loads((world["home"] / "models" / "base" / "final" / "config.json").read_text())["vocab_size"]
    code, out, err = run("bench", "train", "--recipe", recipe, "--seq", "16", "--steps", "1", "--warmup", "0",
                         "--set", f"model.vocab_size={vocab}")
    assert code == 0, err
    s = summary_of(out)
    assert (s["total_params"], s["trainable_params"]) == (trained["total_params"], trained["trainable_params"])
    assert s["lora_preset"] == "dense" and s["full_modules"] == "lm_head" and s["uncheckpointed_layers"] == "1"
    assert s["batch_per_rank"] == "4" and s["activation_checkpointing"] == "true"


def test_bench_optim_steps_the_recipe_tensors(run):
    args = ("bench", "optim", "--arch", "tiny-qwen3.5-moe", "--optim", "adamw", "--steps", "2", "--warmup", "1")
    code, out, err = run(*args)
    assert code == 0, err
    s = summary_of(out)
    assert int(s["tensors"]) > 10 and int(s["trainable_params"]) > 0 and float(s["torch_ms_per_step"]) > 0
    # --set takes TrainConfig keys as `bench train` does: one more layer, more tensors; a bare model key is refused
    code, out, err = run(*args, "--set", "model.num_hidden_layers=5")
    assert code == 0, err
    assert int(summary_of(out)["tensors"]) > int(s["tensors"])
    code, out, err = run(*args, "--set", "num_hidden_layers=5")
    assert code != 0 and "--set model.num_hidden_layers=5" in err


def test_bench_train_offloads_checkpoints_and_refuses_unknown_compile_modes(run):
    args = ["bench", "train", "--arch", "tiny-qwen3.5-moe", "--mode", "lora", "--seq", "16", "--batch", "2",
            "--steps", "1", "--warmup", "0"]
    code, out, err = run(*args, "--offload-checkpoints")
    assert code == 0, err
    s = summary_of(out)
    assert s["offload_checkpoints"] == "true" and s["compile"] == "none" and float(s["tokens_per_second"]) > 0
    code, out, err = run(*args, "--compile", "layers")
    assert code != 0 and "'compile': bad value 'layers'" in err and "tokens_per_second" not in out
    code, out, err = run(*args, "--offload-checkpoints", "--no-activation-checkpointing")  # the trainer's own rule
    assert code != 0 and "set gradient_checkpointing: true" in err and "tokens_per_second" not in out


def test_offloaded_checkpointing_trains_the_same_adapter(run, world, tmp_path):
    """pitlm train with gradient_checkpointing_offload: the same adapter as without checkpointing (fp32, CPU)."""
    from safetensors.torch import load_file

    adapters = {}
    for name, extra in (("plain", {}), ("offload", {"gradient_checkpointing": True,
                                                    "gradient_checkpointing_offload": True})):
        recipe = write_recipe(tmp_path / f"{name}.yaml", mode="lora", base="model:base", tokenizer=None, model=None,
                              steps=2, eval={"every": 2, "batches": 1}, checkpoint={"every": 2},
                              lora={"preset": "dense", "r": 4, "merge_on_exit": False}, **extra)
        code, out, err = run("train", "--recipe", recipe, "--name", f"gc-{name}")
        assert code == 0, err
        adapters[name] = load_file(world["home"] / "models" / f"gc-{name}" / "final" / "adapter_model.safetensors")
    assert adapters["plain"].keys() == adapters["offload"].keys()
    assert any("lora_B" in k and t.abs().max() > 0 for k, t in adapters["plain"].items())  # training moved B
    for key, t in adapters["plain"].items():
        assert torch.allclose(adapters["offload"][key], t, rtol=1e-4, atol=1e-6), key
