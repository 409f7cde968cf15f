"""`pitlm corpus build`: a point-in-time corpus on the volume.

    scan (parallel over source units)      filter every document, count drop reasons, record eligible ids
    select (main process)                  sort eligible documents by a seeded hash of their id, drop repeated ids
    tokenize (parallel over jobs, rounds)  tokenize a priority prefix estimated to cover the budget; repeat with
                                           the measured tokens/char until the budget is met or the source is spent
    cut (main process)                     the shortest priority prefix whose train tokens reach --target-tokens
    pack (parallel over shards)            lay documents end to end (EOS after each) into fixed-size shards

A nested build (--cutoffs c_1,...,c_n) scans once and then selects, tokenizes, cuts and packs every crawl period
(c_{k-1}, c_k] on its own, as a build of that period alone would (pitlm.corpus.periods); the rounds of all periods
run together on one pool.

The output depends only on the documents and the config, never on the worker count or on where a killed build
stopped: every job's output is named after its inputs and written atomically, a completion marker last. The build
lives in `corpus/.NAME.build/` (kept when killed, so a rerun resumes; removed on a user error) and its finished
tree is renamed onto `corpus/NAME/` in one step, so a reader sees no corpus or a complete one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pitlm import __version__
from pitlm.corpus.config import CorpusConfig
from pitlm.corpus.dates import crawl_period, end_of_day, format_utc, parse_dump
from pitlm.corpus.periods import (
    Periods,
    describe_periods,
    empty_period_warnings,
    hub_caps,
    period_dir,
    period_ends,
    period_label,
    trim_hub_units,
)
from pitlm.corpus.scan import KEPT, DocFilter, ScanJob, scan_unit
from pitlm.corpus.shards import INDEX, ShardIndex, dtype_for_vocab
from pitlm.corpus.sources import Source, Unit, resolve_source
from pitlm.corpus.tokenizer import backend_json, load_tokenizer, tokenizer_info
from pitlm.corpus.workers import PackJob, TokenizeJob, WorkerPool, pack_shard, tokenize_job

if TYPE_CHECKING:
    from pitlm.corpus.executors import DatatrovePool
from pitlm.errors import PitlmError
from pitlm.log import progress
from pitlm.volume import Volume, _fsync_dir, atomic_write_json, build_manifest, sha256_file

log = logging.getLogger("pitlm.corpus")

MANIFEST = "manifest.json"
INITIAL_TOKENS_PER_CHAR = 0.3  # first-round guess (gpt2 on English is ~0.25); later rounds use the measured ratio
JOB_CHARS = (1 << 18, 1 << 23)  # tokenize jobs hold 256 Ki..8 Mi characters, ~32 jobs a round when that fits


def build_corpus(cfg: CorpusConfig, vol: Volume) -> dict:
    """Build corpus `cfg.name` on the volume; returns the manifest."""
    t0 = time.time()
    final = vol.path("corpus", cfg.name)
    if final.exists() and not cfg.overwrite:
        raise PitlmError(f"corpus '{cfg.name}' already exists at {final}; pass --overwrite to rebuild it")
    tok = load_tokenizer(cfg.tokenizer, vol)
    tinfo = tokenizer_info(tok, cfg.tokenizer)
    source = resolve_source(cfg.source, vol, cfg.cutoff, cfg.dumps)
    if source.kind == "hub" and cfg.target_tokens is None:
        raise PitlmError(f"--target-tokens is required for the hub source '{cfg.source}' (e.g. --target-tokens 1B)")
    if source.kind == "hub":
        source = trim_hub_units(source, cfg.periods())
    work = vol.path("corpus", f".{cfg.name}.build")
    for stale in final.parent.glob(f".{cfg.name}.old-*"):  # left by a build killed while publishing
        shutil.rmtree(stale, ignore_errors=True)
    with vol.lock("corpus", cfg.name):
        _prepare_workdir(work, {"config": cfg.content(), "tokenizer": tinfo, "source": source.describe()})
        manifest = _build_in(work, final, cfg, tok, tinfo, source, t0)
    manifest["wall_seconds"] = round(time.time() - t0, 3)
    return manifest


def _build_in(work: Path, final: Path, cfg: CorpusConfig, tok, tinfo: dict, source: Source, t0: float) -> dict:
    periods = cfg.periods()
    try:
        phases = {}
        with make_pool(cfg, backend_json(tok), work) as pool:
            with _timed(phases, "scan"):
                stats = _scan(pool, cfg, source, work, periods)
            with _timed(phases, "select"):
                df, units, counts = _candidates(stats, source, work, periods)
                _check_not_empty(cfg, stats, counts)
                source_end, late, warnings = _source_end(source, stats, [c for _, c in periods])
            with _timed(phases, "tokenize"):
                budgets = _tokenize_rounds(pool, cfg, [df[df["period"] == k].reset_index(drop=True)
                                                       for k in range(1, len(periods) + 1)], units, work / "tok")
            parts = [{"candidates": len(b.df), "kept": b.chosen(), "dropped_budget": len(b.df) - b.cut}
                     for b in budgets]
            with _timed(phases, "pack"):
                shards = _pack(pool, [p["kept"] for p in parts], periods, cfg.nested, work, tinfo, cfg.shard_tokens)
        counts["dropped_budget"] = sum(p["dropped_budget"] for p in parts)
        counts["kept"] = sum(len(p["kept"]) for p in parts)
        out = work / "out"
        chosen = pd.concat([p["kept"] for p in parts], ignore_index=True)
        manifest = _manifest(cfg, source, tinfo, stats, counts, chosen, shards, t0)
        manifest["periods"], manifest["slices"] = describe_periods(out, periods, cfg.nested, parts, shards)
        warnings += empty_period_warnings(periods, parts)
        manifest.update(source_end=source_end, cutoffs_after_source_end=late, warnings=warnings)
        manifest["build"]["phase_seconds"] = phases
        atomic_write_json(out / MANIFEST, manifest)
        table = [{k: e[k] for k in ("period", "start", "cutoff", "dir")} for e in manifest["periods"]]
        index = ShardIndex(out, str(dtype_for_vocab(tinfo["vocab_size"])), tinfo["vocab_size"], tinfo["eos_id"],
                           {s: [e for e in shards if e["split"] == s] for s in ("train", "val")},
                           table if cfg.nested else None, nested=cfg.nested)
        atomic_write_json(out / INDEX, index.to_json())  # last: the corpus tree is complete
        shutil.rmtree(out / ".done", ignore_errors=True)
        _publish(out, final)
        shutil.rmtree(work, ignore_errors=True)
    except PitlmError as e:
        if getattr(e, "resumable", False):  # tasks of a datatrove stage did not finish: keep the work to resume
            raise
        shutil.rmtree(work, ignore_errors=True)  # a user error leaves nothing half-written
        raise
    return manifest


def make_pool(cfg: CorpusConfig, tokenizer_json: str | None, work: Path) -> WorkerPool | DatatrovePool:
    """What runs the build's parallel stages: pitlm's multiprocessing pool (`--executor mp`), or a datatrove
    executor (`local`, `slurm`, `ray`; pitlm.corpus.executors). Both give the same bytes."""
    if cfg.executor == "mp":
        return WorkerPool(cfg.workers, tokenizer_json)
    try:
        from pitlm.corpus.executors import DatatrovePool  # noqa: PLC0415 - optional dependency datatrove
    except ImportError as e:
        raise PitlmError(f"--executor {cfg.executor} needs datatrove ({e}): pip install 'pitlm[distributed]'") from None
    return DatatrovePool(cfg, tokenizer_json, work / "datatrove")


@contextlib.contextmanager
def _timed(phases: dict, name: str):
    t = time.perf_counter()
    yield
    phases[name] = round(time.perf_counter() - t, 3)
    log.info("%s: %.1f s", name, phases[name])


# ----------------------------------------------------------------------------- work directory

def _prepare_workdir(work: Path, key: dict) -> None:
    key_path = work / "key.json"
    text = json.dumps(key, sort_keys=True, default=str)
    if work.exists():
        if key_path.is_file() and key_path.read_text() == text:
            log.info("resuming the build in %s", work)
            return
        log.info("discarding a stale build in %s (different config or inputs)", work)
        shutil.rmtree(work)
    work.mkdir(parents=True)
    key_path.write_text(text)


def _publish(out: Path, final: Path) -> None:
    trash = None
    if final.exists():
        trash = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, trash)
    os.replace(out, final)
    _fsync_dir(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


# ----------------------------------------------------------------------------- scan and select

def _scan(pool: WorkerPool, cfg: CorpusConfig, source: Source, work: Path, periods: Periods) -> list[dict]:
    hub = source.kind == "hub"
    caps = (hub_caps(source.units, periods, cfg.target_tokens, cfg.val_fraction, cfg.hub_oversample) if hub
            else [None] * len(source.units))
    filt, ends = DocFilter.from_config(cfg), period_ends(periods)
    jobs = [ScanJob(i, u, str(work / "scan"), filt, cfg.seed, cfg.val_fraction, hub, cap, ends if hub else ())
            for i, (u, cap) in enumerate(zip(source.units, caps, strict=True))]
    list(progress(pool.run(scan_unit, jobs), "scan", total=len(jobs), unit="unit"))
    return [json.loads(j.stats_path.read_text()) for j in jobs]


def _candidates(stats: list[dict], source: Source, work: Path,
                periods: Periods) -> tuple[pd.DataFrame, list[Unit], dict]:
    """Eligible documents of every unit in sampling order (seeded priority, then id), with their period (1-based);
    repeated ids dropped, the copy in the earliest period kept (a later crawl cannot take a document out of an
    earlier slice)."""
    frames, units = [], []
    for i, unit in enumerate(source.units):
        path = work / "scan" / f"u{i:05d}.parquet"
        df = pd.read_parquet(path, columns=["row", "id", "date", "dump", "n_chars", "priority", "is_val"])
        df["src"] = i
        if source.kind == "hub":  # the text was materialized in the scan file, in row order
            units.append(Unit("parquet", str(path), unit.dump))
            df["text_row"] = np.arange(len(df), dtype=np.int64)
        else:
            units.append(unit)
            df["text_row"] = df["row"]
        frames.append(df)
    df = pd.concat(frames, ignore_index=True).astype({"is_val": bool, "priority": np.uint64})
    df["period"] = np.searchsorted(np.array(period_ends(periods)), df["date"].to_numpy(str), side="left") + 1
    assert (df["period"] <= len(periods)).all(), "the scan keeps no document after the last cutoff"
    counts: dict[str, int] = {}
    for s in stats:
        for k, v in s["counts"].items():
            counts[k] = counts.get(k, 0) + v
    if len(df):
        # stable: repeated ids keep the earliest period, then unit/row order
        df = df.sort_values(["priority", "id", "period"], kind="mergesort")
        dup = df.duplicated("id", keep="first")
        counts["dropped_duplicate_id"] = int(dup.sum())
        df = df[~dup].reset_index(drop=True)
    return df, units, counts


def _check_not_empty(cfg: CorpusConfig, stats: list[dict], counts: dict) -> None:
    if counts.get(KEPT, 0) > 0:
        return
    if not counts.get("read"):
        raise PitlmError(f"source '{cfg.source}' has no documents")
    seen = [s["min_date_seen"] for s in stats if s["min_date_seen"]]
    if seen and counts.get("dropped_after_cutoff") and min(seen) > format_utc(
            dt.datetime.combine(cfg.cutoff, dt.time.max, dt.timezone.utc)):
        raise PitlmError(f"cutoff {cfg.cutoff} is earlier than all data: the earliest document was crawled at "
                         f"{min(seen)}")
    drops = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()) if k.startswith("dropped_") and v)
    raise PitlmError(f"nothing left after filtering: read {counts['read']} documents, {drops}")


def _source_end(source: Source, stats: list[dict], cutoffs: list[dt.date]) -> tuple[dict, list[str], list[str]]:
    """Where the source ends, the cutoffs after that end (they clip nothing: likely a typo), and a warning line
    naming them. A hub dump is read only up to its share of the budget, so there the end is the last dump's crawl
    end; a local source ends at the latest document date seen."""
    dumps = sorted({*source.dumps_read, *source.dumps_skipped}, key=parse_dump)
    last_dump = dumps[-1] if dumps else None
    seen = [s["max_date_seen"] for s in stats if s["max_date_seen"]]
    if source.kind == "hub":
        basis, end = "dump", format_utc(crawl_period(last_dump).end) if last_dump else None
        what = f"the end of the source's last dump, {last_dump} (crawled until {end})"
    else:
        basis, end = "documents", max(seen) if seen else None
        what = f"the source's last document (crawled {end})"
    info = {"max_date_seen": max(seen) if seen else None, "last_dump": last_dump, "basis": basis}
    if end is None or source.dumps_skipped:  # a dump was skipped as after the cutoff: the source goes on
        return info, [], []
    late = [str(c) for c in cutoffs if format_utc(end_of_day(c)) > end]
    if not late:
        return info, [], []
    line = (f"cutoff{'s' if len(late) > 1 else ''} {', '.join(late)} {'are' if len(late) > 1 else 'is'} after "
            f"{what}: nothing is clipped there; check --cutoff{'s' if len(cutoffs) > 1 else ''}")
    log.warning(line)
    return info, late, [line]


# ----------------------------------------------------------------------------- tokenize in rounds

class _Budget:
    """One period's candidates (in sampling order), what of them is tokenized, and, once known, the cut: the
    number of them (from the front) that make the period's share of the corpus."""

    def __init__(self, df: pd.DataFrame, target: int | None, label: str | None):
        self.df, self.target, self.label = df, target, label
        n = len(df)
        self.n_tokens, self.offset = np.full(n, -1, np.int64), np.zeros(n, np.int64)
        self.job_of, self.hashes = np.full(n, "", object), np.full(n, "", object)
        self.train, self.n_chars = ~df["is_val"].to_numpy(), df["n_chars"].to_numpy()
        self.done, self.ratio, self.cut = 0, None, None

    def round_end(self) -> int:
        n = len(self.df)
        if self.target is None:
            return n
        return _round_end(self.n_chars, self.n_tokens, self.train, self.done, self.target, self.ratio)

    def absorb(self, job: TokenizeJob, positions: np.ndarray) -> None:
        meta = pd.read_parquet(job.meta_path)
        assert list(meta["id"]) == list(job.ids), job.job_id
        lengths = meta["n_tokens"].to_numpy()
        self.n_tokens[positions], self.offset[positions] = lengths, np.cumsum(lengths) - lengths
        self.job_of[positions], self.hashes[positions] = job.job_id, meta["text_hash"].to_numpy()

    def settle(self, upto: int) -> None:
        """After tokenizing up to `upto`: set the cut when the budget is met (or there is none)."""
        n, target, done = len(self.df), self.target, upto
        self.done = done
        cum = np.cumsum(np.where(self.train[:done], self.n_tokens[:done] + 1, 0))
        if target is None:
            self.cut = n
        elif (hit := int(np.searchsorted(cum, target, side="left"))) < done:
            self.cut = hit + 1
        elif done == n:
            have = int(cum[-1]) if done else 0
            what = "the source has" if self.label is None else f"{self.label} has"
            per = "" if self.label is None else " (a budget per period)"
            raise PitlmError(f"{what} only {have:,} train tokens after filtering, less than --target-tokens "
                             f"{target:,}{per}; lower it or pass --target-tokens all")
        else:
            self.ratio = float(self.n_tokens[:done].sum()) / max(1, int(self.n_chars[:done].sum()))
            log.info("%s%d documents tokenized, %d of %d train tokens; measured %.3f tokens/char",
                     f"{self.label}: " if self.label else "", done, int(cum[-1]), target, self.ratio)

    def chosen(self) -> pd.DataFrame:
        return self.df.assign(n_tokens=self.n_tokens, offset=self.offset, job=self.job_of,
                              text_hash=self.hashes).iloc[:self.cut]


def _tokenize_rounds(pool: WorkerPool, cfg: CorpusConfig, parts: list[pd.DataFrame], units: list[Unit],
                     tok_dir: Path) -> list[_Budget]:
    """Tokenize every period's priority prefix until its budget is met; all periods' jobs of a round run on the
    pool together."""
    labels = [period_label(k, s, c) if cfg.nested else None for k, (s, c) in enumerate(cfg.periods(), 1)]
    budgets = [_Budget(df, cfg.target_tokens, label) for df, label in zip(parts, labels, strict=True)]
    rnd = 0
    while pending := [(k, b) for k, b in enumerate(budgets, 1) if b.cut is None]:
        plan = [(k, b, b.round_end()) for k, b in pending]
        jobs = [(b, job, positions) for k, b, upto in plan
                for job, positions in _make_jobs(b.df, b.done, upto, units, f"p{k}_r{rnd}", tok_dir)]
        list(progress(pool.run(tokenize_job, [j for _, j, _ in jobs]), f"tokenize (round {rnd})", total=len(jobs),
                      unit="job"))
        for b, job, positions in jobs:
            b.absorb(job, positions)
        for _, b, upto in plan:
            b.settle(upto)
        rnd += 1
    return budgets


def _round_end(n_chars: np.ndarray, n_tokens: np.ndarray, train: np.ndarray, done: int, target: int,
               ratio: float | None) -> int:
    """Index up to which documents must be tokenized so that the train tokens likely reach the target."""
    exact = int(np.sum(np.where(train[:done], n_tokens[:done] + 1, 0)))
    margin = 1.2 if ratio is None else 1.05
    est = (n_chars[done:] * (ratio or INITIAL_TOKENS_PER_CHAR) + 1) * margin
    cum = np.cumsum(np.where(train[done:], est, 0))
    k = int(np.searchsorted(cum, target - exact, side="left"))
    return min(len(n_chars), done + k + 1)


def _make_jobs(df: pd.DataFrame, start: int, stop: int, units: list[Unit], prefix: str,
               tok_dir: Path) -> list[tuple[TokenizeJob, np.ndarray]]:
    part = df.iloc[start:stop]
    chars = int(part["n_chars"].sum())
    job_chars = min(max(chars // 32, JOB_CHARS[0]), JOB_CHARS[1])
    jobs = []
    for src, group in part.groupby("src", sort=True):
        group = group.sort_values("text_row", kind="mergesort")
        positions, rows, ids = group.index.to_numpy(), group["text_row"].to_numpy(), group["id"].to_numpy()
        bounds = np.cumsum(group["n_chars"].to_numpy()) // job_chars
        for k, sel in enumerate(np.split(np.arange(len(group)), np.flatnonzero(np.diff(bounds)) + 1)):
            job = TokenizeJob(f"{prefix}_s{int(src):05d}_{k:04d}", units[int(src)], tuple(int(r) for r in rows[sel]),
                              tuple(str(i) for i in ids[sel]), str(tok_dir))
            jobs.append((job, positions[sel]))
    return jobs


# ----------------------------------------------------------------------------- pack

def _pack(pool: WorkerPool, kept: list[pd.DataFrame], periods: Periods, nested: bool, work: Path, tinfo: dict,
          shard_tokens: int) -> list[dict]:
    """Every period's documents into its own shards (train shards of all periods, then val), each period laid out
    as a build of that period alone; returns the index entries in that order."""
    dtype = str(dtype_for_vocab(tinfo["vocab_size"]))
    jobs = []
    for split in ("train", "val"):
        for k, (chosen, (_, cutoff)) in enumerate(zip(kept, periods, strict=True), 1):
            prefix = f"{period_dir(k, cutoff)}/" if nested else ""
            jobs += [(k, job) for job in _pack_jobs(chosen, split, prefix, work, dtype, tinfo["eos_id"], shard_tokens)]
    entries = {e["file"]: e for e in progress(pool.run(pack_shard, [j for _, j in jobs]), "pack", total=len(jobs),
                                               unit="shard")}
    return [{"split": j.split, **({"period": k} if nested else {}), **entries[j.file]} for k, j in jobs]


def _pack_jobs(chosen: pd.DataFrame, split: str, prefix: str, work: Path, dtype: str, eos_id: int,
               shard_tokens: int) -> list[PackJob]:
    docs = chosen[chosen["is_val"] == (split == "val")]
    n = docs["n_tokens"].to_numpy()
    ends = np.cumsum(n + 1)
    starts = ends - n - 1
    total = int(ends[-1]) if len(n) else 0
    jobs = []
    for k in range(math.ceil(total / shard_tokens)):
        s, e = k * shard_tokens, min(total, (k + 1) * shard_tokens)
        a, b = int(np.searchsorted(ends, s, side="right")), int(np.searchsorted(starts, e, side="left"))
        sub = docs.iloc[a:b]
        pieces = tuple((str(j), int(o), int(m), int(max(s, st) - st), int(min(e, en) - st))
                       for j, o, m, st, en in zip(sub["job"], sub["offset"], n[a:b], starts[a:b], ends[a:b], strict=True))
        first = sub[starts[a:b] >= s]
        ids = {"id": list(first["id"]), "date": list(first["date"]), "dump": list(first["dump"]),
               "n_tokens": [int(x) for x in first["n_tokens"]], "text_hash": list(first["text_hash"]),
               "start": [int(x) - s for x in starts[a:b][starts[a:b] >= s]]}
        jobs.append(PackJob(split, k, str(work / "out"), str(work / "tok"), dtype, eos_id, pieces, ids, prefix))
    return jobs


# ----------------------------------------------------------------------------- manifest

def _manifest(cfg: CorpusConfig, source: Source, tinfo: dict, stats: list[dict], counts: dict,
              chosen: pd.DataFrame, shards: list[dict], t0: float) -> dict:
    docs = {"read": counts.get("read", 0), "eligible": counts.get(KEPT, 0), "kept": counts["kept"]}
    docs.update(sorted((k, v) for k, v in counts.items() if k.startswith("dropped_")))
    tokens = {s: sum(e["tokens"] for e in shards if e["split"] == s) for s in ("train", "val")}
    dumps_kept = sorted(chosen["dump"].unique().tolist()) if len(chosen) else []
    manifest = build_manifest(
        "corpus", inputs={"source": cfg.source, "tokenizer": cfg.tokenizer}, config=cfg.content(), wall_seconds=round(time.time() - t0, 3),
        name=cfg.name, pitlm_version=__version__, source=source.describe(), cutoff=str(cfg.cutoff),
        cutoffs=[str(c) for _, c in cfg.periods()], after=None if cfg.after is None else str(cfg.after),
        filters=DocFilter.from_config(cfg).describe(),
        sampling={"seed": cfg.seed, "target_tokens": cfg.target_tokens, "val_fraction": cfg.val_fraction,
                  "order": "blake2b(seed:sample:id)", "val": "blake2b(seed:val:id) < val_fraction",
                  "budget": "per period"},
        dumps_used=dumps_kept, dumps_read=source.dumps_read, dumps_skipped=source.dumps_skipped,
        tokenizer=tinfo, dtype=str(dtype_for_vocab(tinfo["vocab_size"])), shard_tokens=cfg.shard_tokens,
        docs=docs, docs_by_split={s: int((chosen["is_val"] == (s == "val")).sum()) for s in ("train", "val")},
        tokens=tokens, min_doc_date=min(chosen["date"]) if len(chosen) else None,
        max_doc_date=max(chosen["date"]) if len(chosen) else None, units=stats, shards=shards,
        build={"workers": cfg.workers, "executor": cfg.executor, "tasks": cfg.tasks})
    manifest["payload"] = [{"path": e["file"], "sha256": e["sha256"], "bytes": e["bytes"]} for e in shards]
    return manifest


def corpus_dir(vol: Volume, name: str) -> Path:
    return vol.path("corpus", name)


def verify_payload(root: Path, entries: list[dict]) -> list[str]:
    """Files whose sha256 or size differ from their entries (empty when all match)."""
    bad = []
    for e in entries:
        p = root / e["file"]
        if not p.is_file() or p.stat().st_size != e["bytes"] or sha256_file(p) != e["sha256"]:
            bad.append(e["file"])
    return bad
