"""Bring your own embeddings: `--model NAME=embeddings:PATH`, keyed by (SecuritiesCode, Date).

Embeddings computed anywhere (an API, vLLM, another framework) get the same protocols, control and paired
bootstrap as the ones pitlm computes. Layouts:

    PATH.parquet   columns SecuritiesCode, Date, and either one list/array column `embedding` (every row the
                   same length d) or columns e0, e1, ..., e{d-1}
    PATH.npy       an (n, d) float array, row i the embedding of row i of a keys file beside it:
                   PATH.keys.parquet or PATH.keys.csv (or, for emb.npy, emb.keys.parquet / emb.keys.csv), with
                   columns SecuritiesCode, Date

SecuritiesCode is an integer (a string of digits is read as one), Date anything pandas parses as a date (a time of
day is dropped). The file may hold more (code, date) pairs than the eval's rows; every eval row must have one, and
no pair may appear twice. Errors are one line naming the file and the first offending key: a missing key, a
duplicate, a wrong row count (npy vs keys), a NaN or infinite embedding of an eval row. The fingerprint of such a
spec is the sha256 of the file (and of its keys file), so results.json records exactly which embeddings were scored.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from pitlm.errors import PitlmError

SUFFIXES = (".parquet", ".npy")
KEY_COLUMNS = ("SecuritiesCode", "Date")


def keys_file(path: Path) -> Path | None:
    """The keys file of an .npy embeddings file: PATH.keys.{parquet,csv}, else STEM.keys.{parquet,csv}."""
    for cand in (Path(f"{path}.keys.parquet"), Path(f"{path}.keys.csv"), path.with_suffix(".keys.parquet"),
                 path.with_suffix(".keys.csv")):
        if cand.is_file():
            return cand
    return None


def check_path(path: Path, spec: str) -> Path | None:
    """Check an embeddings file's form before any work; returns its keys file (None for parquet)."""
    if not path.is_file():
        raise PitlmError(f"'{spec}': no embeddings file at {path}")
    if path.suffix not in SUFFIXES:
        raise PitlmError(f"'{spec}': embeddings must be a .parquet or an .npy file (+ keys), got '{path.name}'")
    if path.suffix == ".parquet":
        return None
    keys = keys_file(path)
    if keys is None:
        raise PitlmError(f"'{spec}': {path.name} needs a keys file with SecuritiesCode, Date beside it "
                         f"({path.name}.keys.parquet or {path.name}.keys.csv)")
    return keys


def _keys(df: pd.DataFrame, source: Path) -> pd.DataFrame:
    missing = [c for c in KEY_COLUMNS if c not in df.columns]
    if missing:
        raise PitlmError(f"{source} lacks column(s) {', '.join(missing)} (need SecuritiesCode, Date)")
    codes = pd.to_numeric(df["SecuritiesCode"], errors="coerce")
    if codes.isna().any() or (codes != codes.round()).any():
        bad = df["SecuritiesCode"][codes.isna() | (codes != codes.round())].iloc[0]
        raise PitlmError(f"{source}: SecuritiesCode {bad!r} is not an integer code")
    dates = pd.to_datetime(df["Date"], errors="coerce")
    if dates.isna().any():
        raise PitlmError(f"{source}: Date {df['Date'][dates.isna()].iloc[0]!r} is not a date")
    if getattr(dates.dt, "tz", None) is not None:
        dates = dates.dt.tz_localize(None)
    return pd.DataFrame({"SecuritiesCode": codes.astype(np.int64).to_numpy(),
                         "Date": dates.dt.normalize().to_numpy()})


def _matrix_from_parquet(df: pd.DataFrame, source: Path) -> np.ndarray:
    ecols = sorted((c for c in df.columns if re.fullmatch(r"e\d+", str(c))), key=lambda c: int(c[1:]))
    if "embedding" in df.columns:
        if ecols:
            raise PitlmError(f"{source} has both an `embedding` column and e0.. columns; keep one")
        lengths = df["embedding"].map(lambda v: -1 if v is None else len(v)).to_numpy()
        if len(lengths) and (lengths != lengths[0]).any():
            i = int(np.flatnonzero(lengths != lengths[0])[0])
            raise PitlmError(f"{source}: embedding of row {i} has length {lengths[i]}, row 0 has {lengths[0]}")
        if len(lengths) == 0:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([np.asarray(v, dtype=np.float32) for v in df["embedding"]])
    if not ecols:
        raise PitlmError(f"{source} has no embedding: give a list column `embedding` or columns e0..e{{d-1}}")
    want = [f"e{i}" for i in range(len(ecols))]
    if ecols != want:
        gap = next(w for w, c in zip(want, ecols, strict=True) if w != c)
        raise PitlmError(f"{source}: embedding columns must be e0..e{len(ecols) - 1}; {gap} is missing")
    return df[ecols].to_numpy(dtype=np.float32)


def read_embeddings(path: str | Path) -> tuple[pd.DataFrame, np.ndarray]:
    """(keys: SecuritiesCode int64 / Date datetime64, X: (n, d) float32) of an embeddings file."""
    path = Path(path).expanduser()
    keys_path = check_path(path, f"embeddings:{path}")
    if keys_path is None:
        df = pd.read_parquet(path)
        return _keys(df, path), _matrix_from_parquet(df, path)
    X = np.load(path, allow_pickle=False)
    if X.ndim != 2:
        raise PitlmError(f"{path}: expected an (n, d) array, got shape {X.shape}")
    kdf = pd.read_parquet(keys_path) if keys_path.suffix == ".parquet" else pd.read_csv(keys_path)
    if len(kdf) != len(X):
        raise PitlmError(f"{path} has {len(X)} rows but its keys file {keys_path.name} has {len(kdf)}; "
                         f"row i of the array must be the embedding of row i of the keys")
    return _keys(kdf, keys_path), X.astype(np.float32, copy=False)


def _label(code, date) -> str:
    return f"(SecuritiesCode={int(code)}, Date={pd.Timestamp(date).date()})"


def align_embeddings(keys: pd.DataFrame, X: np.ndarray, rows: pd.DataFrame, source: str | Path) -> np.ndarray:
    """X's rows in the order of `rows` (SecuritiesCode, Date): one clear error for a duplicate key in the file,
    an eval row the file lacks, or a non-finite embedding of an eval row."""
    dup = keys.duplicated(list(KEY_COLUMNS))
    if dup.any():
        first = keys[dup].iloc[0]
        raise PitlmError(f"{source}: key {_label(*first)} appears more than once ({int(dup.sum())} duplicates)")
    want = _keys(rows[list(KEY_COLUMNS)], Path(str(source)))
    index = pd.MultiIndex.from_frame(keys)
    pos = index.get_indexer(pd.MultiIndex.from_frame(want))
    if (pos < 0).any():
        first = want[pos < 0].iloc[0]
        raise PitlmError(f"{source}: {int((pos < 0).sum())} of {len(want)} eval rows have no embedding, e.g. "
                         f"{_label(*first)}; embed every sampled (SecuritiesCode, Date) row")
    out = np.asarray(X[pos], dtype=np.float32)
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():
        first = want[bad].iloc[0]
        raise PitlmError(f"{source}: the embedding of {_label(*first)} has NaN or infinite values "
                         f"({int(bad.sum())} eval rows)")
    return out


def load_for_rows(path: str | Path, rows: pd.DataFrame) -> np.ndarray:
    """The embeddings of `rows` (their order) from an embeddings file."""
    keys, X = read_embeddings(path)
    return align_embeddings(keys, X, rows, path)
