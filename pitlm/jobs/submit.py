"""Submitting and waiting: `submit_job` validates, creates `runs/<job id>/`, hands the job to its backend and
saves job.json; `wait_jobs` polls backends until every job is terminal (or the timeout passes), then collects each
log, parses the command's `key: value` summary lines into `metrics` and records the exit status.

Apart from pitlm/jobs/core.py because the backends import core (the job record, the script lines, run_tool).
"""

from __future__ import annotations

import calendar
import logging
import sys
import time

from pitlm.errors import PitlmError
from pitlm.jobs.core import (
    BACKENDS,
    UTC_FORMAT,
    Backend,
    Job,
    SubmitOptions,
    command_stage,
    exit_marker,
    parse_metrics,
    utc_now,
)
from pitlm.jobs.local import LocalBackend
from pitlm.jobs.slurm import SlurmBackend
from pitlm.jobs.vessl import VesslBackend
from pitlm.runs import new_run_id
from pitlm.volume import Volume, atomic_write_text

log = logging.getLogger("pitlm.jobs")


def get_backend(name: str) -> Backend:
    if name == "local":
        return LocalBackend()
    if name == "vessl":
        return VesslBackend()
    if name == "slurm":
        return SlurmBackend()
    raise PitlmError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")


def submit_job(vol: Volume, backend_name: str, command: list[str], opts: SubmitOptions) -> tuple[Job, Backend]:
    """Validate (refusals happen before anything is written), create the run directory, submit, save job.json."""
    backend = get_backend(backend_name)
    stage = command_stage(command)
    backend.check(stage, opts, list(command))
    vol.ensure()
    directory = vol.path("runs", new_run_id(f"job-{stage}"))
    directory.mkdir(parents=True)
    job = Job(dir=directory, backend=backend_name, command=list(command))
    try:
        backend.submit(job, opts)
    except BaseException as e:
        job.state, job.error = "failed", job.redactor().text(f"submission failed: {e}")
        job.save()
        raise
    job.history.append([job.submitted_utc, job.state])
    job.save()
    log.info("%s: submitted to %s as %s", job.run_id, backend_name, job.native_id)
    return job, backend


def finish_job(job: Job, backend: Backend) -> None:
    """Collect the log (redacted in place: the job itself may have printed a secret), metrics and exit status."""
    fetched = backend.collect(job)
    text = job.redactor().text(fetched if fetched is not None else job.read_log())
    atomic_write_text(job.log_path, text)
    job.metrics = parse_metrics(text)
    command_error = job.metrics.pop("error", None)  # pitlm's one-line `error: ...`, not a metric
    if command_error is not None and job.error is None:
        job.error = str(command_error)
    marked = exit_marker(text)
    if marked is not None:
        job.exit_code = marked
    elif job.exit_code is None:
        job.exit_code = 0 if job.state == "succeeded" else None
    job.finished_utc = utc_now()
    job.wall_seconds = float(calendar.timegm(time.strptime(job.finished_utc, UTC_FORMAT))
                             - calendar.timegm(time.strptime(job.submitted_utc, UTC_FORMAT)))
    job.save()


def wait_jobs(jobs: list[Job], timeout: float, poll_interval: float | None = None, follow: bool = False,
              backends: dict[str, Backend] | None = None) -> list[Job]:
    """Poll until every job is terminal or `timeout` seconds pass; returns the jobs still not terminal.
    State changes are logged and saved; a terminal job's log and metrics are collected once."""
    backends = dict(backends or {})
    for job in jobs:
        backends.setdefault(job.backend, get_backend(job.backend))
    for job in jobs:  # remote logs can lag the job's state: fetch again when the exit marker never arrived
        if job.terminal and not backends[job.backend].log_is_local and exit_marker(job.read_log()) is None:
            finish_job(job, backends[job.backend])
    interval = poll_interval if poll_interval is not None else min(b.default_poll_s for b in backends.values())
    offsets = {job.run_id: 0 for job in jobs}
    deadline = time.monotonic() + timeout
    while True:
        pending = []
        for job in (j for j in jobs if not j.terminal):
            backend = backends[job.backend]
            state, native = backend.poll(job)
            if (state, native) != (job.state, job.native_state):
                log.info("%s: %s%s", job.run_id, state, f" ({native})" if native and native != state else "")
                if state != job.state:
                    job.history.append([utc_now(), state])
                job.state, job.native_state = state, native
                job.save()
            if follow and backend.log_is_local:
                offsets[job.run_id] = _stream_new(job, offsets[job.run_id])
            if job.terminal:
                finish_job(job, backend)
            else:
                pending.append(job)
        if not pending or time.monotonic() >= deadline:
            return pending
        time.sleep(max(0.0, min(interval, deadline - time.monotonic())))


def _stream_new(job: Job, offset: int) -> int:
    """Echo what the job appended to its log since `offset` to stderr (redacted)."""
    try:
        with open(job.log_path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:
        return offset
    if chunk:
        sys.stderr.write(job.redactor().text(chunk.decode(errors="replace")))
        sys.stderr.flush()
    return offset + len(chunk)
