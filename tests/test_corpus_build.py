import datetime as dt
import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from pitlm.corpus.build import build_corpus
from pitlm.corpus.config import CorpusConfig
from pitlm.corpus.dates import dump_may_precede
from pitlm.corpus.fake import fake_records, write_fineweb_tree, write_jsonl, write_parquet
from pitlm.corpus.shards import ShardIndex
from pitlm.corpus.tokenizer import train_bpe
from pitlm.errors import PitlmError
from pitlm.volume import Volume

CUTOFF = "2017-06-30"
VOLATILE = {"created_utc", "host", "wall_seconds", "build", "versions"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """1,200 FineWeb-schema documents (2016-2018) as parquet (small row groups) + JSONL, and a 500-token BPE."""
    root = tmp_path_factory.mktemp("corpus-data")
    records = fake_records(1200, seed=7, words=(20, 120))
    write_parquet(records[:700], root / "src" / "a.parquet", row_group_size=64)
    write_jsonl(records[700:], root / "src" / "b.jsonl")
    train_bpe([r["text"] for r in records[:300]], 500).save_pretrained(str(root / "tok"))
    return {"root": root, "records": records, "src": str(root / "src"), "tok": str(root / "tok")}


def cfg_for(data, name="c", **kw):
    base = dict(name=name, source=data["src"], cutoff=CUTOFF, tokenizer=data["tok"], shard_tokens=4000,
                val_fraction=0.1, workers=1)
    return CorpusConfig(**{**base, **kw})


def stable(manifest):
    return {k: v for k, v in manifest.items() if k not in VOLATILE}


def test_build_from_parquet_and_jsonl(data, tmp_path):
    vol = Volume(tmp_path / "home").ensure()
    m = build_corpus(cfg_for(data), vol)
    root = vol.path("corpus", "c")
    index = ShardIndex.load(root)
    by_id = {r["id"]: r for r in data["records"]}
    eligible = [r for r in data["records"] if r["date"] <= "2017-06-30T23:59:59Z"]
    # everything eligible is kept (no target), each once, from both files
    assert m["docs"]["kept"] == len(eligible) == m["docs"]["eligible"]
    assert m["docs"]["read"] == 1200 == m["docs"]["kept"] + sum(v for k, v in m["docs"].items() if k.startswith("dropped_"))
    assert m["docs"]["dropped_after_cutoff"] == 1200 - len(eligible)
    assert m["max_doc_date"] <= "2017-06-30T23:59:59Z" and m["min_doc_date"] >= "2016-01-01"
    assert index.dtype == "uint16" and index.eos_id == m["tokenizer"]["eos_id"]
    assert index.num_tokens("train") == m["tokens"]["train"] and index.num_tokens("val") == m["tokens"]["val"]
    assert all(e["tokens"] == 4000 for e in index.splits["train"][:-1])  # fixed-size shards, last one shorter
    assert {"source", "dumps_used", "cutoff", "filters", "tokenizer", "docs", "tokens", "shards", "pitlm_version",
            "wall_seconds", "min_doc_date", "max_doc_date"} <= set(m)
    assert len(m["tokenizer"]["vocab_sha256"]) == 64 and all(len(s["sha256"]) == 64 for s in m["shards"])
    # decode: the concatenated shards are the documents' tokens, EOS after each, in the listed order
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(data["tok"])
    for split in ("train", "val"):
        stream = np.concatenate(index.arrays(split)) if index.splits[split] else np.zeros(0)
        ids = pd.concat([pd.read_parquet(root / e["ids"]) for e in index.splits[split]], ignore_index=True)
        ends = np.flatnonzero(stream == index.eos_id)
        assert len(ends) == len(ids)
        starts = np.concatenate([[0], ends[:-1] + 1])
        for k in (0, len(ids) // 2, len(ids) - 1):
            text = tok.decode(stream[starts[k]:ends[k]].tolist())
            assert text == by_id[ids["id"][k]]["text"]
            assert ids["date"][k] == by_id[ids["id"][k]]["date"]


def test_one_and_two_workers_identical(data, tmp_path):
    out = []
    for workers in (1, 2):
        vol = Volume(tmp_path / f"home{workers}").ensure()
        out.append(build_corpus(cfg_for(data, workers=workers, target_tokens="20k"), vol))
    assert stable(out[0]) == stable(out[1])
    assert out[0]["build"]["workers"] == 1 and out[1]["build"]["workers"] == 2


def test_target_cut_is_minimal_and_split_is_stable(data, tmp_path):
    vol = Volume(tmp_path / "home").ensure()
    small = build_corpus(cfg_for(data, name="small", target_tokens="10k"), vol)
    big = build_corpus(cfg_for(data, name="big", target_tokens="30k"), vol)
    assert 10_000 <= small["tokens"]["train"] < 10_000 + 200 and big["tokens"]["train"] >= 30_000
    assert small["docs"]["dropped_budget"] > big["docs"]["dropped_budget"] > 0

    def ids(name):
        root = vol.path("corpus", name)
        return pd.concat([pd.read_parquet(root / e["ids"]).assign(split=e["split"])
                          for e in json.loads((root / "manifest.json").read_text())["shards"]])

    s, b = ids("small"), ids("big")
    assert set(s["id"]) <= set(b["id"])  # a larger budget extends the same seeded sample
    merged = s.merge(b, on="id", suffixes=("_s", "_b"))
    assert (merged["split_s"] == merged["split_b"]).all()  # the validation split is by document id
    assert len(set(s["dump"])) > 10  # the sample spreads over the dumps


def test_target_larger_than_available(data, tmp_path):
    vol = Volume(tmp_path / "home").ensure()
    with pytest.raises(PitlmError, match="less than --target-tokens"):
        build_corpus(cfg_for(data, target_tokens="5M"), vol)
    assert not any(vol.path("corpus").iterdir())


def test_fineweb_layout_skips_later_dumps_and_drops_repeated_ids(data, tmp_path):
    recs = data["records"][:400]
    write_fineweb_tree(recs, tmp_path / "fw", rows_per_file=50)
    write_parquet(recs[:10], tmp_path / "fw" / "extra.parquet")  # the same 10 documents again, outside data/
    vol = Volume(tmp_path / "home").ensure()
    m = build_corpus(cfg_for(data, source=str(tmp_path / "fw")), vol)
    assert m["dumps_skipped"] and min(m["dumps_skipped"]) > max(m["dumps_read"])
    assert all(dump_may_precede(d, dt.date(2017, 6, 30)) for d in m["dumps_read"])
    assert not any(dump_may_precede(d, dt.date(2017, 6, 30)) for d in m["dumps_skipped"])
    early = [r for r in recs[:10] if r["date"] <= "2017-06-30T23:59:59Z"]
    assert m["docs"]["dropped_duplicate_id"] == len(early)
    assert m["docs"]["kept"] == sum(r["date"] <= "2017-06-30T23:59:59Z" for r in recs)


def test_world_source(data, tmp_path):
    vol = Volume(tmp_path / "home").ensure()
    recs = data["records"][:300]
    for dump in sorted({r["dump"] for r in recs}):  # the world's layout: corpus/<DUMP>.parquet
        write_parquet([r for r in recs if r["dump"] == dump], vol.path("world", "w1", "corpus", f"{dump}.parquet"))
    m = build_corpus(cfg_for(data, source="world:w1"), vol)
    assert m["source"]["kind"] == "world" and m["dumps_skipped"] and m["dumps_read"]
    skipped = sum(r["dump"] in m["dumps_skipped"] for r in recs)
    assert skipped > 0 and m["docs"]["read"] == 300 - skipped  # files of later dumps are not even opened
    assert m["docs"]["kept"] == sum(r["date"] <= "2017-06-30T23:59:59Z" for r in recs)
    with pytest.raises(PitlmError, match="world 'nope' has no corpus"):
        build_corpus(cfg_for(data, name="w2", source="world:nope"), vol)


def test_overwrite_and_incomplete_corpus(data, tmp_path):
    vol = Volume(tmp_path / "home").ensure()
    build_corpus(cfg_for(data, target_tokens="5k"), vol)
    with pytest.raises(PitlmError, match="already exists"):
        build_corpus(cfg_for(data, target_tokens="6k"), vol)
    m = build_corpus(cfg_for(data, target_tokens="6k", overwrite=True), vol)
    root = vol.path("corpus", "c")
    assert ShardIndex.load(root).num_tokens("train") == m["tokens"]["train"] >= 6000
    assert sorted(p.name for p in vol.path("corpus").iterdir()) == ["c"]  # no temp or old dirs left
    (root / m["shards"][0]["file"]).unlink()
    with pytest.raises(PitlmError, match="incomplete"):
        ShardIndex.load(root)


def _children(pid):
    out = []
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(stat))
    return out


def _alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _markers(work):
    return len(list((work / "tok").glob("*.parquet"))) if (work / "tok").is_dir() else 0


def test_killed_build_resumes_to_the_same_corpus(data, tmp_path):
    """SIGKILL a 2-worker build mid-way (the parent only: its workers must not outlive it), rerun it, compare with
    an uninterrupted build."""
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    ref = build_corpus(cfg_for(data, target_tokens="20k"), Volume(home_b).ensure())
    env = {**os.environ, "PITLM_HOME": str(home_a), "PITLM_CORPUS_JOB_DELAY": "0.4", "PITLM_NO_PROGRESS": "1"}
    args = [sys.executable, "-m", "pitlm.cli", "corpus", "build", "c", "--source", data["src"], "--cutoff", CUTOFF,
            "--tokenizer", data["tok"], "--target-tokens", "20k", "--shard-tokens", "4000", "--val-fraction", "0.1",
            "--workers", "2"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    work = home_a / "corpus" / ".c.build"
    deadline = time.time() + 120
    while _markers(work) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    workers = _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.05)
    left = [w for w in workers if _alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert len(workers) == 2 and not left, "workers outlived the killed build"
    done_before = _markers(work)
    assert done_before >= 2, "the build did not get far enough to be killed mid-way"
    assert not (home_a / "corpus" / "c").exists()  # nothing visible under the final name
    with pytest.raises(PitlmError):
        ShardIndex.load(work / "out")  # unfinished: no index yet
    resumed = build_corpus(cfg_for(data, target_tokens="20k", workers=2), Volume(home_a))
    assert stable(resumed) == stable(ref)
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in ref["shards"]]
    assert not work.exists()


def test_hub_source_reads_only_dumps_before_cutoff(data, tmp_path, monkeypatch):
    """The hub path with `datasets` stubbed: dump configs listed, streamed one by one, capped, then built."""
    import datasets

    by_dump = {}
    for r in data["records"]:
        by_dump.setdefault(r["dump"], []).append(r)
    opened = []

    def fake_load_dataset(repo, name=None, split=None, streaming=False):
        assert repo == "HuggingFaceFW/fineweb" and split == "train" and streaming
        opened.append(name)
        return iter(by_dump.get(name, []))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(datasets, "get_dataset_config_names", lambda repo: ["default", "sample-10BT", *by_dump])
    vol = Volume(tmp_path / "home").ensure()
    m = build_corpus(cfg_for(data, source="fineweb", target_tokens="8k"), vol)
    assert opened and set(opened) == set(m["dumps_read"]) and max(opened) < min(m["dumps_skipped"])
    assert m["tokens"]["train"] >= 8000 and m["max_doc_date"] <= "2017-06-30T23:59:59Z"
    assert m["docs"]["read"] < 1200  # each dump is read only up to its share of the budget
    with pytest.raises(PitlmError, match="required for the hub"):
        build_corpus(cfg_for(data, name="d", source="fineweb"), vol)
    assert m["cutoffs_after_source_end"] == [] and m["source_end"]["basis"] == "dump"
    late = build_corpus(cfg_for(data, name="late", source="fineweb", target_tokens="8k", cutoff="2030-01-01"), vol)
    assert late["cutoffs_after_source_end"] == ["2030-01-01"] and late["source_end"]["last_dump"] == max(by_dump)
    assert "the source's last dump, " + max(by_dump) in late["warnings"][0]


def test_uint32_shards_for_large_vocabularies(data, tmp_path):
    big = train_bpe([r["text"] for r in data["records"][:100]], 400)
    big.add_tokens([f"<extra_{i}>" for i in range(66000)])  # len > 65536: ids need uint32
    big.save_pretrained(str(tmp_path / "big"))
    recs = [dict(r, text=r["text"] + " <extra_65999>") for r in data["records"][:40]]
    write_jsonl(recs, tmp_path / "src.jsonl")
    vol = Volume(tmp_path / "home").ensure()
    m = build_corpus(cfg_for(data, source=str(tmp_path / "src.jsonl"), tokenizer=str(tmp_path / "big"),
                             val_fraction=0.0), vol)
    index = ShardIndex.load(vol.path("corpus", "c"))
    assert m["dtype"] == index.dtype == "uint32" and index.vocab_size > 65536 and index.splits["val"] == []
    stream = np.concatenate(index.arrays("train"))
    assert stream.dtype == np.uint32 and int(stream.max()) == len(big) - 1


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings_logged():
    handler = _Records()
    logger = logging.getLogger("pitlm.corpus")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def test_cutoff_after_the_source_end_warns_and_is_recorded(data, tmp_path, warnings_logged):
    vol = Volume(tmp_path / "home").ensure()
    m = build_corpus(cfg_for(data, cutoff=CUTOFF), vol)
    assert not warnings_logged and m["cutoffs_after_source_end"] == [] and m["warnings"] == []
    last = max(r["date"] for r in data["records"])
    m = build_corpus(cfg_for(data, name="late", cutoff="2030-01-01"), vol)
    late = [w for w in warnings_logged if "2030-01-01" in w]
    assert len(late) == 1 and "\n" not in late[0] and last in late[0] and "after" in late[0]
    assert m["cutoffs_after_source_end"] == ["2030-01-01"] and m["warnings"] == late
    assert m["source_end"] == {"max_date_seen": last, "last_dump": None, "basis": "documents"}  # files name no dump
    assert m["docs"]["kept"] == 1200 and "dropped_after_cutoff" not in m["docs"]
