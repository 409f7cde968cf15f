"""`pitlm submit` and `pitlm jobs list|show|wait`."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from pitlm.cliutil import volume

log = logging.getLogger("pitlm.jobs")

jobs_app = typer.Typer(help="Batch jobs submitted with `pitlm submit`: list, show, wait.", no_args_is_help=True)

TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Stop waiting after this many seconds (the job keeps running; exit 124).")]
PollOpt = Annotated[float | None, typer.Option("--poll-interval", help="Seconds between polls (default: local 0.5, slurm 15, vessl 30).")]
DEFAULT_TIMEOUT = 48 * 3600.0


def submit(
    ctx: typer.Context,
    command: Annotated[list[str] | None, typer.Argument(help="The pitlm command to run, after `--`.", show_default=False)] = None,
    backend: Annotated[str, typer.Option("--backend", "-b", help="local | vessl | slurm")] = "local",
    detach: Annotated[bool, typer.Option("--async", help="Return once submitted; follow with `pitlm jobs wait ID`.")] = False,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT,
    poll_interval: PollOpt = None,
    name: Annotated[str | None, typer.Option(help="Job name prefix on the cluster (vessl).")] = None,
    env: Annotated[list[str] | None, typer.Option("--env", help="Forward NAME (from this shell) or NAME=VALUE; KAGGLE_USERNAME/KAGGLE_KEY go when set. Secret values are redacted everywhere.")] = None,
    gpus: Annotated[int | None, typer.Option(help="GPUs (per node); training with >1 launches torchrun. vessl default: count them in the container.")] = None,
    volume_: Annotated[str | None, typer.Option("--volume", envvar="PITLM_JOB_VOLUME", help="vessl: object volume slug (objvol-..., or SLUG:/mount/path); slurm: the PITLM_HOME path on the cluster.")] = None,
    image: Annotated[str | None, typer.Option(envvar="PITLM_VESSL_IMAGE", help="vessl: container image.")] = None,
    resource_spec: Annotated[str | None, typer.Option(envvar="PITLM_VESSL_RESOURCE_SPEC", help="vessl: resource spec slug (`vesslctl resource-spec list`).")] = None,
    mount_path: Annotated[str, typer.Option(help="vessl: where the volume is mounted, the container's PITLM_HOME.")] = "/root/.cache/pitlm",
    allow_ephemeral: Annotated[bool, typer.Option(help="vessl: run a writing stage without a volume (its outputs are lost).")] = False,
    repo_dir: Annotated[str | None, typer.Option(help="vessl: git checkout to submit (default: the one pitlm runs from).")] = None,
    repo_url: Annotated[str | None, typer.Option(help="vessl: URL the container clones (default: origin of the checkout).")] = None,
    commit: Annotated[str | None, typer.Option(help="vessl: commit to install (default: HEAD).")] = None,
    allow_dirty: Annotated[bool, typer.Option(help="vessl: submit HEAD although tracked files have uncommitted changes.")] = False,
    allow_unpushed: Annotated[bool, typer.Option(help="vessl: submit a commit that is on no remote branch.")] = False,
    extras: Annotated[str, typer.Option(help="vessl: pip extras installed with pitlm in the container, e.g. 'jobs,gpu'.")] = "jobs",
    nodes: Annotated[int, typer.Option(help="slurm: nodes.")] = 1,
    time_limit: Annotated[str, typer.Option("--time", help="slurm: time limit (sbatch --time).")] = "24:00:00",
    partition: Annotated[str | None, typer.Option(help="slurm: partition.")] = None,
    python: Annotated[str | None, typer.Option(help="slurm: python on the compute nodes (default: this one).")] = None,
    sbatch_arg: Annotated[list[str] | None, typer.Option("--sbatch-arg", help="slurm: extra sbatch option, e.g. --sbatch-arg=--account=abc (repeatable).")] = None,
) -> None:
    """Run a pitlm command as a batch job: `pitlm submit --backend local|vessl|slurm [options] -- <command ...>`.

    Records runs/<job id>/job.json and job.log; prints `job_*` lines and the command's `key: value` metrics.
    Exits with the command's exit status (124 when --timeout passes first; the job keeps running)."""
    from pitlm.jobs.core import SubmitOptions
    from pitlm.jobs.submit import submit_job, wait_jobs
    from pitlm.log import emit_summary

    opts = SubmitOptions(
        name=name, detach=detach, poll_interval=poll_interval, env=env or [], gpus=gpus,
        image=image, resource_spec=resource_spec, volume=volume_, mount_path=mount_path,
        allow_ephemeral=allow_ephemeral, repo_dir=repo_dir, repo_url=repo_url, commit=commit,
        allow_dirty=allow_dirty, allow_unpushed=allow_unpushed, extras=extras, nodes=nodes, time_limit=time_limit,
        partition=partition, python=python, sbatch_args=sbatch_arg or [])
    job, runner = submit_job(volume(ctx), backend, list(command or []), opts)
    emit_summary({"job_id": job.run_id, "job_backend": job.backend, "job_native_id": job.native_id})
    if detach:
        emit_summary({"job_state": job.state})
        return
    if wait_jobs([job], timeout, poll_interval, follow=True, backends={backend: runner}):
        log.warning("%s still %s after %.0fs; it keeps running: `pitlm jobs wait %s` resumes waiting, `%s` stops it",
                    job.run_id, job.state, timeout, job.run_id, runner.cancel_hint(job))
        emit_summary({"job_state": job.state})
        raise typer.Exit(124)
    emit_summary({"job_state": job.state, "job_exit_code": job.result_code(), **job.metrics})
    if job.state != "succeeded":
        log.error("%s %s (exit %s); log: %s", job.run_id, job.state, job.result_code(), job.log_path)
    raise typer.Exit(job.result_code())


@jobs_app.command("list")
def jobs_list(ctx: typer.Context,
              limit: Annotated[int, typer.Option(help="Show at most this many jobs.")] = 30) -> None:
    """Submitted jobs, newest first: backend, state, cluster id, exit code, command."""
    import shlex

    from pitlm.runs import list_runs

    rows = [r for r in list_runs(volume(ctx)) if "backend" in r][:limit]
    if not rows:
        print(f"no jobs under {volume(ctx).path('runs')}")
    for r in rows:
        code = "-" if r.get("exit_code") is None else r["exit_code"]
        print(f"{r['run_id']:<44} {r['backend']:<6} {r.get('state', '?'):<10} {str(r.get('native_id')):<14} "
              f"exit={code} pitlm {shlex.join(r.get('command', []))}")


@jobs_app.command("show")
def jobs_show(ctx: typer.Context,
              job_id: Annotated[str, typer.Argument(help="Job id (prefix ok).")],
              tail: Annotated[int, typer.Option(help="Lines of the log to show.")] = 20) -> None:
    """One job's record (job.json) and the end of its log."""
    import json

    from pitlm.jobs.core import JOB_FILE, find_job

    job = find_job(volume(ctx), job_id)
    for k, v in json.loads((job.dir / JOB_FILE).read_text()).items():
        print(f"{k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    lines = job.read_log().splitlines()
    print(f"--- {job.log_path} (last {min(tail, len(lines))} of {len(lines)} lines)")
    print("\n".join(lines[-tail:]) if tail > 0 else "")


@jobs_app.command("wait")
def jobs_wait(ctx: typer.Context,
              job_ids: Annotated[list[str], typer.Argument(help="Job ids (prefixes ok).")],
              timeout: TimeoutOpt = DEFAULT_TIMEOUT,
              poll_interval: PollOpt = None,
              metric: Annotated[list[str] | None, typer.Option("--metric", help="Metric column to show (repeatable; default: the headline metrics present).")] = None) -> None:
    """Wait for jobs to finish, then tabulate their headline metrics (like the seed's wait-jobs.sh).

    Exits 0 when every job succeeded, 124 when some are still running at --timeout, else 1."""
    from pitlm.jobs.core import find_job
    from pitlm.jobs.submit import wait_jobs
    from pitlm.log import emit_summary

    vol = volume(ctx)
    jobs = [find_job(vol, i) for i in dict.fromkeys(job_ids)]
    pending = wait_jobs(jobs, timeout, poll_interval)
    print(format_table(jobs, metric))
    failed = [j for j in jobs if j.terminal and j.state != "succeeded"]
    for job in failed:  # the end of a failed job's log, as wait-jobs.sh does
        tail = "\n".join(job.read_log().splitlines()[-40:])
        print(f"--- {job.run_id} ({job.state}, exit {job.result_code()}): last lines of {job.log_path}\n{tail}",
              file=sys.stderr)
    emit_summary({"jobs_total": len(jobs), "jobs_succeeded": sum(j.state == "succeeded" for j in jobs),
                  "jobs_failed": len(failed), "jobs_unfinished": len(pending)})
    raise typer.Exit(124 if pending else (1 if failed else 0))


def format_table(jobs, metric_keys: list[str] | None = None) -> str:
    """A plain aligned table: job, backend, state, exit and metric columns ('-' where a job lacks one)."""
    from pitlm.log import format_value
    from pitlm.runs import HEADLINE_METRICS

    if not metric_keys:
        present = [k for k in HEADLINE_METRICS if any(k in j.metrics for j in jobs)]
        metric_keys = present or list(dict.fromkeys(k for j in jobs for k in j.metrics))[:4]
    rows = [["job", "backend", "state", "exit", *metric_keys]]
    for j in jobs:
        rows.append([j.run_id, j.backend, j.state, "-" if j.exit_code is None else str(j.exit_code),
                     *(format_value(j.metrics[k]) if k in j.metrics else "-" for k in metric_keys)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    # Options end at the command: `pitlm submit -b local doctor --help` passes --help to doctor.
    app.command("submit", context_settings={"allow_interspersed_args": False})(submit)
    app.add_typer(jobs_app, name="jobs")
