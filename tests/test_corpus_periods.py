"""Nested PIT corpora (`pitlm corpus build --cutoffs`): one scan, one corpus whose slice of cutoff c_k is exactly the
build of documents crawled on or before c_k, and whose periods are the builds of each crawl interval alone; the
reader API (`ShardIndex.slice/periods`, `NAME@CUTOFF`); the audit of every slice; bad cutoff lists."""

import datetime as dt
import hashlib
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

from pitlm.corpus.audit import audit_corpus
from pitlm.corpus.build import build_corpus
from pitlm.corpus.config import CorpusConfig
from pitlm.corpus.dates import crawl_period, end_of_day, parse_cutoffs
from pitlm.corpus.fake import fake_records, write_jsonl, write_parquet
from pitlm.corpus.shards import ShardIndex, open_corpus, parse_corpus_spec
from pitlm.corpus.tokenizer import train_bpe
from pitlm.errors import PitlmError
from pitlm.volume import Volume

CUTOFFS = ["2016-12-31", "2017-06-30", "2018-06-30"]  # the data runs to 2018-12-31: later documents are dropped
VOLATILE = {"created_utc", "host", "wall_seconds", "build", "versions"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus-periods")
    records = fake_records(900, seed=11, words=(20, 100))
    write_parquet(records[:500], root / "src" / "a.parquet", row_group_size=64)
    write_jsonl(records[500:], root / "src" / "b.jsonl")
    train_bpe([r["text"] for r in records[:300]], 500).save_pretrained(str(root / "tok"))
    return {"records": records, "src": str(root / "src"), "tok": str(root / "tok")}


def cfg_for(data, name="n", **kw):
    base = dict(name=name, source=data["src"], tokenizer=data["tok"], shard_tokens=3000, val_fraction=0.1, workers=1)
    if "cutoff" not in kw:
        base["cutoffs"] = ",".join(CUTOFFS)
    return CorpusConfig(**{**base, **kw})


def stream(index, split):
    arrays = index.arrays(split)
    return np.concatenate(arrays).tobytes() if arrays else b""


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stable(manifest):
    return {k: v for k, v in manifest.items() if k not in VOLATILE}


@pytest.mark.parametrize("target", ["6k", None])
def test_slices_equal_independent_builds(data, tmp_path, target):
    """Slice c_1 is the plain --cutoff c_1 build byte for byte; slice c_k's stream is the concatenation of the
    independent builds --after c_{j-1} --cutoff c_j, j <= k; every period of the nested build is that build."""
    vol = Volume(tmp_path / "home").ensure()
    m = build_corpus(cfg_for(data, target_tokens=target), vol)
    nested = ShardIndex.load(vol.path("corpus", "n"))
    assert nested.nested and [str(c) for c in nested.cutoffs] == CUTOFFS == m["cutoffs"]
    assert m["docs"]["dropped_after_cutoff"] == sum(r["date"] > "2018-06-30T23:59:59Z" for r in data["records"])
    singles = []
    for j, cutoff in enumerate(CUTOFFS):
        after = CUTOFFS[j - 1] if j else None
        single = build_corpus(cfg_for(data, name=f"s{j}", cutoff=cutoff, after=after, target_tokens=target), vol)
        singles.append(ShardIndex.load(vol.path("corpus", f"s{j}")))
        assert singles[j].periods()[0][:2] == (None if after is None else dt.date.fromisoformat(after),
                                               dt.date.fromisoformat(cutoff))
        assert single["docs"].get("dropped_before_period", 0) == (0 if j == 0 else sum(
            r["date"] <= f"{after}T23:59:59Z" for r in data["records"]))
        period = nested.periods()[j]
        assert (str(period.start) if period.start else None, str(period.cutoff)) == (after, cutoff)
        # the period's files are the independent build's files, byte for byte (shards and ids tables)
        for split in ("train", "val"):
            mine, theirs = period.index.splits[split], singles[j].splits[split]
            assert len(mine) == len(theirs) > 0
            for a, b in zip(mine, theirs, strict=True):
                assert a["file"] == f"periods/{j + 1:03d}_{cutoff}/{b['file']}" and a["period"] == j + 1
                assert sha(nested.root / a["file"]) == sha(singles[j].root / b["file"]) == a["sha256"]
                assert sha(nested.root / a["ids"]) == sha(singles[j].root / b["ids"])
        assert m["periods"][j]["tokens"] == single["tokens"] and m["periods"][j]["docs_by_split"] == single["docs_by_split"]
    first = nested.slice(CUTOFFS[0])
    assert first.to_json()["splits"] == {s: [{**e, "file": f"periods/001_{CUTOFFS[0]}/{e['file']}",
                                              "ids": f"periods/001_{CUTOFFS[0]}/{e['ids']}", "period": 1}
                                             for e in singles[0].splits[s]] for s in ("train", "val")}
    for k, cutoff in enumerate(CUTOFFS, 1):
        sl = nested.slice(cutoff)
        assert sl.cutoff == dt.date.fromisoformat(cutoff) and len(sl.periods()) == k
        for split in ("train", "val"):
            want = b"".join(stream(s, split) for s in singles[:k])
            assert stream(sl, split) == want
            assert m["slices"][k - 1]["stream_sha256"][split] == hashlib.sha256(want).hexdigest()
            assert m["slices"][k - 1]["tokens"][split] == sl.num_tokens(split) == sum(s.num_tokens(split) for s in singles[:k])
    # a reader that knows nothing of periods reads the whole corpus: the slice of the last cutoff
    assert stream(nested, "train") == stream(nested.slice(CUTOFFS[-1]), "train")
    if target:  # the budget is per period
        assert all(6000 <= p["tokens"]["train"] < 6300 for p in m["periods"])


def test_one_and_two_workers_identical(data, tmp_path):
    out, files = [], []
    for workers in (1, 2):
        vol = Volume(tmp_path / f"h{workers}").ensure()
        out.append(build_corpus(cfg_for(data, workers=workers, target_tokens="5k"), vol))
        root = vol.path("corpus", "n")
        files.append({str(p.relative_to(root)): sha(p) for p in sorted(root.rglob("*"))
                      if p.is_file() and p.name != "manifest.json"})
    assert stable(out[0]) == stable(out[1]) and files[0] == files[1] and len(files[0]) > 10
    assert "index.json" in files[0]


def _markers(work):
    return len(list((work / "tok").glob("*.parquet"))) if (work / "tok").is_dir() else 0


def test_killed_nested_build_resumes_to_the_same_corpus(data, tmp_path):
    ref = build_corpus(cfg_for(data, target_tokens="5k", workers=2), Volume(tmp_path / "ref").ensure())
    home = tmp_path / "a"
    env = {**os.environ, "PITLM_HOME": str(home), "PITLM_CORPUS_JOB_DELAY": "0.3", "PITLM_NO_PROGRESS": "1"}
    args = [sys.executable, "-m", "pitlm.cli", "corpus", "build", "n", "--source", data["src"], "--cutoffs",
            ",".join(CUTOFFS), "--tokenizer", data["tok"], "--target-tokens", "5k", "--shard-tokens", "3000",
            "--val-fraction", "0.1", "--workers", "2"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    work = home / "corpus" / ".n.build"
    deadline = time.time() + 120
    while _markers(work) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the build and its workers
    proc.wait()
    assert _markers(work) >= 2, "the build did not get far enough to be killed mid-way"
    assert not (home / "corpus" / "n").exists()
    resumed = build_corpus(cfg_for(data, target_tokens="5k", workers=2), Volume(home))
    assert stable(resumed) == stable(ref) and not work.exists()
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in ref["shards"]]
    assert resumed["slices"] == ref["slices"]


def test_reader_api_and_specs(data, tmp_path):
    vol = Volume(tmp_path / "home").ensure()
    build_corpus(cfg_for(data, target_tokens="5k"), vol)
    build_corpus(cfg_for(data, name="plain", cutoff="2017-06-30"), vol)
    assert parse_corpus_spec("n") == ("n", None)
    assert parse_corpus_spec("n@2017-06-30") == ("n", dt.date(2017, 6, 30))
    assert parse_corpus_spec("/data/x@y/corpus") == ("/data/x@y/corpus", None)
    for bad, msg in (("n@2017-13-01", "is not a cutoff date"), ("@2017-06-30", "expected NAME or NAME@")):
        with pytest.raises(PitlmError, match=msg):
            parse_corpus_spec(bad)
    sl = open_corpus("n@2017-06-30", vol)
    assert [str(c) for c in sl.cutoffs] == CUTOFFS[:2] and {e["period"] for e in sl.splits["train"]} == {1, 2}
    assert open_corpus(str(vol.path("corpus", "n")) + "@2016-12-31", vol).cutoffs == [dt.date(2016, 12, 31)]
    with pytest.raises(PitlmError, match=r"corpus n has no cutoff 2017-12-31 \(its cutoffs: 2016-12-31, 2017-06-30, "
                                         r"2018-06-30\)"):
        open_corpus("n@2017-12-31", vol)
    with pytest.raises(PitlmError, match="corpus 'nope' not found"):
        open_corpus("nope@2017-06-30", vol)
    with pytest.raises(PitlmError, match="is not a built corpus"):
        open_corpus(str(tmp_path / "missing") + "@2017-06-30", vol)
    # a chronological run reads the periods in order, each on its own
    parts = ShardIndex.load(vol.path("corpus", "n")).periods()
    assert [(p.start, p.cutoff) for p in parts] == [(None, dt.date(2016, 12, 31)),
                                                   (dt.date(2016, 12, 31), dt.date(2017, 6, 30)),
                                                   (dt.date(2017, 6, 30), dt.date(2018, 6, 30))]
    assert all({e["period"] for e in p.index.splits["train"]} == {k} for k, p in enumerate(parts, 1))
    # a plain corpus is the one-period case: NAME@its cutoff works, its index.json has no periods
    plain = open_corpus("plain@2017-06-30", vol)
    assert plain.cutoffs == [dt.date(2017, 6, 30)] and not plain.nested and "periods" not in plain.to_json()
    assert plain.periods()[0].index.splits == plain.splits
    with pytest.raises(PitlmError, match="has no cutoff 2018-06-30"):
        open_corpus("plain@2018-06-30", vol)


def test_parse_cutoffs():
    assert parse_cutoffs("yearly:2017..2019") == [dt.date(2017, 12, 31), dt.date(2018, 12, 31), dt.date(2019, 12, 31)]
    assert parse_cutoffs(" 2017-06-30 , 2018-06-30 ") == [dt.date(2017, 6, 30), dt.date(2018, 6, 30)]
    assert CorpusConfig(name="x", source="/tmp", tokenizer="t", cutoffs="yearly:2017..2018").cutoff == dt.date(2018, 12, 31)
    one = CorpusConfig(name="x", source="/tmp", tokenizer="t", cutoffs="2017-06-30")
    assert not one.nested and one.cutoff == dt.date(2017, 6, 30) and "cutoffs" not in one.content()
    for bad, msg in (("2018-06-30,2017-06-30", "2017-06-30 comes after 2018-06-30"),
                     ("2017-06-30,2017-06-30", "2017-06-30 is listed twice"),
                     ("2017-06-30,2017-02-30", "bad cutoff '2017-02-30'"),
                     ("yearly:2019..2017", "expected yearly:Y0..Y1"), ("yearly:17..19", "expected yearly:Y0..Y1"),
                     (",", "expected D1,D2,...")):
        with pytest.raises(PitlmError, match=msg):
            parse_cutoffs(bad)


def test_empty_period_warns_without_a_budget_and_fails_with_one(data, tmp_path):
    vol = Volume(tmp_path / "home").ensure()
    seen = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("pitlm.corpus").addHandler(handler)
    try:
        cutoffs = "2017-06-30,2019-06-30,2020-06-30"  # the data ends in 2018: the last period is empty
        m = build_corpus(cfg_for(data, cutoffs=cutoffs), vol)
    finally:
        logging.getLogger("pitlm.corpus").removeHandler(handler)
    assert m["periods"][2]["docs"]["kept"] == 0 and m["slices"][2]["stream_sha256"] == m["slices"][1]["stream_sha256"]
    assert any("period 3 (2019-06-30, 2020-06-30] holds no document" in w for w in seen)
    assert m["cutoffs_after_source_end"] == ["2019-06-30", "2020-06-30"] and len(m["warnings"]) == 2
    with pytest.raises(PitlmError, match=r"period 3 \(2019-06-30, 2020-06-30\] has only 0 train tokens"):
        build_corpus(cfg_for(data, name="m", cutoffs=cutoffs, target_tokens="1k"), vol)
    assert sorted(p.name for p in vol.path("corpus").iterdir() if not p.name.endswith(".lock")) == ["n"]


def test_hub_periods_read_the_same_documents_as_builds_of_each_period(data, tmp_path, monkeypatch):
    """Hub dumps are read up to their share of each period's budget: a period of the nested build collects from
    every dump what a build of that period alone collects."""
    import datasets

    by_dump = {}
    for r in data["records"]:
        by_dump.setdefault(r["dump"], []).append(r)
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, name=None, split=None, streaming=False:
                        iter(by_dump.get(name, [])))
    monkeypatch.setattr(datasets, "get_dataset_config_names", lambda repo: sorted(by_dump))
    vol = Volume(tmp_path / "home").ensure()
    m = build_corpus(cfg_for(data, source="fineweb", target_tokens="4k"), vol)
    nested = ShardIndex.load(vol.path("corpus", "n"))
    for j, cutoff in enumerate(CUTOFFS):
        after = CUTOFFS[j - 1] if j else None
        s = build_corpus(cfg_for(data, name=f"s{j}", source="fineweb", cutoff=cutoff, after=after,
                                 target_tokens="4k"), vol)
        if after:  # dumps crawled entirely before the period are not even opened
            end = end_of_day(dt.date.fromisoformat(after))
            assert s["source"]["dumps_before_period"]
            assert all(crawl_period(d).end <= end for d in s["source"]["dumps_before_period"])
            assert all(crawl_period(d).end > end for d in s["dumps_read"])
        single = ShardIndex.load(vol.path("corpus", f"s{j}"))
        for split in ("train", "val"):
            assert stream(nested.periods()[j].index, split) == stream(single, split)
    assert m["docs"]["dropped_dump_share"] > 0  # dumps straddling a cutoff read on for the next period
    assert m["docs"]["read"] < len(data["records"]) and m["tokens"]["train"] >= 3 * 4000


def _plant(root, entry, date):
    """Give the first document of a shard a later crawl date in its ids table (the corpus now claims it)."""
    ids = pd.read_parquet(root / entry["ids"])
    ids.loc[0, "date"] = date
    ids.to_parquet(root / entry["ids"])
    return ids["id"][0]


@pytest.mark.parametrize("period", [1, 2, 3])
def test_audit_catches_a_post_cutoff_document_in_any_slice(data, tmp_path, period):
    vol = Volume(tmp_path / "home").ensure()
    build_corpus(cfg_for(data, target_tokens="5k"), vol)
    assert all(c.ok for c in audit_corpus(vol, "n")), [c.line() for c in audit_corpus(vol, "n") if not c.ok]
    root = vol.path("corpus", "n")
    index = json.loads((root / "index.json").read_text())
    entry = next(e for e in index["splits"]["train"] if e["period"] == period)
    late = "2018-07-01T00:00:01Z" if period == 3 else f"{CUTOFFS[period][:7]}-01T00:00:00Z"  # inside the next period
    victim = _plant(root, entry, late)
    checks = {c.name: c for c in audit_corpus(vol, "n")}
    name = f"slice@{CUTOFFS[period - 1]}"
    assert not checks[name].ok and "dated after" in checks[name].detail and victim in checks[name].detail
    assert all(checks[f"slice@{c}"].ok for c in CUTOFFS[:period - 1])  # earlier slices do not hold it
    assert not checks["shard_hashes"].ok  # the ids file no longer matches its recorded sha256 either


def test_audit_catches_an_index_listing_a_later_shard_in_an_earlier_slice(data, tmp_path):
    vol = Volume(tmp_path / "home").ensure()
    build_corpus(cfg_for(data, target_tokens="5k"), vol)
    root = vol.path("corpus", "n")
    index = json.loads((root / "index.json").read_text())
    train = index["splits"]["train"]
    later = next(e for e in train if e["period"] == 3)
    train.remove(later)
    train.insert(0, {**later, "period": 1})  # a reader of slice 2016-12-31 now trains on 2018 documents
    (root / "index.json").write_text(json.dumps(index))
    assert [str(c) for c in ShardIndex.load(root).cutoffs] == CUTOFFS
    checks = {c.name: c for c in audit_corpus(vol, "n")}
    first = checks[f"slice@{CUTOFFS[0]}"]
    assert not first.ok and "dated after 2016-12-31T23:59:59Z" in first.detail
    assert "after 2016-12-31T23:59:59Z" in first.detail and not checks["shard_hashes"].ok


def test_cli_nested_build_lines_and_audit(cli, home, data):
    code, out, err = cli("corpus", "build", "y", "--source", data["src"], "--cutoffs", "yearly:2016..2017",
                         "--tokenizer", data["tok"], "--target-tokens", "5k", "--shard-tokens", "3000",
                         "--workers", "1")
    assert code == 0, err
    lines = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    assert lines["cutoffs"] == "2016-12-31,2017-12-31" and lines["periods"] == "2" and lines["cutoff"] == "2017-12-31"
    t1, t2 = int(lines["tokens_train@2016-12-31"]), int(lines["tokens_train@2017-12-31"])
    assert 5000 <= t1 < t2 == int(lines["tokens_train"]) and int(lines["docs_kept@2017-12-31"]) == int(lines["docs_kept"])
    assert sorted(p.name for p in (home / "corpus" / "y" / "periods").iterdir()) == ["001_2016-12-31", "002_2017-12-31"]
    code, out, _ = cli("audit", "corpus", "y", "--deep")
    assert code == 0 and "slice@2016-12-31: pass" in out and "slice@2017-12-31: pass" in out and "audit: pass" in out


@pytest.mark.parametrize("extra, expect", [
    (("--cutoffs", "2018-06-30,2017-06-30"), "2017-06-30 comes after 2018-06-30"),
    (("--cutoffs", "2017-06-30,2017-06-30"), "2017-06-30 is listed twice"),
    (("--cutoffs", "2017-06-30,2018-02-30"), "bad cutoff '2018-02-30'"),
    (("--cutoffs", "yearly:2018..2016"), "expected yearly:Y0..Y1"),
    (("--cutoffs", "2016-12-31,2017-06-30", "--cutoff", "2017-06-30"), "not both"),
    (("--cutoff", "2017-06-30", "--after", "2017-06-30"), "--after 2017-06-30 must be before the cutoff"),
    (("--cutoffs", "2016-12-31,2017-06-30", "--after", "2017-01-01"), "must be before the first cutoff 2016-12-31"),
    (("--cutoffs", "2016-12-31,2017-06-30", "--target-tokens", "50k"), "period 1 (-inf, 2016-12-31] has only"),
])
def test_bad_cutoff_lists_give_one_line_and_leave_nothing(cli, home, data, extra, expect):
    code, out, err = cli("corpus", "build", "c", "--source", data["src"], "--tokenizer", data["tok"],
                         "--workers", "1", *extra)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert expect in errors[0]
    corpus = home / "corpus"
    assert not corpus.is_dir() or not list(corpus.iterdir())
