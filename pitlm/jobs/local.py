"""The local backend: the command runs here as a subprocess (`python -m pitlm.cli ...`) on the same PITLM_HOME,
its stdout and stderr going to runs/<job id>/job.log.

The subprocess is `sh -c` around the command so that the log ends with `pitlm_exit_code: N`; that marker is how a
later `pitlm jobs wait` (another process, which cannot reap the child) learns the exit status of an --async job.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from pitlm.errors import PitlmError
from pitlm.jobs.core import Job, SubmitOptions, command_lines, exit_marker
from pitlm.secrets import is_secret_name


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not running
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


class LocalBackend:
    name = "local"
    default_poll_s = 0.5
    log_is_local = True

    def __init__(self) -> None:
        self._procs: dict[str, subprocess.Popen] = {}

    def check(self, stage: str, opts: SubmitOptions, command: list[str]) -> None:
        if opts.volume:
            raise PitlmError("--volume is for the vessl and slurm backends; a local job uses this PITLM_HOME "
                             "(set it with --home or PITLM_HOME)")

    def submit(self, job: Job, opts: SubmitOptions) -> None:
        python = shlex.quote(sys.executable)
        env = {**os.environ, "PITLM_HOME": str(job.dir.parents[1]), "PYTHONUNBUFFERED": "1",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.update(_explicit_env(opts))
        job.secrets = [v for k, v in _explicit_env(opts).items() if is_secret_name(k)]  # --env HF_TOKEN=...
        script = command_lines(job.run_id, job.command, python=python, gpus=opts.gpus)
        job.write_file("job.sh", script)
        with open(job.log_path, "ab") as logf:
            # --async: a new session, so the job outlives this shell; otherwise Ctrl-C reaches it too.
            proc = subprocess.Popen(["sh", "-c", script], stdout=logf, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=opts.detach)
        self._procs[job.run_id] = proc
        job.submit_argv = ["sh", "-c", "$(cat job.sh)"]
        job.native_id, job.state = str(proc.pid), "running"
        job.options = {"python": sys.executable, "gpus": opts.gpus, "async": opts.detach}

    def poll(self, job: Job) -> tuple[str, str | None]:
        proc = self._procs.get(job.run_id)
        if proc is not None:
            code = proc.poll()
            if code is None:
                return "running", None
            job.exit_code = code
            return ("succeeded" if code == 0 else "failed"), f"exit {code}"
        code = exit_marker(job.read_log())
        if code is not None:
            return ("succeeded" if code == 0 else "failed"), f"exit {code}"
        if job.native_id and _pid_alive(int(job.native_id)):
            return "running", None
        job.error = "the process ended without recording an exit status (killed?)"
        return "failed", "vanished"

    def collect(self, job: Job) -> None:
        """The log is in the run directory already."""

    def cancel_hint(self, job: Job) -> str:
        return f"kill {job.native_id}"


def _explicit_env(opts: SubmitOptions) -> dict[str, str]:
    """Only `--env NAME=VALUE` matters locally: the subprocess inherits this shell's environment anyway."""
    return dict(item.split("=", 1) for item in opts.env if "=" in item)
