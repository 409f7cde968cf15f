"""schedule=chronological (pitlm.train.schedule): one run over a nested corpus's crawl periods in date order exports
a family member per cutoff; the member of c_k equals the run on the slice corpus@c_k with the first k segment
lengths (and member 1 the plain run on corpus@c_1); resume across a boundary is exact; LoRA and 2-rank FSDP2
write their members too; model:RUN@CUTOFF resolves; bad configs are one line."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import run_cli
from safetensors.torch import load_file
from test_train import TINY_MODEL, summary_of

from pitlm.corpus.build import build_corpus
from pitlm.corpus.config import CorpusConfig
from pitlm.corpus.fake import fake_records, write_parquet
from pitlm.corpus.tokenizer import train_bpe
from pitlm.errors import PitlmError
from pitlm.volume import Volume

CUTOFFS = ["2016-12-31", "2017-06-30", "2018-06-30"]
STEPS = [4, 3, 3]


@pytest.fixture(scope="module")
def fhome(tmp_path_factory):
    """A volume with a nested corpus `fam` (three crawl periods) and its BPE tokenizer."""
    root = tmp_path_factory.mktemp("chrono")
    records = fake_records(700, seed=5, words=(20, 80))
    write_parquet(records, root / "src" / "a.parquet", row_group_size=64)
    home = root / "home"
    vol = Volume(home).ensure()
    train_bpe([r["text"] for r in records[:200]], 400).save_pretrained(str(home / "corpus" / "_tokenizers" / "fam"))
    build_corpus(CorpusConfig(name="fam", source=str(root / "src"), tokenizer="pit:fam", shard_tokens=4000,
                              val_fraction=0.1, workers=1, cutoffs=",".join(CUTOFFS)), vol)
    return home


def recipe(path, **kw):
    base = {"stage": "train", "mode": "scratch", "corpus": "fam", "tokenizer": "pit:fam", "model": TINY_MODEL,
            "seq_len": 32, "batch_size": 8, "steps": 10, "log_every": 5, "schedule": "chronological",
            "chronological": {"steps_per_period": STEPS, "replay": 0.25},
            "optim": {"lr": 3e-3, "warmup_steps": 2}, "eval": {"every": 50, "batches": 2},
            "checkpoint": {"every": 50, "keep_last": 1}}
    for k, v in kw.items():
        if v is None:
            base.pop(k, None)
        elif isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    path.write_text(yaml.safe_dump(base))
    return str(path)


def weights(d):
    return load_file(str(d / "model.safetensors"))


def same_weights(a, b):
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def family(fhome, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fam-recipes")
    code, out, err = run_cli("--home", str(fhome), "train", "--recipe", recipe(tmp / "f.yaml"), "--name", "fam")
    assert code == 0, err
    return {"out": out, "err": err, "md": fhome / "models" / "fam"}


def test_one_run_exports_a_member_per_cutoff(family, fhome):
    from pitlm.train.paths import resolve_model_path

    s = summary_of(family["out"])
    assert s["schedule"] == "chronological" and s["members"] == "3" and s["steps"] == str(sum(STEPS))
    assert s["member_cutoffs"] == ",".join(CUTOFFS)
    md = family["md"]
    ends = [sum(STEPS[:k + 1]) for k in range(3)]
    for k, c in enumerate(CUTOFFS):
        rec = json.loads((md / "members" / c / "member.json").read_text())
        assert rec["cutoff"] == c and rec["step"] == ends[k] and rec["segment"] == k + 1
        assert rec["tokens_seen"] == ends[k] * 8 * 32 and rec["spec"] == f"model:fam@{c}"
        assert resolve_model_path(f"model:fam@{c}", Volume(fhome)) == str(md / "members" / c / "final")
    assert not same_weights(md / "members" / CUTOFFS[0] / "final", md / "members" / CUTOFFS[1] / "final")
    assert same_weights(md / "members" / CUTOFFS[-1] / "final", md / "final")  # the run's model is its last member
    with pytest.raises(PitlmError, match="no member for cutoff 2017-12-31 .members: 2016-12-31, 2017-06-30"):
        resolve_model_path("model:fam@2017-12-31", Volume(fhome))
    assert "segment 2: steps 4..6, period ending 2017-06-30" in family["err"]


def test_a_member_equals_the_run_that_ends_at_its_cutoff(cli, fhome, family, tmp_path):
    """Member 2 = the chronological run on the slice fam@c_2 with the first two segment lengths; member 1 = the
    plain run on fam@c_1 with segment 1's steps (the same order, the same learning rates)."""
    md = family["md"]
    r2 = recipe(tmp_path / "s2.yaml", corpus=f"fam@{CUTOFFS[1]}", chronological={"steps_per_period": STEPS[:2]})
    code, out, err = cli("--home", str(fhome), "train", "--recipe", r2, "--name", "slice2")
    assert code == 0, err
    assert summary_of(out)["member_cutoffs"] == ",".join(CUTOFFS[:2])
    assert same_weights(fhome / "models" / "slice2" / "final", md / "members" / CUTOFFS[1] / "final")
    r1 = recipe(tmp_path / "s1.yaml", corpus=f"fam@{CUTOFFS[0]}", schedule="plain", steps=STEPS[0])
    code, out, err = cli("--home", str(fhome), "train", "--recipe", r1, "--name", "plain1")
    assert code == 0, err
    assert same_weights(fhome / "models" / "plain1" / "final", md / "members" / CUTOFFS[0] / "final")


@pytest.mark.parametrize("kill_at", [STEPS[0], STEPS[0] + 1])
def test_resume_across_a_boundary_gives_the_uninterrupted_weights(cli, fhome, family, tmp_path, kill_at):
    """Killed at a boundary (its member written, its checkpoint too) or one step past it (the last checkpoint is the
    boundary's): --resume ends with every member and the final weights of the uninterrupted run."""
    r = recipe(tmp_path / "k.yaml", debug={"kill_at_step": kill_at})
    env = {**os.environ, "PITLM_HOME": str(fhome)}
    name = f"killed{kill_at}"
    proc = subprocess.run([sys.executable, "-m", "pitlm.cli", "train", "--recipe", r, "--name", name], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 137, proc.stderr[-2000:]
    md = fhome / "models" / name
    assert (md / "members" / CUTOFFS[0] / "member.json").is_file() and not (md / "members" / CUTOFFS[1]).exists()
    code, out, err = cli("--home", str(fhome), "train", "--recipe", recipe(tmp_path / "k2.yaml"), "--name", name,
                         "--resume")
    assert code == 0, err
    assert f"step {STEPS[0]})" in err  # resumed from the boundary's checkpoint
    for c in CUTOFFS:
        assert same_weights(md / "members" / c / "final", family["md"] / "members" / c / "final"), c
    assert same_weights(md / "final", family["md"] / "final")


def test_lora_family_members_hold_an_adapter_and_its_merge(cli, fhome, family, tmp_path):
    from pitlm.eval.models import parse_spec

    r = recipe(tmp_path / "l.yaml", mode="lora", base="model:fam", tokenizer=None, model=None,
               lora={"preset": None, "target_modules": ["q_proj", "v_proj"], "r": 4, "full_modules": [],
                     "min_trainable_fraction": 0.0}, chronological={"steps_per_period": 2})
    code, out, err = cli("--home", str(fhome), "train", "--recipe", r, "--name", "famlora")
    assert code == 0, err
    md = fhome / "models" / "famlora"
    for c in CUTOFFS:
        m = md / "members" / c
        assert (m / "final" / "adapter_config.json").is_file() and (m / "merged" / "model.safetensors").is_file()
        spec = parse_spec(f"model:famlora@{c}", Volume(fhome))
        assert spec.kind == "hf" and spec.path == str(m / "merged")
    first, last = (weights(md / "members" / c / "merged") for c in (CUTOFFS[0], CUTOFFS[-1]))
    assert any(not torch.equal(first[k], last[k]) for k in first)


def test_two_rank_fsdp2_family_merges_every_member(fhome, family, tmp_path):
    """Scratch on 2 gloo ranks is sharded (FSDP2): each member is merged from its boundary checkpoint once the
    process group is gone, and equals the single-process member up to the ranks' summation order."""
    from transformers import AutoModelForCausalLM

    r = recipe(tmp_path / "d.yaml", nproc=2)
    env = {**os.environ, "PITLM_HOME": str(fhome)}
    proc = subprocess.run([sys.executable, "-m", "pitlm.cli", "train", "--recipe", r, "--name", "famfsdp"],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary_of(proc.stdout)
    assert s["world_size"] == "2" and s["members"] == "3"
    md = fhome / "models" / "famfsdp"
    tokens = torch.arange(1, 33).unsqueeze(0)
    for c in CUTOFFS:
        assert json.loads((md / "members" / c / "member.json").read_text())["cutoff"] == c
        with torch.no_grad():
            sharded = AutoModelForCausalLM.from_pretrained(md / "members" / c / "final")(input_ids=tokens).logits
            single = AutoModelForCausalLM.from_pretrained(family["md"] / "members" / c / "final")(
                input_ids=tokens).logits
        torch.testing.assert_close(sharded, single, atol=2e-4, rtol=2e-4)
    # the boundary checkpoints were kept for the merges (keep_last=1 would have pruned them)
    steps = sorted(p.name for p in (md / "checkpoints").iterdir())
    assert steps == [f"step_{sum(STEPS[:k + 1]):06d}" for k in range(3)]


@pytest.mark.parametrize("change, message", [
    ({"corpus": f"fam@{CUTOFFS[0]}", "chronological": {"steps_per_period": [2, 2]}},
     "lists 2 segments but the corpus has 1 periods"),
    ({"chronological": {"steps_per_period": None}, "steps": 10}, "steps=10 does not split evenly"),
    ({"chronological": {"replay": 0.01}}, "replays 0 windows per batch"),
    ({"corpus": "fam@2017-01-31"}, "has no cutoff 2017-01-31"),
])
def test_bad_chronological_configs_are_one_line(cli, fhome, tmp_path, change, message):
    code, out, err = cli("--home", str(fhome), "train", "--recipe", recipe(tmp_path / "b.yaml", **change),
                         "--name", "bad")
    assert code != 0 and message in err, err
    assert not (fhome / "models" / "bad" / "members").exists()
