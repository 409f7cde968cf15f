"""The Slurm backend: writes runs/<job id>/job.sbatch (nodes, GPUs, time, partition, the volume path as PITLM_HOME,
a torchrun launch line for multi-GPU training), submits it with `sbatch --parsable`, follows it with `squeue` and,
once it has left the queue, `sacct` (state and exit code). Slurm writes the log straight into the run directory,
so the run directory must be on a filesystem the compute nodes share (the usual home/project filesystem).

`pitlm submit --backend slurm -- corpus build NAME ... --executor slurm` submits a driver: one CPU, no GPU, that
runs the build's reduce steps and submits each parallel stage as a datatrove array from inside the job (sbatch
passes the driver's environment on, PITLM_HOME and PATH included; the arrays' partition defaults to the driver's,
$SLURM_JOB_PARTITION). The driver must outlive the arrays: if its --time runs out first, the same command resumes.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from pitlm.config import load_recipe, parse_override
from pitlm.errors import ConfigError, PitlmError
from pitlm.jobs.core import Job, SubmitOptions, command_lines, command_stage, exit_marker, forward_env, run_tool
from pitlm.secrets import is_secret_name

SBATCH_SCRIPT = """\
#!/bin/bash
#SBATCH --job-name={name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
{gres}{cpus}#SBATCH --time={time}
{partition}#SBATCH --output={log}
#SBATCH --export=ALL
# pitlm job {run_id}: pitlm {command}
# Credentials (KAGGLE_KEY, ...) reach the job through --export=ALL from the submitting shell, never via this file.
set -uo pipefail
export PITLM_HOME={home}
export PYTHONUNBUFFERED=1
export PATH={bindir}:"$PATH"
mkdir -p "$PITLM_HOME"
cd {cwd}
"""
SLURM_STATES = {
    "PENDING": "pending", "CONFIGURING": "pending", "REQUEUED": "pending", "REQUEUE_HOLD": "pending",
    "RUNNING": "running", "COMPLETING": "running", "SUSPENDED": "running", "STOPPED": "running",
    "RESIZING": "running", "SIGNALING": "running", "STAGE_OUT": "running",
    "COMPLETED": "succeeded", "CANCELLED": "cancelled", "TIMEOUT": "timeout",
    "FAILED": "failed", "NODE_FAIL": "failed", "BOOT_FAIL": "failed", "OUT_OF_MEMORY": "failed",
    "DEADLINE": "failed", "PREEMPTED": "failed", "REVOKED": "failed", "SPECIAL_EXIT": "failed",
}
LOST_AFTER_POLLS = 3  # out of squeue, no sacct record, no exit marker: gone


def map_state(raw: str) -> str:
    return SLURM_STATES.get(raw.split()[0].rstrip("+").upper(), "unknown") if raw.strip() else "unknown"


def corpus_build_executor(command: list[str]) -> str | None:
    """The executor a `pitlm corpus build` command will run on, read as load_config reads it (recipe, then
    --executor, then --set executor=...); None for any other command. A recipe that cannot be read here counts as
    unset (the job itself reports it)."""
    stage = command_stage(command)
    i = next(i for i, a in enumerate(command) if a == stage and (i == 0 or command[i - 1] != "--home"))
    if stage != "corpus" or command[i + 1:i + 2] != ["build"]:
        return None
    recipe = flag = setting = None
    args = iter(command[i + 2:])
    for a in args:
        name, eq, value = a.partition("=")
        if name not in ("--recipe", "-r", "--executor", "--set"):
            continue
        value = value if eq else next(args, "")
        if name == "--executor":
            flag = value
        elif name == "--set" and value.split("=", 1)[0].strip() == "executor":
            setting = parse_override(value)[1]
        elif name != "--set":
            recipe = value
    from_recipe = None
    if recipe:
        try:
            from_recipe = load_recipe(recipe).get("executor")
        except ConfigError:
            pass
    return str(next((v for v in (setting, flag, from_recipe) if v not in (None, "")), "mp"))


def sbatch_script(job: Job, opts: SubmitOptions, home: str) -> str:
    python = opts.python or sys.executable
    q = shlex.quote
    driver = corpus_build_executor(job.command) == "slurm"  # waits on the arrays: one core is plenty
    header = SBATCH_SCRIPT.format(
        name=f"pitlm-{job.run_id}", nodes=opts.nodes, time=opts.time_limit, log=q(str(job.log_path)),
        gres=f"#SBATCH --gres=gpu:{opts.gpus}\n" if opts.gpus else "",
        cpus="#SBATCH --cpus-per-task=1\n" if driver else "",
        partition=f"#SBATCH --partition={opts.partition}\n" if opts.partition else "",
        run_id=job.run_id, command=shlex.join(job.command), home=q(home), bindir=q(str(Path(python).parent)),
        cwd=q(os.getcwd()))
    return header + command_lines(job.run_id, job.command, python=q(python), gpus=opts.gpus, nodes=opts.nodes)


class SlurmBackend:
    name = "slurm"
    default_poll_s = 15.0
    log_is_local = True

    def __init__(self) -> None:
        self._misses: dict[str, int] = {}

    def check(self, stage: str, opts: SubmitOptions, command: list[str]) -> None:
        if opts.nodes < 1 or (opts.gpus is not None and opts.gpus < 0):
            raise PitlmError("--nodes must be >= 1 and --gpus >= 0")
        if (opts.nodes > 1 or opts.gpus) and corpus_build_executor(command) == "slurm":
            raise PitlmError("`corpus build --executor slurm` runs as a one-CPU driver that submits the stages' "
                             "arrays and waits: drop --nodes/--gpus (the arrays' size is --tasks, their options "
                             "--slurm-arg)")

    def submit(self, job: Job, opts: SubmitOptions) -> None:
        home = opts.volume or str(job.dir.parents[1])  # default: this PITLM_HOME (a shared filesystem)
        script = job.dir / "job.sbatch"
        job.write_file(script.name, sbatch_script(job, opts, home))
        env = forward_env(opts.env)  # sbatch exports its environment (--export=ALL); nothing secret is written
        job.secrets = [v for k, v in env.items() if is_secret_name(k)]
        job.env_forwarded = sorted(env)
        argv = ["sbatch", "--parsable", *opts.sbatch_args, str(script)]
        job.submit_argv = argv
        job.options = {"nodes": opts.nodes, "gpus": opts.gpus, "time": opts.time_limit, "partition": opts.partition,
                       "volume": home, "python": opts.python or sys.executable}
        proc = run_tool(argv, "run this on a Slurm login node", env={**os.environ, **env})
        if proc.returncode != 0:
            raise PitlmError(f"sbatch failed (exit {proc.returncode}): {job.redactor().text(proc.stderr.strip()[-500:])}")
        job_id, _, cluster = proc.stdout.strip().splitlines()[-1].partition(";")
        job.native_id, job.state = job_id.strip(), "pending"
        if cluster:
            job.options["cluster"] = cluster.strip()

    def _cluster(self, job: Job) -> list[str]:
        return ["-M", job.options["cluster"]] if job.options.get("cluster") else []

    def poll(self, job: Job) -> tuple[str, str | None]:
        jid = job.native_id or ""
        q = run_tool(["squeue", "-h", "-j", jid, "-o", "%T", *self._cluster(job)], "is this a Slurm host?")
        raw = q.stdout.split()[0] if q.returncode == 0 and q.stdout.strip() else None
        if raw and map_state(raw) not in ("succeeded", "failed", "cancelled", "timeout", "unknown"):
            self._misses[job.run_id] = 0
            return map_state(raw), raw
        # Out of the queue (or finishing): accounting has the final state and exit code.
        a = run_tool(["sacct", "-j", jid, "-X", "-n", "-P", "-o", "State,ExitCode", *self._cluster(job)],
                     "is this a Slurm host?")
        lines = [ln for ln in a.stdout.splitlines() if ln.strip()] if a.returncode == 0 else []
        if lines:
            state_text, _, code = lines[0].partition("|")
            if code.split(":")[0].strip().isdigit():
                job.exit_code = int(code.split(":")[0])
            return map_state(state_text), state_text.split()[0] if state_text.strip() else None
        if raw:
            return map_state(raw), raw
        marked = exit_marker(job.read_log())  # no accounting on this cluster: the log's own marker
        if marked is not None:
            return ("succeeded" if marked == 0 else "failed"), f"exit {marked}"
        self._misses[job.run_id] = self._misses.get(job.run_id, 0) + 1
        if self._misses[job.run_id] >= LOST_AFTER_POLLS:
            job.error = f"job {jid} left the queue with no sacct record and no exit status in its log"
            return "failed", "lost"
        return "unknown", None

    def collect(self, job: Job) -> None:
        """Slurm wrote the log into the run directory already."""

    def cancel_hint(self, job: Job) -> str:
        return f"scancel {job.native_id}"

