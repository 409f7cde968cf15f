"""What every backend shares: the job record (job.json), the script lines that run a pitlm command and mark its
exit status in the log, secret redaction, metric capture, and running a backend's CLI. Submitting and the polling
loop (`submit_job`, `wait_jobs`) are in pitlm/jobs/submit.py, which imports the backends.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shlex
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pitlm.errors import PitlmError
from pitlm.secrets import Redactor
from pitlm.volume import Volume, atomic_write_json, atomic_write_text

log = logging.getLogger("pitlm.jobs")

BACKENDS = ("local", "vessl", "slurm")
# Stages that write to the volume: on a remote machine without the volume mounted their outputs are lost.
WRITING_STAGES = frozenset({"world", "market", "corpus", "train", "merge", "eval", "calibrate", "demo"})
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled", "timeout"})
# Forwarded to remote jobs when set (never printed: values are redacted everywhere pitlm writes).
DEFAULT_FORWARD_ENV = ("KAGGLE_USERNAME", "KAGGLE_KEY")
EXIT_KEY = "pitlm_exit_code"
JOB_FILE, LOG_FILE = "job.json", "job.log"


# ----------------------------------------------------------------------------- the command

def command_stage(args: list[str]) -> str:
    """The pitlm subcommand in `args` (skipping the root options --home X, --verbose, --require-persistent)."""
    it = iter(args)
    for a in it:
        if a == "--home":
            next(it, None)
        elif not a.startswith("-"):
            return a
    raise PitlmError("no pitlm command given; put it after `--`, e.g. `pitlm submit --backend local -- doctor`")


def begin_marker(run_id: str) -> str:
    return f"=== pitlm job {run_id}: begin ==="


def launch_line(args: list[str], python: str = "python", gpus: int | str | None = None, nodes: int = 1) -> str:
    """Shell that runs `pitlm <args>`. Multi-GPU training goes through torchrun (one process per GPU); `gpus="auto"`
    counts the GPUs at run time; several nodes rendezvous through srun + torchrun's c10d backend."""
    cli = shlex.join(args)
    single = f"{python} -m pitlm.cli {cli}"
    if command_stage(args) != "train" or gpus is None:
        return single
    if gpus == "auto":
        return (f'GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)\n'
                f'if [ "$GPUS" -gt 1 ]; then\n'
                f'  torchrun --standalone --nproc-per-node "$GPUS" -m pitlm.cli {cli}\n'
                f'else\n  {single}\nfi')
    if nodes > 1:
        return (f'GPUS={int(gpus)}\n'
                f'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n'
                f'srun --ntasks-per-node=1 torchrun --nnodes "$SLURM_NNODES" --nproc-per-node "$GPUS" '
                f'--rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:29500" -m pitlm.cli {cli}')
    if int(gpus) <= 1:
        return single
    return f'GPUS={int(gpus)}\ntorchrun --standalone --nproc-per-node "$GPUS" -m pitlm.cli {cli}'


def command_lines(run_id: str, args: list[str], python: str = "python", gpus: int | str | None = None,
                  nodes: int = 1) -> str:
    """The tail of every job script: mark where the command's output starts, run it, and end the log with
    `pitlm_exit_code: N` so the exit status survives backends that only report succeeded/failed."""
    return "\n".join([f'echo "{begin_marker(run_id)}"', launch_line(args, python, gpus, nodes), "rc=$?",
                      f'echo "{EXIT_KEY}: $rc"', 'exit "$rc"', ""])


# ----------------------------------------------------------------------------- secrets (pitlm/secrets.py)

def forward_env(names: list[str]) -> dict[str, str]:
    """`--env NAME` (taken from this shell when set) or `--env NAME=VALUE`, plus KAGGLE_* when set."""
    out: dict[str, str] = {k: os.environ[k] for k in DEFAULT_FORWARD_ENV if os.environ.get(k)}
    for item in names:
        name, sep, value = item.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise PitlmError(f"--env {name!r}: not a variable name; use --env NAME or --env NAME=VALUE")
        if sep:
            out[name] = value
        elif os.environ.get(name):
            out[name] = os.environ[name]
        else:
            log.warning("--env %s: not set in this shell; not forwarded", name)
    return out


# ----------------------------------------------------------------------------- metrics in a log

_BEGIN_RE = re.compile(r"^=== pitlm job \S+: begin ===$", re.M)
_SUMMARY_RE = re.compile(r"^([a-z][a-z0-9_]*): (.*?)\s*$")
_EXIT_RE = re.compile(rf"^{EXIT_KEY}: (-?\d+)\s*$", re.M)


def parse_value(text: str) -> Any:
    if text in ("true", "false"):
        return text == "true"
    for cast in (int, float):
        try:
            v = cast(text)
        except ValueError:
            continue
        return None if isinstance(v, float) and not math.isfinite(v) else v
    return text


def parse_metrics(log_text: str) -> dict[str, Any]:
    """The command's `key: value` summary lines (lower-case snake_case keys, last value wins), read after the
    job's begin marker so that setup output (git, pip) is never mistaken for a metric."""
    begins = list(_BEGIN_RE.finditer(log_text))
    body = log_text[begins[-1].end():] if begins else log_text
    metrics: dict[str, Any] = {}
    for line in body.splitlines():
        m = _SUMMARY_RE.match(line)
        if m and m.group(1) != EXIT_KEY:
            metrics[m.group(1)] = parse_value(m.group(2))
    return metrics


def exit_marker(log_text: str) -> int | None:
    found = _EXIT_RE.findall(log_text)
    return int(found[-1]) if found else None


# ----------------------------------------------------------------------------- the record

UTC_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def utc_now() -> str:
    return time.strftime(UTC_FORMAT, time.gmtime())


@dataclass
class Job:
    """One submitted command; serialised as runs/<run_id>/job.json (see README: "Batch jobs")."""

    dir: Path
    backend: str
    command: list[str]
    state: str = "submitted"  # submitted | pending | running | succeeded | failed | cancelled | timeout | unknown
    native_id: str | None = None  # pid (local), job slug (vessl), job id (slurm)
    native_state: str | None = None
    exit_code: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    submitted_utc: str = field(default_factory=utc_now)
    finished_utc: str | None = None
    wall_seconds: float | None = None
    error: str | None = None
    submit_argv: list[str] | None = None
    env_forwarded: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    history: list[list[str]] = field(default_factory=list)  # [utc, state] at each state change: queue vs run time
    secrets: list[str] = field(default_factory=list, repr=False)  # never saved; extra values to redact

    @property
    def run_id(self) -> str:
        return self.dir.name

    @property
    def log_path(self) -> Path:
        return self.dir / LOG_FILE

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def status(self) -> str:
        """ok / failed / running, the vocabulary of `pitlm runs`."""
        if not self.terminal:
            return "running"
        return "ok" if self.state == "succeeded" else "failed"

    def result_code(self) -> int:
        """The process exit status that mirrors the job: its command's own code, never 0 unless it succeeded."""
        code = self.exit_code if self.exit_code is not None else (0 if self.state == "succeeded" else 1)
        return 1 if code == 0 and self.state != "succeeded" else code

    def redactor(self) -> Redactor:
        return Redactor(self.secrets)

    def save(self) -> Path:
        record = asdict(self)
        for key in ("dir", "secrets"):
            record.pop(key)
        record.update(run_id=self.run_id, status=self.status, command_stage=command_stage(self.command),
                      log=LOG_FILE)
        return atomic_write_json(self.dir / JOB_FILE, self.redactor().obj(record))

    def write_file(self, name: str, text: str) -> Path:
        return atomic_write_text(self.dir / name, self.redactor().text(text))

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @classmethod
    def load(cls, directory: Path) -> Job:
        try:
            data = json.loads((directory / JOB_FILE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PitlmError(f"cannot read {directory / JOB_FILE} ({e})") from e
        known = {f for f in cls.__dataclass_fields__ if f not in ("dir", "secrets")}
        return cls(dir=directory, **{k: v for k, v in data.items() if k in known})


def find_job(vol: Volume, prefix: str) -> Job:
    """A job by run id or unique prefix."""
    root = vol.path("runs")
    matches = sorted(p for p in root.glob(f"{prefix}*") if (p / JOB_FILE).is_file()) if root.is_dir() else []
    exact = [m for m in matches if m.name == prefix]
    if not matches:
        raise PitlmError(f"no job matching '{prefix}' under {root}; see `pitlm jobs list`")
    if len(matches) > 1 and not exact:
        raise PitlmError(f"'{prefix}' matches {len(matches)} jobs; give more of the id")
    return Job.load((exact or matches)[0])


# ----------------------------------------------------------------------------- backends and the loop

@dataclass
class SubmitOptions:
    """Everything `pitlm submit` takes; each backend reads the fields it needs."""

    name: str | None = None
    detach: bool = False
    poll_interval: float | None = None
    env: list[str] = field(default_factory=list)
    gpus: int | None = None
    # vessl
    image: str | None = None
    resource_spec: str | None = None
    volume: str | None = None
    mount_path: str = "/root/.cache/pitlm"
    allow_ephemeral: bool = False
    repo_dir: str | None = None
    repo_url: str | None = None
    commit: str | None = None
    allow_dirty: bool = False
    allow_unpushed: bool = False
    extras: str = "jobs"
    # slurm
    nodes: int = 1
    time_limit: str = "24:00:00"
    partition: str | None = None
    python: str | None = None
    sbatch_args: list[str] = field(default_factory=list)


class Backend(Protocol):
    name: str
    default_poll_s: float
    log_is_local: bool  # the job writes job.log itself (local, Slurm on a shared filesystem)

    def check(self, stage: str, opts: SubmitOptions, command: list[str]) -> None: ...
    def submit(self, job: Job, opts: SubmitOptions) -> None: ...
    def poll(self, job: Job) -> tuple[str, str | None]: ...
    def collect(self, job: Job) -> str | None: ...  # the log text when fetched remotely, else None
    def cancel_hint(self, job: Job) -> str: ...


def run_tool(argv: list[str], what: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run an external CLI (vesslctl, sbatch, ...) capturing text output; a missing tool is a one-line error."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env)
    except FileNotFoundError as e:
        raise PitlmError(f"{argv[0]} not found on PATH; {what}") from e
