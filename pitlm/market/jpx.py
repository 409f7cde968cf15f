"""Kaggle JPX (`jpx-tokyo-stock-exchange-prediction`) into the normalised panel; the synthetic world's prices
are written in the same format and go through the same code.

Split adjustment (AdjustmentFactor, AF). Two conventions exist for which rows a factor scales:

  kaggle   the factor on row t scales Close on t AND every earlier row; the split takes effect on the next
           trading day (t+1), so the raw close jumps by AF between t and t+1. This is the competition's starter
           code (`adjust_price`): sort dates descending, CumulativeAdjustmentFactor = cumprod(AF),
           AdjustedClose = Close * CumulativeAdjustmentFactor.
  ex-date  the factor on row t scales only rows BEFORE t (t is the ex-date; the raw close jumps between t-1
           and t). Data from the J-Quants API is handled with this placement.

Either way prices are adjusted to the latest basis (the last row is unscaled) and Volume is divided by the same
cumulative factor. A 2-for-1 split has AF = 0.5: pre-split closes are halved, pre-split volumes doubled.
`--adjustment auto` (the default) picks, from the data itself, the convention under which the raw close jumps
where the factor says it should, and reports how many split events agree; the recomputed Target is then compared
with the file's Target.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from pitlm.errors import PitlmError
from pitlm.market.features import jpx_target
from pitlm.market.rows import RowCheck, dates, numbers, origin

COMPETITION = "jpx-tokyo-stock-exchange-prediction"
PRICE_COLUMNS = ["RowId", "Date", "SecuritiesCode", "Open", "High", "Low", "Close", "Volume", "AdjustmentFactor",
                 "ExpectedDividend", "SupervisionFlag", "Target"]
REQUIRED_PRICE_COLUMNS = ["Date", "SecuritiesCode", "Close", "Volume", "AdjustmentFactor"]
LIST_COLUMNS = ["SecuritiesCode", "EffectiveDate", "Name", "Section/Products", "NewMarketSegment", "33SectorCode",
                "33SectorName", "17SectorCode", "17SectorName", "NewIndexSeriesSizeCode", "NewIndexSeriesSize",
                "TradeDate", "Close", "IssuedShares", "MarketCapitalization", "Universe0"]
SECTOR_COLUMNS = ("17SectorName", "33SectorName")
CONVENTIONS = ("auto", "kaggle", "ex-date")
STAGE_BY_HAND = (f"download train_files/stock_prices.csv and stock_list.csv from "
                 f"https://www.kaggle.com/competitions/{COMPETITION}/data into one directory DIR "
                 f"(e.g. $PITLM_HOME/market/_staged/jpx/), then run `pitlm market jpx NAME --from DIR`")


# ----------------------------------------------------------------------------- reading and validation

def find_jpx_files(directory: str | Path) -> tuple[Path, Path]:
    """(stock_prices.csv, stock_list.csv) in DIR; prices may sit under DIR/train_files/."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise PitlmError(f"{d} is not a directory; --from expects a directory holding stock_prices.csv "
                         f"(or train_files/stock_prices.csv) and stock_list.csv")
    prices = next((p for p in (d / "train_files" / "stock_prices.csv", d / "stock_prices.csv") if p.is_file()), None)
    if prices is None:
        raise PitlmError(f"no stock_prices.csv in {d} or {d / 'train_files'}; {STAGE_BY_HAND}")
    if not (d / "stock_list.csv").is_file():
        raise PitlmError(f"no stock_list.csv in {d}; {STAGE_BY_HAND}")
    return prices, d / "stock_list.csv"


def read_csv(path: str | Path, **kwargs) -> pd.DataFrame:
    try:
        return pd.read_csv(path, low_memory=False, **kwargs)
    except FileNotFoundError as e:
        raise PitlmError(f"{path} does not exist") from e
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise PitlmError(f"{path} is not a readable CSV: {str(e).splitlines()[0]}") from e


def read_csv_lines(path: str | Path) -> tuple[pd.DataFrame, np.ndarray, int]:
    """(rows, the file line of each row (header = line 1), number of blank lines skipped)."""
    df = read_csv(path, skip_blank_lines=False)
    blank = df.isna().all(axis=1).to_numpy() if len(df.columns) else np.zeros(len(df), dtype=bool)
    return df[~blank].reset_index(drop=True), np.flatnonzero(~blank) + 2, int(blank.sum())


def _first_bad(values: pd.Series, ok: pd.Series) -> str:
    i = int(np.flatnonzero(~ok.to_numpy())[0])
    return f"{values.iloc[i]!r} at data row {i + 1}"


def to_numeric(df: pd.DataFrame, col: str, source: str, *, integer: bool = False) -> pd.Series:
    """Column as numbers; empty cells stay NaN, anything else that is not a number is an error (stock_list.csv)."""
    raw = df[col]
    if pd.api.types.is_bool_dtype(raw):
        raise PitlmError(f"{source}: column {col} must hold numbers, found booleans")
    num = pd.to_numeric(raw, errors="coerce")
    bad = num.isna() & raw.notna()
    if not pd.api.types.is_numeric_dtype(raw):
        bad &= raw.astype(str).str.strip() != ""
    if bad.any():
        raise PitlmError(f"{source}: column {col} has {int(bad.sum())} non-numeric value(s), first "
                         f"{_first_bad(raw, ~bad)}")
    if integer and (num.dropna() != np.round(num.dropna())).any():
        ok = num.isna() | (num == np.round(num))
        raise PitlmError(f"{source}: column {col} must hold integers, found {_first_bad(raw, ok)}")
    return num


def require_columns(df: pd.DataFrame, required: list[str], source: str, hint: str = "") -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise PitlmError(f"{source} lacks column(s) {', '.join(missing)} (has: {', '.join(map(str, df.columns))})"
                         f"{'; ' + hint if hint else ''}")


def _codes(check: RowCheck, raw: pd.Series) -> pd.Series:
    """SecuritiesCode as int64 (0 where flagged): empty is missing_code, anything but an integer bad_code."""
    text = raw.astype("string").str.strip()
    empty = (text.isna() | (text == "")).to_numpy()
    num = pd.to_numeric(text.mask(text == ""), errors="coerce").astype("float64").to_numpy()
    check.flag("missing_code", empty, "SecuritiesCode", raw)
    check.flag("bad_code", ~empty & ~(np.isfinite(num) & (num == np.round(num))), "SecuritiesCode", raw)
    return pd.Series(np.where(np.isfinite(num), num, 0), dtype="float64").round().astype("int64")


def clean_jpx_prices(df: pd.DataFrame, source: str = "stock_prices.csv", on_invalid: str = "error",
                     lines: np.ndarray | None = None) -> tuple[pd.DataFrame, dict]:
    """Typed copy of a JPX stock_prices table, sorted by (code, date), and the row report (pitlm.market.rows).

    Missing columns or no rows are one-line PitlmErrors whatever the policy; invalid rows (see the kinds in
    pitlm.market.rows) refuse the table under `error` and are dropped under `drop`, except that a row carrying
    a split (a non-empty AdjustmentFactor other than 1) is never dropped. Empty Open/High/Low/Close, Volume and
    Target are allowed (days without trades); an empty AdjustmentFactor is 1."""
    require_columns(df, REQUIRED_PRICE_COLUMNS, source)
    if df.empty:
        raise PitlmError(f"{source} has no rows")
    df = df.reset_index(drop=True)
    check = RowCheck(origin(len(df), source, lines), {"SecuritiesCode": df["SecuritiesCode"], "Date": df["Date"]},
                     on_invalid)
    out = pd.DataFrame({"Date": dates(check, df["Date"], "Date", fmt="%Y-%m-%d")[0],
                        "SecuritiesCode": _codes(check, df["SecuritiesCode"])})
    prices = [c for c in ("Open", "High", "Low", "Close") if c in df.columns]
    for col in prices:
        out[col] = numbers(check, df[col], col)
    for col in prices:
        check.flag("non_positive_price", (out[col] <= 0).to_numpy(), col, df[col])
    out["Volume"] = numbers(check, df["Volume"], "Volume")
    check.flag("negative_volume", (out["Volume"] < 0).to_numpy(), "Volume", df["Volume"])
    af = numbers(check, df["AdjustmentFactor"], "AdjustmentFactor")
    check.flag("non_positive_adjustment_factor", (af <= 0).to_numpy(), "AdjustmentFactor", df["AdjustmentFactor"])
    splits = (df["AdjustmentFactor"].notna() & (af != 1.0)).to_numpy()
    out["AdjustmentFactor"] = af.fillna(1.0)
    out["Target"] = numbers(check, df["Target"], "Target") if "Target" in df.columns else np.nan
    check.flag_duplicates(out, ["Date", "SecuritiesCode"], [c for c in out.columns if c not in ("Date", "SecuritiesCode")])
    out, report = check.finish(out, source, keep=splits)
    return out.sort_values(["SecuritiesCode", "Date"], kind="mergesort").reset_index(drop=True), report


def validate_jpx_prices(df: pd.DataFrame, source: str = "stock_prices.csv") -> pd.DataFrame:
    """`clean_jpx_prices` under the `error` policy, without the report: any invalid row is a one-line PitlmError."""
    return clean_jpx_prices(df, source)[0]


def read_stock_list(path: str | Path, sector: str = "17SectorName") -> pd.DataFrame:
    """SecuritiesCode, Name, Sector from a JPX stock_list.csv (sector names stripped of padding)."""
    if sector not in SECTOR_COLUMNS:
        raise PitlmError(f"--sector must be one of {', '.join(SECTOR_COLUMNS)}, got '{sector}'")
    source = Path(path).name
    df = read_csv(path)
    require_columns(df, ["SecuritiesCode", "Name", sector], source)
    out = pd.DataFrame({"SecuritiesCode": to_numeric(df, "SecuritiesCode", source, integer=True),
                        "Name": df["Name"].fillna("").astype(str).str.strip(),
                        "Sector": df[sector].fillna("").astype(str).str.strip()})
    out = out.dropna(subset=["SecuritiesCode"]).astype({"SecuritiesCode": "int64"})
    return out.drop_duplicates("SecuritiesCode", keep="last")


# ----------------------------------------------------------------------------- adjustment and Target

def cumulative_factor(code: pd.Series, af: pd.Series, convention: str) -> pd.Series:
    """Per-row cumulative adjustment factor for rows sorted by (code, date): the product of the factors that
    scale this row (see the module docstring); 1.0 on each stock's last row."""
    assert convention in ("kaggle", "ex-date"), convention
    values = af.to_numpy(dtype=float)
    rev = pd.Series(values[::-1])
    incl = rev.groupby(code.to_numpy()[::-1]).cumprod().to_numpy()[::-1]  # product over rows >= t of the stock
    return pd.Series(incl if convention == "kaggle" else incl / values, index=af.index)


def split_events(df: pd.DataFrame) -> pd.DataFrame:
    """Rows with AdjustmentFactor != 1 and the raw log close jumps into (jump_at) and out of (jump_after) them.
    `df` sorted by (SecuritiesCode, Date), with raw Close."""
    g = df.groupby("SecuritiesCode", sort=False)["Close"]
    log_c = np.log(df["Close"])
    jump_at = log_c - np.log(g.shift(1))
    jump_after = np.log(g.shift(-1)) - log_c
    ev = df["AdjustmentFactor"] != 1.0
    return pd.DataFrame({"log_af": np.log(df.loc[ev, "AdjustmentFactor"]), "jump_at": jump_at[ev],
                         "jump_after": jump_after[ev]}).dropna()


def detect_convention(df: pd.DataFrame) -> tuple[str, int, int]:
    """(convention, events, events agreeing with it): an event agrees with 'kaggle' when the raw close moves by
    the factor between t and t+1 rather than between t-1 and t. Ties and no events give 'kaggle'."""
    ev = split_events(df)
    kaggle_votes = int(((ev["jump_after"] - ev["log_af"]).abs() <= (ev["jump_at"] - ev["log_af"]).abs()).sum())
    if kaggle_votes * 2 >= len(ev):
        return "kaggle", len(ev), kaggle_votes
    return "ex-date", len(ev), len(ev) - kaggle_votes


def adjust(prices: pd.DataFrame, convention: str = "auto") -> tuple[pd.DataFrame, dict]:
    """Add CumulativeAdjustmentFactor, AdjustedClose (forward-filled over missing closes within a stock) and
    AdjustedVolume to validated prices (sorted by code, date). Returns (frame, report)."""
    if convention not in CONVENTIONS:
        raise PitlmError(f"--adjustment must be one of {', '.join(CONVENTIONS)}, got '{convention}'")
    df = prices.copy()
    chosen, n_events, n_match = detect_convention(df)
    if convention != "auto":
        n_match = n_match if convention == chosen else n_events - n_match
        chosen = convention
    df["CumulativeAdjustmentFactor"] = cumulative_factor(df["SecuritiesCode"], df["AdjustmentFactor"], chosen)
    adj = df["Close"] * df["CumulativeAdjustmentFactor"]
    df["AdjustedClose"] = adj.groupby(df["SecuritiesCode"], sort=False).ffill()
    df["AdjustedVolume"] = df["Volume"].fillna(0.0) / df["CumulativeAdjustmentFactor"]
    return df, {"adjustment_convention": chosen, "adjustment_events": n_events, "adjustment_events_matching": n_match,
                "close_missing_filled": int((adj.isna() & df["AdjustedClose"].notna()).sum())}


def recompute_target(df: pd.DataFrame) -> pd.Series:
    """JPX Target from AdjustedClose, per stock (rows sorted by code, date)."""
    return df.groupby("SecuritiesCode", sort=False)["AdjustedClose"].transform(jpx_target)


def compare_targets(recomputed: pd.Series, provided: pd.Series, tolerance: float) -> dict:
    both = recomputed.notna() & provided.notna()
    diff = (recomputed[both] - provided[both]).abs()
    return {"target_compared": int(both.sum()), "target_disagreements": int((diff > tolerance).sum()),
            "target_max_abs_diff": float(diff.max()) if len(diff) else 0.0}


def jpx_panel(prices: pd.DataFrame, stock_list: pd.DataFrame, *, adjustment: str = "auto",
              target_tolerance: float = 1e-6, source: str = "stock_prices.csv", on_invalid: str = "error",
              lines: np.ndarray | None = None) -> tuple[pd.DataFrame, dict]:
    """The normalised panel (pitlm.market.features schema) from raw JPX prices and a stock list
    (SecuritiesCode, Name, Sector). Target is recomputed from adjusted closes; where it cannot be (a stock's last
    two rows) the file's Target is used. Invalid rows: see `clean_jpx_prices` (`lines`: each row's file line).
    Returns (panel, report of key: value facts, with the row report of pitlm.market.rows)."""
    clean, rows = clean_jpx_prices(prices, source, on_invalid, lines)
    df, report = adjust(clean, adjustment)
    report = {**rows, **report}
    df["TargetRecomputed"] = recompute_target(df)
    report.update(compare_targets(df["TargetRecomputed"], df["Target"], target_tolerance))
    fill = df["TargetRecomputed"].isna() & df["Target"].notna()
    report["target_filled_from_file"] = int(fill.sum())
    df["TargetRecomputed"] = df["TargetRecomputed"].where(~fill, df["Target"])
    df = df[df["AdjustedClose"].notna()]
    listed = stock_list.set_index("SecuritiesCode")
    names = df["SecuritiesCode"].map(listed["Name"])
    report["stocks_without_list"] = int(df.loc[names.isna(), "SecuritiesCode"].nunique())
    panel = pd.DataFrame({"Date": df["Date"], "SecuritiesCode": df["SecuritiesCode"], "Name": names.fillna(""),
                          "Sector": df["SecuritiesCode"].map(listed["Sector"]).fillna("Unknown"),
                          "Close": df["AdjustedClose"].astype("float64"),
                          "Volume": df["AdjustedVolume"].astype("float64"),
                          "Target": df["TargetRecomputed"].astype("float64")}).reset_index(drop=True)
    if panel.empty:
        raise PitlmError(f"{source}: no rows with a close price; nothing to load")
    return panel, report


def load_jpx_dir(directory: str | Path, *, sector: str = "17SectorName", adjustment: str = "auto",
                 target_tolerance: float = 1e-6, on_invalid: str = "error") -> tuple[pd.DataFrame, dict, dict]:
    """Read and normalise a directory of JPX CSVs: (panel, report, inputs {file: path})."""
    prices_path, list_path = find_jpx_files(directory)
    stock_list = read_stock_list(list_path, sector)
    prices, lines, blank = read_csv_lines(prices_path)
    panel, report = jpx_panel(prices, stock_list, adjustment=adjustment, target_tolerance=target_tolerance,
                              source=str(prices_path), on_invalid=on_invalid, lines=lines)
    if blank:
        report["blank_lines_skipped"] = blank
    return panel, report, {"stock_prices": str(prices_path), "stock_list": str(list_path), "sector": sector}


# ----------------------------------------------------------------------------- Kaggle download

def kaggle_credentials() -> str | None:
    """Where Kaggle credentials come from, or None. Never returns the secret itself."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "environment (KAGGLE_USERNAME, KAGGLE_KEY)"
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "environment (KAGGLE_API_TOKEN)"
    config_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR") or Path.home() / ".kaggle").expanduser()
    path = config_dir / "kaggle.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PitlmError(f"{path} is not valid JSON ({e}); it must be {{\"username\": ..., \"key\": ...}}") from e
        if not (isinstance(data, dict) and data.get("username") and data.get("key")):
            raise PitlmError(f"{path} lacks 'username' or 'key'; download a fresh one from "
                             f"https://www.kaggle.com/settings/api")
        return str(path)
    if (config_dir / "access_token").is_file():
        return str(config_dir / "access_token")
    return None


NO_CREDENTIALS = ("no Kaggle credentials: export KAGGLE_USERNAME and KAGGLE_KEY (or write ~/.kaggle/kaggle.json) "
                  "and accept the competition rules on kaggle.com; or stage the files by hand: " + STAGE_BY_HAND)


def download_jpx(dest: str | Path) -> Path:
    """Download stock_prices.csv (train_files/) and stock_list.csv with the `kaggle` package into `dest`
    (files already there are kept). Returns `dest`, ready for `load_jpx_dir`."""
    if kaggle_credentials() is None:
        raise PitlmError(NO_CREDENTIALS)
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi  # noqa: PLC0415 - optional dependency kaggle
    except Exception as e:  # the package authenticates and imports optional modules at import time
        raise PitlmError(f"cannot import the kaggle package ({e}); pip install 'kaggle>=1.6', or stage the files "
                         f"by hand: {STAGE_BY_HAND}") from e
    dest = Path(dest)
    (dest / "train_files").mkdir(parents=True, exist_ok=True)
    api = KaggleApi()
    try:
        api.authenticate()
        for remote, local_dir in (("train_files/stock_prices.csv", dest / "train_files"), ("stock_list.csv", dest)):
            if (local_dir / Path(remote).name).is_file():
                continue
            api.competition_download_file(COMPETITION, remote, path=str(local_dir), quiet=False)
            for z in local_dir.glob("*.zip"):  # large files arrive zipped
                with zipfile.ZipFile(z) as zf:
                    zf.extractall(local_dir)
                z.unlink()
    except SystemExit as e:  # the kaggle client exits on authentication failure
        raise PitlmError(f"Kaggle authentication failed; check your credentials, or stage the files by hand: "
                         f"{STAGE_BY_HAND}") from e
    except Exception as e:
        raise PitlmError(f"Kaggle download of {COMPETITION} failed ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                         f"accept the rules at https://www.kaggle.com/competitions/{COMPETITION}/rules, "
                         f"or stage the files by hand: {STAGE_BY_HAND}") from e
    return dest
