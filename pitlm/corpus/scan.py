"""The per-document filter and the scan of one source unit.

Like a datatrove filter, `DocFilter.check` says why it drops a document; `scan_unit` counts every reason and
writes the eligible documents' metadata (and, for hub units that cannot be re-read cheaply, their text) to a
parquet file, then a stats file that doubles as the unit's completion marker.

Sampling and the validation split are seeded hashes of the document id, so they do not depend on the order in
which units are read, on the worker count, or on the token budget.
"""

from __future__ import annotations

import bisect
import contextlib
import datetime as dt
import hashlib
import json
import os
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pitlm.corpus.dates import end_of_day, format_utc, parse_doc_date
from pitlm.corpus.sources import Unit, iter_records

KEPT = "eligible"  # passed every filter (the build then samples `kept` from these)
REASONS = ("dropped_bad_record", "dropped_no_date", "dropped_after_cutoff", "dropped_before_period", "dropped_dump",
           "dropped_lang", "dropped_lang_score", "dropped_short", "dropped_dump_share")
# A hub dump is read until its share of the budget is met, or until this many times that share was read
# without meeting it (a dump mostly crawled after the cutoff), whichever comes first. In a nested build this holds
# per period: once a dump's share of one period is met, its further documents of that period are dropped
# (dropped_dump_share), exactly as a build of that period alone would have stopped reading the dump there.
MAX_READ_FACTOR = 20


@dataclass(frozen=True)
class DocFilter:
    cutoff: dt.date
    lang: str | None = "en"
    min_chars: int = 1
    min_language_score: float = 0.0
    dumps: tuple[str, ...] | None = None
    after: dt.date | None = None  # also drop documents crawled on or before the end of this day

    @classmethod
    def from_config(cls, cfg) -> DocFilter:
        """From any config with cutoff, lang, min_chars, min_language_score and dumps (and optionally after)."""
        return cls(cfg.cutoff, cfg.lang, cfg.min_chars, cfg.min_language_score, tuple(cfg.dumps) if cfg.dumps else None,
                   getattr(cfg, "after", None))

    @property
    def cutoff_end(self) -> dt.datetime:
        return end_of_day(self.cutoff)

    def check(self, rec: dict) -> tuple[str | None, dt.datetime | None]:
        """(None, date) when the document is kept, else (drop reason, date or None)."""
        text, doc_id = rec.get("text"), rec.get("id")
        if not isinstance(text, str) or doc_id in (None, ""):
            return "dropped_bad_record", None
        date = parse_doc_date(rec.get("date"))
        if date is None:
            return "dropped_no_date", None
        if date > self.cutoff_end:
            return "dropped_after_cutoff", date
        if self.after is not None and date <= end_of_day(self.after):
            return "dropped_before_period", date
        if self.dumps and rec.get("dump") not in self.dumps:
            return "dropped_dump", date
        if self.lang and rec.get("language") != self.lang:
            return "dropped_lang", date
        score = rec.get("language_score")
        if self.min_language_score > 0 and (score is None or float(score) < self.min_language_score):
            return "dropped_lang_score", date
        if len(text.strip()) < self.min_chars:
            return "dropped_short", date
        return None, date

    def describe(self) -> dict:
        out = {"cutoff": str(self.cutoff), "cutoff_end_utc": format_utc(self.cutoff_end), "lang": self.lang,
               "min_chars": self.min_chars, "min_language_score": self.min_language_score,
               "dumps": list(self.dumps) if self.dumps else None}
        if self.after is not None:
            out.update(after=str(self.after), after_end_utc=format_utc(end_of_day(self.after)))
        return out


@contextlib.contextmanager
def staged_path(path: Path):
    """Temp file + rename, without the fsync of `pitlm.volume.atomic_path`: for the build's intermediate files,
    which only need to be all-or-nothing for a rerun after a killed process (final shards are fsynced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_staged_json(path: Path, obj) -> None:
    with staged_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))


def _hash64(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def doc_priority(seed: int, doc_id: str) -> int:
    """Sampling order: documents are taken by increasing priority until the budget is met."""
    return _hash64(f"{seed}:sample:{doc_id}")


def is_val_doc(seed: int, doc_id: str, val_fraction: float) -> bool:
    return _hash64(f"{seed}:val:{doc_id}") < val_fraction * 2.0**64


def text_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def period_of(date: str, period_ends: tuple[str, ...]) -> int:
    """0-based period of a formatted UTC date, given each period's formatted end (`format_utc(end_of_day(c))`):
    the first period whose end is >= the date. Formatting drops sub-seconds and every end is at :59, so this agrees
    with comparing the datetimes."""
    return bisect.bisect_left(period_ends, date)


def estimate_tokens(rec: dict) -> int:
    """FineWeb's gpt2 `token_count` when present, else ~4 characters a token."""
    n = rec.get("token_count")
    return int(n) if isinstance(n, int) and n > 0 else len(rec["text"]) // 4 + 1


@dataclass(frozen=True)
class ScanJob:
    index: int
    unit: Unit
    out_dir: str
    filt: DocFilter
    seed: int
    val_fraction: float
    keep_text: bool = False  # hub units: materialize the text so it is streamed once
    # hub units: per period, stop collecting its documents after this many (estimated) eligible tokens, or after
    # MAX_READ_FACTOR times that many were read (0: the unit holds no share of that period); stop reading when
    # every period has stopped. `period_ends` are the periods' formatted UTC ends.
    token_caps: tuple[int, ...] | None = None
    period_ends: tuple[str, ...] = ()

    @property
    def meta_path(self) -> Path:
        return Path(self.out_dir) / f"u{self.index:05d}.parquet"

    @property
    def stats_path(self) -> Path:
        return Path(self.out_dir) / f"u{self.index:05d}.stats.json"


def scan_unit(job: ScanJob) -> dict:
    """Filter one unit; write its eligible documents' metadata and its counts. Skips a finished unit."""
    if job.stats_path.is_file():
        return json.loads(job.stats_path.read_text())
    counts: Counter[str] = Counter()
    cols: dict[str, list] = {k: [] for k in ("row", "id", "date", "dump", "n_chars", "est_tokens", "priority", "is_val")}
    if job.keep_text:
        cols["text"] = []
    lo = hi = None  # earliest / latest parseable date seen, kept or not
    caps = job.token_caps
    collecting = [c > 0 for c in caps] if caps is not None else None
    eligible_tokens = [0] * len(caps) if caps is not None else None
    read_tokens = 0
    for row, rec in iter_records(job.unit):
        counts["read"] += 1
        reason, date = job.filt.check(rec)
        if date is not None:
            lo, hi = (date, date) if lo is None else (min(lo, date), max(hi, date))
        if caps is not None:
            read_tokens += estimate_tokens(rec) if isinstance(rec.get("text"), str) else 0
            period = period_of(format_utc(date), job.period_ends) if reason is None else -1
            if reason is None and not collecting[period]:
                reason = "dropped_dump_share"
        if reason:
            counts[reason] += 1
        else:
            counts[KEPT] += 1
            doc_id = str(rec["id"])
            est = estimate_tokens(rec)
            if caps is not None:
                eligible_tokens[period] += est
            for key, value in (("row", row), ("id", doc_id), ("date", format_utc(date)),
                               ("dump", rec.get("dump") or job.unit.dump or ""), ("n_chars", len(rec["text"])),
                               ("est_tokens", est), ("priority", doc_priority(job.seed, doc_id)),
                               ("is_val", is_val_doc(job.seed, doc_id, job.val_fraction))):
                cols[key].append(value)
            if job.keep_text:
                cols["text"].append(rec["text"])
        if caps is not None:
            for p, cap in enumerate(caps):
                if collecting[p] and (eligible_tokens[p] >= cap or read_tokens >= MAX_READ_FACTOR * cap):
                    collecting[p] = False
            if not any(collecting):
                break
    schema = {"row": pa.int64(), "id": pa.string(), "date": pa.string(), "dump": pa.string(), "n_chars": pa.int64(),
              "est_tokens": pa.int64(), "priority": pa.uint64(), "is_val": pa.bool_(), "text": pa.string()}
    table = pa.table({k: pa.array(v, type=schema.get(k)) for k, v in cols.items()})
    with staged_path(job.meta_path) as tmp:
        pq.write_table(table, tmp, row_group_size=4096)
    stats = {"unit": job.unit.label, "counts": dict(sorted(counts.items())),
             "min_date_seen": format_utc(lo) if lo else None, "max_date_seen": format_utc(hi) if hi else None}
    write_staged_json(job.stats_path, stats)  # written last: the unit's completion marker
    return stats


def iter_eligible(units: list[Unit], filt: DocFilter, max_docs: int | None = None) -> Iterator[dict]:
    """Eligible records of several units, interleaved round-robin (so a capped read spreads over dumps), in a
    fixed order."""
    streams = [iter_records(u) for u in units]
    n = 0
    while streams and (max_docs is None or n < max_docs):
        alive = []
        for stream in streams:
            for _row, rec in stream:
                if filt.check(rec)[0] is None:
                    yield rec
                    n += 1
                    alive.append(stream)
                    break
            if max_docs is not None and n >= max_docs:
                return
        streams = alive
