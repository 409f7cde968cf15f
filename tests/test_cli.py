import os
import subprocess
import sys

import typer.main

from pitlm.cli import app


def _all_command_paths(cmd, prefix=()):
    yield prefix
    if hasattr(cmd, "commands"):
        for name, sub in cmd.commands.items():
            yield from _all_command_paths(sub, prefix + (name,))


def test_help_renders_for_every_command(cli):
    paths = list(_all_command_paths(typer.main.get_command(app)))
    assert ("doctor",) in paths and ("runs",) in paths and ("runs", "show") in paths
    for path in paths:
        code, out, err = cli(*path, "--help")
        assert code == 0, (path, err)
        assert "Usage" in out, path


def test_console_script_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "pitlm.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "doctor" in proc.stdout


def test_a_torchrun_worker_leaves_without_finalization_and_keeps_its_output_and_exit_code(tmp_path):
    """Under torchrun, once torch.distributed is imported, main() ends with os._exit: block-buffered stdout must
    still arrive, and an error's exit code and line must survive."""
    code = ("import os, sys, torch.distributed; from pitlm.cli import main; sys.argv = ['pitlm'] + sys.argv[1:]; "
            "main(); print('unreachable')")
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "t", "PITLM_HOME": str(tmp_path)}
    ok = subprocess.run([sys.executable, "-c", code, "runs"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "no runs under" in ok.stdout.lower() and "unreachable" not in ok.stdout
    bad = subprocess.run([sys.executable, "-c", code, "runs", "show", "nope"], capture_output=True, text=True,
                         env=env)
    assert bad.returncode != 0 and bad.stderr.strip().startswith("error:"), bad.stderr
    assert "unreachable" not in bad.stdout


def test_doctor_runs_on_cpu(cli, home):
    code, out, err = cli("doctor")
    assert code == 0, err
    assert "doctor_failed: 0" in out
    for name in ("torch", "transformers", "PITLM_HOME", "persistence", "kaggle credentials", "vesslctl"):
        assert name in out
    assert str(home) in out


def test_doctor_never_prints_kaggle_key(cli, monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", "s3cr3t-key-value")
    code, out, err = cli("doctor")
    assert "s3cr3t-key-value" not in out + err
    assert "present" in out


def test_runs_lists_and_shows(cli, home):
    from pitlm.runs import start_run
    from pitlm.volume import Volume

    vol = Volume.resolve(home)
    with start_run(vol, "world", {"seed": 3}) as run:
        run.log_metrics(step=1, loss=2.5)
        run.finish({"docs_kept": 12}, print_lines=False)
    code, out, _ = cli("runs")
    assert code == 0 and run.id in out and "ok" in out and "docs_kept=12" in out
    code, out, _ = cli("runs", "show", run.id[:12])
    assert code == 0 and "seed" in out and "metrics.jsonl" in out
    code, _, err = cli("runs", "show", "nope")
    assert code == 2 and err.startswith("error: no run matching")


def test_failed_run_recorded(home):
    import json

    import pytest

    from pitlm.runs import start_run
    from pitlm.volume import Volume

    vol = Volume.resolve(home)
    with pytest.raises(RuntimeError), start_run(vol, "train") as run:
        raise RuntimeError("boom")
    summary = json.loads((run.dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "boom" in summary["error"]
