"""Row validation shared by every market loader (Kaggle JPX, generic long CSV, the synthetic world), and the
`--on-invalid` policy: `error` (the default) refuses the input with one line naming the kind of problem, how many
rows have it and the first such row; `drop` removes those rows, counts them per kind and keeps the first few of
each (file, line or row, column, value) for the market manifest. Nothing is dropped silently.

Kinds, checked in this order; a row is counted once, under the first kind it fails:
    unparseable_date              an empty date, or one not in the file's date format (named in the message)
    missing_code                  an empty security code
    bad_code                      a JPX SecuritiesCode that is not an integer
    non_numeric                   text that is not a number in a numeric column (empty cells are not text)
    non_finite                    inf / -inf (or a number too large for a float) in a numeric column
    missing_close                 an empty close in a generic CSV (a JPX stock_prices row with an empty Close is a
                                  day without trades, which the format has by design: forward-filled, not invalid)
    non_positive_price            a price <= 0
    negative_volume               a volume < 0
    non_positive_adjustment_factor  a JPX AdjustmentFactor <= 0
    duplicate_row                 a (date, code) row equal to an earlier one in every value the loader uses: the
                                  first copy (in file, then line, order) is kept and only the later copies dropped
    conflicting_duplicate         a (date, code) that appears more than once with different values: no copy can be
                                  trusted over another, so every copy is dropped
Duplicates are looked for among rows that passed every other check (a zero-close copy does not make the good
copy a duplicate).

Line numbers count the header as line 1 and count blank lines (pandas is told to keep them, then they are skipped
and counted); a quoted field holding a newline would shift them. Parquet inputs give 1-based row numbers.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from pandas.tseries.api import guess_datetime_format

from pitlm.errors import PitlmError

ON_INVALID = ("error", "drop")
KINDS = ("unparseable_date", "missing_code", "bad_code", "non_numeric", "non_finite", "missing_close",
         "non_positive_price", "negative_volume", "non_positive_adjustment_factor", "duplicate_row",
         "conflicting_duplicate")
MAX_EXAMPLES = 5
DROP_HINT = ("fix the input, or pass --on-invalid drop to drop invalid rows (each kind counted, with its first "
             "rows, in the market manifest)")


def check_policy(on_invalid: str) -> str:
    if on_invalid not in ON_INVALID:
        raise PitlmError(f"--on-invalid must be one of {', '.join(ON_INVALID)}, got '{on_invalid}'")
    return on_invalid


def origin(n: int, file: str, lines: np.ndarray | None = None) -> pd.DataFrame:
    """Where each of `n` rows came from: CSV line numbers when given, else 1-based row numbers."""
    unit = "line" if lines is not None else "row"
    at = np.asarray(lines, dtype="int64") if lines is not None else np.arange(1, n + 1, dtype="int64")
    return pd.DataFrame({"file": pd.Categorical([file] * n), "unit": pd.Categorical([unit] * n), "at": at})


def _show(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA or value is pd.NaT:
        return "empty"
    return repr(value) if isinstance(value, str) else str(value)


def _plain(value) -> str:
    if isinstance(value, pd.Timestamp) and value == value.normalize():
        return str(value.date())
    shown = _show(value)
    return str(value).strip() if shown != "empty" else shown


def _key(value) -> str:
    """A code or date for context: 1301.0 (an integer column that pandas read as float) shows as 1301."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return _plain(value)


class RowCheck:
    """Invalid rows of one table, flagged kind by kind (`flag`), then refused or dropped (`finish`).

    `origin` (file, unit, at) and `context` (e.g. raw date and code, for messages) are positional with the rows."""

    def __init__(self, origin: pd.DataFrame, context: dict[str, pd.Series], on_invalid: str = "error"):
        self.on_invalid = check_policy(on_invalid)
        self.origin = origin.reset_index(drop=True)
        self.context = {k: v.reset_index(drop=True) for k, v in context.items()}
        self.bad = np.zeros(len(origin), dtype=bool)
        self.kind_of = np.full(len(origin), -1, dtype="int16")
        self._found: dict[str, list[tuple[np.ndarray, str, pd.Series | None, str, dict]]] = {}

    def flag(self, kind: str, mask, column: str, raw: pd.Series | None = None, why: str = "",
             extra: dict[str, np.ndarray] | None = None) -> None:
        """Flag the rows of `mask` not flagged before as `kind`; `raw` holds the offending cell values."""
        assert kind in KINDS, kind
        mask = np.asarray(mask, dtype=bool) & ~self.bad
        if not mask.any():
            return
        idx = np.flatnonzero(mask)
        self.bad[idx] = True
        self.kind_of[idx] = KINDS.index(kind)
        raw = None if raw is None else raw.reset_index(drop=True)
        self._found.setdefault(kind, []).append((idx, column, raw, why, extra or {}))

    def count(self, kind: str) -> int:
        return sum(len(idx) for idx, *_ in self._found.get(kind, []))

    def examples(self, kind: str, limit: int = MAX_EXAMPLES) -> list[dict]:
        """The first `limit` rows of `kind` in row order: file, line (or row), column, value, context."""
        picks = sorted((int(i), j) for j, (idx, *_) in enumerate(self._found[kind]) for i in idx[:limit])[:limit]
        return [self._example(kind, j, i) for i, j in picks]

    def _example(self, kind: str, j: int, i: int, quoted: bool = False) -> dict:
        """One row's record; `quoted`: text values in repr quotes (for messages), else as they are (manifest)."""
        idx, column, raw, why, extra = self._found[kind][j]
        o = self.origin.iloc[i]
        ex = {"file": str(o["file"]), str(o["unit"]): int(o["at"]), "column": column}
        if raw is not None:
            ex["value"] = _show(raw.iloc[i]) if quoted and "+" not in column else _plain(raw.iloc[i])
        ex.update({k: _key(v.iloc[i]) for k, v in self.context.items() if k not in column.split("+")})
        pos = int(np.searchsorted(idx, i))
        ex.update({k: v[pos].item() for k, v in extra.items()})
        if why:
            ex["why"] = why
        return ex

    def flag_duplicates(self, frame: pd.DataFrame, keys: list[str], values: list[str]) -> None:
        """duplicate_row / conflicting_duplicate among rows not flagged yet (see the module docstring)."""
        ok = ~self.bad
        sub = frame.reset_index(drop=True).loc[ok, keys + values]
        repeated = sub.duplicated(keys, keep=False)
        if not repeated.any():
            return
        rep = sub[repeated]
        versions = rep.drop_duplicates().groupby(keys, sort=False).size()
        conflicted = rep.set_index(keys).index.isin(versions[versions > 1].index)
        conflict = np.zeros(len(frame), dtype=bool)
        conflict[rep.index[conflicted]] = True
        later_copy = np.zeros(len(frame), dtype=bool)
        later_copy[sub.index[sub.duplicated(keys + values, keep="first").to_numpy()]] = True
        later_copy &= ~conflict
        first_at, copies = self._copies(rep, keys)
        key_text = self._key_text(frame.reset_index(drop=True), keys)
        for kind, mask in (("duplicate_row", later_copy), ("conflicting_duplicate", conflict)):
            idx = np.flatnonzero(mask)
            self.flag(kind, mask, "+".join(keys), key_text,
                      extra={"copies": copies[idx], "first_" + self._unit(): first_at[idx]})

    def _unit(self) -> str:
        units = set(self.origin["unit"].astype(str))
        return units.pop() if len(units) == 1 else "at"

    def _copies(self, rep: pd.DataFrame, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Per row: the line (or row) of the first copy of its key, and how many copies the key has."""
        groups = pd.Series(rep.index, index=rep.index).groupby([rep[k] for k in keys], sort=False)
        first, copies = np.zeros(len(self.origin), dtype="int64"), np.zeros(len(self.origin), dtype="int64")
        first[rep.index] = self.origin["at"].to_numpy()[groups.transform("min").to_numpy()]
        copies[rep.index] = groups.transform("size").to_numpy()
        return first, copies

    @staticmethod
    def _key_text(frame: pd.DataFrame, keys: list[str]) -> pd.Series:
        parts = [frame[k].dt.strftime("%Y-%m-%d") if pd.api.types.is_datetime64_any_dtype(frame[k])
                 else frame[k].astype(str) for k in keys]
        text = parts[0]
        for p in parts[1:]:
            text = text + " " + p
        return text

    def report(self) -> dict:
        counts = {k: self.count(k) for k in KINDS if k in self._found}
        return {"on_invalid": self.on_invalid, "rows_read": len(self.origin), "rows_dropped": int(self.bad.sum()),
                **{f"dropped_{k}": n for k, n in counts.items()},
                "invalid_rows": {k: {"count": n, "examples": self.examples(k)} for k, n in counts.items()}}

    def message(self) -> str:
        """One line: the first invalid row (file order), its kind, how many rows have that kind, the others."""
        first = int(np.flatnonzero(self.bad)[0])
        kind = KINDS[self.kind_of[first]]
        j = next(j for j, (idx, *_) in enumerate(self._found[kind]) if first in idx)
        ex = self._example(kind, j, first, quoted=True)
        o = self.origin.iloc[first]
        value = f" {ex['value']}" if "value" in ex else ""
        ctx = [f"{k} {ex[k]}" for k in self.context if k in ex]
        if "copies" in ex:
            first_key = next(k for k in ex if k.startswith("first_"))
            ctx.append(f"{ex['copies']} copies, the first at {first_key[6:]} {ex[first_key]}")
        n = self.count(kind)
        others = [f"{self.count(k)} {k}" for k in KINDS if k in self._found and k != kind]
        return (f"{o['file']} {o['unit']} {o['at']}: {kind}: {ex['column']}{value}"
                f"{' ' + ex['why'] if 'why' in ex else ''}{' (' + ', '.join(ctx) + ')' if ctx else ''}; "
                f"{n} row{'s' if n != 1 else ''} of this kind{', plus ' + ', '.join(others) if others else ''}; "
                f"{DROP_HINT}")

    def finish(self, frame: pd.DataFrame, source: str, keep: pd.Series | None = None) -> tuple[pd.DataFrame, dict]:
        """`frame` without the flagged rows, and the report; PitlmError under `error` when any row was flagged.

        `keep` marks rows that must not be dropped (a JPX row carrying a split factor): dropping one is refused."""
        if self.bad.any() and self.on_invalid == "error":
            raise PitlmError(self.message())
        if keep is not None:
            lost = self.bad & np.asarray(keep, dtype=bool) & (self.kind_of != KINDS.index("duplicate_row"))
            if lost.any():
                i = int(np.flatnonzero(lost)[0])
                o = self.origin.iloc[i]
                raise PitlmError(f"{o['file']} {o['unit']} {o['at']}: cannot drop this {KINDS[self.kind_of[i]]} row: "
                                 f"it carries a split (AdjustmentFactor != 1), and dropping it would mis-adjust every "
                                 f"earlier price of that code; fix the row")
        if self.bad.all():
            counts = ", ".join(f"{self.count(k)} {k}" for k in KINDS if k in self._found)
            raise PitlmError(f"{source}: every row is invalid ({counts}); nothing to load")
        return frame.reset_index(drop=True)[~self.bad].reset_index(drop=True), self.report()


def numbers(check: RowCheck, raw: pd.Series, column: str) -> pd.Series:
    """A column as float64: empty cells stay NaN; text that is not a number is non_numeric, +-inf non_finite."""
    raw = raw.reset_index(drop=True)
    if pd.api.types.is_bool_dtype(raw):
        raise PitlmError(f"column {column} holds booleans, not numbers; is it the right column?")
    if pd.api.types.is_numeric_dtype(raw):
        num = raw.astype("float64")
    else:
        text = raw.astype("string").str.strip()
        num = pd.to_numeric(text.mask(text == ""), errors="coerce").astype("float64")
        check.flag("non_numeric", (num.isna() & text.notna() & (text != "")).to_numpy(), column, raw)
    check.flag("non_finite", np.isinf(num.to_numpy()), column, raw)
    return num


def guess_date_format(values: pd.Series, sample: int = 200) -> str | None:
    """The strftime format that parses most of the first `sample` distinct values (pandas' guesses, month-first
    and day-first); None when no value looks like a date."""
    distinct = pd.Series(values.dropna().astype(str).str.strip().head(20 * sample).unique()[:sample])
    candidates: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for v in distinct:
            for dayfirst in (False, True):
                fmt = guess_datetime_format(v, dayfirst=dayfirst)
                if fmt and fmt not in candidates:
                    candidates.append(fmt)
    if not candidates:
        return None
    scores = [int(_parse(distinct, fmt).notna().sum()) for fmt in candidates]
    return candidates[int(np.argmax(scores))]


def _parse(text: pd.Series, fmt: str) -> pd.Series:
    if fmt.endswith("%z"):  # keep the exchange's wall date: drop the UTC offset rather than convert to UTC
        text, fmt = text.str.replace(r"(Z|[+-]\d\d:?\d\d)$", "", regex=True), fmt[:-2]
    return pd.to_datetime(text, format=fmt, errors="coerce")


def parse_dates(raw: pd.Series, fmt: str | None = None,
                guessed_hint: str = "pass --date-format to set it") -> tuple[pd.Series, str | None, str]:
    """A date column as datetime64[ns] normalised to the day (NaT where unparseable), the format used, and why
    a NaT is not a date (for messages). Text dates are parsed with `fmt` or, without one, with the format guessed
    from the column's own values; datetime columns (parquet) are kept; numbers read as 20170104."""
    raw = raw.reset_index(drop=True)
    if pd.api.types.is_datetime64_any_dtype(raw):
        out, why = raw, ""
    elif pd.api.types.is_numeric_dtype(raw):  # 20170104-style numbers, not epoch nanoseconds
        fmt = fmt or "%Y%m%d"
        text = raw.map(lambda v: f"{v:.0f}" if pd.notna(v) and float(v).is_integer() else None)
        out, why = pd.to_datetime(text, format=fmt, errors="coerce"), f"is not a date in the format {fmt}"
    else:
        text = raw.astype("string").str.strip()
        given = fmt is not None
        fmt = fmt or guess_date_format(text)
        if fmt is None:
            out = pd.Series(pd.NaT, index=raw.index, dtype="datetime64[ns]")
            why = f"is not a date (no date format recognised in the column; {guessed_hint})"
        else:
            out = _parse(text, fmt)
            why = (f"is not a date in the format {fmt}" if given else
                   f"does not match the file's date format {fmt} (guessed from its dates; {guessed_hint})")
    if getattr(out.dt, "tz", None) is not None:
        out = out.dt.tz_localize(None)
    return out.dt.normalize().astype("datetime64[ns]"), fmt, why


def dates(check: RowCheck, raw: pd.Series, column: str, fmt: str | None = None) -> tuple[pd.Series, str | None]:
    """`parse_dates`, flagging the unparseable ones."""
    out, fmt, why = parse_dates(raw, fmt)
    check.flag("unparseable_date", out.isna().to_numpy(), column, raw, why=why)
    return out, fmt
