import json

import numpy as np
import pandas as pd
import pytest

from pitlm.errors import PitlmError
from pitlm.market.jpx import adjust, jpx_panel, kaggle_credentials, validate_jpx_prices
from pitlm.market.panel import load_panel, save_panel
from pitlm.volume import Volume

DATES = ["2021-01-04", "2021-01-05", "2021-01-06", "2021-01-07", "2021-01-08"]


def _prices(close, af, volume=(10, 10, 20, 20, 20), code=1301, target=None):
    n = len(close)
    df = pd.DataFrame({"RowId": [f"{d.replace('-', '')}_{code}" for d in DATES[:n]], "Date": DATES[:n],
                       "SecuritiesCode": code, "Open": close, "High": close, "Low": close, "Close": close,
                       "Volume": list(volume)[:n], "AdjustmentFactor": af, "ExpectedDividend": np.nan,
                       "SupervisionFlag": False, "Target": target if target is not None else np.nan})
    return df


STOCKS = pd.DataFrame({"SecuritiesCode": [1301], "Name": ["Kanto Steel"], "Sector": ["STEEL"]})


def test_two_for_one_split_kaggle_placement_hand_example():
    # 2-for-1 split effective 2021-01-06: the factor 0.5 sits on the last pre-split day (Kaggle's starter code:
    # cumprod of AF over dates >= t scales Close on t and before).
    df, rep = adjust(validate_jpx_prices(_prices([100.0, 102.0, 51.0, 52.0, 52.0], [1, 0.5, 1, 1, 1])))
    np.testing.assert_allclose(df["AdjustedClose"], [50.0, 51.0, 51.0, 52.0, 52.0])
    np.testing.assert_allclose(df["AdjustedVolume"], [20, 20, 20, 20, 20])  # pre-split volume doubled
    assert rep["adjustment_convention"] == "kaggle" and rep["adjustment_events"] == 1 == rep["adjustment_events_matching"]


def test_ex_date_placement_is_detected_and_adjusts_the_same_prices():
    # The same split with the factor on the ex-date (J-Quants placement): scales only earlier rows.
    df, rep = adjust(validate_jpx_prices(_prices([100.0, 102.0, 51.0, 52.0, 52.0], [1, 1, 0.5, 1, 1])))
    np.testing.assert_allclose(df["AdjustedClose"], [50.0, 51.0, 51.0, 52.0, 52.0])
    assert rep["adjustment_convention"] == "ex-date"
    # forcing the wrong convention is allowed but reported: the one event does not match
    df, rep = adjust(validate_jpx_prices(_prices([100.0, 102.0, 51.0, 52.0, 52.0], [1, 1, 0.5, 1, 1])), "kaggle")
    np.testing.assert_allclose(df["AdjustedClose"], [50.0, 51.0, 25.5, 52.0, 52.0])
    assert rep["adjustment_events_matching"] == 0


def test_reverse_split_and_missing_close_forward_filled():
    df, rep = adjust(validate_jpx_prices(_prices([100.0, 100.0, np.nan, 500.0, 510.0], [1, 1, 5.0, 1, 1])))
    # AF 5 (1-for-5) on 01-06, a day without a close; the raw close jumps 01-06 -> 01-07, so Kaggle placement
    np.testing.assert_allclose(df["AdjustedClose"], [500.0, 500.0, 500.0, 500.0, 510.0])
    assert rep["close_missing_filled"] == 1


def test_panel_recomputes_target_and_reports_disagreements():
    close = [100.0, 102.0, 51.0, 52.0, 52.0]
    # adjusted closes 50, 51, 51, 52, 52 -> Target[0] = 51/51 - 1 = 0, Target[1] = 52/51 - 1, Target[2] = 0
    provided = [0.0, 52 / 51 - 1, 0.5, 0.01, -0.02]
    panel, rep = jpx_panel(_prices(close, [1, 0.5, 1, 1, 1], target=provided), STOCKS)
    np.testing.assert_allclose(panel["Target"], [0.0, 52 / 51 - 1, 0.0, 0.01, -0.02])  # last two from the file
    assert rep["target_compared"] == 3 and rep["target_disagreements"] == 1
    assert rep["target_max_abs_diff"] == pytest.approx(0.5) and rep["target_filled_from_file"] == 2
    assert list(panel.columns) == ["Date", "SecuritiesCode", "Name", "Sector", "Close", "Volume", "Target"]
    assert panel["Name"].iloc[0] == "Kanto Steel" and panel["Sector"].iloc[0] == "STEEL"


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.drop(columns=["Close"]), "lacks column(s) Close"),
    (lambda d: d.assign(Close=["1", "x", "3", "4", "5"]), "row 2: non_numeric: Close 'x' (SecuritiesCode 1301, "
     "Date 2021-01-05); 1 row of this kind"),
    (lambda d: d.assign(Date=["2021-01-04", "Jan 5", *DATES[2:]]), "row 2: unparseable_date: Date 'Jan 5' is not a "
     "date in the format %Y-%m-%d"),
    (lambda d: d.assign(Date=DATES[:4] + DATES[3:4]), "row 4: conflicting_duplicate: Date+SecuritiesCode "
     "2021-01-07 1301 (2 copies, the first at row 4); 2 rows of this kind"),
    (lambda d: d.assign(Close=[1.0, 0.0, 3.0, 4.0, 5.0]), "row 2: non_positive_price: Close 0.0"),
    (lambda d: d.assign(Close=[1.0, 2.0, np.inf, 4.0, 5.0]), "row 3: non_finite: Close inf"),
    (lambda d: d.assign(SecuritiesCode=1301.5), "bad_code: SecuritiesCode 1301.5"),
    (lambda d: d.iloc[:0], "has no rows"),
])
def test_validation_errors_are_one_clear_line(mutate, message):
    with pytest.raises(PitlmError) as e:
        validate_jpx_prices(mutate(_prices([1.0, 2.0, 3.0, 4.0, 5.0], [1] * 5)))
    assert message in str(e.value) and "\n" not in str(e.value)


def _error_line(err: str) -> str:
    """The CLI's one `error: ...` line (stderr may also carry log warnings, e.g. the persistence guard's)."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _stage(d, prices, sub="train_files"):
    (d / sub).mkdir(parents=True, exist_ok=True)
    prices.to_csv(d / sub / "stock_prices.csv", index=False)
    pd.DataFrame({"SecuritiesCode": [1301], "Name": ["Kanto Steel"], "17SectorName": ["STEEL & NONFERROUS METALS "],
                  "33SectorName": ["Iron and Steel"]}).to_csv(d / "stock_list.csv", index=False)
    return d


def test_cli_jpx_from_dir_writes_panel_and_summary(cli, home, tmp_path):
    d = _stage(tmp_path / "jpx", _prices([100.0, 102.0, 51.0, 52.0, 52.0], [1, 0.5, 1, 1, 1]))
    code, out, err = cli("market", "jpx", "k", "--from", str(d), "--sector", "33SectorName")
    assert code == 0, err
    for line in ("rows: 5", "stocks: 1", "dates: 5", "first_date: 2021-01-04", "last_date: 2021-01-08",
                 "target_disagreements: 0", "adjustment_convention: kaggle"):
        assert line in out
    panel = load_panel(Volume(home), "k")
    assert panel["Sector"].iloc[0] == "Iron and Steel" and panel["Close"].iloc[0] == 50.0
    manifest = json.loads((home / "market" / "k" / "manifest.json").read_text())
    assert manifest["payload"][0]["path"] == "panel.parquet" and manifest["summary"]["rows"] == 5
    code, _, err = cli("market", "jpx", "k", "--from", str(d))
    assert code == 2 and "already exists" in err


def test_cli_malformed_csv_gives_one_error_line_and_writes_nothing(cli, home, tmp_path):
    d = _stage(tmp_path / "bad", _prices([100.0, 102.0, 51.0, 52.0, 52.0], [1, 0.5, 1, 1, 1]).drop(columns=["Volume"]))
    code, out, err = cli("market", "jpx", "bad", "--from", str(d))
    assert code == 2 and out == ""
    assert "lacks column(s) Volume" in _error_line(err)
    assert not (home / "market" / "bad").exists()
    assert not [p for p in (home / "market").iterdir() if p.name.startswith(".bad")]
    code, _, err = cli("market", "jpx", "bad", "--from", str(tmp_path / "nowhere"))
    assert code == 2 and "is not a directory" in err


def test_cli_world_through_the_jpx_loader(cli, home):
    code, out, err = cli("world", "build", "w", "--set", "n_companies=4", "--set", "n_sectors=2",
                         "--set", "news_repeats=1", "--seed", "5")
    assert code == 0, err
    assert "oracle_r2:" in out and "docs:" in out and "seed: 5" in out
    code, _, err = cli("world", "build", "w")
    assert code == 2 and "already exists" in err
    code, out, err = cli("market", "world", "wm", "--world", "w")
    assert code == 0, err
    assert "stocks: 4" in out and "target_disagreements: 0" in out
    assert len(load_panel(Volume(home), "wm")) == 4 * 1242
    code, _, err = cli("market", "world", "x", "--world", "missing")
    assert code == 2 and "pitlm world build missing" in err


def test_cli_csv_long_format_with_tickers(cli, home, tmp_path):
    f = tmp_path / "us.csv"
    pd.DataFrame({"day": ["2021-01-04", "2021-01-05", "2021-01-06", "2021-01-04", "2021-01-05", "2021-01-06"],
                  "ticker": ["MSFT", "MSFT", "MSFT", "AAPL", "AAPL", "AAPL"], "Close": [10, 11, 12, 20, 22, 33],
                  "Adj Close": [5, 5.5, 6.6, 20, 22, 33], "volume": [1, 2, 3, 4, 5, 6]}).to_csv(f, index=False)
    code, _, err = cli("market", "csv", "us", "--from", str(f))
    assert code == 2 and "lacks a date column" in err and "--date-col" in err
    code, out, err = cli("market", "csv", "us", "--from", str(f), "--date-col", "day")
    assert code == 0, err
    assert "codes_from_tickers: true" in out and "close_column: Adj Close" in out
    panel = load_panel(Volume(home), "us")
    aapl = panel[panel["Ticker"] == "AAPL"]
    assert aapl["SecuritiesCode"].iloc[0] == 1 and aapl["Name"].iloc[0] == "AAPL"
    assert aapl["Target"].iloc[0] == pytest.approx(33 / 22 - 1)
    msft = panel[panel["Ticker"] == "MSFT"]
    assert msft["Target"].iloc[0] == pytest.approx(6.6 / 5.5 - 1) and msft["Target"].iloc[1:].isna().all()


def test_cli_csv_directory_of_one_file_per_security(cli, home, tmp_path):
    d = tmp_path / "per"
    d.mkdir()
    for code, base in ((7203, 100.0), (6758, 50.0)):
        pd.DataFrame({"Date": DATES, "Close": [base * (1 + i / 10) for i in range(5)],
                      "Volume": [100] * 5}).to_csv(d / f"{code}.csv", index=False)
    code, out, err = cli("market", "csv", "per", "--from", str(d))
    assert code == 0, err
    assert "stocks: 2" in out and "files: 2" in out
    panel = load_panel(Volume(home), "per")
    assert sorted(panel["SecuritiesCode"].unique()) == [6758, 7203] and "Ticker" not in panel.columns
    bad = tmp_path / "neg.csv"
    pd.DataFrame({"date": DATES, "code": 1, "close": [1, 2, -3, 4, 5]}).to_csv(bad, index=False)
    code, _, err = cli("market", "csv", "neg", "--from", str(bad))
    assert code == 2 and f"{bad} line 4: non_positive_price: close -3 (code 1, date 2021-01-06); 1 row of" in err


def test_load_panel_absent_raises(home):
    with pytest.raises(PitlmError, match="no market panel 'nope'"):
        load_panel(Volume(home).ensure(), "nope")


def test_save_panel_round_trip(home):
    vol = Volume(home).ensure()
    panel, _ = jpx_panel(_prices([100.0, 102.0, 51.0, 52.0, 52.0], [1, 0.5, 1, 1, 1]), STOCKS)
    save_panel(vol, "rt", panel, what="test")
    pd.testing.assert_frame_equal(load_panel(vol, "rt"), panel, check_dtype=False)
    with pytest.raises(PitlmError, match="plain directory name"):
        save_panel(vol, "../x", panel, what="test")


# ----------------------------------------------------------------------------- Kaggle credentials (no download)

@pytest.fixture
def no_kaggle(monkeypatch, tmp_path):
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle"))
    return tmp_path / "kaggle"


def test_kaggle_credentials_detection(no_kaggle, monkeypatch):
    assert kaggle_credentials() is None
    no_kaggle.mkdir()
    (no_kaggle / "kaggle.json").write_text("{not json")
    with pytest.raises(PitlmError, match="not valid JSON"):
        kaggle_credentials()
    (no_kaggle / "kaggle.json").write_text(json.dumps({"username": "alice"}))
    with pytest.raises(PitlmError, match="lacks 'username' or 'key'"):
        kaggle_credentials()
    (no_kaggle / "kaggle.json").write_text(json.dumps({"username": "alice", "key": "s3cr3t"}))
    assert kaggle_credentials() == str(no_kaggle / "kaggle.json")
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", "s3cr3t")
    assert kaggle_credentials() == "environment (KAGGLE_USERNAME, KAGGLE_KEY)"


def test_download_without_credentials_says_how_to_stage_by_hand(cli, home, no_kaggle):
    code, out, err = cli("market", "jpx", "real", "--download")
    assert code == 2 and out == ""
    err = _error_line(err)
    for part in ("no Kaggle credentials", "KAGGLE_USERNAME", "KAGGLE_KEY", "kaggle.json", "train_files/stock_prices.csv",
                 "stock_list.csv", "pitlm market jpx NAME --from DIR"):
        assert part in err
    assert not (home / "market" / "real").exists()
    code, _, err = cli("market", "jpx", "real")
    assert code == 2 and "exactly one of --download or --from" in err
