"""The token-shard format shared by `pitlm corpus build` (writer) and `pitlm train` (reader).

A corpus directory `corpus/<name>/` holds:

    train/shard_00000.bin ...   raw little-endian token ids (uint16 when vocab <= 65536, else uint32);
    val/shard_00000.bin ...     documents concatenated, each followed by the tokenizer's EOS id
    ids/train_00000.parquet     the documents that start in each shard (id, date, dump, n_tokens, text_hash, start)
    index.json                  {"dtype": "uint16", "vocab_size": V, "eos_id": E,
                                 "splits": {"train": [{"file": "train/shard_00000.bin", "tokens": n,
                                                       "sha256": "...", "bytes": b, ...}, ...], "val": [...]}}
    manifest.json               provenance (see pitlm.corpus.build)

index.json is written last and the finished tree is renamed into place in one step, so `ShardIndex.load`
sees a complete corpus or none; it also checks that every listed shard exists with its recorded size. Index
entries may carry extra keys (docs, ids, ids_sha256, min_date, max_date); readers ignore what they do not use.

A nested corpus (`pitlm corpus build --cutoffs c_1,...,c_n`) keeps the same index.json, so a reader that knows
nothing of periods reads the whole corpus (the slice of c_n). Period k's files live under
`periods/<kkk>_<c_k>/{train,val,ids}/`, each entry carries `"period": k`, the splits list the periods in order,
and a top-level `"periods": [{"period": k, "start": c_{k-1} or null, "cutoff": c_k, "dir": ...}, ...]` says
what each holds: the documents crawled in (c_{k-1}, c_k] (UTC, end of day). The slice of c_k is periods 1..k:

    index = ShardIndex.load(root)          # or open_corpus("NAME@2018-12-31", vol) for the slice directly
    index.cutoffs                          # [date(2017, 12, 31), date(2018, 12, 31), ...]
    index.slice("2018-12-31")              # a ShardIndex of periods <= that cutoff (train, val in period order)
    for start, cutoff, part in index.periods(): ...   # a chronological run: each period alone, in order

A one-period corpus is the n = 1 case (its cutoff, and --after as its start, come from manifest.json).

Like nanoGPT's memmap: a 1 B-token corpus with a 248k vocabulary (uint32) is 4 GB on disk; with a 50k
vocabulary (uint16) 2 GB. Shards are written atomically (temp + rename), so a visible shard is complete.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pitlm.corpus.dates import parse_cutoff
from pitlm.errors import PitlmError
from pitlm.volume import Volume, atomic_path, sha256_file

INDEX = "index.json"
MANIFEST = "manifest.json"


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_shard(path: str | Path, tokens: np.ndarray, dtype: np.dtype) -> dict:
    """Atomically write one shard; returns its index entry (file relative to the corpus dir is set by caller)."""
    arr = np.asarray(tokens)
    if arr.size and int(arr.max()) > np.iinfo(dtype).max:
        raise ValueError(f"token id {int(arr.max())} does not fit {dtype}")
    path = Path(path)
    with atomic_path(path) as tmp:
        arr.astype(dtype.newbyteorder("<"), copy=False).tofile(tmp)
    return {"tokens": int(arr.size), "sha256": sha256_file(path), "bytes": path.stat().st_size}


def read_shard(path: str | Path, dtype: str | np.dtype) -> np.ndarray:
    """Memory-map a shard (read-only)."""
    path = Path(path)
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r")


class CorpusPeriod(NamedTuple):
    start: dt.date | None  # documents crawled after the end of this day (None: any time)
    cutoff: dt.date | None  # ... up to the end of this day (None: a hand-made corpus that does not say)
    index: ShardIndex  # that period's shards alone


def _date(value) -> dt.date | None:
    return None if value is None else dt.date.fromisoformat(str(value))


@dataclass
class ShardIndex:
    root: Path
    dtype: str
    vocab_size: int
    eos_id: int
    splits: dict[str, list[dict]]
    # [{"period": k, "start": "YYYY-MM-DD" | None, "cutoff": "YYYY-MM-DD", "dir": ...}] in order; None when unknown
    periods_table: list[dict] | None = None
    nested: bool = False  # written with periods/ (index.json then carries the table)

    @classmethod
    def load(cls, corpus_dir: str | Path) -> ShardIndex:
        root = Path(corpus_dir)
        path = root / INDEX
        if not path.is_file():
            raise PitlmError(f"{root} is not a built corpus (no {INDEX}); run `pitlm corpus build` first")
        if root.name.startswith("."):
            raise PitlmError(f"{root} is an unfinished build, not a corpus; rerun `pitlm corpus build` to finish it")
        try:
            data = json.loads(path.read_text())
            nested = "periods" in data
            table = _checked_table(data["periods"]) if nested else _single_period(root)
            index = cls(root, data["dtype"], int(data["vocab_size"]), int(data["eos_id"]), data["splits"], table,
                        nested)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise PitlmError(f"{path} is not a valid shard index ({e}); rebuild the corpus") from None
        index.check_complete()
        return index

    def check_complete(self) -> None:
        """Every shard listed exists with its recorded size (a cheap stat; `pitlm audit corpus` re-hashes)."""
        itemsize = np.dtype(self.dtype).itemsize
        for split, entries in self.splits.items():
            for s in entries:
                p = self.root / s["file"]
                want = int(s["tokens"]) * itemsize
                if not p.is_file() or p.stat().st_size != want:
                    raise PitlmError(f"corpus {self.root.name} is incomplete: {split} shard {s['file']} is missing or "
                                     f"not {want} bytes; rebuild it or run `pitlm audit corpus {self.root.name}`")

    def to_json(self) -> dict:
        out = {"dtype": self.dtype, "vocab_size": self.vocab_size, "eos_id": self.eos_id, "splits": self.splits}
        if self.nested:
            out["periods"] = self.periods_table
        return out

    def num_tokens(self, split: str) -> int:
        return sum(int(s["tokens"]) for s in self.splits.get(split, []))

    def arrays(self, split: str) -> list[np.ndarray]:
        """Memory-mapped arrays of a split's shards, in order."""
        if split not in self.splits:
            raise PitlmError(f"corpus {self.root.name} has no '{split}' split (has: {', '.join(self.splits)})")
        return [read_shard(self.root / s["file"], self.dtype) for s in self.splits[split]]

    # ------------------------------------------------------------------------- periods and slices

    @property
    def cutoffs(self) -> list[dt.date]:
        """The cutoff of every slice, in order ([] when the corpus does not record its cutoff)."""
        return [_date(p["cutoff"]) for p in self.periods_table or [] if p["cutoff"] is not None]

    @property
    def cutoff(self) -> dt.date | None:
        """The cutoff of this index: the last period's (the whole corpus, or the slice it was cut to)."""
        return self.cutoffs[-1] if self.cutoffs else None

    def periods(self) -> list[CorpusPeriod]:
        """(start, cutoff, that period's ShardIndex) of each period, in crawl order."""
        if not self.periods_table:
            return [CorpusPeriod(None, None, self)]
        return [CorpusPeriod(_date(p["start"]), _date(p["cutoff"]), self._subset([p])) for p in self.periods_table]

    def slice(self, cutoff: str | dt.date) -> ShardIndex:
        """The corpus of documents crawled on or before `cutoff`: periods 1..k where c_k = cutoff, each split's
        shards in period order. The cutoff must be one of `cutoffs` (a date between two would silently mean the
        earlier one)."""
        c = parse_cutoff(cutoff)
        have = self.cutoffs
        if c not in have:
            listed = ", ".join(map(str, have)) if have else "none recorded"
            raise PitlmError(f"corpus {self.root.name} has no cutoff {c} (its cutoffs: {listed})")
        return self._subset(self.periods_table[:have.index(c) + 1])

    def _subset(self, table: list[dict]) -> ShardIndex:
        keep = {int(p["period"]) for p in table}
        splits = {s: [e for e in entries if int(e.get("period", 1)) in keep] for s, entries in self.splits.items()}
        return replace(self, splits=splits, periods_table=[dict(p) for p in table])


def _checked_table(table: list[dict]) -> list[dict]:
    """index.json's periods: 1..n in order, each with ISO dates (ValueError/KeyError/TypeError otherwise)."""
    out = [dict(p) for p in table]
    for k, p in enumerate(out, 1):
        if int(p["period"]) != k or _date(p["cutoff"]) is None:
            raise ValueError(f"periods[{k - 1}] is not period {k} with a cutoff")
        _date(p["start"])
    return out


def _single_period(root: Path) -> list[dict] | None:
    """A one-period corpus's (start, cutoff) from its manifest (None for a corpus without one)."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict) or not manifest.get("cutoff"):
        return None
    after = (manifest.get("config") or {}).get("after")
    return [{"period": 1, "start": after, "cutoff": manifest["cutoff"], "dir": ""}]


# ----------------------------------------------------------------------------- corpus specs

def parse_corpus_spec(spec: str) -> tuple[str, dt.date | None]:
    """'NAME' -> (NAME, None); 'NAME@YYYY-MM-DD' -> (NAME, that date): the slice of a nested corpus (or the one
    cutoff of a plain one). NAME may be a corpus name on the volume or a path to a corpus directory."""
    spec = str(spec).strip()
    name, at, tail = spec.rpartition("@")
    if not at or "/" in tail:  # no '@', or an '@' inside a directory name of a path
        return spec, None
    if not name:
        raise PitlmError(f"bad corpus '{spec}': expected NAME or NAME@YYYY-MM-DD")
    try:
        return name, parse_cutoff(tail)
    except PitlmError:
        raise PitlmError(f"bad corpus '{spec}': '{tail}' is not a cutoff date; expected NAME@YYYY-MM-DD") from None


def open_corpus(spec: str, vol: Volume) -> ShardIndex:
    """The ShardIndex a `corpus:` spec names: NAME (PITLM_HOME/corpus/NAME) or a corpus directory, optionally
    @CUTOFF for that slice; one-line errors for an unknown corpus or cutoff."""
    name, cutoff = parse_corpus_spec(spec)
    looks_like_path = "/" in name or name.startswith(("~", "."))
    root = Path(name).expanduser() if looks_like_path else vol.entry("corpus", name)
    if looks_like_path and not (root / INDEX).is_file():
        raise PitlmError(f"{root} is not a built corpus (no {INDEX}); give a corpus directory or a corpus name")
    if not (root / INDEX).is_file():
        raise PitlmError(f"corpus '{name}' not found at {root} (no {INDEX}); build it with "
                         f"`pitlm corpus build {name} ...` or give a corpus directory")
    index = ShardIndex.load(root)
    return index if cutoff is None else index.slice(cutoff)
