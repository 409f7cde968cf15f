"""`pitlm report` on real eval statistics (pitlm.eval.protocols.run.evaluate_features on a simulated panel), a train run's
metrics and a corpus manifest: HTML with embedded plots, PNGs, Markdown, verdicts that follow the decision."""

import base64
import json

import numpy as np
import pandas as pd
import pytest

from pitlm.eval.protocols.run import ProtocolConfig, evaluate_features
from pitlm.report.render import verdicts
from pitlm.runs import start_run
from pitlm.volume import Volume, atomic_write_json


def _panel(n_stocks=24, n_dates=120, seed=0):
    rng = np.random.default_rng(seed)
    dates = pd.bdate_range("2018-01-02", periods=n_dates * 8)[::8]
    rows = pd.DataFrame([(d, 1000 + s) for s in range(n_stocks) for d in dates], columns=["Date", "SecuritiesCode"])
    knowledge = rng.normal(size=len(rows))
    rows["Target"] = 0.5 * knowledge + rng.normal(size=len(rows))
    leaky = np.column_stack([knowledge + 0.3 * rng.normal(size=len(rows)), rng.normal(size=(len(rows), 5))])
    blind = rng.normal(size=(len(rows), 6))
    control = rng.normal(size=(len(rows), 6))
    return rows, {"leaky": leaky, "blind": blind, "control": control}


@pytest.fixture
def eval_run(home):
    rows, feats = _panel()
    cfg = ProtocolConfig(n_boot=40, jackknife_groups=0, protocols=["legacy", "purged", "walk_forward"],
                         train_end="2020-12-31", test_start="2021-01-01")
    result = evaluate_features(feats, rows, cfg, control="control", base="leaky", primary="blind")
    vol = Volume.resolve(home)
    with start_run(vol, "eval") as run:
        run.save_json("results.json", {"config": {"market": "sim", "protocols": cfg.protocols},
                                       "rows": {"n": len(rows), "stocks": 24, "template": "seed"},
                                       "protocols": result.to_json()})
    return run.id, result


def test_verdicts_follow_the_decision(eval_run):
    run_id, result = eval_run
    res = {"protocols": result.to_json()}
    by_model = {v["model"]: v for v in verdicts(res)}
    assert by_model["leaky"]["flagged"] is True and "leakage detected" in by_model["leaky"]["text"]
    assert by_model["blind"]["flagged"] is False and "not detected" in by_model["blind"]["text"]
    assert by_model["control"]["role"] == "control" and by_model["control"]["flagged"] is None
    for v in by_model.values():
        assert "legacy (seed) protocol" in v["text"]


def test_report_cli_writes_self_contained_html(cli, home, eval_run):
    run_id, _ = eval_run
    vol = Volume.resolve(home)
    with start_run(vol, "train", {"name": "tiny", "corpus": "c1"}) as run:
        for step in range(1, 6):
            run.log_metrics(step=step, train_loss=5.0 - step * 0.3, **({"val_loss": 4.5} if step == 5 else {}))
        run.finish({"val_loss_final": 4.5, "train_loss_final": 3.5}, print_lines=False)
    atomic_write_json(vol.path("corpus", "c1", "manifest.json"),
                      {"cutoff": "2017-06-30", "tokens": {"train": 1000, "val": 10},
                       "docs": {"kept": 7, "dropped_after_cutoff": 3}, "dumps_used": ["CC-MAIN-2017-26"],
                       "min_doc_date": "2017-01-01", "max_doc_date": "2017-06-30"})
    out = home / "rep"
    code, stdout, err = cli("report", run_id, run.id, "--out", str(out))
    assert code == 0, err
    assert "verdict_leaky: leakage_detected" in stdout and "verdict_blind: not_detected" in stdout
    html = (out / "report.html").read_text()
    images = html.count("data:image/png;base64,")
    assert images >= 5  # forest, reduction, walk-forward, long-short, loss
    first = html.split("data:image/png;base64,")[1].split('"')[0]
    assert base64.b64decode(first)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "src=\"http" not in html and "<script" not in html  # self-contained, no external assets
    assert "dropped_after_cutoff=3" in html and "2017-06-30" in html
    md = (out / "report.md").read_text()
    assert "leaky: leakage detected" in md and "![forest plot" in md
    assert sorted(p.name for p in out.glob("*.png")) == ["forest_0.png", "long_short_0.png", "loss.png",
                                                         "reduction_0.png", "walk_forward_0.png"]
    assert "Long-short portfolios" in md and "sharpe_gap_walk_forward" in md
    summary = json.loads(next(vol.path("runs").glob("report-*/summary.json")).read_text())
    assert summary["status"] == "ok" and summary["figures"] == 5


def test_report_refuses_runs_with_nothing_to_show(cli, home):
    vol = Volume.resolve(home)
    with start_run(vol, "world"):
        pass
    code, _, err = cli("report", "world")
    assert code == 2 and "nothing to report" in err
    code, _, err = cli("report", "nope")
    assert code == 2 and err.startswith("error: no run 'nope'")


def test_forest_colours_only_intervals_above_zero_as_flagged():
    """A leakage statistic whose interval lies below 0 is not a finding: red only above 0 in the forest plot,
    both ways for reductions (a difference either way is news)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    from pitlm.report.plots import CLEAR, FLAG, _interval_rows

    rows = [("below", {"estimate": -1.0, "ci_lo": -2.0, "ci_hi": -0.5}, False),
            ("above", {"estimate": 1.0, "ci_lo": 0.5, "ci_hi": 2.0}, False),
            ("spans", {"estimate": 0.1, "ci_lo": -0.5, "ci_hi": 0.6}, False)]
    for one_sided, expected in ((True, [CLEAR, FLAG, CLEAR]), (False, [FLAG, FLAG, CLEAR])):
        fig, ax = plt.subplots()
        _interval_rows(ax, rows, "t", "x", one_sided=one_sided)
        colours = [to_hex(line.get_color()) for line in ax.get_lines()[0:6:2]]  # the interval lines, in row order
        plt.close(fig)
        assert colours == [to_hex(c) for c in expected], (one_sided, colours)


def _probe_results(n_boot=40, seed=1):
    """A probe results.json with summaries from pitlm.eval.probe.summarise_probe: 'leaky' knows (every draw of its
    Min-K% margin and entity gap above its control's), 'blind' does not (its draws straddle the control's)."""
    from pitlm.eval.bootstrap import summarize
    from pitlm.eval.probe import summarise_probe

    rng = np.random.default_rng(seed)
    draws = lambda mean: mean + 0.1 * rng.standard_normal(1 + n_boot)  # noqa: E731  [estimate, draws...]
    control = draws(0.0)
    lm = {m: {"spec": m, "control": "random-init", "stats": {
        "mink": summarise_probe(draws(mean), control, n_boot, 0.95),
        "direction_accuracy": summarise_probe(0.5 + draws(mean), 0.5 + control, n_boot, 0.95)}}
        for m, mean in (("leaky", 1.0), ("blind", 0.0))}
    entity = {}
    for m, mean in (("leaky", 0.5), ("blind", 0.0)):
        s = {k: summarize(draws(v), n_boot, 0.95) for k, v in (("named", mean), ("anonymised", 0.0), ("gap", mean))}
        entity[m] = {"statistic": "net_r2_purged", **s, "templates": ["bare", "bare-anonymised"],
                     "flagged": {k: bool(s[k]["ci_lo"] > 0) for k in s}}
    return {"stage": "probe", "config": {"market": "sim", "move": "target"},
            "rows": {"n": 100, "with_move": 90, "template": "bare"}, "summary": {"bootstrap_draws": n_boot},
            "probes": {"lm": lm, "entity": entity}}


def test_report_shows_probes_beside_the_regression_verdict(cli, home, eval_run):
    run_id, _ = eval_run
    vol = Volume.resolve(home)
    results = _probe_results()
    assert results["probes"]["lm"]["leaky"]["stats"]["mink"]["flagged"]
    assert not results["probes"]["lm"]["blind"]["stats"]["mink"]["flagged"]
    with start_run(vol, "probe") as run:
        run.save_json("results.json", results)
    out = home / "rep"
    code, stdout, err = cli("report", run_id, run.id, "--out", str(out))
    assert code == 0, err
    assert "probes_flagged_leaky: mink,direction_accuracy,entity_gap" in stdout, stdout
    assert "probes_flagged_blind: none" in stdout
    md = (out / "report.md").read_text()
    assert "## Knowledge probes" in md and "![knowledge probes" in md and (out / "probes_0.png").is_file()
    table = {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if line.startswith("| leaky")
             or line.startswith("| blind")}
    # the leaky model's row: the eval's verdict for the same name, then each probe's net estimate, flagged
    assert "leakage detected" in table["leaky"] and table["leaky"].count("▲") == 3
    assert "not detected" in table["blind"] and "▲" not in table["blind"]
    assert "No probe calibration in this report" in md
