"""Crawl periods of a corpus build: nested PIT corpora from one scan.

A build with cutoffs c_1 < ... < c_n (and optionally --after a) keeps the documents of the half-open UTC crawl-date
intervals (a, c_1], (c_1, c_2], ..., (c_{n-1}, c_n] (a = -inf by default), each its own *period*. Each period is
selected, budget-cut and packed exactly as a build of that period alone would be (`--after c_{k-1} --cutoff c_k`):
the same seeded priority and validation split (hashes of the document id), the same per-period `--target-tokens`
(a budget cut over all periods would make an early slice depend on later documents: a look-ahead), the same shard
size. The *slice* of cutoff c_k is the union of periods 1..k; its token stream (per split) is the concatenation of
those periods' shards in period order. A one-period build keeps the plain layout (train/, val/, ids/); a nested
one puts period k under periods/<kkk>_<c_k>/ (see pitlm.corpus.shards).

Hub sources are read only up to each dump's share of the budget. Here that share is per period: the dumps whose
estimated crawl window overlaps a period share its budget, and a dump stops collecting a period's documents once
its share is met; a dump overlapping no period is not read. A build of one period alone therefore collects the same
documents of that period from every dump as the nested build does.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
from dataclasses import replace
from pathlib import Path

from pitlm.corpus.dates import crawl_period, end_of_day, format_utc
from pitlm.corpus.sources import Source, Unit
from pitlm.errors import PitlmError

log = logging.getLogger("pitlm.corpus")

Periods = list[tuple[dt.date | None, dt.date]]  # (start, cutoff): documents crawled after end of start, up to cutoff


def period_ends(periods: Periods) -> tuple[str, ...]:
    """Each period's end as a formatted UTC instant (the scan and the select compare formatted dates with these)."""
    return tuple(format_utc(end_of_day(c)) for _, c in periods)


def period_dir(k: int, cutoff: dt.date) -> str:
    """Where period k (1-based) of a nested corpus lives, relative to the corpus root."""
    return f"periods/{k:03d}_{cutoff}"


def period_label(k: int, start: dt.date | None, cutoff: dt.date) -> str:
    return f"period {k} ({start if start is not None else '-inf'}, {cutoff}]"


# ----------------------------------------------------------------------------- hub dumps and their shares

def _overlaps(unit: Unit, start: dt.date | None, cutoff: dt.date) -> bool:
    window = crawl_period(unit.dump)
    return window.start <= end_of_day(cutoff) and (start is None or window.end > end_of_day(start))


def trim_hub_units(source: Source, periods: Periods) -> Source:
    """A hub source without the dumps whose estimated crawl window ends on or before the first period starts
    (--after): they hold no share of any period. The others were kept by `resolve_source` (window starting on or
    before the last cutoff)."""
    keep = [u for u in source.units if any(_overlaps(u, s, c) for s, c in periods)]
    early = [u.dump for u in source.units if u not in keep]
    if not keep:
        raise PitlmError(f"no dump of '{source.spec}' may hold a document crawled after {periods[0][0]} (the last "
                         f"one, {source.units[-1].dump}, ends earlier); move --after or the cutoff")
    return replace(source, units=keep, dumps_read=[u.dump for u in keep], dumps_before_period=early)


def hub_caps(units: list[Unit], periods: Periods, target_tokens: int, val_fraction: float,
             oversample: float) -> list[tuple[int, ...]]:
    """Per unit, per period: the eligible tokens it reads of that period (0 when its window misses the period).
    The period's budget (train + val, oversampled) is split evenly over the dumps that overlap it; with one period
    starting at -inf this is the budget over all dumps read, as before periods existed."""
    overlap = [[_overlaps(u, s, c) for s, c in periods] for u in units]
    caps = []
    for row in overlap:
        caps.append(tuple(
            int(math.ceil(target_tokens * (1 + val_fraction) * oversample / sum(r[p] for r in overlap))) if hit else 0
            for p, hit in enumerate(row)))
    return caps


# ----------------------------------------------------------------------------- the manifest's periods and slices

def _sha256_stream(root: Path, files: list[str], h) -> None:
    for f in files:
        with open(root / f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)


def describe_periods(root: Path, periods: Periods, nested: bool, parts: list[dict], shards: list[dict]
                     ) -> tuple[list[dict], list[dict]]:
    """The manifest's `periods` (what each holds) and `slices` (each cutoff's union of periods 1..k: token and
    document counts, and the sha256 of its token stream per split, hashed in one pass over the shards).

    `parts[k]` has the period's candidates, kept documents (a DataFrame with is_val, date) and dropped_budget."""
    out_periods, out_slices = [], []
    hashes = {s: hashlib.sha256() for s in ("train", "val")}
    totals = {"tokens": {"train": 0, "val": 0}, "docs": {"train": 0, "val": 0}, "shards": {"train": 0, "val": 0}}
    lo = hi = None
    for k, ((start, cutoff), part) in enumerate(zip(periods, parts, strict=True), 1):
        kept = part["kept"]
        mine = [e for e in shards if e.get("period", 1) == k]
        entry = {"period": k, "start": None if start is None else str(start), "cutoff": str(cutoff),
                 "dir": period_dir(k, cutoff) if nested else "",
                 "docs": {"candidates": part["candidates"], "kept": len(kept), "dropped_budget": part["dropped_budget"]},
                 "docs_by_split": {}, "tokens": {}, "shards": {},
                 "min_doc_date": min(kept["date"]) if len(kept) else None,
                 "max_doc_date": max(kept["date"]) if len(kept) else None}
        for split in ("train", "val"):
            files = [e for e in mine if e["split"] == split]
            entry["docs_by_split"][split] = int((kept["is_val"] == (split == "val")).sum())
            entry["tokens"][split] = sum(e["tokens"] for e in files)
            entry["shards"][split] = len(files)
            _sha256_stream(root, [e["file"] for e in files], hashes[split])
            for key, name in (("tokens", "tokens"), ("docs", "docs_by_split"), ("shards", "shards")):
                totals[key][split] += entry[name][split]
        out_periods.append(entry)
        if entry["min_doc_date"] is not None:
            lo = entry["min_doc_date"] if lo is None else min(lo, entry["min_doc_date"])
            hi = entry["max_doc_date"] if hi is None else max(hi, entry["max_doc_date"])
        out_slices.append({"cutoff": str(cutoff), "periods": k, "tokens": dict(totals["tokens"]),
                           "docs_by_split": dict(totals["docs"]), "shards": dict(totals["shards"]),
                           "min_doc_date": lo, "max_doc_date": hi,
                           "stream_sha256": {s: h.copy().hexdigest() for s, h in hashes.items()}})
    return out_periods, out_slices


def empty_period_warnings(periods: Periods, parts: list[dict]) -> list[str]:
    """One line per period that kept no document (allowed without a budget: its slice equals the previous one)."""
    lines = []
    for k, ((start, cutoff), part) in enumerate(zip(periods, parts, strict=True), 1):
        if not len(part["kept"]):
            lines.append(f"{period_label(k, start, cutoff)} holds no document: slice {cutoff} equals the one before")
            log.warning(lines[-1])
    return lines
