"""Bootstrap: seeded draws, jackknife, intervals; coverage of the 95% intervals on simulated clustered data
with a known effect, and the false-positive rate of the paired, control-netted purged test on null data."""

import numpy as np
import pandas as pd
import pytest

from pitlm.eval.bootstrap import (
    basic_interval,
    bca_interval,
    draw_counts,
    jackknife_counts,
    percentile_interval,
    summarize,
)
from pitlm.eval.protocols.run import ProtocolConfig, evaluate_features


def test_draw_counts_seeded_and_shaped():
    a, b = draw_counts(50, 20, seed=3), draw_counts(50, 20, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (20, 50) and (a.sum(1) == 50).all() and (a >= 0).all()
    assert not np.array_equal(a, draw_counts(50, 20, seed=4))
    # as many stocks as there are, with replacement: about 1 - 1/e of them drawn at least once
    assert 0.55 < (draw_counts(1000, 5, seed=0) > 0).mean() < 0.7


def test_jackknife_counts_leave_each_group_out_once():
    j = jackknife_counts(23, 5, seed=0)
    assert j.shape == (5, 23) and ((j == 0).sum(0) == 1).all()
    assert jackknife_counts(23, 0, seed=0).shape == (0, 23)


def test_interval_helpers():
    draws = np.r_[np.arange(101.0), np.nan]
    assert percentile_interval(draws) == pytest.approx((2.5, 50.0, 97.5))
    assert basic_interval(60.0, draws) == pytest.approx((22.5, 117.5))
    s = summarize(np.r_[200.0, draws], n_boot=102)
    assert s["outside_ci"] and s["n_skipped"] == 1 and s["n_draws"] == 101
    assert np.isnan(bca_interval(1e9, draws, np.arange(5.0))).all()  # every draw below the estimate


def _cluster_sim(rng, n_clusters=40, effect=0.3):
    sizes = rng.integers(3, 12, n_clusters)
    u = rng.normal(0, 1.0, n_clusters)  # cluster effect: rows within a stock are correlated
    sums = np.array([(effect + u[c] + rng.normal(0, 1.0, k)).sum() for c, k in enumerate(sizes)])
    return sums, sizes


def test_ci_coverage_of_a_known_effect():
    """Clustered data with known mean 0.3: the 95% intervals of the stock bootstrap cover it ~95% of the time."""
    rng = np.random.default_rng(0)
    n_sims, n_boot, effect = 300, 200, 0.3
    hits = {"percentile": 0, "basic": 0, "bca": 0}
    for i in range(n_sims):
        sums, sizes = _cluster_sim(rng, effect=effect)
        counts = np.vstack([np.ones((1, 40), int), draw_counts(40, n_boot, seed=i), jackknife_counts(40, 20, seed=i)])
        stat = counts @ sums / (counts @ sizes)  # the same weighted statistic on every count vector
        est, draws, jack = stat[0], stat[1:1 + n_boot], stat[1 + n_boot:]
        lo, _, hi = percentile_interval(draws)
        hits["percentile"] += lo <= effect <= hi
        lo, hi = basic_interval(est, draws)
        hits["basic"] += lo <= effect <= hi
        lo, hi = bca_interval(est, draws, jack)
        hits["bca"] += lo <= effect <= hi
    for name, h in hits.items():
        assert 0.89 <= h / n_sims <= 0.99, (name, h / n_sims)


def test_null_false_positive_rate_of_the_net_purged_test():
    """Pure-noise target, two exchangeable knowledge-free models: net_r2_purged is 0 in expectation, so the
    paired test flags ~5% of worlds (tolerance band for 60 worlds)."""
    flagged = 0
    n_worlds = 60
    cal = pd.bdate_range("2019-01-01", "2021-12-31")
    for w in range(n_worlds):
        rng = np.random.default_rng(1000 + w)
        rows = pd.concat([pd.DataFrame({"Date": np.sort(rng.choice(cal, 8, replace=False)), "SecuritiesCode": s})
                          for s in range(30)], ignore_index=True)
        rows["Target"] = rng.normal(size=len(rows)) + np.repeat(rng.normal(0, 0.5, 30), 8)
        feats = {"control": rng.normal(size=(len(rows), 3)), "model": rng.normal(size=(len(rows), 3))}
        cfg = ProtocolConfig(protocols=["purged"], n_boot=100, seed=w, jackknife_groups=0, rank_ic=False,
                             n_time_blocks=3, n_splits=3)
        flagged += evaluate_features(feats, rows, cfg).leakage()["model"]["flagged"]
    assert flagged / n_worlds <= 0.12, flagged
