"""Protocols are records: a protocol defined and registered here, in one file, runs end to end through `evaluate`
(layouts, metrics, long-short series, net and base-vs-arm statistics, the leakage decision, the config's check of
protocol names), and the shipped records are what the rest of the package reads."""

import numpy as np
import pytest
from test_eval_stats_protocols import rows_and_features

from pitlm.config import build_config
from pitlm.errors import ConfigError, PitlmError
from pitlm.eval.protocols import PROTOCOLS, Protocol, get, register, registry, unregister
from pitlm.eval.protocols.run import ProtocolConfig, evaluate_features, fold_r2
from pitlm.eval.result import headline, leakage_order, reductions, sharpes
from pitlm.eval.splitters import ChronologicalSplit


def chrono_layouts(calendar, cfg):
    return {"chrono_only": ChronologicalSplit(cfg.train_end, cfg.test_start).folds(calendar)}


def chrono_metrics(raw, layouts, panel, groups_ok):
    return {"r2_chrono_only": fold_r2(raw["chrono_only"])[:, 0]}


CHRONO_ONLY = Protocol(name="chrono_only", layouts=chrono_layouts, metrics=chrono_metrics, statistic="r2_chrono_only",
                       headline=("r2_chrono_only",), preference=-1, series=("all", "chrono_only"))


@pytest.fixture
def chrono_only():
    register(CHRONO_ONLY)
    yield CHRONO_ONLY
    unregister("chrono_only")


def test_a_protocol_registered_in_one_file_runs_end_to_end(chrono_only):
    rows, feats = rows_and_features()
    cfg = ProtocolConfig(protocols=["chrono_only", "legacy"], n_boot=5, seed=2, jackknife_groups=0)
    res = evaluate_features(feats, rows, cfg, control="control", base="base")
    arm = res.values["arm"]
    # the same chronological split and alpha as legacy's fold 0: the same R2 and long-short series
    np.testing.assert_allclose(arm["r2_chrono_only"][0], arm["r2_leakage_off"][0], rtol=1e-10)
    np.testing.assert_allclose(arm["sharpe_chrono_only"][0], arm["sharpe_leakage_off"][0], rtol=1e-10)
    assert res.info["alphas"]["arm"]["chrono_only"] == [1.0] and "chrono_only" in res.info["protocol_seconds"]
    summary = res.summary()
    for key in ("r2_chrono_only", "net_r2_chrono_only", "control_r2_chrono_only", "sharpe_chrono_only",
                "sharpe_chrono_only_nw_t", "r2_chrono_only_reduction", "sharpe_gap_chrono_only"):
        assert key in summary, key
    # preference -1: the calibrated leakage estimate is the new protocol's statistic, net of the control
    assert res.leakage()["arm"]["statistic"] == "net_r2_chrono_only"
    assert summary["leakage_estimate"] == pytest.approx(arm["r2_chrono_only"][0] - res.values["control"]["r2_chrono_only"][0])


def test_protocol_names_are_checked_against_the_registry(chrono_only):
    assert build_config(ProtocolConfig, {"protocols": ["chrono_only"]}).protocols == ["chrono_only"]
    unregister("chrono_only")
    with pytest.raises(ConfigError, match="expected 'legacy', 'purged' or 'walk_forward'"):
        build_config(ProtocolConfig, {"protocols": ["chrono_only"]})
    with pytest.raises(PitlmError, match="unknown protocol 'chrono_only'"):
        get("chrono_only")
    with pytest.raises(PitlmError, match="shipped"):
        unregister("legacy")


def test_the_shipped_records_give_the_summary_order():
    assert tuple(registry())[:3] == PROTOCOLS
    assert headline() == ("r2_leakage_off", "r2_leakage_on", "leakage_premium", "rank_ic_leakage_off",
                          "rank_ic_leakage_on", "rank_ic_premium", "r2_purged", "rank_ic_purged", "r2_walk_forward",
                          "rank_ic_walk_forward")
    assert sharpes() == ("sharpe_leakage_off", "sharpe_purged", "sharpe_walk_forward")
    assert list(reductions().items()) == [
        ("leakage_premium", "premium_reduction"), ("r2_purged", "r2_purged_reduction"),
        ("r2_walk_forward", "r2_walk_forward_reduction"), ("sharpe_leakage_off", "sharpe_gap_leakage_off"),
        ("sharpe_purged", "sharpe_gap_purged"), ("sharpe_walk_forward", "sharpe_gap_walk_forward")]
    assert leakage_order() == ("r2_purged", "r2_walk_forward", "leakage_premium")
    assert get("legacy").fixed_alpha and not get("purged").fixed_alpha
    assert get("walk_forward").per_year == "r2_walk_forward_"
