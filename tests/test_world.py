import re
from datetime import date

import numpy as np
import pandas as pd
import pytest

from pitlm.errors import ConfigError
from pitlm.market.jpx import LIST_COLUMNS, PRICE_COLUMNS, load_jpx_dir
from pitlm.world import WorldConfig, build_world, generate_corpus, generate_market, oracle_r2, period_truth
from pitlm.world.corpus import FINEWEB_COLUMNS
from pitlm.world.text import latest_mentioned_date

SMALL = dict(n_companies=6, n_sectors=3, news_repeats=2, n_splits=3)


def small(**kw) -> WorldConfig:
    return WorldConfig(**{**SMALL, **kw})


@pytest.fixture(scope="module")
def world():
    cfg = small(seed=3)
    market = generate_market(cfg)
    return cfg, market, generate_corpus(cfg, market)


def _payload(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def test_same_seed_gives_byte_identical_files(tmp_path):
    build_world(small(seed=7), tmp_path / "a")
    build_world(small(seed=7), tmp_path / "b")
    a, b = _payload(tmp_path / "a"), _payload(tmp_path / "b")
    assert a == b
    assert {"stock_prices.csv", "stock_list.csv", "ground_truth.parquet", "news_index.parquet"} <= set(a)
    assert any(k.startswith("corpus/CC-MAIN-") for k in a)
    build_world(small(seed=8), tmp_path / "c")
    assert _payload(tmp_path / "c")["stock_prices.csv"] != a["stock_prices.csv"]


def test_files_have_the_exact_jpx_and_fineweb_columns(world, tmp_path):
    cfg, market, corpus = world
    build_world(cfg, tmp_path / "w")
    prices = pd.read_csv(tmp_path / "w" / "stock_prices.csv")
    assert list(prices.columns) == PRICE_COLUMNS
    assert list(pd.read_csv(tmp_path / "w" / "stock_list.csv").columns) == LIST_COLUMNS
    assert prices["RowId"].iloc[0] == f"{prices['Date'].iloc[0].replace('-', '')}_{prices['SecuritiesCode'].iloc[0]}"
    assert prices["Date"].min() == "2017-01-04" and prices["Date"].max() == "2021-12-03"
    assert prices["Target"].notna().all()  # as in Kaggle: the last rows' Target uses days past the calendar
    for f in (tmp_path / "w" / "corpus").glob("*.parquet"):
        docs = pd.read_parquet(f)
        assert list(docs.columns) == FINEWEB_COLUMNS
        assert (docs["dump"] == f.stem).all()
    assert corpus["id"].str.fullmatch(r"<urn:uuid:[0-9a-f-]{36}>").all() and corpus["id"].is_unique
    assert corpus["date"].str.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ").all()
    iso = pd.to_datetime(corpus["date"]).dt.isocalendar()
    assert (corpus["dump"] == "CC-MAIN-" + iso["year"].astype(str) + "-" + iso["week"].astype(str).str.zfill(2)).all()
    assert (corpus["language"] == "en").all() and (corpus["token_count"] > 0).all()


def test_world_prices_load_through_the_jpx_loader(world, tmp_path):
    cfg, market, corpus = world
    build_world(cfg, tmp_path / "w")
    panel, report, _ = load_jpx_dir(tmp_path / "w")
    assert report["target_disagreements"] == 0 and report["target_compared"] > 0
    assert report["adjustment_convention"] == "kaggle"
    assert report["adjustment_events"] == 3 == report["adjustment_events_matching"]
    assert len(panel) == len(market.prices) and panel["Target"].notna().all()
    # adjusted closes carry no split jumps: the largest daily move is far below a 2-for-1 split's log(2)
    jumps = np.log(panel["Close"]).groupby(panel["SecuritiesCode"]).diff().abs()
    assert jumps.max() < 0.2


def test_null_world_has_zero_planted_component_and_the_same_corpus():
    null, planted = small(leak_strength=0.0), small(leak_strength=1.0)
    m0, m1 = generate_market(null), generate_market(planted)
    assert (m0.ground_truth[["planted_log_return", "planted_target", "planted_cum", "planted_total"]]
            .fillna(0.0) == 0.0).all().all()
    assert (m1.ground_truth["planted_total"].abs() > 0).all()
    # same random numbers apart from the planted drift; the corpus does not depend on the strength
    assert (m0.ground_truth["sign"] == m1.ground_truth["sign"]).all()
    pd.testing.assert_frame_equal(generate_corpus(null, m0), generate_corpus(planted, m1))


def test_planted_moves_add_up_and_news_states_them(world):
    cfg, market, corpus = world
    gt = market.ground_truth
    total = gt.groupby(["SecuritiesCode", "period"])["planted_log_return"].sum()
    truth = period_truth(gt).set_index(["SecuritiesCode", "period"])
    last = truth.index.get_level_values("period") != gt["period"].max()  # the last period is cut by the calendar end
    np.testing.assert_allclose(total[truth.index][last], truth["planted_total"][last], rtol=1e-9)
    news = corpus[corpus["kind"] == "news"].merge(truth.reset_index(), on=["SecuritiesCode", "period"])
    assert len(news) == len(truth) * cfg.news_repeats
    for row in news.itertuples():
        assert f"{row.Name} (code {row.SecuritiesCode})" in row.text or f"code {row.SecuritiesCode} ({row.Name})" in row.text \
            or f"code {row.SecuritiesCode}, {row.Name}" in row.text
        assert f"{abs(row.reported_pct):.0f}" in row.text
        up = re.search(r"\b(rose|climbed|gained|advanced|rallied|risen|higher|gain)\b", row.text)
        down = re.search(r"\b(fell|dropped|declined|slid|slumped|fallen|lower|loss)\b", row.text)
        assert bool(up) == (row.sign > 0) and bool(down) == (row.sign < 0)
        assert pd.Timestamp(row.date[:10]) > row.period_end  # published after the period ends
        assert re.search(rf"On \d{{4}}-\d\d-\d\d, {re.escape(row.Name)} \(code {row.SecuritiesCode}\) shares", row.text)


def test_no_document_mentions_anything_after_its_own_date(world):
    cfg, market, corpus = world
    for text, when in zip(corpus["text"], corpus["date"], strict=True):
        latest = latest_mentioned_date(text)
        assert latest is None or latest <= date.fromisoformat(when[:10]), (when, text)
    # and the cutoff check the PIT model relies on: nothing on or before the cutoff reports a later period
    day = pd.to_datetime(corpus["date"]).dt.tz_localize(None).dt.normalize()
    early = corpus[day <= pd.Timestamp(cfg.cutoff)]
    assert len(early) > 0 and (early["kind"] == "filler").all()
    assert not early["text"].str.contains(r"\b(?:rose|fell|risen|fallen|gained|slumped)\b").any()


def test_latest_mentioned_date_reads_every_phrasing():
    assert latest_mentioned_date("Kanto Steel (code 2019) opened a shop.") is None  # codes are not years
    assert latest_mentioned_date("in the second half of 2019") == date(2019, 12, 31)
    assert latest_mentioned_date("over H1 2020 and Q3 2018") == date(2020, 6, 30)
    assert latest_mentioned_date("the third quarter of 2018") == date(2018, 9, 30)
    assert latest_mentioned_date("the six months to June 2021") == date(2021, 6, 30)
    assert latest_mentioned_date("July-December 2017") == date(2017, 12, 31)
    assert latest_mentioned_date("the last six months of 2017") == date(2017, 12, 31)
    assert latest_mentioned_date("On 2021-08-13, x. Founded in 1950.") == date(2021, 8, 13)
    assert latest_mentioned_date("plans for 2022") == date(2022, 1, 1)
    assert latest_mentioned_date("over calendar 2019") == date(2019, 12, 31)  # year periods end in December
    assert latest_mentioned_date("a gain in full-year 2020") == date(2020, 12, 31)


def test_oracle_r2_is_clearly_positive_at_default_strength_and_nil_when_null():
    planted = oracle_r2(generate_market(WorldConfig()))
    assert 0.15 <= planted["oracle_r2"] <= 0.35 and planted["oracle_r2_cv"] > 0.1
    assert planted["oracle_rows"] == 12 * 75  # the demo eval's sample
    null = oracle_r2(generate_market(WorldConfig(leak_strength=0.0)))
    assert null["oracle_r2"] == pytest.approx(0.0, abs=1e-12) and null["oracle_r2_cv"] <= 0.0


def test_year_periods_and_their_news_are_leak_free():
    cfg = small(period="year", n_companies=3, n_sectors=1)
    market = generate_market(cfg)
    assert set(market.ground_truth["period"]) == {f"{y}Y" for y in range(2017, 2022)}
    per = market.ground_truth.groupby(["SecuritiesCode", "period"])["planted_log_return"].nunique()
    assert (per == 1).all()  # one planted drift per (company, year)
    corpus = generate_corpus(cfg, market)
    news = corpus[corpus["kind"] == "news"]
    assert news["text"].str.contains(r"the year 20\d\d|calendar 20\d\d|full-year 20\d\d|December 20\d\d").all()
    for text, when in zip(corpus["text"], corpus["date"], strict=True):
        latest = latest_mentioned_date(text)
        assert latest is None or latest <= date.fromisoformat(when[:10]), (when, text)


def test_quarter_periods():
    cfg = small(period="quarter", n_companies=3, n_sectors=1)
    market = generate_market(cfg)
    assert set(market.ground_truth["period"]) == {f"{y}Q{q}" for y in range(2017, 2022) for q in range(1, 5)}
    corpus = generate_corpus(cfg, market)
    assert corpus["text"].str.contains(r"quarter of 20\d\d|Q[1-4] 20\d\d|three months to").any()


def test_bad_config_is_one_line():
    with pytest.raises(ConfigError, match="n_sectors"):
        WorldConfig(n_companies=2, n_sectors=3).check()
    with pytest.raises(ConfigError, match="end_date"):
        WorldConfig(end_date=date(2016, 1, 1)).check()


@pytest.mark.parametrize("args, message", [
    (["--seed", "-1"], "config key 'seed': bad value -1: Input should be greater than or equal to 0"),
    (["--leak-strength", "inf"], "config key 'leak_strength': bad value inf: Input should be a finite number"),
    (["--leak-strength", "nan"], "config key 'leak_strength'"),
    (["--set", "idio_vol=50"], "where prices overflow"),
    (["--set", "planted_daily=10"], "where prices overflow"),
    (["--set", "n_splits=500"], "config key 'n_splits': bad value 500"),
    (["--set", "end_date=2017-01-05"], "holds 2 trading days; a world needs at least 40"),
])
def test_cli_bad_world_parameter_is_one_line_exit_2_and_writes_nothing(cli, home, args, message):
    # before: a negative seed was a numpy traceback; the others built a world of overflowed prices or failed after
    # leaving a run directory
    code, out, err = cli("world", "build", "w", "--set", "n_companies=2", "--set", "n_sectors=1", *args)
    assert code == 2 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and message in lines[0], err
    assert not (home / "world" / "w").exists() and not (home / "runs").exists()


def test_world_config_bounds():
    with pytest.raises(ValueError, match="seed"):
        WorldConfig(seed=-1)
    with pytest.raises(ValueError, match="finite"):
        WorldConfig(market_vol=float("inf"))
    prices = generate_market(small(n_splits=40, n_companies=1, n_sectors=1)).prices   # all 40 on one stock
    assert (prices["Volume"] > 0).all() and np.isfinite(prices["Close"]).all()
    with pytest.raises(ConfigError, match="overflow"):
        small(leak_strength=1e6).check()


@pytest.mark.parametrize("end, splits", [("2017-03-22", 0), ("2017-03-24", 0), ("2017-03-27", 2)])
def test_short_worlds_place_splits_only_where_they_fit(end, splits):
    """58, 60 and 61 simulated trading days: a split needs 30 days on each side (60 days used to crash)."""
    cfg = small(n_splits=2, start_date="2017-01-04", end_date=end, cutoff="2017-02-01", corpus_end=end)
    prices = generate_market(cfg).prices
    assert int((prices["AdjustmentFactor"] != 1).sum()) == splits
