"""Long-format daily prices of any market (one row per date and security) into the normalised panel.

Input: a CSV (.csv / .csv.gz) or parquet file, or a directory of them (each file may hold one security; without a
code column the file name is the ticker). Columns are found by common names or given with flags:
    date (required), code/ticker (required unless one file per security), close (required), volume (optional, else 0),
    name (optional), adj_close (optional: used instead of close when present).
Close must already be split-adjusted (or adj_close given). Target uses the JPX definition (close t+1 -> t+2).

Dates: each file's own format, guessed from its values (MM/DD/YYYY, DD/MM/YYYY, ISO, with or without a time or
UTC offset: the wall date is kept), or `date_format` (--date-format) for all files. A date that does not match is
an unparseable_date row, named with its file, line and value. Invalid rows (pitlm.market.rows) refuse the input
under `on_invalid="error"` or are dropped and counted under "drop"; a row without a close is missing_close.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pitlm.errors import PitlmError
from pitlm.market.features import jpx_target
from pitlm.market.jpx import read_csv_lines
from pitlm.market.rows import RowCheck, numbers, origin, parse_dates

ALIASES = {
    "date": ["date", "Date", "DATE", "datetime", "timestamp", "trade_date", "TradeDate"],
    "code": ["code", "Code", "SecuritiesCode", "ticker", "Ticker", "TICKER", "symbol", "Symbol", "SYMBOL", "permno",
             "PERMNO", "secid"],
    "close": ["close", "Close", "CLOSE", "close_price", "PRC", "price"],
    "volume": ["volume", "Volume", "VOLUME", "VOL", "vol"],
    "name": ["name", "Name", "NAME", "company", "Company", "security_name"],
    "adj_close": ["adj_close", "Adj Close", "AdjClose", "adjclose", "adjusted_close", "Adjusted Close", "AdjustedClose"],
}
FLAGS = {"date": "--date-col", "code": "--code-col", "close": "--close-col", "volume": "--volume-col",
         "name": "--name-col", "adj_close": "--adj-close-col"}
SUFFIXES = (".csv", ".csv.gz", ".parquet")


def _files(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and p.name.endswith(SUFFIXES))
        if not files:
            raise PitlmError(f"{source} holds no {', '.join(SUFFIXES)} files")
        return files
    raise PitlmError(f"{source} does not exist; --from expects a CSV/parquet file or a directory of them")


def _read(path: Path) -> tuple[pd.DataFrame, np.ndarray | None, int]:
    """(rows, CSV line of each row or None for parquet, blank lines skipped)."""
    try:
        if path.name.endswith(".parquet"):
            return pd.read_parquet(path), None, 0
        return read_csv_lines(path)
    except PitlmError:
        raise
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, ValueError) as e:
        raise PitlmError(f"{path} is not readable: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def _stem(path: Path) -> str:
    name = path.name
    for suf in SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


def resolve_columns(columns: list[str], given: dict[str, str | None], source: str, per_file_code: bool) -> dict:
    """Role -> column name (None when an optional role is absent). Explicit flags must exist."""
    out: dict[str, str | None] = {}
    for role, aliases in ALIASES.items():
        if given.get(role):
            if given[role] not in columns:
                raise PitlmError(f"{source} has no column '{given[role]}' ({FLAGS[role]}); columns: {', '.join(columns)}")
            out[role] = given[role]
        else:
            out[role] = next((a for a in aliases if a in columns), None)
    required = ["date"] + ([] if per_file_code else ["code"])
    if out["close"] is None and out["adj_close"] is None:
        required.append("close")
    for role in required:
        if out[role] is None:
            raise PitlmError(f"{source} lacks a {role} column (tried {', '.join(ALIASES[role])}); name it with "
                             f"{FLAGS[role]}. Columns: {', '.join(columns)}")
    return out


def read_long_prices(source: str | Path, given: dict[str, str | None] | None = None) -> tuple[pd.DataFrame, dict]:
    """Raw long table with columns date, code, close, volume, name (cells untouched) and the origin of each row
    (_file, _unit, _at: its file and line, or row for parquet); plus a report."""
    source = Path(source).expanduser()
    files = _files(source)
    parts, blank, first_cols = [], 0, None
    for f in files:
        df, lines, skipped = _read(f)
        blank += skipped
        cols = resolve_columns([str(c) for c in df.columns], given or {}, str(f), per_file_code=len(files) > 1)
        first_cols = first_cols or cols
        where = origin(len(df), str(f), lines)
        parts.append(pd.DataFrame({"date": df[cols["date"]].to_numpy(),
                                   "code": df[cols["code"]].to_numpy() if cols["code"] else _stem(f),
                                   "close": df[cols["adj_close"] or cols["close"]].to_numpy(),
                                   "volume": df[cols["volume"]].to_numpy() if cols["volume"] else 0,
                                   "name": df[cols["name"]].to_numpy() if cols["name"] else None,
                                   "_file": str(f), "_unit": where["unit"].astype(str).to_numpy(),
                                   "_at": where["at"].to_numpy()}))
    raw = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    report = {"files": len(files), "close_column": first_cols["adj_close"] or first_cols["close"],
              "close_assumed_adjusted": first_cols["adj_close"] is None}
    if blank:
        report["blank_lines_skipped"] = blank
    return raw, report


def _dates(check: RowCheck, raw: pd.DataFrame, date_format: str | None) -> tuple[pd.Series, str]:
    """Dates parsed file by file (each file may have its own format); flags unparseable_date."""
    out = np.full(len(raw), np.datetime64("NaT"), dtype="datetime64[ns]")
    formats = []
    for _, idx in raw.groupby("_file", sort=False).indices.items():
        parsed, fmt, why = parse_dates(raw["date"].iloc[idx].infer_objects(), date_format)
        out[idx] = parsed.to_numpy()
        mask = np.zeros(len(raw), dtype=bool)
        mask[idx] = parsed.isna().to_numpy()
        check.flag("unparseable_date", mask, "date", raw["date"], why=why)
        formats.append(fmt or "none")
    return pd.Series(out), ", ".join(sorted(set(formats), key=formats.index))


def generic_panel(raw: pd.DataFrame, source: str = "prices", on_invalid: str = "error",
                  date_format: str | None = None) -> tuple[pd.DataFrame, dict]:
    """Validate a raw long table (`read_long_prices`) and build the normalised panel; (panel, report)."""
    if raw.empty:
        raise PitlmError(f"{source} has no rows")
    raw = raw.reset_index(drop=True)
    where = raw[["_file", "_unit", "_at"]].set_axis(["file", "unit", "at"], axis=1)
    check = RowCheck(where, {"code": raw["code"], "date": raw["date"]}, on_invalid)
    dates, formats = _dates(check, raw, date_format)
    codes = raw["code"].astype("string").str.strip()
    check.flag("missing_code", (codes.isna() | (codes == "")).to_numpy(), "code", raw["code"])
    close = numbers(check, raw["close"], "close")
    volume = numbers(check, raw["volume"], "volume")
    check.flag("missing_close", close.isna().to_numpy(), "close", raw["close"])
    check.flag("non_positive_price", (close <= 0).to_numpy(), "close", raw["close"])
    check.flag("negative_volume", (volume < 0).to_numpy(), "volume", raw["volume"])
    names = raw["name"].fillna("").astype(str).str.strip() if raw["name"].notna().any() else ""
    df = pd.DataFrame({"Date": dates, "code": codes.fillna("").astype(str), "Close": close,
                       "Volume": volume.fillna(0.0), "Name": names})
    check.flag_duplicates(df, ["Date", "code"], ["Close", "Volume", "Name"])
    df, rows = check.finish(df, source)
    numeric = pd.to_numeric(df["code"], errors="coerce")
    integer_codes = bool(numeric.notna().all() and (numeric == np.round(numeric)).all())
    if integer_codes:
        df["SecuritiesCode"] = numeric.astype("int64")
    else:  # tickers: number them in sorted order, keep the symbol
        tickers = sorted(df["code"].unique())
        df["SecuritiesCode"] = df["code"].map({t: i + 1 for i, t in enumerate(tickers)}).astype("int64")
        df["Ticker"] = df["code"]
    df["Name"] = df["Name"].where(df["Name"] != "", df["code"])
    df = df.sort_values(["SecuritiesCode", "Date"], kind="mergesort").reset_index(drop=True)
    df["Target"] = df.groupby("SecuritiesCode", sort=False)["Close"].transform(jpx_target)
    df["Sector"] = "Unknown"
    cols = ["Date", "SecuritiesCode", "Name", "Sector", "Close", "Volume", "Target"] + (
        [] if integer_codes else ["Ticker"])
    return df[cols], {"date_format": formats, **rows, "codes_from_tickers": not integer_codes}
