"""Protocols: the legacy protocol reproduces the seed's sklearn loop (point estimate and bootstrap draws),
a hand-checked example, paired differencing, seeded reproducibility, summary keys, bad input."""

import json
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score
from sklearn.model_selection import GroupKFold

from pitlm.errors import PitlmError
from pitlm.eval.bootstrap import draw_counts
from pitlm.eval.protocols.run import ProtocolConfig, evaluate_features


def rows_and_features(n_stocks=20, per_stock=12, d=5, seed=0, models=("control", "base", "arm")):
    rng = np.random.default_rng(seed)
    cal = pd.bdate_range("2017-01-04", "2021-12-03")
    codes = np.sort(rng.choice(9000, n_stocks, replace=False)) + 1000
    parts = [pd.DataFrame({"Date": np.sort(rng.choice(cal, per_stock, replace=False)), "SecuritiesCode": c})
             for c in codes]
    rows = pd.concat(parts, ignore_index=True)
    rows["Target"] = rng.normal(0, 0.02, len(rows))
    feats = {m: rng.normal(size=(len(rows), d)) + rng.normal(size=d) for m in models}
    return rows, feats


def seed_loop(X, rows, counts, alpha=1.0):
    """The seed's protocol on one bootstrap draw, written plainly with scikit-learn."""
    y, codes, dates = rows["Target"].to_numpy(), rows["SecuritiesCode"].to_numpy(), rows["Date"].to_numpy()
    uniq = np.unique(codes)
    idx = np.concatenate([np.flatnonzero(codes == c) for c, k in zip(uniq, counts, strict=True) for _ in range(k)])
    Xb, yb, gb, db = X[idx], y[idx], codes[idx], dates[idx]
    tr, te = db <= np.datetime64("2020-12-31"), db >= np.datetime64("2021-01-01")
    off = r2_score(yb[te], Ridge(alpha=alpha).fit(Xb[tr], yb[tr]).predict(Xb[te]))
    on = np.mean([r2_score(yb[b], Ridge(alpha=alpha).fit(Xb[a], yb[a]).predict(Xb[b]))
                  for a, b in GroupKFold(5).split(Xb, yb, gb)])
    return off, on, on - off


def test_legacy_reproduces_the_seed_loop_on_point_and_draws():
    rows, feats = rows_and_features()
    cfg = ProtocolConfig(protocols=["legacy"], n_boot=4, seed=11, jackknife_groups=0, rank_ic=False)
    res = evaluate_features(feats, rows, cfg, control="control", base="base")
    draws = draw_counts(20, 4, seed=11)
    for model in ("control", "base", "arm"):
        for c, counts in enumerate([np.ones(20, int), *draws]):
            want = seed_loop(feats[model], rows, counts)
            got = [res.values[model][k][c] for k in ("r2_leakage_off", "r2_leakage_on", "leakage_premium")]
            np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)


def test_alpha_cv_leaves_legacy_exactly_the_seed():
    """alpha by inner CV serves the calibrated protocols; the legacy protocol keeps the seed's alpha=1."""
    rows, feats = rows_and_features(n_stocks=15, per_stock=10, seed=5, models=("control", "arm"))
    cfg = ProtocolConfig(protocols=["legacy", "purged"], n_boot=3, jackknife_groups=0, rank_ic=False)
    plain = evaluate_features(feats, rows, cfg)
    cv = evaluate_features(feats, rows, cfg.model_copy(update={"alpha_cv": True, "alpha_grid": [1e-2, 1e4]}))
    for k in ("r2_leakage_off", "r2_leakage_on", "leakage_premium"):
        np.testing.assert_array_equal(cv.values["arm"][k], plain.values["arm"][k])
    assert set(np.ravel(cv.info["alphas"]["arm"]["purged"])) <= {1e-2, 1e4}
    assert not np.array_equal(cv.values["arm"]["r2_purged"], plain.values["arm"]["r2_purged"])


def test_legacy_hand_checked_example():
    # 5 stocks, x = stock index in both years; y(2020) = x, y(2021) = [1, 0, 3, 4, 2].
    # Off: train x=y=0..4 -> beta = 10/(10+1), b0 = 2/11; test residuals*11 = 9,-12,11,12,-20 -> SSE = 890/121,
    # SST = 10 -> R2 = 32/121. On: each GroupKFold fold leaves one stock (both its rows) out.
    y21 = [1, 0, 3, 4, 2]
    rows = pd.DataFrame({"Date": ["2020-06-01"] * 5 + ["2021-06-01"] * 5, "SecuritiesCode": list(range(5)) * 2,
                         "Target": list(range(5)) + y21})
    X = np.array([[float(s)] for s in range(5)] * 2)

    def ridge_r2(train, test):  # exact 1-D ridge, alpha = 1
        mx = Fraction(sum(x for x, _ in train), len(train))
        my = Fraction(sum(y for _, y in train), len(train))
        b = sum((x - mx) * (y - my) for x, y in train) / (sum((x - mx) ** 2 for x, _ in train) + 1)
        m = Fraction(sum(y for _, y in test), len(test))
        sse = sum((y - my - b * (x - mx)) ** 2 for x, y in test)
        return 1 - sse / sum((y - m) ** 2 for _, y in test)

    pts = [(s, s) for s in range(5)] + [(s, y21[s]) for s in range(5)]
    off = ridge_r2(pts[:5], pts[5:])
    assert off == Fraction(32, 121)
    on = sum(ridge_r2([p for p in pts if p[0] != s], [p for p in pts if p[0] == s]) for s in range(5)) / 5
    cfg = ProtocolConfig(protocols=["legacy"], n_boot=0, jackknife_groups=0, rank_ic=False)
    res = evaluate_features({"m": X}, rows, cfg, control=None)
    v = res.values["m"]
    assert v["r2_leakage_off"][0] == pytest.approx(float(off), abs=1e-12)
    assert v["r2_leakage_on"][0] == pytest.approx(float(on), abs=1e-12)
    assert v["leakage_premium"][0] == pytest.approx(float(on - off), abs=1e-12)
    assert "leakage_premium: " + f"{float(on - off):.6g}" in res.summary_lines()


@pytest.fixture(scope="module")
def result():
    rows, feats = rows_and_features(n_stocks=25, per_stock=16, seed=3)
    cfg = ProtocolConfig(n_boot=30, seed=5, jackknife_groups=10, n_time_blocks=3)
    return evaluate_features(feats, rows, cfg, control="control", base="base"), rows, feats, cfg


def test_paired_differences_are_exact_per_draw(result):
    res = result[0]
    for m in ("base", "arm"):
        for k, v in res.net_values(m).items():
            np.testing.assert_array_equal(v, res.values[m][k[4:]] - res.values["control"][k[4:]])
    comp = res.comparison_values()
    np.testing.assert_array_equal(comp["premium_reduction"],
                                  res.values["base"]["leakage_premium"] - res.values["arm"]["leakage_premium"])
    assert set(comp) == {"premium_reduction", "r2_purged_reduction", "r2_walk_forward_reduction",  # one arm
                         "sharpe_gap_leakage_off", "sharpe_gap_purged", "sharpe_gap_walk_forward"}
    s = res.comparisons()["premium_reduction"]
    want = np.percentile(comp["premium_reduction"][1:31][np.isfinite(comp["premium_reduction"][1:31])], [2.5, 97.5])
    assert (s["ci_lo"], s["ci_hi"]) == pytest.approx(tuple(want))


def test_reduction_for_every_arm():
    rows, feats = rows_and_features(n_stocks=15, per_stock=10, seed=6, models=("control", "base", "lora", "full"))
    cfg = ProtocolConfig(protocols=["legacy"], n_boot=3, jackknife_groups=0, rank_ic=False)
    res = evaluate_features(feats, rows, cfg, control="control", base="base", primary="lora")
    comp = res.comparison_values()
    assert set(comp) == {"premium_reduction", "full_premium_reduction", "sharpe_gap_leakage_off",
                         "full_sharpe_gap_leakage_off"}
    for key, arm in (("premium_reduction", "lora"), ("full_premium_reduction", "full")):
        np.testing.assert_array_equal(comp[key], res.values["base"]["leakage_premium"]
                                      - res.values[arm]["leakage_premium"])
    np.testing.assert_array_equal(comp["full_sharpe_gap_leakage_off"], res.values["base"]["sharpe_leakage_off"]
                                  - res.values["full"]["sharpe_leakage_off"])


def test_reproducible_by_seed(result):
    res, rows, feats, cfg = result
    again = evaluate_features(feats, rows, cfg, control="control", base="base")

    def stable(r):
        js = r.to_json()
        js["data"].pop("wall_s")
        js["data"].pop("protocol_seconds")
        return json.dumps(js, sort_keys=True)

    assert stable(again) == stable(res)
    other = evaluate_features(feats, rows, cfg.model_copy(update={"seed": 6}), control="control", base="base")
    assert other.values["arm"]["r2_purged"][1] != res.values["arm"]["r2_purged"][1]
    assert other.values["arm"]["r2_purged"][0] == res.values["arm"]["r2_purged"][0]  # same point estimate


def test_summary_keys_and_json(result):
    res = result[0]
    keys = [line.split(":")[0] for line in res.summary_lines()]
    for k in ("r2_leakage_off", "r2_leakage_on", "leakage_premium", "leakage_premium_ci_lo", "leakage_premium_ci_hi",
              "base_r2_leakage_off", "base_r2_leakage_on", "base_leakage_premium", "premium_reduction",
              "premium_reduction_ci_lo", "premium_reduction_ci_hi", "r2_purged", "net_r2_purged", "r2_walk_forward",
              "rank_ic_purged", "control_r2_purged", "leakage_estimate", "leakage_flagged", "base_leakage_flagged",
              "bootstrap_draws", "bootstrap_skipped", "outside_ci"):
        assert k in keys, k
    js = json.loads(json.dumps(res.to_json()))
    assert js["roles"] == {"primary": "arm", "base": "base", "control": "control"}
    leak = js["leakage"]["arm"]
    assert leak["statistic"] == "net_r2_purged" and leak["estimate"] == pytest.approx(res.summary()["leakage_estimate"])
    assert set(js["models"]["arm"]["metrics"]["r2_purged"]) >= {"estimate", "ci_lo", "ci_hi", "bca_lo", "basic_lo",
                                                                 "outside_ci", "n_draws", "n_skipped"}
    assert any(k.startswith("r2_walk_forward_20") for k in js["models"]["arm"]["metrics"])


def test_options_run_and_change_results():
    rows, feats = rows_and_features(n_stocks=15, per_stock=10, seed=4, models=("control", "arm"))
    base = ProtocolConfig(protocols=["purged", "walk_forward"], n_boot=5, jackknife_groups=0)
    a = evaluate_features(feats, rows, base)
    b = evaluate_features(feats, rows, base.model_copy(update={"demean_target": True, "alpha_cv": True,
                                                     "alpha_grid": [0.1, 10.0, 1e4]}))
    assert a.values["arm"]["r2_purged"][0] != b.values["arm"]["r2_purged"][0]
    assert set(np.ravel(b.info["alphas"]["arm"]["purged"])) <= {0.1, 10.0, 1e4}


def test_bad_input_is_one_clear_error():
    rows, feats = rows_and_features(n_stocks=8, per_stock=6)
    with pytest.raises(PitlmError, match="lack column"):
        evaluate_features(feats, rows.drop(columns="Target"))
    with pytest.raises(PitlmError, match="n_rows"):
        evaluate_features({"control": feats["control"][:-1]}, rows)
    with pytest.raises(PitlmError, match="no rows on the chronological test side"):
        evaluate_features(feats, rows, ProtocolConfig(protocols=["legacy"], test_start="2030-01-01", train_end="2029-12-31"))
    with pytest.raises(PitlmError, match="fewer than n_splits"):
        evaluate_features(feats, rows[rows["SecuritiesCode"].isin(rows["SecuritiesCode"].unique()[:3])].reset_index(drop=True))
    with pytest.raises(PitlmError, match="not among the models"):
        evaluate_features(feats, rows, ProtocolConfig(protocols=["legacy"], n_boot=1), base="nope")


def test_engine_modes_agree_with_every_option():
    rows, feats = rows_and_features(n_stocks=14, per_stock=10, seed=8, models=("control", "arm"))
    cfg = ProtocolConfig(n_boot=6, jackknife_groups=4, n_time_blocks=3, alpha_cv=True, alpha_grid=[0.1, 10.0],
                         demean_target=True, rank_ic=True)
    a = evaluate_features(feats, rows, cfg.model_copy(update={"engine": "stats"}))
    b = evaluate_features(feats, rows, cfg.model_copy(update={"engine": "rows"}))
    assert set(a.info["engine_modes"].values()) == {"stats"} and set(b.info["engine_modes"].values()) == {"rows"}
    for m in feats:
        for k, v in a.values[m].items():
            np.testing.assert_allclose(b.values[m][k], v, rtol=1e-9, atol=1e-12, err_msg=k)


def test_json_is_strict_when_draws_fail():
    rows, feats = rows_and_features(n_stocks=6, per_stock=4, seed=9, models=("control", "arm"))
    res = evaluate_features(feats, rows, ProtocolConfig(protocols=["legacy"], n_boot=20, jackknife_groups=0))
    assert res.metrics("arm")["leakage_premium"]["n_skipped"] > 0  # draws with < 5 distinct stocks are skipped
    json.dumps(res.to_json(include_draws=True), allow_nan=False)


def test_fast_inner_cv_equals_the_generic_path_on_every_statistic():
    """The eval's defaults (alpha by inner CV over the default grid, jackknife, rank IC, all protocols): the
    CPU fast path (engine auto) and the generic block-statistics path (engine stats) agree to 1e-10 (relative
    beyond 1: a fold with a near-constant test side has an R2 of -2e14) on every statistic of every count vector."""
    rows, feats = rows_and_features(n_stocks=30, per_stock=14, d=6, seed=12, models=("control", "arm"))
    cfg = ProtocolConfig(n_boot=8, jackknife_groups=5, alpha_cv=True, rank_ic=True)
    fast = evaluate_features(feats, rows, cfg)
    generic = evaluate_features(feats, rows, cfg.model_copy(update={"engine": "stats"}))
    assert fast.info["alphas"] == generic.info["alphas"]
    for m in feats:
        for k, v in generic.values[m].items():
            np.testing.assert_allclose(fast.values[m][k], v, rtol=1e-10, atol=1e-10, err_msg=k)


def test_progress_bar_for_every_draw_loop(capsys, monkeypatch):
    """Every model x fold layout draw loop shows a bar with draws done/total on stderr; where stderr is not a
    terminal, plain lines with the ETA as well."""
    import pitlm.log

    monkeypatch.setenv("PITLM_NO_PROGRESS", "0")
    monkeypatch.setattr(pitlm.log, "PLAIN_PROGRESS_S", 0.0)
    rows, feats = rows_and_features(n_stocks=12, per_stock=10, seed=2, models=("control", "arm"))
    evaluate_features(feats, rows, ProtocolConfig(n_boot=20, jackknife_groups=0, rank_ic=False), show_progress=True)
    err = capsys.readouterr().err
    for layout in ("legacy", "purged", "walk_forward"):
        for m in feats:
            assert f"{layout} {m}" in err and f"{layout} {m}: 21/21 draws" in err, (layout, m, err)
    assert "ETA" in err
