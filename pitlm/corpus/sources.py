"""Where documents come from. Every source becomes a list of `Unit`s, and every unit reads as the same thing: an
iterator of (row, record) with `record` a dict in the FineWeb schema (text, id, dump, url, date, language, ...).

    fineweb | fineweb-edu | hf:REPO   a FineWeb-schema dataset on the HF hub, one unit per dump config, streamed
                                       with `datasets` (network); only dumps whose crawl may precede the cutoff
    PATH | DIR | GLOB                  local parquet / JSONL (.jsonl, .jsonl.gz, .json) files in the FineWeb schema
    world:NAME                         the synthetic world's corpus, PITLM_HOME/world/NAME/corpus/*.parquet

Local files named `CC-MAIN-YYYY-WW.*` (the world's layout) or under such a folder (FineWeb's `data/<dump>/`) are
skipped like hub dumps when their dump was crawled entirely after the cutoff.
"""

from __future__ import annotations

import datetime as dt
import glob
import gzip
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pitlm.corpus.dates import FINEWEB_DUMPS, crawl_period, format_utc, is_dump_name, parse_dump, select_dumps
from pitlm.errors import PitlmError
from pitlm.volume import Volume

log = logging.getLogger("pitlm.corpus")

HUB_ALIASES = {"fineweb": "HuggingFaceFW/fineweb", "fineweb-edu": "HuggingFaceFW/fineweb-edu"}
FINEWEB_COLUMNS = ("text", "id", "dump", "url", "date", "file_path", "language", "language_score", "token_count")
LOCAL_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".json")


@dataclass(frozen=True)
class Unit:
    """One independently readable piece of a source: a local file, or one dump config of a hub dataset."""

    kind: str  # "parquet" | "jsonl" | "hub"
    path: str  # file path, or the hub repo
    dump: str | None = None  # the dump it belongs to, when known before reading

    @property
    def label(self) -> str:
        return f"{self.path}:{self.dump}" if self.kind == "hub" else self.path


@dataclass
class Source:
    spec: str
    kind: str  # "hub" | "local" | "world"
    units: list[Unit]
    repo: str | None = None
    dumps_read: list[str] = field(default_factory=list)
    dumps_skipped: list[str] = field(default_factory=list)  # crawled after the (last) cutoff
    dumps_before_period: list[str] = field(default_factory=list)  # hub: crawled before --after (see periods.py)

    def describe(self) -> dict:
        files = []
        for u in self.units:
            entry = asdict(u)
            if u.kind != "hub":
                entry["bytes"] = os.path.getsize(u.path)
            files.append(entry)
        out = {"spec": self.spec, "kind": self.kind, "repo": self.repo, "units": files,
               "dumps_read": self.dumps_read, "dumps_skipped": self.dumps_skipped}
        if self.dumps_before_period:
            out["dumps_before_period"] = self.dumps_before_period
        return out


# ----------------------------------------------------------------------------- resolving a source spec

def _datasets():
    """The `datasets` package: only hub sources need it, and a bare GPU image may lack it (`pitlm doctor` warns)."""
    try:
        import datasets  # noqa: PLC0415 - optional at run time: only `--source fineweb` / hub sources read through it
    except ImportError:
        raise PitlmError("hub sources need the `datasets` package: pip install datasets") from None
    return datasets


def hub_dump_names(repo: str) -> list[str]:
    """The dump configs of a hub dataset; FineWeb v1's shipped list when the hub cannot be asked (offline)."""
    datasets = _datasets()
    try:
        names = [n for n in datasets.get_dataset_config_names(repo) if is_dump_name(n)]
        if names:
            return names
        log.warning("%s lists no CC-MAIN-YYYY-WW configs; using FineWeb v1's 96 dumps", repo)
    except Exception as e:  # noqa: BLE001 - any hub failure falls back to the shipped list
        log.warning("cannot list the dumps of %s (%s); using FineWeb v1's 96 dumps", repo, str(e).splitlines()[0][:200])
    return list(FINEWEB_DUMPS)


def _dump_in_path(path: str) -> str | None:
    """The dump a file belongs to by its name (world: corpus/CC-MAIN-2017-24.parquet) or folder (FineWeb:
    data/CC-MAIN-2017-26/000_00000.parquet)."""
    p = Path(path)
    for part in (p.name.split(".")[0], *reversed(p.parts[:-1])):
        if is_dump_name(part):
            return part
    return None


def _local_files(spec: str) -> list[str]:
    p = Path(spec).expanduser()
    if p.is_file():
        files = [str(p)]
    elif p.is_dir():
        files = [str(f) for f in p.rglob("*") if f.is_file() and f.name.endswith(LOCAL_SUFFIXES)]
        if not files:
            raise PitlmError(f"{spec} holds no {'/'.join(LOCAL_SUFFIXES)} files")
    elif any(ch in spec for ch in "*?["):
        files = [f for f in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(f)]
        if not files:
            raise PitlmError(f"no files match {spec}")
    else:
        raise PitlmError(f"source '{spec}' is not a file, directory, glob, 'fineweb', 'hf:REPO' or 'world:NAME'")
    bad = [f for f in files if not f.endswith(LOCAL_SUFFIXES)]
    if bad:
        raise PitlmError(f"cannot read {bad[0]}: expected a FineWeb-schema {' / '.join(LOCAL_SUFFIXES)} file")
    return sorted(str(Path(f).resolve()) for f in files)


def _file_unit(path: str) -> Unit:
    kind = "parquet" if path.endswith(".parquet") else "jsonl"
    return Unit(kind, path, _dump_in_path(path))


def resolve_source(spec: str, vol: Volume, cutoff: dt.date, dumps: list[str] | None = None,
                   list_dumps: Callable[[str], list[str]] = hub_dump_names) -> Source:
    """Turn a source spec into units, keeping only dumps that may hold documents crawled on or before the cutoff.

    `dumps` restricts to explicit dump names (each must be well formed, exist in a hub source, and not start after
    the cutoff)."""
    for d in dumps or []:
        parse_dump(d)
    spec = spec.strip()
    if spec in HUB_ALIASES or spec.startswith("hf:"):
        repo = HUB_ALIASES.get(spec) or spec[3:]
        available = list_dumps(repo)
        if dumps:
            unknown = [d for d in dumps if d not in available]
            if unknown:
                raise PitlmError(f"unknown dump name '{unknown[0]}': {repo} has no such config")
            available = list(dumps)
        read, skipped = _select(available, cutoff, explicit=bool(dumps))
        return Source(spec, "hub", [Unit("hub", repo, d) for d in read], repo, read, skipped)
    if spec.startswith("world:"):
        name = spec[6:]
        root = vol.entry("world", name, "corpus")
        files = sorted(str(p) for p in root.glob("*.parquet")) if root.is_dir() else []
        if not files:
            raise PitlmError(f"world '{name}' has no corpus at {root}; build the world first (pitlm world)")
        units, kind = [_file_unit(f) for f in files], "world"
    else:
        units, kind = [_file_unit(f) for f in _local_files(spec)], "local"
    if dumps:
        _check_dumps_present(spec, units, dumps)
        units = [u for u in units if u.dump is None or u.dump in dumps]
    known = sorted({u.dump for u in units if u.dump}, key=parse_dump)
    read, skipped = _select(known, cutoff, explicit=bool(dumps)) if known else ([], [])
    kept = [u for u in units if u.dump is None or u.dump in read]
    assert kept, "_select raises when no named dump is read, and units without a dump name are always kept"
    return Source(spec, kind, kept, None, read, skipped)


def _check_dumps_present(spec: str, units: list[Unit], dumps: list[str]) -> None:
    """When every file of a local source names its dump, each --dumps entry must be one of them (files without a
    dump in their name are filtered per document by the scan instead)."""
    if not units or any(u.dump is None for u in units):
        return
    have = sorted({u.dump for u in units}, key=parse_dump)
    missing = [d for d in dumps if d not in have]
    if missing:
        listed = ", ".join(have) if len(have) <= 10 else f"{len(have)} dumps, {have[0]} .. {have[-1]}"
        raise PitlmError(f"dump {missing[0]} is not in source '{spec}' (it has {listed}); fix --dumps")


def _select(names: list[str], cutoff: dt.date, explicit: bool) -> tuple[list[str], list[str]]:
    read, skipped = select_dumps(names, cutoff)
    if explicit and skipped:
        raise PitlmError(f"dump {skipped[0]} was crawled after the cutoff {cutoff} (from "
                         f"{format_utc(crawl_period(skipped[0]).start)}); drop it from --dumps")
    if names and not read:
        first = sorted(names, key=parse_dump)[0]
        raise PitlmError(f"cutoff {cutoff} is earlier than all data: the first dump, {first}, was crawled from "
                         f"{format_utc(crawl_period(first).start)}")
    return read, skipped


# ----------------------------------------------------------------------------- reading records

def iter_records(unit: Unit) -> Iterator[tuple[int, dict]]:
    """(row, FineWeb-schema record) for every document of a unit, in a fixed order."""
    if unit.kind == "parquet":
        yield from _iter_parquet(unit.path)
    elif unit.kind == "jsonl":
        yield from _iter_jsonl(unit.path)
    elif unit.kind == "hub":
        yield from _iter_hub(unit.path, unit.dump)
    else:
        raise AssertionError(unit.kind)


def _parquet_file(path: str):
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise PitlmError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


def _iter_parquet(path: str) -> Iterator[tuple[int, dict]]:
    pf = _parquet_file(path)
    columns = [c for c in FINEWEB_COLUMNS if c in pf.schema_arrow.names]
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=2048, columns=columns):
            for rec in batch.to_pylist():
                yield row, rec
                row += 1
    except OSError as e:
        raise PitlmError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


def _open_text(path: str):
    try:
        return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")
    except OSError as e:
        raise PitlmError(f"cannot read {path}: {e.strerror}") from None


def _iter_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    with _open_text(path) as f:
        try:
            for row, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    raise PitlmError(f"cannot read {path}: line {row + 1} is not valid JSON") from None
                if not isinstance(rec, dict):
                    raise PitlmError(f"cannot read {path}: line {row + 1} is not a JSON object")
                yield row, rec
        except (UnicodeDecodeError, EOFError, OSError) as e:
            raise PitlmError(f"cannot read {path}: {e}") from None


def _iter_hub(repo: str, dump: str | None) -> Iterator[tuple[int, dict]]:
    datasets = _datasets()
    try:
        stream = datasets.load_dataset(repo, name=dump, split="train", streaming=True)
        yield from enumerate(stream)
    except PitlmError:
        raise
    except Exception as e:  # noqa: BLE001 - network / hub errors become one line
        raise PitlmError(f"cannot stream {repo} ({dump}): {str(e).splitlines()[0][:300]}") from None


def read_texts(unit: Unit, rows: list[int]) -> list[str]:
    """The `text` of the given rows of a local unit, in the order of `rows` (which must be sorted)."""
    if unit.kind == "parquet":
        return _parquet_texts(unit.path, rows)
    wanted = set(rows)
    found: dict[int, str] = {}
    last = rows[-1] if rows else -1
    for row, rec in _iter_jsonl(unit.path):
        if row in wanted:
            found[row] = rec["text"]
        if row >= last:
            break
    return [found[r] for r in rows]


def _parquet_texts(path: str, rows: list[int]) -> list[str]:
    pf = _parquet_file(path)
    sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    groups = sorted({int(np.searchsorted(starts, r, side="right") - 1) for r in rows})
    table = pf.read_row_groups(groups, columns=["text"])
    # Row r of the file sits at (r - start of its group) + (rows of the groups read before it).
    offset, base = {}, 0
    for g in groups:
        offset[g] = base - int(starts[g])
        base += sizes[g]
    idx = [r + offset[int(np.searchsorted(starts, r, side="right") - 1)] for r in rows]
    return table.column("text").take(pa.array(idx)).to_pylist()
