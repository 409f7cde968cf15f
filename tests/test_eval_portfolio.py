"""Portfolio economics: long-short legs, Sharpe, Newey-West t against hand-computed values and statsmodels, and
the eval's Sharpe per bootstrap draw against a plain scikit-learn refit of the expanded draw."""

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import Ridge

from pitlm.eval.bootstrap import draw_counts
from pitlm.eval.portfolio import (
    LongShort,
    day_intervals,
    long_short_returns,
    newey_west_t,
    nw_lags,
    periods_per_year,
    sharpe,
    stationary_indices,
)
from pitlm.eval.protocols.run import ProtocolConfig, evaluate_features


def test_long_short_legs_by_hand():
    # date 0: five rows, q=0.2 -> one row per leg; date 1: ten rows -> two per leg; date 2: one row -> no position
    date = np.array([0] * 5 + [1] * 10 + [2])
    pred = np.array([3, 1, 4, 1.5, 9, *range(10), 0.0])
    y = np.array([0.3, 0.1, 0.4, 0.15, 0.9, *np.arange(10) / 100, 7.0])
    ls = LongShort(date, y, 3, quantile=0.2)(pred, np.ones(16))
    np.testing.assert_allclose(ls[:2], [0.9 - 0.1, (0.09 + 0.08) / 2 - (0.00 + 0.01) / 2])
    assert np.isnan(ls[2])
    # a bootstrap weight counts as copies: weights 1, 3, 1 at q=0.5 -> k = 2 of N = 5; the short leg holds row 1 and
    # one copy of row 2, the long leg one copy of row 2 and row 3
    a, b, c = 0.01, 0.05, 0.02
    got = LongShort(np.zeros(3, int), np.array([a, b, c]), 1, quantile=0.5)(np.array([1.0, 2, 3]), np.array([1, 3, 1]))
    assert got[0] == pytest.approx((b + c) / 2 - (a + b) / 2)
    # ... and equals the series of the expanded rows
    rng = np.random.default_rng(0)
    date, pred, y, w = rng.integers(0, 4, 40), rng.normal(size=40), rng.normal(size=40), rng.integers(0, 3, 40)
    rep = np.repeat(np.arange(40), w)
    np.testing.assert_allclose(LongShort(date, y, 4)(pred, w), LongShort(date[rep], y[rep], 4)(pred[rep], np.ones(len(rep))))


def test_sharpe_and_newey_west_by_hand():
    r = np.array([1.0, -1.0, 2.0, 0.0])
    # mean 0.5, std (ddof 1) sqrt(5/3); 4 periods a year -> sqrt(4)
    assert sharpe(r, 4.0) == pytest.approx(0.5 / np.sqrt(5 / 3) * 2)
    # T=4: L = floor(4 * 0.04^(2/9)) = 1; e = r - 0.5; g0 = 5/4, g1 = -3.75/4; lrv = g0 + 2 * (1/2) * g1 = 0.3125
    t, se, L = newey_west_t(r)
    assert L == 1 and se == pytest.approx(np.sqrt(0.3125 / 4)) and t == pytest.approx(0.5 / np.sqrt(0.3125 / 4))
    assert nw_lags(100) == 4 and nw_lags(1000) == 6
    # 3 dates, 182 days from the first to the last: 2 intervals in 182 / 365.25 years
    dates = np.array(["2021-01-01", "2021-03-01", "2021-07-02"], dtype="datetime64[D]")
    assert periods_per_year(dates) == pytest.approx(2 / (182 / 365.25))


def test_newey_west_matches_statsmodels():
    sm = pytest.importorskip("statsmodels.api")
    rng = np.random.default_rng(1)
    e = rng.normal(size=300)
    r = np.empty(300)
    r[0] = e[0]
    for i in range(1, 300):  # AR(1), so the lags matter
        r[i] = 0.4 * r[i - 1] + e[i] + 0.1
    for lags in (None, 0, 3):
        t, se, L = newey_west_t(r, lags)
        fit = sm.OLS(r, np.ones((300, 1))).fit(cov_type="HAC", cov_kwds={"maxlags": L, "use_correction": False})
        assert t == pytest.approx(fit.tvalues[0], rel=1e-10) and se == pytest.approx(fit.bse[0], rel=1e-10)


def test_stationary_bootstrap_blocks_and_paired_day_intervals():
    iid = stationary_indices(50, 4, 1.0, seed=0)  # every day starts a block
    assert iid.shape == (4, 50) and iid.min() >= 0 and iid.max() < 50
    runs = stationary_indices(50, 4, 1e12, seed=0)  # one block, wrapping around the end
    np.testing.assert_array_equal(runs, (runs[:, :1] + np.arange(50)) % 50)
    rng = np.random.default_rng(2)
    a, b = rng.normal(0.1, 1, 400), rng.normal(0, 1, 400)
    cis, block = day_intervals({"a": a, "b": b, "a2": a.copy()}, 250.0, {"gap": ("a", "b"), "same": ("a", "a2")}, 0)
    assert block == pytest.approx(400 ** (1 / 3))
    assert cis["same"] == [0.0, 0.0]  # paired: the same resampled days for every series
    assert cis["a"][0] < sharpe(a, 250.0) < cis["a"][1]
    assert cis["gap"][0] < sharpe(a, 250.0) - sharpe(b, 250.0) < cis["gap"][1]


def dense_panel(n_stocks=10, n_dates=60, seed=0):
    rng = np.random.default_rng(seed)
    cal = np.sort(rng.choice(pd.bdate_range("2019-06-01", "2021-11-30"), n_dates, replace=False))
    rows = pd.DataFrame([(d, 1000 + s) for s in range(n_stocks) for d in cal], columns=["Date", "SecuritiesCode"])
    X = rng.normal(size=(len(rows), 4))
    rows["Target"] = X @ np.array([0.01, -0.005, 0.0, 0.002]) + rng.normal(0, 0.01, len(rows))
    return rows, X


def legacy_sharpe_by_hand(X, rows, counts, quantile=0.2):
    """Sharpe of the legacy test split's long-short series, refitting sklearn's Ridge(alpha=1) on the expanded draw."""
    codes = rows["SecuritiesCode"].to_numpy()
    idx = np.concatenate([np.flatnonzero(codes == c) for c, k in zip(np.unique(codes), counts, strict=True)
                          for _ in range(k)])
    Xb, yb, db = X[idx], rows["Target"].to_numpy()[idx], rows["Date"].to_numpy()[idx]
    tr, te = db <= np.datetime64("2020-12-31"), db >= np.datetime64("2021-01-01")
    pred = Ridge(alpha=1.0).fit(Xb[tr], yb[tr]).predict(Xb[te])
    cal = np.unique(rows["Date"].to_numpy())
    test_dates = cal[cal >= np.datetime64("2021-01-01")]
    ls = long_short_returns(db[te], pred, yb[te], quantile).reindex(test_dates).fillna(0.0).to_numpy()
    ppy = (len(test_dates) - 1) / ((test_dates[-1] - test_dates[0]) / np.timedelta64(1, "D") / 365.25)
    return ls.mean() / ls.std(ddof=1) * np.sqrt(ppy)


def test_eval_sharpe_per_draw_matches_an_sklearn_refit():
    rows, X = dense_panel()
    rng = np.random.default_rng(3)
    feats = {"control": rng.normal(size=X.shape), "arm": X}
    cfg = ProtocolConfig(protocols=["legacy", "purged"], n_boot=3, seed=4, jackknife_groups=0, rank_ic=False)
    res = evaluate_features(feats, rows, cfg, control="control")
    for c, counts in enumerate([np.ones(10, int), *draw_counts(10, 3, seed=4)]):
        assert res.values["arm"]["sharpe_leakage_off"][c] == pytest.approx(legacy_sharpe_by_hand(X, rows, counts),
                                                                           rel=1e-9)
    purged = res.portfolio["series"]["purged"]
    assert purged["days"] == 60 and len(purged["models"]["arm"]["returns"]) == 60  # every date is tested once
    np.testing.assert_array_equal(res.net_values("arm")["net_sharpe_purged"],
                                  res.values["arm"]["sharpe_purged"] - res.values["control"]["sharpe_purged"])
    lines = dict(line.split(": ", 1) for line in res.summary_lines())
    for key in ("sharpe_leakage_off", "sharpe_leakage_off_ci_lo", "sharpe_leakage_off_nw_t", "net_sharpe_purged",
                "control_sharpe_purged", "portfolio_outside_ci", "sharpe_purged_day_ci", "net_sharpe_purged_day_ci"):
        assert key in lines, key
    t, _, _ = newey_west_t(res.portfolio["series"]["leakage_off"]["models"]["arm"]["returns"])
    assert float(lines["sharpe_leakage_off_nw_t"]) == pytest.approx(t, rel=1e-5)
