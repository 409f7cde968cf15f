"""`pitlm bench corpus`: build throughput (tokens/s) at 1 and N workers on a generated corpus, and a check that
every build wrote identical shards. `control_speedup_*` is the speedup a trivial CPU loop gets from N processes at
the same moment: the ceiling the machine allowed (other jobs on shared cores lower it).

`--executor mp,local,ray` repeats the pair of builds on each executor (pitlm.corpus.executors) over the same
documents: `tokens_per_second_<executor>_w<n>` and `parallel_efficiency_<executor>`. Slurm is not benchmarked: it
needs a cluster (tests check its bytes against a fake sbatch). From a datatrove executor's numbers (local when
measured: its tasks are what a Slurm array task runs) the bench projects the nodes and wall time of a large build:
a projection, not a measurement (see `project`).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import multiprocessing as mp
import os
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pitlm.corpus.build import build_corpus
from pitlm.corpus.config import CorpusConfig, parse_token_count
from pitlm.corpus.fake import fake_records, write_fineweb_tree
from pitlm.corpus.tokenizer import load_tokenizer, train_bpe
from pitlm.errors import PitlmError
from pitlm.log import progress_task
from pitlm.volume import Volume

log = logging.getLogger("pitlm.corpus")

BENCH_EXECUTORS = ("mp", "local", "ray")
PROJECTION_FROM = ("local", "ray")  # datatrove executors that span nodes, in order of preference


def _cpu_seconds() -> float:
    self_, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return self_.ru_utime + self_.ru_stime + children.ru_utime + children.ru_stime


def _spin(n: int) -> int:
    s = 0
    for i in range(n):
        s += i * i
    return s


def control_speedup(workers: int, n: int = 5_000_000) -> float:
    """What the machine allows right now: N copies of a pure-Python loop in N processes vs one copy in one
    (N on idle cores; ~1 when other jobs hold the cores)."""
    t0 = time.perf_counter()
    _spin(n)
    t1 = time.perf_counter() - t0
    with mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn").Pool(workers) as pool:
        pool.map(_spin, [1] * workers)  # start the workers before timing
        t0 = time.perf_counter()
        pool.map(_spin, [n] * workers, chunksize=1)
        tn = time.perf_counter() - t0
    return round(workers * t1 / tn, 3)


def parse_executors(text: str | None) -> list[str]:
    """'mp,local,ray' -> ['mp', 'local', 'ray'] (order kept, repeats dropped); slurm and unknown names refused."""
    names = list(dict.fromkeys(s.strip() for s in (text or "mp").split(",") if s.strip()))
    if "slurm" in names:
        raise PitlmError("--executor slurm cannot be benchmarked here (it needs a Slurm cluster); use "
                         f"{','.join(BENCH_EXECUTORS)}, and `pitlm corpus build --executor slurm` on the cluster")
    bad = [n for n in names if n not in BENCH_EXECUTORS]
    if bad or not names:
        raise PitlmError(f"--executor {text!r}: expected a comma-separated list of {', '.join(BENCH_EXECUTORS)}")
    if "ray" in names:
        if importlib.util.find_spec("ray") is None:
            raise PitlmError("--executor ray needs ray: pip install 'pitlm[distributed]'")
    return names


@dataclass
class Projection:
    """A build of `tokens` tokens on nodes of `cores_per_node` cores that should take at most `hours`."""

    tokens: float | str = 100e9  # also 100B, 2.5T, ...
    cores_per_node: int = 64
    hours: float = 24.0

    def __post_init__(self):
        if isinstance(self.tokens, str):
            try:
                self.tokens = float(self.tokens)
            except ValueError:
                self.tokens = float(parse_token_count(self.tokens) or 0)
        if not (math.isfinite(self.tokens) and self.tokens > 0) or self.cores_per_node < 1 or not self.hours > 0:
            raise PitlmError(f"projection needs --project-tokens > 0, --project-cores-per-node >= 1 and "
                             f"--project-hours > 0 (got {self.tokens:g}, {self.cores_per_node}, {self.hours:g})")


def project(p: Projection, tokens: int, seconds_1: float, serial_seconds_1: float, efficiency: float) -> dict:
    """Amdahl from the bench: the driver's serial reduce (the select phase at 1 worker) scales linearly with tokens
    and no node shortens it; everything else is spread over nodes x cores at the measured 1-worker rate times
    the parallel efficiency measured at N workers (capped at 1), held at every core of every node."""
    efficiency = min(1.0, efficiency)
    serial_s = p.tokens * serial_seconds_1 / tokens
    core_s = p.tokens * (seconds_1 - serial_seconds_1) / tokens / efficiency
    out = {"projection_tokens": int(p.tokens), "projection_cores_per_node": p.cores_per_node,
           "projection_hours": p.hours, "projection_parallel_efficiency": round(efficiency, 3),
           "projection_serial_hours": round(serial_s / 3600, 3), "projection_core_hours": round(core_s / 3600, 1)}
    budget = p.hours * 3600 - serial_s
    if budget <= 0:  # no node count meets the hours: the driver's serial reduce alone takes longer
        return {**out, "projection_nodes": "unreachable"}
    nodes = max(1, math.ceil(core_s / (p.cores_per_node * budget)))
    return {**out, "projection_nodes": nodes,
            "projection_wall_hours": round((serial_s + core_s / (nodes * p.cores_per_node)) / 3600, 2)}


def _build(tmp: Path, executor: str, n: int, seed: int) -> tuple[float, dict, float]:
    vol = Volume(tmp / f"home-{executor}-w{n}").ensure()
    cfg = CorpusConfig(name="bench", source=str(tmp / "src"), cutoff="2017-06-30", tokenizer=str(tmp / "tok"),
                       workers=n, shard_tokens=1 << 22, seed=seed, executor=executor)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    manifest = build_corpus(cfg, vol)
    return time.perf_counter() - t0, manifest, _cpu_seconds() - c0


def bench_corpus(docs: int = 40_000, workers: int | None = None, vocab_size: int = 4096, seed: int = 0,
                 workdir: str | None = None, executors: list[str] | None = None,
                 projection: Projection | None = None) -> dict:
    workers = workers or max(2, os.cpu_count() or 2)
    if workers < 2 or docs < 1:
        raise PitlmError(f"the bench needs --docs >= 1 and --workers >= 2 (it compares 1 worker with N; got "
                         f"{docs}, {workers})")
    executors = executors or ["mp"]
    with tempfile.TemporaryDirectory(prefix="pitlm-bench-corpus-", dir=workdir) as tmp:
        tmp = Path(tmp)
        records = fake_records(docs, seed=seed, start="2016-01-01", end="2017-06-30")
        write_fineweb_tree(records, tmp / "src", rows_per_file=2500)
        train_bpe((r["text"] for r in records[:2000]), vocab_size).save_pretrained(str(tmp / "tok"))
        chars = sum(len(r["text"]) for r in records)
        del records
        load_tokenizer(str(tmp / "tok"), Volume(tmp / "home0"))  # pay the transformers import before timing
        control_before = control_speedup(workers)
        runs = [(ex, n) for ex in executors for n in (1, workers)]
        results = {}
        with progress_task("bench corpus", total=len(runs), unit="build") as advance:
            for i, (ex, n) in enumerate(runs, 1):
                log.info("bench corpus: build %d of %d, executor %s, %d worker%s", i, len(runs), ex, n,
                         "s" * (n > 1))
                results[ex, n] = _build(tmp, ex, n, seed)
                advance(1)
        control_after = control_speedup(workers)
    first = results[runs[0]][1]
    tokens = first["tokens"]["train"] + first["tokens"]["val"]
    shas = {run: [s["sha256"] for s in m["shards"]] for run, (_, m, _) in results.items()}
    out = {"docs": docs, "chars": chars, "tokens": tokens, "workers_N": workers, "cpu_count": os.cpu_count(),
           "executors": ",".join(executors)}
    if "mp" in executors:  # the unsuffixed keys are the multiprocessing pool's, as before --executor existed
        (t1, m1, c1), (tn, mn, cn) = results["mp", 1], results["mp", workers]
        out.update({"seconds_1": round(t1, 3), "seconds_N": round(tn, 3),
                    "tokens_per_second_1": round(tokens / t1), "tokens_per_second_N": round(tokens / tn),
                    "speedup": round(t1 / tn, 3),
                    # CPU seconds (this process + its workers): close for 1 and N when parallelism adds little
                    # overhead; wall-time speedup needs idle cores (other jobs on the machine take theirs)
                    "cpu_seconds_1": round(c1, 3), "cpu_seconds_N": round(cn, 3),
                    **{f"{phase}_seconds_1": s for phase, s in m1["build"]["phase_seconds"].items()},
                    **{f"{phase}_seconds_N": s for phase, s in mn["build"]["phase_seconds"].items()}})
    for ex in executors:
        (t1, m1, _), (tn, mn, _) = results[ex, 1], results[ex, workers]
        # (no CPU seconds here: datatrove's forkserver and ray's workers are not this process's waited-for children)
        for n, t, m in ((1, t1, m1), (workers, tn, mn)):
            phases = m["build"]["phase_seconds"]
            out.update({f"seconds_{ex}_w{n}": round(t, 3), f"tokens_per_second_{ex}_w{n}": round(tokens / t),
                        **{f"{phase}_seconds_{ex}_w{n}": s for phase, s in phases.items()},
                        # the rest of the wall time: loading the tokenizer, ray.init/shutdown, publishing
                        f"other_seconds_{ex}_w{n}": round(t - sum(phases.values()), 3)})
        out[f"speedup_{ex}"] = round(t1 / tn, 3)
        out[f"parallel_efficiency_{ex}"] = round(t1 / tn / workers, 3)
        out[f"identical_{ex}"] = shas[ex, 1] == shas[ex, workers] == shas[runs[0]]
    out.update(control_speedup_before=control_before, control_speedup_after=control_after,
               identical=all(s == shas[runs[0]] for s in shas.values()))
    basis = next((ex for ex in PROJECTION_FROM if ex in executors), None)
    if basis and projection is not None:
        t1, m1, _ = results[basis, 1]
        out["projection_executor"] = basis
        out["projection_tokens_per_second_per_core"] = round(tokens / t1)
        out.update(project(projection, tokens, t1, m1["build"]["phase_seconds"]["select"],
                           t1 / results[basis, workers][0] / workers))
        out["projection_note"] = (
            f"a projection, not a measurement: {basis}'s 1-worker rate on {docs} generated documents (this "
            f"machine's cores, this bench's {vocab_size}-entry BPE, source on local disk, no hub download) times "
            f"its parallel efficiency at {workers} workers, held at {projection.cores_per_node} cores on every "
            f"node; the driver's select phase scaled linearly and run serially (its fixed costs too: more --docs, a "
            f"closer estimate)")
    return out
