"""`pitlm calibrate`: the oracle's construction, the rates, and a tiny end-to-end run."""

import json
from pathlib import Path

import numpy as np
import pytest

from pitlm.eval.bootstrap import wilson
from pitlm.eval.calibrate import CalibrateConfig, rates
from pitlm.world.oracle import oracle_features


def test_oracle_knows_the_planted_component_and_nests_the_control():
    rng = np.random.default_rng(0)
    control = rng.standard_normal((500, 8)).astype(np.float32)
    planted = rng.standard_normal(500) * 0.005
    cfg = CalibrateConfig(knowledge_dim=4, knowledge_noise=0.0)
    X = oracle_features(control, planted, cfg, planted_daily=0.005, world_seed=1)
    assert X.shape == (500, 12)
    np.testing.assert_array_equal(X[:, 4:], control)  # oracle = [knowledge || control]
    for j in range(4):  # noiseless: every knowledge column is the planted component, projected
        assert abs(np.corrcoef(X[:, j], planted)[0, 1]) > 0.999
    null = oracle_features(control, np.zeros(500), cfg.model_copy(update={"knowledge_noise": 1.0}), 0.005, 1)
    assert abs(np.corrcoef(null[:, 0], planted)[0, 1]) < 0.15  # a null world's oracle knows nothing
    np.testing.assert_array_equal(null, oracle_features(control, np.zeros(500),
                                                        cfg.model_copy(update={"knowledge_noise": 1.0}), 0.005, 1))


def test_rates_and_wilson_interval():
    def rec(kind, flagged, control_flagged=False):
        return {"kind": kind, "protocols": {"purged": {"flagged": flagged, "control_flagged": control_flagged,
                                                       "oracle_flagged": flagged, "net_estimate": 0.1,
                                                       "skipped": 0}}}

    records = [rec("null", i == 0) for i in range(10)] + [rec("planted", i < 9, True) for i in range(10)]
    t = rates(records, ["purged"], CalibrateConfig())["purged"]
    assert t["fpr"] == 0.1 and t["power"] == 0.9 and t["calibrated"] and t["power_ok"]
    assert t["control_raw_rejection_planted"] == 1.0 and t["control_raw_rejection_null"] == 0.0
    lo, hi = wilson(1, 20)
    assert 0 < lo < 0.05 < hi < 0.3
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0


def test_calibrate_cli_tiny_run(cli):
    code, out, err = cli("calibrate", "--worlds", "2", "--n-boot", "20", "--protocol", "legacy,purged",
                         "--set", "world.n_companies=10", "--set", "dates_per_stock=12", "--set", "features_dim=16")
    assert code == 0, err
    got = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    for p in ("legacy", "purged"):
        assert 0.0 <= float(got[f"fpr_{p}"]) <= 1.0 and 0.0 <= float(got[f"power_{p}"]) <= 1.0
        assert got[f"calibrated_{p}"] in ("true", "false")
        assert 0.0 <= float(got[f"control_raw_rejection_null_{p}"]) <= 1.0
    assert "walk_forward" not in out and "calibrated" in out  # the verdict column of the table
    report = json.loads(Path(got["calibration_json"]).read_text())
    assert [(w["world_seed"], w["kind"]) for w in report["worlds"]] == [(0, "null"), (0, "planted"),
                                                                         (1, "null"), (1, "planted")]
    assert report["worlds"][0]["leak_strength"] == 0.0 and report["worlds"][1]["leak_strength"] == 1.0
    assert report["worlds"][0]["rows"] == 120 and set(report["table"]) == {"legacy", "purged"}
    assert report["protocol_resolved"]["n_boot"] == 20


@pytest.mark.parametrize("args, message", [
    (["--protocol", "bogus"], "config key 'protocols.0'"),
    (["--worlds", "0"], "worlds"),
])
def test_calibrate_bad_input(cli, args, message):
    code, _, err = cli("calibrate", *args)
    assert code != 0 and message in err


def test_family_rates_by_cell_type_by_hand():
    from pitlm.eval.calibrate import CalibrateConfig, family_rates

    def cell(t, y, flagged):
        return {"type": t, "year": y, "flagged": flagged}

    records = [
        {"kind": "planted", "cells": [cell("known", 2018, True), cell("known", 2019, True),
                                      cell("unknown", 2020, False), cell("unknown", 2021, False)]},
        {"kind": "planted", "cells": [cell("known", 2018, False), cell("known", 2019, True),
                                      cell("unknown", 2020, True), cell("unknown", 2021, False)]},
        {"kind": "null", "cells": [cell("null", y, False) for y in (2018, 2019, 2020, 2021)]},
        {"kind": "null", "cells": [cell("null", 2018, True)] + [cell("null", y, False) for y in (2019, 2020, 2021)]},
    ]
    fam = family_rates(records, CalibrateConfig())
    assert fam["types"]["known"] == {"cells": 4, "flagged": 3, "rate": 0.75, "rate_ci": wilson(3, 4), "meaning": "power"}
    assert fam["types"]["unknown"]["rate"] == 0.25 and fam["types"]["null"]["rate"] == 1 / 8
    assert fam["power_by_year"]["2018"]["rate"] == 0.5 and fam["power_by_year"]["2019"]["rate"] == 1.0
    assert fam["staircase_exact_planted"] == 0.5 and fam["null_worlds_without_flags"] == 0.5
    assert not fam["calibrated"]  # unknown cells flagged at 25% > the 10% limit


def test_calibrate_family_cli_tiny_run(cli):
    """Each world's oracle family: member knows_K keeps the planted signal in the years <= K; the cells of a planted
    world are typed known / unknown by that, a null world's all null."""
    code, out, err = cli("calibrate", "--family", "--worlds", "1", "--n-boot", "20", "--set", "world.n_companies=12",
                         "--set", "dates_per_stock=40", "--set", "features_dim=16")
    assert code == 0, err
    got = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    report = json.loads(Path(got["calibration_json"]).read_text())
    null, planted = report["worlds"]
    members = sorted({c["member"] for c in planted["cells"]})
    assert members == ["knows_2017", "knows_2018", "knows_2019", "knows_2020"]
    assert {c["year"] for c in planted["cells"]} == {2018, 2019, 2020, 2021}
    assert all(c["type"] == ("known" if c["year"] <= c["knows_through"] else "unknown") for c in planted["cells"])
    assert {c["type"] for c in null["cells"]} == {"null"}
    assert int(got["family_cells_known"]) == 6 and int(got["family_cells_unknown"]) == 10
    assert int(got["family_cells_null"]) == 16 and got["family_calibrated"] in ("true", "false")
    assert 0 <= float(got["family_power_known"]) <= 1 and "family_power_known_2018" in got
    assert "cell type" in out and "power by test year" in out


def test_family_oracles_know_the_planted_moves_up_to_their_year_only():
    import numpy as np
    import pandas as pd

    from pitlm.eval.calibrate import CalibrateConfig, family_features

    rng = np.random.default_rng(0)
    dates = pd.to_datetime(rng.choice(pd.bdate_range("2017-01-04", "2020-12-03"), 2000))
    rows = pd.DataFrame({"Date": dates, "planted_target": rng.normal(0, 0.01, 2000)})
    cfg = CalibrateConfig(knowledge_noise=0.1)
    feats = family_features(8, rows, cfg, 0.01, 0, [f"p{i}" for i in range(2000)])
    assert list(feats) == ["knows_2017", "knows_2018", "knows_2019", "control"]
    year = rows["Date"].dt.year.to_numpy()
    for name, k in (("knows_2017", 2017), ("knows_2018", 2018), ("knows_2019", 2019)):
        q = feats[name][:, 0]
        for y in range(2017, 2021):
            r = np.corrcoef(q[year == y], rows["planted_target"][year == y])[0, 1]
            assert (abs(r) > 0.95) if y <= k else (abs(r) < 0.15), (name, y, r)  # the sign is w[0]'s
    assert feats["control"].shape == feats["knows_2017"].shape


# ---- `pitlm calibrate --probe` (pitlm/eval/probecal.py) ----

def test_probe_rates_from_the_worlds_flags_by_hand():
    from pitlm.eval.probecal import format_probe_table, probe_rates, probe_summary

    def world(kind, mink, lap, net=0.1, raw=False):
        return {"kind": kind, "probes": {
            "mink": {"flagged": mink, "oracle_raw_flagged": raw, "net_estimate": net},
            "lap_interaction": {"flagged": lap, "oracle_raw_flagged": False, "net_estimate": float("nan")}}}

    records = [world("null", False, True, net=-0.2, raw=True), world("null", False, False, net=0.0),
               world("null", False, False, net=0.2), world("null", True, False, net=0.4),
               world("planted", True, False, net=1.0), world("planted", True, True, net=2.0),
               world("planted", True, False, net=3.0), world("planted", False, False, net=2.0)]
    records[1]["probes"]["lap_interaction"]["net_estimate"] = 0.5  # nanmean over the one finite null estimate
    t = probe_rates(records, CalibrateConfig())
    assert list(t) == ["mink", "lap_interaction"]
    mink, lap = t["mink"], t["lap_interaction"]
    assert mink["probe"] == "mink" and lap["probe"] == "lap" and mink["statistic"] == "net_mink"
    assert mink["worlds"] == 4 and mink["fpr"] == 1 / 4 and mink["power"] == 3 / 4
    assert mink["fpr_ci"] == wilson(1, 4) and mink["power_ci"] == wilson(3, 4)
    assert mink["raw_rejection_null"] == 1 / 4
    assert mink["mean_net_null"] == pytest.approx((-0.2 + 0.0 + 0.2 + 0.4) / 4) and mink["mean_net_planted"] == 2.0
    assert not mink["calibrated"] and not mink["power_ok"]      # 25% > the 10% limit; 75% < the 80% goal
    assert lap["fpr"] == 1 / 4 and lap["power"] == 1 / 4 and lap["mean_net_null"] == 0.5
    relaxed = probe_rates(records, CalibrateConfig(fpr_limit=0.3, power_goal=0.7))["mink"]
    assert relaxed["calibrated"] and relaxed["power_ok"]
    table = format_probe_table(t, CalibrateConfig())
    assert "mink" in table and table.count("NOT calibrated") == 2 and "of 4 null worlds" in table
    s = probe_summary(t)
    assert s["probe_fpr_mink"] == 0.25 and s["probe_power_mink_ci_lo"] == wilson(3, 4)[0]
    assert s["probe_calibrated_mink"] is False and s["probe_calibrated_all"] is False


def test_simulated_lm_scores_carry_the_knowledge_only_through_the_gain_term():
    from pitlm.eval.probecal import simulated_lm

    prompts = [f"On 2020-01-{d:02d}, Acme {c} (code {c}) shares had" for d in range(1, 29) for c in range(10)]
    q = np.random.default_rng(0).standard_normal(len(prompts))
    null, planted = simulated_lm(prompts, None, 0.5, 3), simulated_lm(prompts, q, 0.5, 3)
    np.testing.assert_array_equal(null["lap"], planted["lap"])
    assert abs(null["z"].mean()) < 1e-12 and null["z"].std() == pytest.approx(1.0)  # r, m standardised
    np.testing.assert_allclose(planted["z"] - null["z"], 0.5 * q * (1 + np.tanh(planted["lap"])), atol=1e-12)
    assert abs(np.corrcoef(null["z"], null["lap"])[0, 1]) < 0.3  # two different functions of the text
    again = simulated_lm(prompts[:5] + prompts[:5], None, 0.5, 3)
    np.testing.assert_array_equal(again["z"][:5], again["z"][5:])  # a function of the prompt text only
    other = simulated_lm(prompts, None, 0.5, 4)
    assert abs(np.corrcoef(null["z"], other["z"])[0, 1]) < 0.3  # another seed: an independent control


def test_calibrate_probe_cli_tiny_run(cli):
    code, out, err = cli("calibrate", "--probe", "mink,lap,entity", "--worlds", "1", "--n-boot", "20",
                         "--set", "world.n_companies=10", "--set", "dates_per_stock=60", "--set", "features_dim=16",
                         "--set", "probe_gain=3")
    assert code == 0, err
    got = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    report = json.loads(Path(got["calibration_json"]).read_text())
    stats = ["mink", "direction_accuracy", "lap_interaction", "entity_gap"]
    assert set(report["probes"]) == set(stats) and "table" not in report
    assert report["protocol_resolved"]["protocols"] == ["purged"] and report["protocol_resolved"]["n_boot"] == 20
    null, planted = report["worlds"]
    assert (null["kind"], planted["kind"]) == ("null", "planted") and set(planted["probes"]) == set(stats)
    for s in stats:
        for w in (null, planted):
            r = w["probes"][s]
            assert r["flagged"] == (r["net_ci_lo"] > 0) and r["net_ci_lo"] <= r["net_ci_hi"]
        t = report["probes"][s]  # one null and one planted world: the rates are their flags
        assert t["fpr"] == float(null["probes"][s]["flagged"]) and t["power"] == float(planted["probes"][s]["flagged"])
        assert float(got[f"probe_fpr_{s}"]) == t["fpr"] and float(got[f"probe_power_{s}"]) == t["power"]
        assert got[f"probe_calibrated_{s}"] == str(t["calibrated"]).lower()
    for s in ("mink", "direction_accuracy", "entity_gap"):  # a strong link: the planted world's knowledge shows
        assert planted["probes"][s]["flagged"], s
    assert got["probe_gain"] == "3" and "FPR 95% CI" in out and "entity_gap" in out  # the printed table
    # pitlm report shows the probe calibration table (a calibrate run without the protocols' table)
    run_dir = Path(got["calibration_json"]).parent
    code, out, err = cli("report", str(run_dir), "--out", str(run_dir / "rep"))
    assert code == 0, err
    md = (run_dir / "rep" / "report.md").read_text()
    for s in stats:
        t = report["probes"][s]
        assert f"| {s} | {t['fpr']:.2f} [{t['fpr_ci'][0]:.2f}, {t['fpr_ci'][1]:.2f}] |" in md


@pytest.mark.parametrize("args, message", [
    (["--probe", "mink,bogus"], "config key 'probes.1'"),
    (["--probe", "mink", "--family"], "--family and --probe calibrate different tests"),
])
def test_calibrate_probe_bad_input(cli, args, message):
    code, _, err = cli("calibrate", *args)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code != 0 and len(errors) == 1 and message in errors[0], err
