"""The corpus CLI end to end: builds, audits (catching tampering and post-cutoff documents), the PIT tokenizer and
its audit, bad inputs, the benchmark."""

import json

import pandas as pd
import pytest

from pitlm.corpus.fake import fake_records, write_jsonl, write_parquet
from pitlm.corpus.tokenizer import train_bpe

CUTOFF = "2017-06-30"
NEW_WORD = "zyxquorbital"  # appears only in documents crawled after the cutoff


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus-cli")
    records = fake_records(400, seed=3, words=(20, 80))
    for r in records:
        if r["date"] > "2017-07":
            r["text"] += f" {NEW_WORD} {NEW_WORD} {NEW_WORD}."
    write_parquet(records[:250], root / "src" / "a.parquet", row_group_size=50)
    write_jsonl(records[250:], root / "src" / "b.jsonl")
    train_bpe([r["text"] for r in records], 600).save_pretrained(str(root / "tok-all"))  # trained on later text too
    return {"root": root, "records": records, "src": str(root / "src"), "tok": str(root / "tok-all")}


def build_args(data, name="c", *extra):
    return ("corpus", "build", name, "--source", data["src"], "--cutoff", CUTOFF, "--tokenizer", data["tok"],
            "--shard-tokens", "3000", "--val-fraction", "0.1", "--workers", "1", *extra)


def lines(out):
    return dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)


def test_build_then_audit_passes(cli, home, data):
    code, out, err = cli(*build_args(data))
    assert code == 0, err
    summary = lines(out)
    assert int(summary["docs_kept"]) > 0 and summary["max_doc_date"] <= "2017-06-30T23:59:59Z"
    assert int(summary["tokens_train"]) > 0 and summary["dtype"] == "uint16"
    for extra in ((), ("--deep",)):
        code, out, err = cli("audit", "corpus", "c", *extra)
        assert code == 0, out + err
        assert "audit: pass" in out and ": fail" not in out
    assert "source: pass" in out  # the deep check ran


def test_audit_catches_a_tampered_shard(cli, home, data):
    assert cli(*build_args(data))[0] == 0
    shard = home / "corpus" / "c" / "train" / "shard_00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    code, out, _ = cli("audit", "corpus", "c")
    assert code == 1 and "shard_hashes: fail" in out and "train/shard_00000.bin" in out and "audit: fail" in out


def test_audit_catches_a_post_cutoff_document(cli, home, data, tmp_path):
    src = tmp_path / "src.jsonl"
    write_jsonl(data["records"], src)
    assert cli("corpus", "build", "c", "--source", str(src), "--cutoff", CUTOFF, "--tokenizer", data["tok"],
               "--workers", "1")[0] == 0
    kept = pd.read_parquet(home / "corpus" / "c" / "ids" / "train_00000.parquet")
    victim = kept["id"][0]
    # 1) the source says a kept document was crawled after the cutoff: only a deep audit re-reads it
    recs = [{**r, "date": "2017-07-02T00:00:00Z"} if r["id"] == victim else r for r in data["records"]]
    write_jsonl(recs, src)
    assert cli("audit", "corpus", "c")[0] == 0
    code, out, _ = cli("audit", "corpus", "c", "--deep")
    assert code == 1 and "source: fail" in out and "dropped_after_cutoff=1" in out and victim in out
    # 2) the corpus itself records a post-cutoff document (ids and manifest edited consistently)
    write_jsonl(data["records"], src)
    root = home / "corpus" / "c"
    kept.loc[0, "date"] = "2017-07-01T00:00:01Z"
    kept.to_parquet(root / "ids" / "train_00000.parquet")
    code, out, _ = cli("audit", "corpus", "c")
    assert code == 1 and "dates: fail" in out and "dated after 2017-06-30T23:59:59Z" in out
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["max_doc_date"] = "2017-07-01T00:00:01Z"
    (root / "manifest.json").write_text(json.dumps(manifest))
    code, out, _ = cli("audit", "corpus", "c")
    assert code == 1 and "recorded max document date 2017-07-01T00:00:01Z is after the cutoff" in out


def test_audit_deep_catches_changed_text(cli, home, data, tmp_path):
    src = tmp_path / "src.jsonl"
    write_jsonl(data["records"], src)
    assert cli("corpus", "build", "c", "--source", str(src), "--cutoff", CUTOFF, "--tokenizer", data["tok"])[0] == 0
    victim = pd.read_parquet(home / "corpus" / "c" / "ids" / "train_00000.parquet")["id"][0]
    write_jsonl([{**r, "text": r["text"] + " edited"} if r["id"] == victim else r for r in data["records"]], src)
    code, out, _ = cli("audit", "corpus", "c", "--deep")
    assert code == 1 and "text_changed=1" in out


def test_pit_tokenizer_and_tokenizer_audit(cli, home, data):
    code, out, err = cli("corpus", "tokenizer", "pit600", "--source", data["src"], "--cutoff", CUTOFF,
                         "--vocab-size", "600")
    assert code == 0, err
    s = lines(out)
    assert s["tokenizer"] == "pit:pit600" and s["max_doc_date"] <= "2017-06-30T23:59:59Z"
    from transformers import AutoTokenizer

    path = home / "corpus" / "_tokenizers" / "pit600"
    pit = AutoTokenizer.from_pretrained(str(path))
    assert pit.eos_token == "<|endoftext|>" and pit.pad_token == "<|pad|>" and pit.bos_token == "<|endoftext|>"
    assert json.loads((path / "manifest.json").read_text())["docs"] == int(s["docs"])
    later = AutoTokenizer.from_pretrained(data["tok"])
    assert any("zyx" in t for t in later.get_vocab()) and not any("zyx" in t for t in pit.get_vocab())
    # the later tokenizer's entries for the new word are absent from the PIT corpus but frequent later
    code, out, err = cli("audit", "tokenizer", data["tok"], "--pit-source", data["src"], "--cutoff", CUTOFF,
                         "--later-source", data["src"], "--min-count", "3")
    assert code == 0, err
    assert int(lines(out)["absent_in_pit_frequent_later"]) >= 1 and "later_only:" in out and "zyx" in out
    code, out, _ = cli("audit", "tokenizer", "pit:pit600", "--pit-source", data["src"], "--cutoff", CUTOFF,
                       "--later-source", data["src"])
    assert code == 0 and "zyx" not in out
    # a corpus built with the PIT tokenizer
    code, out, err = cli(*build_args(data, "p", "--tokenizer", "pit:pit600"))
    assert code == 0, err
    assert lines(out)["vocab_sha256"] == lines(cli("corpus", "tokenizer", "pit600", "--source", data["src"],
                                                   "--cutoff", CUTOFF, "--vocab-size", "600", "--overwrite")[1])["vocab_sha256"]


def _corrupt(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"this is not parquet")
    return str(bad)


@pytest.mark.parametrize("case, expect", [
    (lambda d, t: ("--dumps", "CC-MAIN-2017-99"), "unknown dump name 'CC-MAIN-2017-99'"),
    (lambda d, t: ("--cutoff", "2010-01-01"), "cutoff 2010-01-01 is earlier than all data"),
    (lambda d, t: ("--lang", "fr"), "nothing left after filtering"),
    (lambda d, t: ("--source", _corrupt(t)), "cannot read"),
    (lambda d, t: ("--tokenizer", "pit:nope"), "no PIT tokenizer 'nope'"),
    (lambda d, t: ("--tokenizer", str(t / "missing-dir")), "does not exist"),
    (lambda d, t: ("--target-tokens", "10M"), "less than --target-tokens"),
    (lambda d, t: ("--cutoff", "2017-02-30"), "bad cutoff"),
    (lambda d, t: ("--source", str(t / "nothing-here")), "is not a file, directory"),
])
def test_bad_inputs_give_one_line_and_leave_nothing(cli, home, data, tmp_path, case, expect):
    args = list(build_args(data))
    extra = case(data, tmp_path)
    flag = extra[0]
    if flag in args:
        i = args.index(flag)
        args[i + 1] = extra[1]
    else:
        args += extra
    code, out, err = cli(*args)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err  # logs may precede it
    assert expect in errors[0]
    corpus = home / "corpus"
    assert not corpus.is_dir() or not [p for p in corpus.iterdir() if p.name != "_tokenizers"]


def test_missing_required_flag(cli, home, data):
    code, _, err = cli("corpus", "build", "c", "--cutoff", CUTOFF, "--tokenizer", data["tok"])
    assert code == 2 and err.strip().splitlines()[-1] == "error: --source is required (see --help)"


def test_bench_corpus_prints_throughput(cli, home):
    code, out, err = cli("bench", "corpus", "--docs", "300", "--workers", "2", "--vocab-size", "400")
    assert code == 0, err
    s = lines(out)
    assert float(s["tokens_per_second_1"]) > 0 and float(s["tokens_per_second_N"]) > 0 and float(s["speedup"]) > 0
    assert s["workers_N"] == "2" and s["identical"] == "true" and float(s["control_speedup_before"]) > 0


def _dump_files(records, root):
    """The world's layout: one ROOT/<DUMP>.parquet per dump."""
    for dump in sorted({r["dump"] for r in records}):
        write_parquet([r for r in records if r["dump"] == dump], root / f"{dump}.parquet")
    return str(root)


@pytest.mark.parametrize("dumps", ["CC-MAIN-2023-06", "CC-MAIN-2017-22,CC-MAIN-2023-06"])
def test_dump_not_in_source_gives_one_line(cli, home, data, tmp_path, dumps):
    src = _dump_files(data["records"], tmp_path / "w")
    have = sorted({r["dump"] for r in data["records"]})
    assert "CC-MAIN-2017-22" in have and "CC-MAIN-2023-06" not in have
    code, out, err = cli("corpus", "build", "c", "--source", src, "--cutoff", CUTOFF, "--tokenizer", data["tok"],
                         "--dumps", dumps)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert "dump CC-MAIN-2023-06 is not in source" in errors[0] and have[0] in errors[0] and have[-1] in errors[0]
    assert "Traceback" not in err
    corpus = home / "corpus"
    assert not corpus.is_dir() or not list(corpus.iterdir())


def test_bench_corpus_executors_compare_shards_and_project(cli, home):
    pytest.importorskip("datatrove")
    code, out, err = cli("bench", "corpus", "--docs", "200", "--workers", "2", "--vocab-size", "300",
                         "--executor", "mp,local", "--project-tokens", "100B", "--project-cores-per-node", "64",
                         "--project-hours", "1000")
    assert code == 0, err
    s = lines(out)
    assert s["executors"] == "mp,local" and s["identical"] == "true"
    assert s["identical_mp"] == s["identical_local"] == "true"
    for ex in ("mp", "local"):
        for n in (1, 2):
            rate = int(s["tokens"]) / float(s[f"seconds_{ex}_w{n}"])
            assert int(s[f"tokens_per_second_{ex}_w{n}"]) == pytest.approx(rate, rel=1e-3)
        assert float(s[f"parallel_efficiency_{ex}"]) == pytest.approx(float(s[f"speedup_{ex}"]) / 2, abs=1e-3)
    assert s["tokens_per_second_1"] == s["tokens_per_second_mp_w1"]  # the unsuffixed keys stay mp's
    assert s["projection_executor"] == "local" and s["projection_tokens"] == "100000000000"
    assert s["projection_tokens_per_second_per_core"] == s["tokens_per_second_local_w1"]
    serial, wall = float(s["projection_serial_hours"]), float(s["projection_wall_hours"])
    assert int(s["projection_nodes"]) >= 1 and serial <= wall <= 1000
    assert s["projection_note"].startswith("a projection, not a measurement")


def test_bench_projection_by_hand():
    from pitlm.corpus.bench import Projection, project

    # 1M tokens measured in 10 s at 1 worker, 1 s of it the serial select; efficiency 0.5 at N workers.
    # 1B tokens: serial 1,000 s; parallel 1,000 x 9 / 0.5 = 18,000 core-s; 1 h on 4-core nodes leaves 2,600 s
    p = project(Projection(1e9, 4, 1.0), 10**6, 10.0, 1.0, 0.5)
    assert p["projection_nodes"] == 2 and p["projection_core_hours"] == 5.0
    assert p["projection_wall_hours"] == round((1000 + 18000 / 8) / 3600, 2)
    assert project(Projection("1B", 4, 1.0), 10**6, 10.0, 1.0, 1.7)["projection_parallel_efficiency"] == 1.0
    assert project(Projection(1e9, 4, 0.2), 10**6, 10.0, 1.0, 0.5)["projection_nodes"] == "unreachable"


@pytest.mark.parametrize("args, expect", [
    (("--executor", "mp,slurm"), "--executor slurm cannot be benchmarked here"),
    (("--executor", "mp,spark"), "expected a comma-separated list of mp, local, ray"),
    (("--project-hours", "0"), "projection needs --project-tokens > 0"),
    (("--project-tokens", "lots"), "bad token count 'lots'"),
    (("--workers", "1"), "--workers >= 2"),
])
def test_bench_corpus_bad_input_is_one_line(cli, home, args, expect):
    code, out, err = cli("bench", "corpus", "--docs", "50", *args)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: ") and expect in err, err
    assert "Traceback" not in err and out == ""
