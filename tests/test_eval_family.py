"""Families: knowledge-matrix cells and slope against hand-computed numpy values on a hand-built EvalResult,
NaN draws skipped, staircase logic, ground truth from a world's files, summary lines, and one end-to-end run
of `evaluate` on a panel whose members know the planted signal up to their cutoff."""

from datetime import date

import numpy as np
import pandas as pd
import pytest

from pitlm.errors import PitlmError
from pitlm.eval.family import (
    cutoff_years,
    family_report,
    family_slope,
    family_summary_lines,
    ground_truth_cells,
    knowledge_matrix,
    known_shares,
    known_years,
    staircase_check,
    staircase_ok,
)
from pitlm.eval.protocols.run import ProtocolConfig, evaluate_features
from pitlm.eval.result import EvalResult

B = 40
YEARS = (2018, 2019, 2020)
MEMBERS = {"m20": date(2020, 6, 30), "m18": date(2018, 12, 31), "m19": "2019-12-31"}


def fake_result(seed=0, control=True, nan_draw=None):
    """Per-year walk-forward R2s, their mean and a premium for 3 members (+ a control), over 1 + B draws."""
    rng = np.random.default_rng(seed)
    values = {}
    level = {"m18": 0.01, "m19": 0.03, "m20": 0.05, "control": 0.0}
    for m in ("m18", "m19", "m20") + (("control",) if control else ()):
        v = {f"r2_walk_forward_{y}": level[m] * (y - 2017) + rng.normal(0, 0.01, 1 + B) for y in YEARS}
        v["r2_walk_forward"] = np.mean([v[f"r2_walk_forward_{y}"] for y in YEARS], axis=0)
        v["leakage_premium"] = level[m] + rng.normal(0, 0.02, 1 + B)
        values[m] = v
    if nan_draw is not None:
        for k in values["m19"]:
            values["m19"][k][nan_draw] = np.nan
    return EvalResult({"protocols": ["legacy", "walk_forward"]}, {}, values, n_boot=B,
                      control="control" if control else None)


def test_matrix_cells_are_net_values_with_numpy_percentiles():
    res = fake_result()
    mat = knowledge_matrix(res, MEMBERS)
    assert [m["name"] for m in mat["members"]] == ["m18", "m19", "m20"]  # by cutoff
    assert mat["years"] == list(YEARS)
    for m in ("m18", "m19", "m20"):
        for y in YEARS:
            diff = res.values[m][f"r2_walk_forward_{y}"] - res.values["control"][f"r2_walk_forward_{y}"]
            lo, hi = np.percentile(diff[1:], [2.5, 97.5])
            cell = mat["cells"][m][str(y)]
            assert cell["estimate"] == pytest.approx(diff[0], abs=1e-15)
            assert (cell["ci_lo"], cell["ci_hi"]) == pytest.approx((lo, hi), abs=1e-15)
            assert cell["flagged"] == (lo > 0)
    flags = {(m, y) for m in mat["cells"] for y in mat["cells"][m] if mat["cells"][m][y]["flagged"]}
    assert ("m20", "2020") in flags and ("m18", "2018") not in flags  # the planted sizes show through
    assert knowledge_matrix(res, MEMBERS, years=[2019])["years"] == [2019]


def test_matrix_without_control_uses_raw_values():
    res = fake_result(control=False)
    mat = knowledge_matrix(res, MEMBERS)
    raw = res.values["m19"]["r2_walk_forward_2019"]
    assert mat["cells"]["m19"]["2019"]["estimate"] == pytest.approx(raw[0])
    assert mat["cells"]["m19"]["2019"]["ci_lo"] == pytest.approx(np.percentile(raw[1:], 2.5))
    assert mat["net_of"] is None


def test_slope_equals_polyfit_per_draw_and_skips_nan_draws():
    res = fake_result(nan_draw=7)
    x = np.array([cutoff_years(c) for c in (date(2018, 12, 31), date(2019, 12, 31), date(2020, 6, 30))])
    assert x[0] == pytest.approx((date(2018, 12, 31) - date(2000, 1, 1)).days / 365.25)
    for stat, get in (("leakage_premium", lambda m: res.values[m]["leakage_premium"]),
                      ("net_r2_walk_forward", lambda m: res.values[m]["r2_walk_forward"]
                       - res.values["control"]["r2_walk_forward"])):
        V = np.stack([get(m) for m in ("m18", "m19", "m20")])
        want = np.array([np.polyfit(x, V[:, c], 1)[0] if np.isfinite(V[:, c]).all() else np.nan
                         for c in range(V.shape[1])])
        s = family_slope(res, MEMBERS, stat)
        assert s["estimate"] == pytest.approx(want[0], rel=1e-10)
        ok = np.isfinite(want[1:])
        assert s["n_skipped"] == 1 and s["n_draws"] == B - 1 and not ok[6]
        lo, hi = np.percentile(want[1:][ok], [2.5, 97.5])
        assert (s["ci_lo"], s["ci_hi"]) == pytest.approx((lo, hi), rel=1e-10)
    # the planted levels grow with the cutoff: the calibrated slope is clearly positive
    assert family_slope(res, MEMBERS, "net_r2_walk_forward")["ci_lo"] > 0


def test_matrix_counts_nan_draws_as_skipped():
    mat = knowledge_matrix(fake_result(nan_draw=3), MEMBERS)
    assert mat["cells"]["m19"]["2019"]["n_skipped"] == 1 and mat["cells"]["m18"]["2019"]["n_skipped"] == 0


def test_bad_families_are_one_clear_error():
    res = fake_result()
    with pytest.raises(PitlmError, match="nope"):
        knowledge_matrix(res, {"nope": date(2019, 1, 1)})
    with pytest.raises(PitlmError, match="control"):
        knowledge_matrix(res, {"control": date(2019, 1, 1)})
    with pytest.raises(PitlmError, match="2025"):
        knowledge_matrix(res, MEMBERS, years=[2025])
    with pytest.raises(PitlmError, match="distinct cutoffs"):
        family_slope(res, {"m18": date(2019, 1, 1), "m19": date(2019, 1, 1)}, "leakage_premium")
    with pytest.raises(PitlmError, match="not a date"):
        knowledge_matrix(res, {"m18": "last year"})
    with pytest.raises(PitlmError, match="net_r2_purged"):
        family_slope(res, MEMBERS, "net_r2_purged")


def fixed_matrix(flags: dict[tuple[str, int], bool]) -> dict:
    cells = {}
    for (m, y), f in flags.items():
        cells.setdefault(m, {})[str(y)] = {"estimate": 0.1 if f else 0.0, "ci_lo": 0.05 if f else -0.1,
                                           "ci_hi": 0.2, "flagged": f}
    return {"cells": cells}


def test_staircase_logic():
    members, years = ["a", "b"], [2018, 2019, 2020]
    known = ground_truth_cells(members, years, {"a": {2017, 2018}, "b": {2018: 1.0, 2019: 0.5, 2020: 0.0}})
    assert known == {"a": {"2018": "known", "2019": "unknown", "2020": "unknown"},
                     "b": {"2018": "known", "2019": "partial", "2020": "unknown"}}
    stair = {("a", 2018): True, ("a", 2019): False, ("a", 2020): False,
             ("b", 2018): True, ("b", 2019): False, ("b", 2020): False}
    assert staircase_ok(fixed_matrix(stair), known)
    assert staircase_ok(fixed_matrix({**stair, ("b", 2019): True}), known)  # partial: not judged
    chk = staircase_check(fixed_matrix({**stair, ("a", 2020): True}), known)
    assert not chk["ok"] and chk["false_flags"] == ["a_2020"] and chk["missed"] == []
    missed = fixed_matrix({**stair, ("b", 2018): False})
    assert staircase_check(missed, known)["missed"] == ["b_2018"]
    assert not staircase_ok(missed, known)
    assert staircase_ok(missed, known, detectable={2019, 2020})  # 2018 not detectable: its miss is excused
    assert not staircase_ok(fixed_matrix({**stair, ("a", 2020): True}), known, detectable=set())  # false flags count
    with pytest.raises(PitlmError, match="'c'"):
        ground_truth_cells(["c"], years, {"a": set()})


def test_known_shares_from_world_files(tmp_path):
    days = pd.to_datetime(["2018-03-01", "2018-09-03", "2019-03-01", "2019-09-02"])
    gt = pd.DataFrame({"Date": list(days) * 2, "SecuritiesCode": [1111] * 4 + [2222] * 4,
                       "period": ["2018H1", "2018H2", "2019H1", "2019H2"] * 2})
    gt.to_parquet(tmp_path / "ground_truth.parquet")
    news = pd.DataFrame({
        "id": list("abcdefg"),
        "date": ["2018-07-16T10:00:00Z", "2018-07-16T11:00:00Z", "2019-01-14T09:00:00Z", "2019-02-11T09:00:00Z",
                 "2019-07-15T23:59:59Z", "2019-07-16T00:00:01Z", "2018-01-15T00:00:00Z"],
        "kind": ["news"] * 6 + ["filler"],
        "SecuritiesCode": [1111, 2222, 1111, 2222, 1111, 2222, None],
        "period": ["2018H1", "2018H1", "2018H2", "2018H2", "2019H1", "2019H1", None]})
    news.to_parquet(tmp_path / "news_index.parquet")
    assert known_shares(tmp_path, date(2018, 6, 30)) == {2018: 0.0, 2019: 0.0}
    assert known_shares(tmp_path, date(2019, 1, 31)) == {2018: 0.75, 2019: 0.0}
    assert known_shares(tmp_path, "2019-07-15") == {2018: 1.0, 2019: 0.25}  # end of the cutoff's day, UTC
    assert known_years(tmp_path, date(2019, 7, 16)) == {2018}
    assert known_shares(tmp_path, date(2019, 7, 16))[2019] == 0.5
    with pytest.raises(PitlmError, match="missing"):
        known_shares(tmp_path / "nope", date(2019, 1, 1))


def test_summary_lines_are_greppable():
    res = fake_result()
    report = family_report(res, MEMBERS, known_years_of={"m18": {2018}, "m19": {2018, 2019},
                                                          "m20": {2018, 2019, 2020}})
    lines = family_summary_lines(report)
    keys = [ln.split(":")[0] for ln in lines]
    assert keys[:8] == ["family_slope", "family_slope_ci_lo", "family_slope_ci_hi", "family_slope_skipped",
                        "family_slope_calibrated", "family_slope_calibrated_ci_lo", "family_slope_calibrated_ci_hi",
                        "family_slope_calibrated_skipped"]
    assert keys[8:17] == [f"knowledge_{m}_{y}" for m in ("m18", "m19", "m20") for y in YEARS]
    assert keys[17:] == ["family_staircase_ok", "family_staircase_missed", "family_staircase_false_flags"]
    c = report["matrix"]["cells"]["m20"]["2020"]
    assert f"knowledge_m20_2020: {c['estimate']:.6g} [{c['ci_lo']:.6g}, {c['ci_hi']:.6g}] flagged" in lines
    assert f"family_slope: {report['slope']['estimate']:.6g}" in lines
    assert lines[17] == f"family_staircase_ok: {str(report['staircase']['ok']).lower()}"
    no_truth = family_summary_lines(family_report(res, MEMBERS))
    assert not any(ln.startswith("family_staircase") for ln in no_truth)


def planted_panel(n_stocks=16, per_year=10, seed=0):
    """Rows 2017-2021; Target = planted + noise. Member m's feature 0 is the planted value in years up to its
    cutoff year and independent noise of the same scale after; the control's features are pure noise."""
    rng = np.random.default_rng(seed)
    parts = []
    for code in range(1001, 1001 + n_stocks):
        for year in range(2017, 2022):
            cal = pd.bdate_range(f"{year}-01-04", f"{year}-12-03")
            parts.append(pd.DataFrame({"Date": np.sort(rng.choice(cal, per_year, replace=False)),
                                       "SecuritiesCode": code}))
    rows = pd.concat(parts, ignore_index=True)
    planted = rng.normal(0, 0.02, len(rows))
    rows["Target"] = planted + rng.normal(0, 0.01, len(rows))
    year = rows["Date"].dt.year.to_numpy()
    members = {"m2018": date(2018, 12, 31), "m2019": date(2019, 12, 31), "m2020": date(2020, 12, 31)}
    feats = {"control": rng.normal(size=(len(rows), 3))}
    for m, c in members.items():
        f0 = np.where(year <= c.year, planted, rng.normal(0, 0.02, len(rows)))
        feats[m] = np.column_stack([f0 / 0.02, rng.normal(size=(len(rows), 2))])
    return rows, feats, members


def test_evaluate_family_flags_known_cells_only():
    rows, feats, members = planted_panel()
    cfg = ProtocolConfig(protocols=["legacy", "walk_forward"], n_boot=50, jackknife_groups=0, rank_ic=False)
    res = evaluate_features(feats, rows, cfg, control="control")
    known = {m: set(range(2017, c.year + 1)) for m, c in members.items()}
    report = family_report(res, members, known_years_of=known)
    mat = report["matrix"]
    assert mat["years"] == [2018, 2019, 2020, 2021]
    flagged = {(m, int(y)) for m, row in mat["cells"].items() for y, c in row.items() if c["flagged"]}
    assert flagged == {(m, y) for m, c in members.items() for y in mat["years"] if y <= c.year}
    assert report["staircase"]["ok"] and report["staircase"]["judged"] == 12
    assert report["slope_calibrated"]["ci_lo"] > 0  # each later cutoff knows one more test year
    assert "family_staircase_ok: true" in family_summary_lines(report)
    # the same matrix judged against a wrong ground truth fails
    wrong = ground_truth_cells(list(members), mat["years"], {m: {2021} for m in members})
    assert not staircase_ok(mat, wrong)


# ---- `pitlm eval --family` end to end ----

FAMILY_CUTOFFS = ("2018-12-31", "2019-12-31", "2020-12-31", "2021-12-31")


@pytest.fixture(scope="module")
def family_world(tmp_path_factory):
    """A built world and its market (`pitlm world build`, `pitlm market world`), and one embeddings file per
    member: dimension 0 is the planted move of the row's (company, year) when a news document reporting it was
    crawled by the member's cutoff (the world's news_index), else noise of the same scale; 3 noise dimensions."""
    from conftest import run_cli

    home = tmp_path_factory.mktemp("famworld") / "home"
    for args in (["world", "build", "w", "--seed", "1", "--set", "n_companies=30", "--set", "history_docs=0"], ["market", "world", "w", "--world", "w"]):
        code, _, err = run_cli("--home", str(home), *args)
        assert code == 0, err
    gt = pd.read_parquet(home / "world" / "w" / "ground_truth.parquet")
    news = pd.read_parquet(home / "world" / "w" / "news_index.parquet")
    news = news[(news["kind"] == "news") & news["period"].notna()]
    rng = np.random.default_rng(0)
    scale = float(gt["planted_target"].std())
    files = {}
    for c in FAMILY_CUTOFFS:
        crawled = pd.to_datetime(news["date"], utc=True) < pd.Timestamp(c, tz="UTC") + pd.Timedelta(days=1)
        known = set(zip(news.loc[crawled, "SecuritiesCode"].astype(int), news.loc[crawled, "period"].astype(str),
                        strict=True))
        is_known = np.array([(int(a), str(p)) in known for a, p in zip(gt["SecuritiesCode"], gt["period"],
                                                                      strict=True)])
        e0 = np.where(is_known, gt["planted_target"], rng.normal(0, scale, len(gt))) / scale
        df = pd.DataFrame({"SecuritiesCode": gt["SecuritiesCode"], "Date": gt["Date"], "e0": e0,
                           **{f"e{i}": rng.normal(size=len(gt)) for i in (1, 2, 3)}})
        files[c] = home / f"emb_{c}.parquet"
        df.to_parquet(files[c])
    return home, files


def test_eval_family_prints_the_staircase_and_writes_the_matrix(cli, family_world):
    import json
    from pathlib import Path

    home, files = family_world
    members = ",".join(f"embeddings:{files[c]}@{c}" for c in FAMILY_CUTOFFS)
    code, out, err = cli("--home", str(home), "eval", "--market", "w", "--family", f"fam={members}",
                         "--protocol", "legacy,walk_forward", "--n-boot", "40", "--max-stocks", "30",
                         "--dates-per-stock", "100", "--set", "protocol.jackknife_groups=0",
                         "--set", "protocol.rank_ic=false", "--set", "numeric_features=false",
                         "--set", "control_match=dim")
    assert code == 0, err
    got = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    assert got["family"] == "fam" and got["family_staircase_ok"] == "true", out
    assert got["family_staircase_false_flags"] == "none" and got["family_staircase_missed"] == "none"
    assert got["knowledge_fam-2021-12-31_2020"].endswith("flagged")
    assert got["knowledge_fam-2018-12-31_2019"].endswith(" -")
    assert float(got["family_slope_calibrated_ci_lo"]) > 0  # each later member knows one more year
    assert "family_slope" in got  # the seed's premium against the cutoff (legacy ran)
    res = json.loads(Path(got["results_json"]).read_text())
    fam = res["family"]["fam"]
    assert fam["ground_truth_world"] == str(home / "world" / "w")
    assert [m["cutoff"] for m in fam["matrix"]["members"]] == list(FAMILY_CUTOFFS)
    # news of year Y is crawled in Y+1: the member of Y-12-31 knows the years before Y
    for m in fam["matrix"]["members"]:
        year = int(m["cutoff"][:4])
        assert {y: fam["ground_truth"][m["name"]][str(y)] for y in fam["matrix"]["years"]} == {
            y: "known" if y < year else "unknown" for y in fam["matrix"]["years"]}
    assert set(res["models"]) == {"control", *(f"fam-{c}" for c in FAMILY_CUTOFFS)}
    # the report shows the matrix as a heatmap and the premium against the cutoff
    code, out, err = cli("--home", str(home), "report", Path(got["results_json"]).parent.name)
    assert code == 0, err
    rep = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    page = Path(rep["report_html"]).read_text()
    assert "Family &#x27;fam&#x27;: leakage against the model&#x27;s cutoff" in page
    assert 'alt="knowledge matrix of fam"' in page and 'alt="premium vs cutoff of fam"' in page
    assert "the staircase holds" in page
    assert (Path(rep["report_html"]).parent / "knowledge_0_0.png").stat().st_size > 5000


@pytest.mark.parametrize("family, message", [
    ("fam=embeddings:x.parquet", "needs its cutoff date: SPEC@YYYY-MM-DD"),
    ("fam=hf:org/a@2019-12-31,hf:org/b@2019-12-31", "cutoff 2019-12-31 is given twice"),
    ("fam=model:nope", "run nope has no members"),
    ("fam=model:nope@2019-12-31", "run nope has no member for cutoff 2019-12-31"),
    ("fam=hf:org/a@2019-13-01", "'2019-13-01' in 'hf:org/a@2019-13-01' is not a date"),
    ("bad name=hf:org/a@2019-12-31", "family name 'bad name'"),
])
def test_bad_family_specs_are_one_line(cli, family_world, family, message):
    home, _ = family_world
    code, out, err = cli("--home", str(home), "eval", "--market", "w", "--family", family)
    assert code != 0 and message in err, err


def test_family_needs_walk_forward(cli, family_world):
    home, files = family_world
    code, out, err = cli("--home", str(home), "eval", "--market", "w", "--protocol", "legacy",
                         "--family", f"fam=embeddings:{files['2018-12-31']}@2018-12-31")
    assert code != 0 and "needs the walk_forward protocol" in err, err
