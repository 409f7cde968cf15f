"""Corpus builds on datatrove's executors: `--executor local|slurm|ray` (`--executor mp`, the default, is the
plain multiprocessing pool of pitlm.corpus.workers).

The build is the same sequence of stages whatever runs them (pitlm.corpus.build):

    scan      datatrove tasks   read FineWeb-schema records (local parquet/JSONL, or a hub dump), apply pitlm's
                                cutoff rule with its drop reasons, write each unit's priority index (seeded hash
                                of the id, val flag, n_chars) and its counts                  -> scan/u*.parquet
    select    this process      reduce: every unit's index sorted by priority, repeated ids dropped
    tokenize  datatrove tasks   tokenize the documents of a priority prefix, one token file per job -> tok/*.bin
    cut       this process      reduce: the budget cut (per period); more rounds when it is not met yet
    pack      datatrove tasks   lay the kept documents end to end into the final shards       -> out/*/shard_*.bin
    publish   this process      manifest, index.json, one rename onto corpus/NAME/

Each parallel stage is one datatrove pipeline of one step, `RunJobs`, whose `run(data, rank, world_size)` runs the
rank's share of the stage's pitlm jobs (scan_unit, tokenize_job, pack_shard). A job's output is named after its
inputs and written atomically with a completion marker, so which task ran it, and how many tasks there were,
cannot change a byte: the corpus equals the multiprocessing build's for any executor and any --tasks. datatrove's
own completion markers (`completions/<rank>`) let a rerun skip finished tasks; pitlm's per-job markers skip the
finished jobs of a task that was killed half-way.

Each stage lives in `corpus/.NAME.build/datatrove/<nn>_<job kind>-<hash of its jobs>-t<tasks>/`: `jobs/` (the
pickled jobs of each rank: a task reads only its own), `logs/` (datatrove's logging_dir: completions, stats, task
logs, the Slurm launch script and logs), `errors/` (a user error met by a task, one line per rank).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import multiprocess
from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
from datatrove.executor.ray import RayPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from loguru import logger

from pitlm.corpus.scan import ScanJob, staged_path
from pitlm.corpus.workers import PackJob, TokenizeJob, init_worker
from pitlm.errors import PitlmError
from pitlm.log import progress_task

log = logging.getLogger("pitlm.corpus")

SLURM_POLL_ENV = "PITLM_SLURM_POLL_S"  # seconds between squeue polls while a stage's array runs (default 15)


class BuildInterrupted(PitlmError):
    """A stage ended with tasks unfinished (killed, preempted, out of time): the build directory is kept and the
    same command resumes it."""

    exit_code = 1
    resumable = True


def done_path(job) -> Path:
    """The job's completion marker (written last by the job function)."""
    if isinstance(job, ScanJob):
        return job.stats_path
    if isinstance(job, TokenizeJob):
        return job.meta_path
    assert isinstance(job, PackJob), type(job)
    return job.done_path


def _job_weight(job) -> int:
    if isinstance(job, ScanJob):
        return os.path.getsize(job.unit.path) if job.unit.kind != "hub" else 1
    if isinstance(job, TokenizeJob):
        return len(job.rows)
    return sum(hi - lo for _, _, _, lo, hi in job.pieces)


def assign_ranks(jobs: list, tasks: int) -> list[list]:
    """Jobs per rank, heaviest first to the least loaded rank (greedy); each rank keeps the stage's order."""
    load, ranks = [0] * tasks, [[] for _ in range(tasks)]
    weights = [_job_weight(j) for j in jobs]
    for i in sorted(range(len(jobs)), key=lambda i: (-weights[i], i)):
        r = min(range(tasks), key=lambda r: (load[r], r))
        load[r] += weights[i]
        ranks[r].append(i)
    return [[jobs[i] for i in sorted(idx)] for idx in ranks]


# ----------------------------------------------------------------------------- the one pipeline step

class RunJobs(PipelineStep):
    """Run this rank's share of one stage's pitlm jobs. A user error (a bad input file) is written to
    errors/r<rank>.txt for the driver to report as one line, then re-raised so that the task fails."""

    name = "pitlm jobs"
    type = "PITLM"

    def __init__(self, fn: Callable, stage_dir: str, tokenizer_path: str | None):
        super().__init__()
        self.fn, self.stage_dir, self.tokenizer_path = fn, stage_dir, tokenizer_path

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        stage = Path(self.stage_dir)
        jobs = pickle.loads((stage / "jobs" / f"r{rank:05d}.pkl").read_bytes())
        init_worker(Path(self.tokenizer_path).read_text() if self.tokenizer_path else None)
        for job in jobs:
            try:
                with self.track_time(unit="job"):
                    self.fn(job)
            except PitlmError as e:
                with staged_path(stage / "errors" / f"r{rank:05d}.txt") as tmp:
                    tmp.write_text(str(e))
                raise
            self.stat_update("jobs", unit="task")
        yield from data or ()


# ----------------------------------------------------------------------------- executors

def quiet_datatrove() -> None:
    """datatrove logs every task at INFO on stderr; keep its warnings there (the task logs keep everything)."""
    logger.remove()
    logger.add(sys.stderr, level="WARNING")


class _Quiet:
    """Each task's console output cut to errors (datatrove sends only errors to stderr for local_rank > 0); its
    log file under logs/ still has everything."""

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        try:
            return super()._run_for_rank(rank, local_rank + 1, node_rank)
        finally:
            quiet_datatrove()


class LocalExecutor(_Quiet, LocalPipelineExecutor):
    pass


class SlurmExecutor(_Quiet, SlurmPipelineExecutor):
    def get_sbatch_args(self, max_array: int = 1) -> dict:
        # no --partition line when none is given: the cluster's default partition
        return {k: v for k, v in super().get_sbatch_args(max_array).items() if v is not None}


class RayExecutor(_Quiet, RayPipelineExecutor):  # ray itself is imported by run()
    pass


EXECUTOR_CLASSES = {"local": LocalExecutor, "slurm": SlurmExecutor, "ray": RayExecutor}


class DatatrovePool:
    """The WorkerPool interface (`run(fn, jobs)` yields fn's results) over datatrove executors: each call is one
    stage, run to completion by `tasks` datatrove tasks before the results are read back from the jobs' markers."""

    def __init__(self, cfg, tokenizer_json: str | None, root: Path):
        self.kind, self.cfg, self.root = cfg.executor, cfg, Path(root)
        self.tasks = cfg.tasks or cfg.workers
        self.tokenizer_json = tokenizer_json
        if self.kind == "ray" and importlib.util.find_spec("ray") is None:
            raise PitlmError("--executor ray needs ray: pip install 'pitlm[distributed]'")
        self._stage, self._ray_started = 0, False

    def __enter__(self) -> DatatrovePool:
        self.root.mkdir(parents=True, exist_ok=True)
        self.tokenizer_path = None
        if self.tokenizer_json:
            self.tokenizer_path = self.root / "tokenizer.json"
            with staged_path(self.tokenizer_path) as tmp:
                tmp.write_text(self.tokenizer_json)
        init_worker(self.tokenizer_json)  # reading the results back may call a job function here
        quiet_datatrove()
        if self.kind == "local":
            # datatrove's local tasks fork from a forkserver (threads here, such as progress bars, stay here);
            # preload pitlm rather than re-import __main__, which may be any script that calls build_corpus
            multiprocess.set_forkserver_preload(["pitlm.corpus.executors"])
        if self.kind == "ray":
            self._init_ray()
        return self

    def __exit__(self, *exc) -> None:
        if self._ray_started:
            import ray  # noqa: PLC0415 - optional dependency ray

            ray.shutdown()

    def _init_ray(self) -> None:
        import ray  # noqa: PLC0415 - optional dependency ray

        if ray.is_initialized():
            return
        address = self.cfg.ray_address or os.environ.get("RAY_ADDRESS")
        kwargs = {"address": address} if address else {"num_cpus": self.cfg.workers, "include_dashboard": False,
                                                       "object_store_memory": 200 * 2**20}
        if address:  # the tasks import pitlm and write into the build directory on the volume
            log.warning("ray cluster %s: every node needs pitlm installed and %s mounted at the same path", address,
                        self.root.parent.parent)
        ray.init(log_to_driver=False, logging_level=logging.WARNING, **kwargs)
        self._ray_started = True

    def run(self, fn: Callable, jobs: Iterable) -> Iterator:
        jobs = list(jobs)
        self._stage += 1
        if jobs:
            self._run_stage(fn, jobs)
        for job in jobs:  # every job is finished: this reads its stored result
            yield fn(job)

    def _run_stage(self, fn: Callable, jobs: list) -> None:
        tasks = max(1, min(self.tasks, len(jobs)))
        digest = hashlib.sha1(repr(jobs).encode()).hexdigest()[:10]
        stage = self.root / f"{self._stage:02d}_{fn.__name__}-{digest}-t{tasks}"
        for r, share in enumerate(assign_ranks(jobs, tasks)):
            path = stage / "jobs" / f"r{r:05d}.pkl"
            if not path.is_file():
                with staged_path(path) as tmp:
                    tmp.write_bytes(pickle.dumps(share))
        shutil.rmtree(stage / "errors", ignore_errors=True)
        step = RunJobs(fn, str(stage), str(self.tokenizer_path) if self.tokenizer_path else None)
        logs = stage / "logs"
        label = fn.__name__.split("_")[0]
        with progress_task(f"{label} ({self.kind}, {tasks} tasks)", total=tasks, unit="task") as advance:
            if self.kind == "slurm":
                self._run_slurm(step, tasks, logs, advance)
            else:
                with _follow_completions(logs, advance):
                    self._executor(step, tasks, logs).run()
        self._check(stage, fn, jobs, tasks)

    def _executor(self, step, tasks: int, logs: Path):
        if self.kind == "local":
            return LocalExecutor(pipeline=[step], tasks=tasks, workers=min(self.cfg.workers, tasks),
                                 logging_dir=str(logs))
        logger.remove()  # datatrove warns on every stage that the logging dir must be shared (said once, above)
        try:
            return RayExecutor(pipeline=[step], tasks=tasks, workers=-1, logging_dir=str(logs), cpus_per_task=1,
                               mem_per_cpu_gb=1)
        finally:
            quiet_datatrove()

    def _run_slurm(self, step, tasks: int, logs: Path, advance: Callable[[int], None]) -> None:
        cfg = self.cfg
        sbatch = dict(a.split("=", 1) if "=" in a else (a, "") for a in (s.lstrip("-") for s in cfg.slurm_args or []))
        bindir = Path(sys.executable).parent
        ex = SlurmExecutor(
            pipeline=[step], tasks=tasks, time=cfg.slurm_time, partition=cfg.slurm_partition
            or os.environ.get("SLURM_JOB_PARTITION"), cpus_per_task=1, mem_per_cpu_gb=2,
            job_name=f"pitlm-corpus-{cfg.name}", qos=None, logging_dir=str(logs), sbatch_args=sbatch,
            env_command=f'export PATH="{bindir}:$PATH"', with_srun=False)
        try:
            ex.run()  # submits the array (and datatrove's stats merge after it) and returns
        except FileNotFoundError:
            raise PitlmError("--executor slurm needs `sbatch` on PATH: run this on a Slurm login node, or inside "
                             "`pitlm submit --backend slurm`") from None
        except subprocess.CalledProcessError as e:
            raise PitlmError(f"sbatch failed (exit {e.returncode}): {(e.output or b'').decode()[-300:]}") from None
        if ex.job_id in (None, -1):  # every task was already complete
            return
        poll = float(os.environ.get(SLURM_POLL_ENV) or 15)
        seen = 0
        while True:
            done = _count_completions(logs)
            if done > seen:
                advance(done - seen)
                seen = done
            if done >= tasks or not _in_queue(ex.job_id):
                return
            time.sleep(poll)

    def _check(self, stage: Path, fn: Callable, jobs: list, tasks: int) -> None:
        errors = sorted((stage / "errors").glob("r*.txt")) if (stage / "errors").is_dir() else []
        if errors:
            raise PitlmError(errors[0].read_text().strip())
        missing = [j for j in jobs if not done_path(j).is_file()]
        if missing:
            unfinished = tasks - _count_completions(stage / "logs")
            raise BuildInterrupted(f"{fn.__name__}: {unfinished} of {tasks} {self.kind} tasks did not finish "
                                   f"({len(missing)} of {len(jobs)} jobs missing; task logs in {stage / 'logs'}); "
                                   f"run the same command again to resume")


def _count_completions(logs: Path) -> int:
    d = logs / "completions"
    return len(os.listdir(d)) if d.is_dir() else 0


@contextlib.contextmanager
def _follow_completions(logs: Path, advance: Callable[[int], None], every: float = 0.5):
    """Advance the stage's progress bar as datatrove marks tasks complete (the executor's run() blocks)."""
    stop = threading.Event()
    seen = [_count_completions(logs)]
    advance(seen[0])

    def follow() -> None:
        while not stop.wait(every):
            n = _count_completions(logs)
            if n > seen[0]:
                advance(n - seen[0])
                seen[0] = n

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        n = _count_completions(logs)
        if n > seen[0]:
            advance(n - seen[0])


def _in_queue(job_id: str) -> bool:
    """Whether any task of the Slurm array is still pending or running."""
    try:
        q = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return True  # cannot tell: keep waiting on the completion markers
    return q.returncode == 0 and bool(q.stdout.strip())
