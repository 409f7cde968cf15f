"""The market loaders on dirty inputs in real formats (a US long-format export, Yahoo per-ticker files, Kaggle JPX
stock_prices.csv), the --on-invalid policy, and the volume lock of every market/world writing stage."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from pitlm.market.panel import load_panel
from pitlm.volume import HELD_LOCKS_ENV, Volume

TICKERS = ["AAPL", "BRK.B", "MSFT"]
HEADER = "date,symbol,open,high,low,close,volume"


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _us_lines(fmt="%Y-%m-%d", n_days=40, tickers=TICKERS) -> list[str]:
    """A US daily export as CSV lines (header first; list index k is file line k + 1), sorted by date then symbol
    like the NYSE prices.csv on Kaggle."""
    days = pd.bdate_range("2015-01-02", periods=n_days)
    lines = [HEADER]
    for i, d in enumerate(days):
        for j, t in enumerate(tickers):
            c = round(100.0 * (j + 1) * (1 + 0.02 * np.sin(i + j)), 2)
            lines.append(f"{d.strftime(fmt)},{t},{c},{round(c * 1.01, 2)},{round(c * 0.99, 2)},{c},{1000 + i}")
    return lines


def _set(lines: list[str], line_no: int, field: str, value: str) -> str:
    """Replace one field of the given file line; returns the old line."""
    cols = HEADER.split(",")
    old = lines[line_no - 1]
    parts = old.split(",")
    parts[cols.index(field)] = value
    lines[line_no - 1] = ",".join(parts)
    return old


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def _nothing_written(home, name, runs=0):
    """No panel, no temp or lock file of `name`, and no run directory beyond the `runs` made before."""
    market = home / "market"
    assert not (market / name).exists()
    assert not [p for p in market.iterdir() if p.name.startswith(f".{name}.")] if market.is_dir() else True
    assert len(list((home / "runs").iterdir()) if (home / "runs").is_dir() else []) == runs


def _field(lines, line_no, field):
    return lines[line_no - 1].split(",")[HEADER.split(",").index(field)]


# ----------------------------------------------------------------------------- generic long CSV

@pytest.fixture
def dirty_us(tmp_path):
    """A 3-ticker x 40-day export with one row of each kind of problem at a known line."""
    lines = _us_lines()
    bad = {"non_positive_price": (5, "close", "0"), "non_finite": (9, "close", "inf"),
           "missing_close": (14, "close", ""), "unparseable_date": (20, "date", "2015-13-45"),
           "missing_code": (23, "symbol", ""), "negative_volume": (30, "volume", "-100"),
           "non_numeric": (33, "close", "n.a.")}
    for line_no, field, value in bad.values():
        _set(lines, line_no, field, value)
    _set(lines, 40, "close", "-inf")                        # a second non_finite row
    lines.append(lines[50 - 1])                             # an identical second copy of line 50
    conflicting = lines[60 - 1].split(",")
    conflicting[5] = "999.0"
    lines.append(",".join(conflicting))                     # a copy of line 60 with another close
    lines.insert(70, "")                                    # a blank line (file line 71); later lines shift by one
    return _write(tmp_path / "us.csv", lines), lines, bad


def test_csv_error_names_kind_count_first_row_and_the_drop_flag_and_writes_nothing(cli, home, dirty_us):
    f, lines, bad = dirty_us
    code, out, err = cli("market", "csv", "us", "--from", str(f))
    assert code == 2 and out == ""
    line = _error_line(err)
    assert line.startswith(f"error: {f} line 5: non_positive_price: close '0' (code {_field(lines, 5, 'symbol')}, "
                           f"date 2015-01-05); 1 row of this kind, plus ")
    for part in ("1 unparseable_date", "1 missing_code", "1 non_numeric", "2 non_finite", "1 missing_close",
                 "1 negative_volume", "1 duplicate_row", "2 conflicting_duplicate", "--on-invalid drop"):
        assert part in line
    _nothing_written(home, "us")


def test_csv_drop_removes_and_counts_each_kind_and_records_rows_in_the_manifest(cli, home, dirty_us):
    f, lines, bad = dirty_us
    code, out, err = cli("market", "csv", "us", "--from", str(f), "--on-invalid", "drop")
    assert code == 0, err
    read = 3 * 40 + 2
    for kind, n in {"unparseable_date": 1, "missing_code": 1, "non_numeric": 1, "non_finite": 2,
                    "missing_close": 1, "non_positive_price": 1, "negative_volume": 1, "duplicate_row": 1,
                    "conflicting_duplicate": 2}.items():
        assert f"\ndropped_{kind}: {n}\n" in out
    assert f"\nrows_read: {read}\n" in out and "\nrows_dropped: 11\n" in out and "\nblank_lines_skipped: 1\n" in out
    report = json.loads((home / "market" / "us" / "manifest.json").read_text())["report"]
    assert report["on_invalid"] == "drop" and report["dropped_non_finite"] == 2
    ex = report["invalid_rows"]["non_finite"]["examples"]
    assert ex[0] == {"file": str(f), "line": 9, "column": "close", "value": "inf", "code": _field(lines, 9, "symbol"),
                     "date": _field(lines, 9, "date")}
    assert ex[1]["line"] == 40 and ex[1]["value"] == "-inf"
    assert report["invalid_rows"]["unparseable_date"]["examples"][0]["value"] == "2015-13-45"
    dup = report["invalid_rows"]["duplicate_row"]["examples"][0]
    assert dup["line"] == 3 * 40 + 3 and dup["first_line"] == 50 and dup["copies"] == 2   # after the blank line
    conf = report["invalid_rows"]["conflicting_duplicate"]["examples"]
    assert [e["line"] for e in conf] == [60, 3 * 40 + 4]
    panel = load_panel(Volume(home), "us")
    assert len(panel) == read - 11 and panel["Close"].gt(0).all() and np.isfinite(panel["Close"]).all()
    assert np.isfinite(panel["Target"].dropna()).all() and not (panel["Target"] == -1.0).any()
    d50, s50 = _field(lines, 50, "date"), _field(lines, 50, "symbol")
    assert ((panel["Date"] == d50) & (panel["Ticker"] == s50)).sum() == 1        # one copy kept
    d60, s60 = _field(lines, 60, "date"), _field(lines, 60, "symbol")
    assert not ((panel["Date"] == d60) & (panel["Ticker"] == s60)).any()         # every copy dropped
    assert set(panel["Ticker"]) == set(TICKERS)


def test_csv_inf_close_is_refused_not_turned_into_a_target_of_minus_one(cli, home, tmp_path):
    lines = _us_lines(tickers=["AAPL"], n_days=10)
    _set(lines, 4, "close", "inf")
    f = _write(tmp_path / "inf.csv", lines)
    code, _, err = cli("market", "csv", "inf", "--from", str(f))
    assert code == 2 and f"{f} line 4: non_finite: close inf (code AAPL, date 2015-01-06)" in _error_line(err)
    _nothing_written(home, "inf")
    lines[4 - 1] = lines[4 - 1].replace(",inf,", ",1e400,")  # too large for a float: read as inf
    _write(f, lines)
    code, _, err = cli("market", "csv", "inf", "--from", str(f))
    assert code == 2 and "line 4: non_finite: close inf" in _error_line(err)


def test_csv_dates_in_each_files_own_format(cli, home, tmp_path):
    us = _write(tmp_path / "us.csv", _us_lines(fmt="%m/%d/%Y", n_days=30))
    eu = _write(tmp_path / "eu.csv", _us_lines(fmt="%d/%m/%Y", n_days=30))   # day-first: 13/01/2015 and later
    tz = _write(tmp_path / "tz.csv", _us_lines(fmt="%Y-%m-%d 00:00:00-05:00", n_days=30))
    expected = pd.bdate_range("2015-01-02", periods=30)
    for f, fmt in ((us, "%m/%d/%Y"), (eu, "%d/%m/%Y"), (tz, "%Y-%m-%d %H:%M:%S%z")):
        code, out, err = cli("market", "csv", f.stem, "--from", str(f))
        assert code == 0, err
        assert f"\ndate_format: {fmt}\n" in out
        panel = load_panel(Volume(home), f.stem)
        assert list(panel["Date"].drop_duplicates().sort_values()) == list(expected)


def test_csv_a_date_in_another_format_is_named_with_its_file_line_and_the_format(cli, home, tmp_path):
    lines = _us_lines(fmt="%m/%d/%Y", n_days=20)
    _set(lines, 7, "date", "2015-01-06")
    f = _write(tmp_path / "mixed.csv", lines)
    code, _, err = cli("market", "csv", "mixed", "--from", str(f))
    assert code == 2
    assert (f"{f} line 7: unparseable_date: date '2015-01-06' does not match the file's date format %m/%d/%Y "
            f"(guessed from its dates; pass --date-format to set it)") in _error_line(err)
    code, out, err = cli("market", "csv", "mixed", "--from", str(f), "--on-invalid", "drop")
    assert code == 0 and "\ndropped_unparseable_date: 1\n" in out
    # an explicit --date-format that fits nothing: every row is invalid, one line, nothing written
    code, _, err = cli("market", "csv", "iso", "--from", str(f), "--date-format", "%d.%m.%Y", "--on-invalid", "drop")
    assert code == 2 and "every row is invalid (60 unparseable_date)" in _error_line(err)
    _nothing_written(home, "iso", runs=1)


def test_csv_directory_names_the_bad_file_and_its_line(cli, home, tmp_path):
    d = tmp_path / "yahoo"
    d.mkdir()
    days = pd.bdate_range("2019-01-02", periods=12)
    for t, base in (("AAPL", 150.0), ("MSFT", 100.0), ("XOM", 70.0)):
        rows = ["Date,Open,High,Low,Close,Adj Close,Volume"]
        rows += [f"{x:%Y-%m-%d},{base},{base + 1},{base - 1},{base + i},{base + i - 0.5},{10 + i}" for i, x in enumerate(days)]
        if t == "MSFT":
            rows[5 - 1] = f"{days[3]:%Y-%m-%d},null,null,null,null,null,null"   # Yahoo's missing day
        if t == "XOM":
            rows[9 - 1] = rows[9 - 1].rsplit(",", 2)[0] + ",abc,18"
        _write(d / f"{t}.csv", rows)
    code, _, err = cli("market", "csv", "y", "--from", str(d))
    assert code == 2
    line = _error_line(err)
    assert line.startswith(f"error: {d / 'MSFT.csv'} line 5: missing_close: close empty (code MSFT, date 2019-01-07)")
    assert "plus 1 non_numeric" in line
    code, out, err = cli("market", "csv", "y", "--from", str(d), "--on-invalid", "drop")
    assert code == 0, err
    ex = json.loads((home / "market" / "y" / "manifest.json").read_text())["report"]["invalid_rows"]["non_numeric"]
    assert ex["examples"][0] == {"file": str(d / "XOM.csv"), "line": 9, "column": "close", "value": "abc",
                                 "code": "XOM", "date": "2019-01-11"}
    assert len(load_panel(Volume(home), "y")) == 3 * 12 - 2


def test_on_invalid_takes_error_or_drop(cli, home, tmp_path):
    f = _write(tmp_path / "ok.csv", _us_lines(n_days=5))
    code, _, err = cli("market", "csv", "ok", "--from", str(f), "--on-invalid", "skip")
    assert code == 2 and "--on-invalid must be one of error, drop, got 'skip'" in _error_line(err)
    _nothing_written(home, "ok")


# ----------------------------------------------------------------------------- Kaggle JPX stock_prices.csv

JPX_HEADER = "RowId,Date,SecuritiesCode,Open,High,Low,Close,Volume,AdjustmentFactor,ExpectedDividend,SupervisionFlag,Target"


def _jpx_dir(tmp_path, edit=None):
    """stock_prices.csv as the competition writes it: empty Open..Close on a day without trades, empty Target on
    each stock's last rows, empty ExpectedDividend, a stock with a missing day; `edit(lines)` makes it dirty."""
    days = pd.bdate_range("2021-11-22", periods=8)
    lines = [JPX_HEADER]
    for code, base in ((1301, 3000.0), (1332, 500.0)):
        for i, d in enumerate(days):
            if code == 1332 and i == 4:
                continue                                               # a gap: 1332 has no row that day
            if code == 1301 and i == 3:
                lines.append(f"{d:%Y%m%d}_{code},{d:%Y-%m-%d},{code},,,,,0,1.0,,False,")   # no trades
                continue
            c = base + 10 * i
            lines.append(f"{d:%Y%m%d}_{code},{d:%Y-%m-%d},{code},{c},{c + 5},{c - 5},{c},{1000 * (i + 1)},1.0,,False,")
    if edit:
        edit(lines)
    d = tmp_path / "jpx"
    (d / "train_files").mkdir(parents=True)
    _write(d / "train_files" / "stock_prices.csv", lines)
    pd.DataFrame({"SecuritiesCode": [1301, 1332], "Name": ["KYOKUYO", "Nissui"],
                  "17SectorName": ["FOODS ", "FOODS "], "33SectorName": ["Fishery", "Fishery"]}).to_csv(
        d / "stock_list.csv", index=False)
    return d, lines


def _dirty_jpx(lines):
    parts = lines[11 - 1].split(",")                                 # 1332 on 2021-11-23
    parts[6] = "0.0"                                                 # Close
    lines[11 - 1] = ",".join(parts)
    lines.insert(6, "")                                              # a blank line at file line 7
    lines.append(lines[3 - 1])                                       # 1301 on 2021-11-23 again, identical


def test_jpx_empty_fields_and_gaps_load_and_dirty_rows_are_refused_with_their_line(cli, home, tmp_path):
    clean, _ = _jpx_dir(tmp_path / "clean")
    code, out, err = cli("market", "jpx", "clean", "--from", str(clean))
    assert code == 0, err
    assert "\nclose_missing_filled: 1\n" in out and "\nrows_dropped: 0\n" in out and "\nrows: 15\n" in out
    d, lines = _jpx_dir(tmp_path / "dirty", _dirty_jpx)
    prices = d / "train_files" / "stock_prices.csv"
    assert lines[12 - 1].split(",")[6] == "0.0"                      # line 11 moved to 12 by the blank line
    code, out, err = cli("market", "jpx", "dirty", "--from", str(d))
    assert code == 2 and out == ""
    line = _error_line(err)
    assert (f"{prices} line 12: non_positive_price: Close 0.0 (SecuritiesCode 1332, Date 2021-11-23); "
            f"1 row of this kind, plus 1 duplicate_row; fix the input, or pass --on-invalid drop") in line
    _nothing_written(home, "dirty", runs=1)                          # only the clean load's run
    code, out, err = cli("market", "jpx", "dirty", "--from", str(d), "--on-invalid", "drop")
    assert code == 0, err
    for part in ("dropped_non_positive_price: 1", "dropped_duplicate_row: 1", "rows_dropped: 2",
                 "blank_lines_skipped: 1", "close_missing_filled: 1", "rows: 14"):
        assert f"\n{part}\n" in out
    report = json.loads((home / "market" / "dirty" / "manifest.json").read_text())["report"]
    assert report["invalid_rows"]["duplicate_row"]["examples"][0]["line"] == len(lines)
    assert report["invalid_rows"]["duplicate_row"]["examples"][0]["first_line"] == 3


def test_jpx_drop_never_drops_a_row_that_carries_a_split(cli, home, tmp_path):
    def split_on_bad_row(lines):
        parts = lines[4 - 1].split(",")                              # 1301 on 2021-11-24
        parts[6], parts[8] = "inf", "0.5"                            # Close, AdjustmentFactor
        lines[4 - 1] = ",".join(parts)

    d, lines = _jpx_dir(tmp_path, split_on_bad_row)
    code, _, err = cli("market", "jpx", "s", "--from", str(d), "--on-invalid", "drop")
    assert code == 2
    assert "line 4: cannot drop this non_finite row: it carries a split (AdjustmentFactor != 1)" in _error_line(err)
    _nothing_written(home, "s")


# ----------------------------------------------------------------------------- the volume lock

def _pitlm(home, *args):
    """The CLI in a separate process (POSIX record locks exclude other processes)."""
    env = {**os.environ, "PITLM_HOME": str(home), "PITLM_NO_PROGRESS": "1"}
    env.pop(HELD_LOCKS_ENV, None)
    return subprocess.run([sys.executable, "-c", "from pitlm.cli import main; main()", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def _snapshot(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


WORLD = ["--set", "n_companies=3", "--set", "n_sectors=1", "--set", "news_repeats=1", "--set", "history_docs=5"]


@pytest.mark.parametrize("kind, name, args", [
    ("market", "us", lambda t: ["market", "csv", "us", "--from", str(t / "us.csv")]),
    ("market", "jx", lambda t: ["market", "jpx", "jx", "--from", str(t / "jpx")]),
    ("market", "wm", lambda t: ["market", "world", "wm", "--world", "w"]),
    ("world", "w", lambda t: ["world", "build", "w", *WORLD]),
])
def test_a_second_writer_of_the_same_entry_gets_one_line_and_exit_2(cli, home, tmp_path, kind, name, args):
    _write(tmp_path / "us.csv", _us_lines(n_days=10))
    _jpx_dir(tmp_path)
    assert cli("world", "build", "w", *WORLD)[0] == 0
    argv = args(tmp_path)
    if argv[:2] != ["world", "build"]:
        assert cli(*argv)[0] == 0
    vol = Volume(home)
    before, runs = _snapshot(vol.path(kind, name)), sorted(p.name for p in (home / "runs").iterdir())
    with vol.lock(kind, name):
        done = _pitlm(home, *argv, "--overwrite")
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert f"another pitlm process is writing {kind} '{name}'" in _error_line(done.stderr)
    assert _snapshot(vol.path(kind, name)) == before
    assert sorted(p.name for p in (home / "runs").iterdir()) == runs
    assert cli(*argv, "--overwrite")[0] == 0                         # the lock, nothing else, refused it
