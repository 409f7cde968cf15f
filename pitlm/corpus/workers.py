"""Worker processes for corpus builds, and the two jobs they run besides the scan: tokenizing documents and
packing token shards.

Why plain `multiprocessing` and not datatrove executors: the build needs one global step between the parallel
ones (sort every eligible document by its seeded priority, cut the budget, lay documents end to end into
fixed-size shards), which is what makes the output identical for 1 or N workers; datatrove's tasks each run a
pipeline over their own files and write their own outputs. Workers are forked (Linux; spawn elsewhere or with
PITLM_MP_START=spawn): they start in milliseconds with everything already imported, where a spawned worker
re-imports the `pitlm` command and its stages. No thread runs in the parent when the pool is made (it is made
before any progress bar), and each worker rebuilds the tokenizer from its JSON with its own parallelism off. Every
job writes atomically with a completion marker, datatrove-style, so a rerun skips finished work.

Every job writes its outputs under a name derived from its inputs only, so a killed build resumes where it was.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from pitlm.corpus.scan import staged_path, text_hash, write_staged_json
from pitlm.corpus.shards import write_shard
from pitlm.corpus.sources import Unit, read_texts
from pitlm.volume import atomic_path, sha256_file

_STATE: dict = {}
DELAY_ENV = "PITLM_CORPUS_JOB_DELAY"  # test hook: seconds to sleep in every tokenize/pack job
ENCODE_BATCH = 256


def _die_with_parent(parent_pid: int) -> None:
    """A killed build must not leave workers behind: forked pool workers never see their queue close (they hold
    its write end themselves), so ask Linux to kill them when the parent dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def init_worker(tokenizer_json: str | None, parent_pid: int | None = None) -> None:
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process = one core; the pool provides the parallelism
    if tokenizer_json:
        _STATE["tokenizer"] = Tokenizer.from_str(tokenizer_json)


def _test_delay() -> None:
    delay = float(os.environ.get(DELAY_ENV) or 0)
    if delay:
        time.sleep(delay)


class WorkerPool:
    """`workers` spawn processes (or the calling process itself when workers == 1) with the tokenizer loaded."""

    def __init__(self, workers: int, tokenizer_json: str | None):
        self.workers = max(1, int(workers))
        self.tokenizer_json = tokenizer_json
        self._pool = None

    def __enter__(self) -> WorkerPool:
        if self.workers == 1:
            init_worker(self.tokenizer_json)
        else:
            method = os.environ.get("PITLM_MP_START") or ("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            ctx = mp.get_context(method)
            self._pool = ctx.Pool(self.workers, initializer=init_worker, initargs=(self.tokenizer_json, os.getpid()))
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()

    def run(self, fn: Callable, jobs: Iterable) -> Iterator:
        """Results of fn(job) as they finish (order not guaranteed)."""
        jobs = list(jobs)
        if self._pool is None:
            for job in jobs:
                yield fn(job)
        else:
            yield from self._pool.imap_unordered(fn, jobs, chunksize=1)


# ----------------------------------------------------------------------------- tokenize

@dataclass(frozen=True)
class TokenizeJob:
    job_id: str
    unit: Unit  # where the text lives: the source file, or the scan file of a hub unit
    rows: tuple[int, ...]  # sorted
    ids: tuple[str, ...]
    out_dir: str

    @property
    def bin_path(self) -> Path:
        return Path(self.out_dir) / f"{self.job_id}.bin"

    @property
    def meta_path(self) -> Path:
        return Path(self.out_dir) / f"{self.job_id}.parquet"


def tokenize_job(job: TokenizeJob) -> str:
    """Tokenize the job's documents (no special tokens; EOS is added when packing) into one uint32 file plus
    a table of (id, n_tokens, text_hash). The table is written last: it is the completion marker."""
    if job.meta_path.is_file():
        return job.job_id
    _test_delay()
    tok = _STATE["tokenizer"]
    texts = read_texts(job.unit, list(job.rows))
    lengths, hashes, parts = [], [], []
    for i in range(0, len(texts), ENCODE_BATCH):
        batch = texts[i:i + ENCODE_BATCH]
        for text, enc in zip(batch, tok.encode_batch(batch, add_special_tokens=False), strict=True):
            ids = np.asarray(enc.ids, dtype=np.uint32)
            parts.append(ids)
            lengths.append(len(ids))
            hashes.append(text_hash(text))
    tokens = np.concatenate(parts) if parts else np.zeros(0, np.uint32)
    with staged_path(job.bin_path) as tmp:
        tokens.astype("<u4", copy=False).tofile(tmp)
    table = pa.table({"id": list(job.ids), "n_tokens": pa.array(lengths, pa.int64()), "text_hash": hashes})
    with staged_path(job.meta_path) as tmp:
        pq.write_table(table, tmp)
    return job.job_id


# ----------------------------------------------------------------------------- pack

@dataclass(frozen=True)
class PackJob:
    split: str
    index: int
    out_dir: str  # the corpus tree being built
    tok_dir: str
    dtype: str
    eos_id: int
    # (job_id, offset of the doc in the job file, n_tokens, lo, hi): tokens lo..hi of the doc followed by EOS
    pieces: tuple[tuple[str, int, int, int, int], ...]
    docs: dict  # columns of the ids table: docs that start in this shard
    prefix: str = ""  # where the shard's period lives in a nested corpus ("periods/001_2017-06-30/"), else ""

    @property
    def file(self) -> str:
        return f"{self.prefix}{self.split}/shard_{self.index:05d}.bin"

    @property
    def ids_file(self) -> str:
        return f"{self.prefix}ids/{self.split}_{self.index:05d}.parquet"

    @property
    def done_path(self) -> Path:
        return Path(self.out_dir) / ".done" / f"{self.prefix.replace('/', '_')}{self.split}_{self.index:05d}.json"


def pack_shard(job: PackJob) -> dict:
    """Write one shard (documents end to end, EOS after each) and its ids table; returns the index entry."""
    if job.done_path.is_file():
        return json.loads(job.done_path.read_text())
    _test_delay()
    maps: dict[str, np.ndarray] = {}
    out = []
    for job_id, offset, n_tokens, lo, hi in job.pieces:
        if job_id not in maps:
            maps[job_id] = np.fromfile(Path(job.tok_dir) / f"{job_id}.bin", dtype="<u4")
        out.append(maps[job_id][offset + lo: offset + min(hi, n_tokens)])
        if hi == n_tokens + 1:
            out.append(np.array([job.eos_id], np.uint32))
    tokens = np.concatenate(out) if out else np.zeros(0, np.uint32)
    root = Path(job.out_dir)
    entry = {"file": job.file, **write_shard(root / job.file, tokens, np.dtype(job.dtype))}
    with atomic_path(root / job.ids_file) as tmp:
        pq.write_table(pa.table(job.docs), tmp)
    dates = job.docs["date"]
    entry.update(docs=len(job.docs["id"]), ids=job.ids_file, ids_sha256=sha256_file(root / job.ids_file),
                 min_date=min(dates) if dates else None, max_date=max(dates) if dates else None)
    write_staged_json(job.done_path, entry)
    return entry
