"""`pitlm corpus build --executor local|slurm|ray`: datatrove's executors give the multiprocessing build's bytes.

Slurm runs against a fake `sbatch`/`squeue`/`sacct`/`scontrol` on PATH that records every array it is given and
runs its tasks here (each a real `launch_pickled_pipeline` process, as on a cluster)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

import pytest

from pitlm.corpus.build import build_corpus
from pitlm.corpus.config import CorpusConfig
from pitlm.corpus.fake import fake_records, write_jsonl, write_parquet
from pitlm.corpus.tokenizer import train_bpe
from pitlm.errors import PitlmError
from pitlm.volume import Volume

pytest.importorskip("datatrove")

CUTOFFS = "2016-12-31,2017-06-30"
VOLATILE = {"created_utc", "host", "wall_seconds", "build", "versions"}

# One script for sbatch, squeue, sacct and scontrol. sbatch copies the script (datatrove deletes its temp file),
# records it in $FAKE_DIR/arrays.jsonl and starts a detached runner that waits for --dependency jobs, then runs
# every array task at once (SLURM_ARRAY_TASK_ID, output to the #SBATCH --output path with %A/%a filled in).
# $FAKE_SLURM_KILL=PATTERN:TASK:SECONDS SIGKILLs that task of the first array whose script contains PATTERN,
# SECONDS after it started. Scripts running datatrove's merge_stats are recorded but not run. A job runs with
# SLURM_JOB_PARTITION set from its #SBATCH --partition (else "default"), as Slurm does; each submission records
# the submitter's SLURM_JOB_ID, SLURM_JOB_PARTITION and PITLM_HOME (what --export=ALL hands the job).
FAKE_SLURM = f"#!{sys.executable}\n" + r'''
import json, os, re, signal, subprocess, sys, time
from pathlib import Path

d = Path(os.environ["FAKE_DIR"]); d.mkdir(parents=True, exist_ok=True)
tool, args = Path(sys.argv[0]).name, sys.argv[1:]

def done(jid):
    return (d / f"{jid}.rc").exists()

if tool == "sbatch" and args[0] == "--run":
    job = json.loads((d / f"{args[1]}.json").read_text())
    for dep in job["deps"]:
        while not done(dep):
            time.sleep(0.05)
    text = Path(job["script"]).read_text()
    out = re.search(r"^#SBATCH --output=(.+)$", text, re.M).group(1).strip("'")
    lo, hi = job["array"] or (0, 0)
    kill = os.environ.get("FAKE_SLURM_KILL", "").split(":") if job["kill"] else None
    procs = []
    for i in range(lo, hi + 1):
        env = {**os.environ, "SLURM_JOB_ID": job["id"], "SLURM_ARRAY_JOB_ID": job["id"], "SLURM_NODELIST": "localhost",
               "SLURM_JOB_PARTITION": job["partition"], "RUN_OFFSET": job["offset"],
               **({"SLURM_ARRAY_TASK_ID": str(i)} if job["array"] else {})}
        log = open(out.replace("%A", job["id"]).replace("%a", str(i)), "ab")
        procs.append((i, subprocess.Popen(["bash", job["script"]], env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)))
    t0 = time.time()
    while any(p.poll() is None for _, p in procs):
        for i, p in procs:
            if kill and i == int(kill[1]) and time.time() - t0 > float(kill[2]) and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                kill = None
        time.sleep(0.05)
    (d / f"{job['id']}.rc").write_text(str(max(abs(p.returncode) for _, p in procs)))
elif tool == "sbatch":
    script = Path(args[-1]).read_text()
    n = len(list(d.glob("*.json")))
    jid = str(2001 + n)
    copy = d / f"{jid}.sh"
    copy.write_text(script)
    m = re.search(r"^#SBATCH --array=(\d+)-(\d+)", script, re.M)
    export = next((a for a in args if a.startswith("--export=")), "")
    deps = ",".join([a.split("=", 1)[1] for a in args if a.startswith("--dependency=")]
                    + re.findall(r"^#SBATCH --dependency=(\S+)$", script, re.M))
    pattern = os.environ.get("FAKE_SLURM_KILL", "").split(":")[0]
    kill = bool(pattern) and pattern in script and not (d / "killed").exists()
    if kill:
        (d / "killed").write_text(jid)
    job = {"id": jid, "script": str(copy), "args": args, "array": [int(m[1]), int(m[2])] if m else None,
           "deps": [x.split(":")[1] for x in deps.split(",") if x], "kill": kill,
           "offset": re.search(r"RUN_OFFSET=(\d+)", export)[1] if "RUN_OFFSET" in export else "0",
           "partition": (re.findall(r"^#SBATCH --partition=(\S+)$", script, re.M) or ["default"])[-1]}
    (d / f"{jid}.json").write_text(json.dumps(job))
    submitter = {k: os.environ.get(k) for k in ("SLURM_JOB_ID", "SLURM_JOB_PARTITION", "PITLM_HOME")}
    with open(d / "arrays.jsonl", "a") as f:
        f.write(json.dumps({k: job[k] for k in ("id", "args", "array")} | {"script": script, "env": submitter}) + "\n")
    if "merge_stats" in script:
        (d / f"{jid}.rc").write_text("0")
    else:
        subprocess.Popen([sys.executable, sys.argv[0], "--run", jid], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"{jid}" if "--parsable" in args else f"Submitted batch job {jid}")
elif tool == "squeue":
    jid = args[args.index("-j") + 1]
    if not done(jid):
        print("RUNNING")
elif tool == "sacct":
    jid = args[args.index("-j") + 1]
    if done(jid):
        rc = int((d / f"{jid}.rc").read_text())
        print(f"{'COMPLETED' if rc == 0 else 'FAILED'}|{rc}:0")
elif tool == "scontrol" and args[:2] == ["show", "hostnames"]:
    print("localhost")
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """800 FineWeb-schema documents (2016-2018) in 3 files (parquet + JSONL) and a 400-token BPE."""
    root = tmp_path_factory.mktemp("dt-data")
    records = fake_records(800, seed=11, words=(20, 120))
    write_parquet(records[:300], root / "src" / "a.parquet", row_group_size=64)
    write_parquet(records[300:550], root / "src" / "b.parquet", row_group_size=64)
    write_jsonl(records[550:], root / "src" / "c.jsonl")
    train_bpe([r["text"] for r in records[:200]], 400).save_pretrained(str(root / "tok"))
    return {"src": str(root / "src"), "tok": str(root / "tok")}


def cfg_for(data, **kw) -> CorpusConfig:
    base = dict(name="c", source=data["src"], cutoffs=CUTOFFS, tokenizer=data["tok"], shard_tokens=3000,
                val_fraction=0.1, target_tokens="6k", workers=1)
    return CorpusConfig(**{**base, **kw})


def corpus_files(root: Path) -> dict[str, str]:
    """sha256 of every file of a built corpus but the manifest (compared without its volatile keys)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def build(data, home: Path, **kw) -> tuple[dict, dict]:
    m = build_corpus(cfg_for(data, **kw), Volume(home).ensure())
    return corpus_files(home / "corpus" / "c"), {k: v for k, v in m.items() if k not in VOLATILE}


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    return build(data, tmp_path_factory.mktemp("mp"), executor="mp")


def test_local_executor_one_and_n_tasks_give_the_mp_bytes(data, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("PITLM_NO_PROGRESS", "1")
    files, manifest = reference
    assert any(f.startswith("periods/002_") for f in files)  # nested: one scan, every cutoff's slice
    for tasks, workers in ((1, 1), (3, 2)):
        home = tmp_path / f"t{tasks}"
        assert build(data, home, executor="local", tasks=tasks, workers=workers) == (files, manifest)
        assert not (home / "corpus" / ".c.build").exists()
        m = json.loads((home / "corpus" / "c" / "manifest.json").read_text())
        assert {k: m["build"][k] for k in ("workers", "executor", "tasks")} == {"workers": workers, "executor": "local",
                                                                              "tasks": tasks}


def test_ray_executor_gives_the_mp_bytes(data, reference, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.setenv("PITLM_NO_PROGRESS", "1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert build(data, tmp_path, executor="ray", tasks=2, workers=2) == reference


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    bin_dir, state = tmp_path / "fakebin", tmp_path / "fakeslurm"
    bin_dir.mkdir()
    for tool in ("sbatch", "squeue", "sacct", "scontrol"):
        (bin_dir / tool).write_text(FAKE_SLURM)
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DIR", str(state))
    monkeypatch.setenv("PITLM_SLURM_POLL_S", "0.2")
    monkeypatch.setenv("PITLM_NO_PROGRESS", "1")

    def arrays() -> list[dict]:
        f = state / "arrays.jsonl"
        return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []

    return arrays


def test_slurm_arrays_killed_task_reruns_to_the_same_bytes(data, reference, tmp_path, fake_slurm, monkeypatch):
    """Task 1 of the first tokenize array is SIGKILLed mid-way: the build stops with one line and keeps its work;
    the same build again submits only the unfinished task and ends with the multiprocessing build's bytes."""
    home = tmp_path / "home"
    monkeypatch.setenv("FAKE_SLURM_KILL", "tokenize_job:1:2.5")
    monkeypatch.setenv("PITLM_CORPUS_JOB_DELAY", "1.5")
    with pytest.raises(PitlmError, match=r"tokenize_job: 1 of 2 slurm tasks did not finish.*run the same command"):
        build(data, home, executor="slurm", tasks=2, slurm_partition="cpu", slurm_args=["--account=pit"])
    assert (home / "corpus" / ".c.build").is_dir() and not (home / "corpus" / "c").exists()
    first = fake_slurm()
    pipelines = [a for a in first if "merge_stats" not in a["script"]]
    assert [a["array"] for a in pipelines] == [[0, 1], [0, 1]]  # scan, then the killed tokenize round
    assert all("#SBATCH --partition=cpu" in a["script"] and "#SBATCH --account=pit" in a["script"] for a in pipelines)
    merges = [a for a in first if "merge_stats" in a["script"]]  # datatrove's own stats merge after each array
    assert [re.search(r"--dependency=afterok:(\d+)", a["script"])[1] for a in merges] == [a["id"] for a in pipelines]

    monkeypatch.delenv("FAKE_SLURM_KILL")
    monkeypatch.delenv("PITLM_CORPUS_JOB_DELAY")
    assert build(data, home, executor="slurm", tasks=2) == reference
    again = [a for a in fake_slurm()[len(first):] if "merge_stats" not in a["script"]]
    assert again[0]["array"] == [0, 0]  # scan was complete (not resubmitted); of the round, the killed task only
    assert "launch_pickled_pipeline" in again[0]["script"] and "tokenize_job" in again[0]["script"]
    assert not (home / "corpus" / ".c.build").exists()


def test_bad_input_is_one_line_and_leaves_nothing(data, tmp_path, monkeypatch):
    monkeypatch.setenv("PITLM_NO_PROGRESS", "1")
    src = tmp_path / "src"
    src.mkdir()
    for f in Path(data["src"]).iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    (src / "b.parquet").write_bytes(b"PAR1 not a parquet file")
    home = tmp_path / "home"
    with pytest.raises(PitlmError, match=r"^cannot read .*b\.parquet") as e:
        build(data, home, source=str(src), executor="local", tasks=2, workers=2)
    assert "\n" not in str(e.value)
    assert list((home / "corpus").iterdir()) == [home / "corpus" / ".c.lock"] or not any(
        p.name.startswith(".c.build") or p.name == "c" for p in (home / "corpus").iterdir())


def test_submit_slurm_driver_submits_the_arrays_from_inside_its_job(data, reference, cli, home, tmp_path, fake_slurm):
    """`pitlm submit --backend slurm -- corpus build ... --executor slurm`: the driver job (one CPU, no GPU, the
    volume as PITLM_HOME) submits every stage's array from inside itself, on its own partition, and the corpus on
    the volume has the multiprocessing build's bytes."""
    volume = tmp_path / "shared"
    build_cmd = ["corpus", "build", "c", "--source", data["src"], "--cutoffs", CUTOFFS, "--tokenizer", data["tok"],
                 "--shard-tokens", "3000", "--val-fraction", "0.1", "--target-tokens", "6k", "--workers", "1",
                 "--executor", "slurm", "--tasks", "2"]
    submit = ["submit", "--backend", "slurm", "--poll-interval", "0.2", "--timeout", "180", "--volume", str(volume)]
    code, out, err = cli(*submit, "--gpus", "1", "--", *build_cmd)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: `corpus build --executor slurm` runs as")
    assert fake_slurm() == [] and not list(home.glob("runs/job-*"))  # refused before anything was written or sent

    code, out, err = cli(*submit, "--partition", "cpu", "--", *build_cmd)
    s = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    assert code == 0, err
    assert s["job_state"] == "succeeded" and s["executor"] == "slurm" and s["tasks"] == "2"
    script = (home / "runs" / s["job_id"] / "job.sbatch").read_text().splitlines()
    assert "#SBATCH --cpus-per-task=1" in script and "#SBATCH --partition=cpu" in script
    assert f"export PITLM_HOME={volume}" in script and not any("--gres" in line for line in script)
    driver, *arrays = fake_slurm()
    assert driver["id"] == s["job_native_id"] and driver["array"] is None and driver["env"]["SLURM_JOB_ID"] is None
    pipelines = [a for a in arrays if "merge_stats" not in a["script"]]
    assert [a["array"] for a in pipelines][:1] == [[0, 1]] and len(pipelines) >= 3  # scan, tokenize.., pack
    for a in arrays:  # submitted by the driver job, with the volume, onto its partition
        assert a["env"] == {"SLURM_JOB_ID": driver["id"], "SLURM_JOB_PARTITION": "cpu", "PITLM_HOME": str(volume)}
        assert "#SBATCH --partition=cpu" in a["script"].splitlines()
    files, manifest = reference
    assert corpus_files(volume / "corpus" / "c") == files and not (home / "corpus" / "c").exists()
    m = json.loads((volume / "corpus" / "c" / "manifest.json").read_text())
    assert {k: v for k, v in m.items() if k not in VOLATILE} == manifest
