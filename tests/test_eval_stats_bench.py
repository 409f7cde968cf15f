"""`pitlm bench stats`: the eval's configuration (--protocol eval, --designs) and the saved-values check."""

import numpy as np

from pitlm.eval.bench import run_bench_stats


def test_bench_eval_protocol_times_every_protocol_and_checks_saved_values(tmp_path):
    saved = tmp_path / "values.npz"
    small = {"scale": "us-473", "stocks": 14, "dates_per_stock": 12, "features": 6, "draws": 4, "seed": 3}
    out = run_bench_stats(protocol="eval", designs=3, save_values=str(saved), **small)
    assert out["designs"] == 3 and out["rows"] == 14 * 12 and out["count_vectors"] == 1 + 4 + 14
    assert {"engine_s_legacy", "engine_s_purged", "engine_s_walk_forward"} <= set(out)
    assert "sklearn_draws" not in out  # scikit-learn has no inner-CV counterpart
    keys = np.load(saved).files
    assert "model1|r2_purged" in keys and "control|rank_ic_walk_forward" in keys and "alpha|model2|purged" in keys
    again = run_bench_stats(protocol="eval", designs=3, compare_values=str(saved), **small)
    assert again["max_abs_diff_saved"] == 0 and again["nan_mismatch_saved"] == 0 and again["alphas_equal_saved"]
    other = run_bench_stats(protocol="eval", designs=3, compare_values=str(saved), **{**small, "seed": 4})
    assert other["max_abs_diff_saved"] > 0


def test_bench_walk_forward_protocol_runs_the_engine_alone():
    out = run_bench_stats(scale="demo-small", stocks=10, features=4, draws=2, protocol="walk_forward")
    assert out["engine_s_walk_forward"] >= 0 and "speedup" not in out
    legacy = run_bench_stats(scale="demo-small", stocks=20, features=4, draws=2, sklearn_draws=2, protocol="legacy")
    assert legacy["max_abs_diff"] < 1e-10
