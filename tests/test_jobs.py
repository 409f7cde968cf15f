"""Batch jobs: the shared pieces (metrics capture, redaction, launch lines) and the local backend end-to-end."""

import json

import pytest
import yaml
from test_jobs_fakes import job_record, summary

from pitlm.errors import PitlmError
from pitlm.jobs.core import begin_marker, command_stage, exit_marker, launch_line, parse_metrics
from pitlm.secrets import Redactor


def test_parse_metrics_reads_only_the_command_summary():
    log = "\n".join([
        "Cloning into '/workspace/pitlm'...", "remote: Enumerating objects: 5", "note: setup noise",
        begin_marker("job-eval-x"),
        "[11/24/26 01:03:11] INFO     fitting ridge: 40 folds", "  continued: line", "WARNING: Upper: ignored",
        "r2_leakage_off: -0.0123", "peak_vram_mb: 74012", "converged: true", "model: qwen3.5",
        "r2_leakage_off: -0.02", "bad_value: nan", "error: something broke", "pitlm_exit_code: 3", ""])
    m = parse_metrics(log)
    assert m == {"r2_leakage_off": -0.02, "peak_vram_mb": 74012, "converged": True, "model": "qwen3.5",
                 "bad_value": None, "error": "something broke"}
    assert exit_marker(log) == 3 and exit_marker("no marker") is None


def test_redactor_hides_env_secrets_and_assignments(monkeypatch):
    monkeypatch.setenv("KAGGLE_KEY", "kg-0123456789abcdef")
    monkeypatch.setenv("SOME_SETTING", "not-a-secret-value")
    r = Redactor(["explicit-secret-1"])
    text = r.text("key kg-0123456789abcdef, HF_TOKEN=hf_abc 'x' MAX_TOKENS=100 explicit-secret-1 not-a-secret-value")
    assert "kg-0123456789abcdef" not in text and "hf_abc" not in text and "explicit-secret-1" not in text
    assert "HF_TOKEN=***" in text and "MAX_TOKENS=100" in text and "not-a-secret-value" in text
    assert r.obj({"a": ["kg-0123456789abcdef"], "n": 3}) == {"a": ["***"], "n": 3}


def test_command_stage_skips_root_options():
    assert command_stage(["--home", "/x", "-v", "train", "--recipe", "demo"]) == "train"
    with pytest.raises(PitlmError, match="after `--`"):
        command_stage(["--verbose"])


def test_launch_lines():
    assert launch_line(["eval", "--recipe", "demo"], gpus=8) == "python -m pitlm.cli eval --recipe demo"
    assert launch_line(["train"], gpus=1) == "python -m pitlm.cli train"
    four = launch_line(["train", "--recipe", "full-qwen35-35b-fsdp2"], gpus=4)
    assert four == 'GPUS=4\ntorchrun --standalone --nproc-per-node "$GPUS" -m pitlm.cli train --recipe full-qwen35-35b-fsdp2'
    auto = launch_line(["train"], gpus="auto")
    assert "nvidia-smi -L" in auto and 'torchrun --standalone --nproc-per-node "$GPUS" -m pitlm.cli train' in auto
    multi = launch_line(["train", "--set", "a=b c"], gpus=8, nodes=2)
    assert 'srun --ntasks-per-node=1 torchrun --nnodes "$SLURM_NNODES" --nproc-per-node "$GPUS"' in multi
    assert multi.endswith("-m pitlm.cli train --set 'a=b c'")


def test_local_runs_a_real_command_end_to_end(cli, home):
    code, out, err = cli("submit", "--backend", "local", "--", "doctor")
    assert code == 0, err
    s = summary(out)
    assert s["job_backend"] == "local" and s["job_state"] == "succeeded" and s["job_exit_code"] == "0"
    assert s["doctor_failed"] == "0"  # the command's own summary line, passed through
    rec = job_record(home, s["job_id"])
    assert rec["backend"] == "local" and rec["state"] == "succeeded" and rec["status"] == "ok"
    assert rec["exit_code"] == 0 and rec["metrics"]["doctor_failed"] == 0 and rec["metrics"]["doctor_checks"] > 5
    assert rec["command"] == ["doctor"] and int(rec["native_id"]) > 0 and rec["wall_seconds"] is not None
    log = (home / "runs" / s["job_id"] / "job.log").read_text()
    assert "pitlm doctor" in log and "pitlm_exit_code: 0" in log and f"pitlm_home: {home}" in log
    code, out, _ = cli("runs")
    assert s["job_id"] in out and "backend=local state=succeeded exit_code=0" in out and "doctor_failed=0" in out


def test_a_secret_in_the_command_stays_out_of_the_child_stages_run_directory(cli, home):
    """The submitted stage (here a train that fails on its missing corpus after its run directory exists) writes
    config.yaml, summary.json and log.txt in its own process: a secret from the job's --env is redacted there
    too, not only in job.json / job.log."""
    secret = "hf_sEcReT_0123456789"
    code, out, err = cli("submit", "-b", "local", "--env", f"HF_TOKEN={secret}", "--", "train", "--recipe",
                         "demo-scratch-pit", "--name", "leaky", "--set", f"tokenizer={secret}",
                         "--set", "corpus=no-such-corpus")
    assert code == 2, err
    child = [d for d in (home / "runs").iterdir() if d.name.startswith("train-")]
    assert len(child) == 1
    files = {f.name: f.read_text() for f in child[0].iterdir() if f.is_file()}
    assert {"config.yaml", "summary.json", "log.txt"} <= set(files)
    assert yaml.safe_load(files["config.yaml"])["tokenizer"] == "***"
    assert json.loads(files["summary.json"])["status"] == "failed"
    for name, text in files.items():
        assert secret not in text, name
    for f in (home / "runs").rglob("*"):
        assert not f.is_file() or secret not in f.read_text(errors="replace"), f


def test_local_failure_mirrors_exit_status(cli, home):
    code, out, err = cli("submit", "-b", "local", "runs", "show", "no-such-run")  # no `--` needed either
    s = summary(out)
    assert code == 2 and s["job_state"] == "failed" and s["job_exit_code"] == "2"
    rec = job_record(home, s["job_id"])
    assert rec["state"] == "failed" and rec["status"] == "failed" and rec["exit_code"] == 2
    assert "no run matching 'no-such-run'" in rec["error"] and "error" not in rec["metrics"]


def test_local_async_then_wait_list_show(cli, home):
    code, out, err = cli("submit", "-b", "local", "--async", "--", "doctor")
    assert code == 0, err
    s = summary(out)
    assert s["job_state"] == "running"  # returned at once: no exit status, no metrics yet
    assert "job_exit_code" not in s and not job_record(home, s["job_id"])["metrics"]
    code, out, err = cli("jobs", "wait", s["job_id"][:20], "--poll-interval", "0.1", "--timeout", "60")
    assert code == 0, err
    header, row = out.splitlines()[:2]
    assert header.split()[:4] == ["job", "backend", "state", "exit"] and "doctor_failed" in header
    assert row.split()[:4] == [s["job_id"], "local", "succeeded", "0"]
    assert "jobs_succeeded: 1" in out and "jobs_failed: 0" in out
    code, out, _ = cli("jobs", "list")
    assert code == 0 and s["job_id"] in out and "succeeded" in out and "pitlm doctor" in out
    code, out, _ = cli("jobs", "show", s["job_id"], "--tail", "3")
    assert code == 0 and "state: succeeded" in out and "pitlm_exit_code: 0" in out


def test_wait_times_out_with_124(cli, home):
    code, out, _ = cli("submit", "-b", "local", "--timeout", "0", "--", "runs")  # one poll, right after the start
    assert code == 124 and summary(out)["job_state"] == "running"
    code, out, _ = cli("jobs", "wait", summary(out)["job_id"], "--poll-interval", "0.1")  # resumes, finishes
    assert code == 0 and "jobs_succeeded: 1" in out


def test_refusals_are_one_line_errors(cli, home):
    code, _, err = cli("submit", "-b", "local")
    assert code == 2 and err.startswith("error: no pitlm command given")
    code, _, err = cli("submit", "-b", "pbs", "--", "doctor")
    assert code == 2 and "unknown backend 'pbs'" in err
    code, _, err = cli("submit", "-b", "local", "--volume", "/x", "--", "doctor")
    assert code == 2 and "--volume is for the vessl and slurm backends" in err
    assert not list((home / "runs").glob("job-*"))  # refused before anything was written
    code, _, err = cli("jobs", "wait", "job-nope")
    assert code == 2 and "no job matching" in err
