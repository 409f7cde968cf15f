"""Knowledge probes: the statistics of pitlm/eval/probestats.py against hand-computed values (and weighted draws
against rows repeated by their bootstrap counts, the LAP interaction against scikit-learn's OLS), and `pitlm probe`
end to end on a tiny world with a tiny random HF model, its estimates recomputed from unpadded forward passes."""

import json
from pathlib import Path

import numpy as np
import pytest
from test_eval_embed import save_tiny_model

from pitlm.eval.probestats import (
    balanced_accuracy,
    lap_interaction,
    min_k,
    min_k_pp,
    n_lowest,
    row_weights,
    true_minus_false,
)

# ---------------------------------------------------------------------------- token scores


def test_min_k_of_a_five_token_sequence_by_hand():
    lp = np.array([-1.0, -3.0, -0.5, -2.0, -4.0])
    assert n_lowest(5, 0.2) == 1 and n_lowest(5, 0.5) == 2 and n_lowest(5, 0.1) == 1 and n_lowest(5, 1.0) == 5
    assert min_k(lp, 0.2) == -4.0                    # int(0.2 * 5) = 1 lowest: -4
    assert min_k(lp, 0.4) == (-4.0 - 3.0) / 2       # 2 lowest: -4, -3
    assert min_k(lp, 0.5) == (-4.0 - 3.0) / 2       # int(2.5) = 2
    assert min_k(lp, 0.1) == -4.0                    # int(0.5) = 0 -> at least one token
    assert min_k(lp, 1.0) == pytest.approx(-10.5 / 5)
    assert min_k(lp[::-1], 0.4) == min_k(lp, 0.4)    # a set statistic: token order does not matter


def test_min_k_pp_standardises_each_token_by_the_models_expectation():
    lp = np.array([-1.0, -3.0, -0.5, -2.0, -4.0])
    mu = np.array([-2.0, -2.0, -1.0, -3.0, -3.0])
    sd = np.array([1.0, 2.0, 0.5, 1.0, 2.0])
    # (lp - mu) / sd = [1, -0.5, 1, 1, -0.5]: the least likely token (-4) is no more surprising than the second
    assert min_k_pp(lp, mu, sd, 0.2) == -0.5
    assert min_k_pp(lp, mu, sd, 0.4) == -0.5
    assert min_k_pp(lp, mu, sd, 0.6) == pytest.approx((-0.5 - 0.5 + 1.0) / 3)
    assert min_k_pp(lp, mu, np.zeros(5), 0.2) == pytest.approx(-1.0 / 1e-12)  # sd 0: clamped, not a division by 0


# ---------------------------------------------------------------------------- statistics per draw

STOCK = np.array([0, 0, 1, 2, 2])
Z = np.array([0.3, -0.1, 0.5, 0.2, -0.4])
UP = np.array([True, False, True, False, True])


def test_row_weights_are_the_stocks_counts_with_masked_rows_zero():
    counts = np.array([[1, 1, 1], [2, 0, 1], [0, 3, 0]])
    W = row_weights(counts, STOCK, np.array([True, True, True, False, True]))
    np.testing.assert_array_equal(W, [[1, 1, 1, 0, 1], [2, 2, 0, 0, 1], [0, 0, 3, 0, 0]])
    np.testing.assert_array_equal(row_weights(counts, STOCK)[1], [2, 2, 0, 1, 1])


def test_true_minus_false_by_hand():
    W = np.array([[1.0, 1, 1, 1, 1], [2, 1, 0, 3, 1], [1, 0, 1, 0, 1]])
    got = true_minus_false(W, Z, UP)
    # original rows: up mean (0.3 + 0.5 - 0.4) / 3, down mean (-0.1 + 0.2) / 2
    assert got[0] == pytest.approx(0.5 * (0.4 / 3 - 0.05))
    # weights 2,1,0,3,1: up (2*0.3 + 0*0.5 + 1*-0.4) / 3, down (1*-0.1 + 3*0.2) / 4
    assert got[1] == pytest.approx(0.5 * (0.2 / 3 - 0.5 / 4))
    assert np.isnan(got[2])  # no down row in the draw: undefined, the draw is skipped downstream
    # a model's general preference for "risen" (a constant added to every up-minus-down score) cancels
    np.testing.assert_allclose(true_minus_false(W, Z + 7.0, UP), got, equal_nan=True)


def test_balanced_accuracy_by_hand_and_chance_whatever_the_share_of_ups():
    margin = np.array([1.0, 2.0, 0.0, 0.5, -1.0])
    up = np.array([True, True, False, False, False])
    W = np.array([[1.0, 1, 1, 1, 1], [0, 1, 2, 0, 1]])
    got = balanced_accuracy(W, margin, up)
    assert got[0] == pytest.approx(0.5 * (1.0 + (0.5 + 0 + 1) / 3))   # ups both right; downs: tie, wrong, right
    assert got[1] == pytest.approx(0.5 * (1.0 + (2 * 0.5 + 1) / 3))    # down rows weighted 2 (tie) and 1 (right)
    always_up = np.ones(5)  # a model that always says "up" is at chance, 2 or 3 up rows alike
    np.testing.assert_array_equal(balanced_accuracy(W, always_up, up), [0.5, 0.5])
    np.testing.assert_array_equal(balanced_accuracy(W, always_up, ~up), [0.5, 0.5])


def _repeat(W_row: np.ndarray, *cols: np.ndarray) -> list[np.ndarray]:
    idx = np.repeat(np.arange(len(W_row)), W_row.astype(int))
    return [c[idx] for c in cols]


def test_weighted_statistics_equal_the_rows_repeated_by_their_bootstrap_counts():
    rng = np.random.default_rng(0)
    n, n_stocks = 60, 12
    stock = rng.integers(0, n_stocks, n)
    counts = np.vstack([np.ones(n_stocks, int), rng.multinomial(n_stocks, np.ones(n_stocks) / n_stocks, 5)])
    mask = rng.random(n) > 0.1
    W = row_weights(counts, stock, mask)
    z, up = rng.normal(size=n), rng.random(n) > 0.4
    tmf, acc = true_minus_false(W, z, up), balanced_accuracy(W, z, up)
    for c in range(len(W)):
        zr, ur = _repeat(W[c], z, up)
        assert tmf[c] == pytest.approx(0.5 * (zr[ur].mean() - zr[~ur].mean()))
        assert acc[c] == pytest.approx(0.5 * ((zr[ur] > 0).mean() + (zr[~ur] < 0).mean()))


def test_lap_interaction_equals_sklearn_ols_on_repeated_rows():
    from sklearn.linear_model import LinearRegression

    rng = np.random.default_rng(1)
    n, n_stocks = 200, 20
    stock = rng.integers(0, n_stocks, n)
    f, lap = rng.normal(1.0, 2.0, n), rng.normal(-3.0, 0.5, n)
    y = 0.1 * f + 0.3 * lap + 0.4 * f * lap + rng.normal(size=n)
    mask = np.ones(n, bool)
    mask[:5] = False
    y[:5] = np.nan  # masked rows may hold NaN (no move): they must not reach any draw
    counts = np.vstack([np.ones(n_stocks, int), rng.multinomial(n_stocks, np.ones(n_stocks) / n_stocks, 4)])
    W = row_weights(counts, stock, mask)
    got = lap_interaction(W, y, f, lap)

    def standardise(v):  # on the original sample's rows (ddof 0), the same scale for every draw
        return (v - v[mask].mean()) / v[mask].std()

    ys, fs, ls = standardise(y), standardise(f), standardise(lap)
    for c in range(len(W)):
        yr, fr, lr = _repeat(W[c], ys, fs, ls)
        ols = LinearRegression().fit(np.column_stack([fr, lr, fr * lr]), yr)
        assert got[c] == pytest.approx(ols.coef_[2], rel=1e-9, abs=1e-12)
    # the planted 0.4 * f * lap, on the standardised scale: 0.4 * sd(f) * sd(lap) / sd(y)
    assert got[0] == pytest.approx(0.4 * f[mask].std() * lap[mask].std() / y[mask].std(), abs=0.02)
    two_rows = np.zeros(n)
    two_rows[10:12] = 1.0  # two rows cannot fit four coefficients: NaN, not a number from a singular system
    assert np.isnan(lap_interaction(np.vstack([W[0], two_rows]), y, f, lap)[1])


# ---------------------------------------------------------------------------- `pitlm probe` end to end

UP_WORD, DOWN_WORD = " risen", " fallen"
PROBE_ARGS = ["--max-stocks", "6", "--dates-per-stock", "8", "--n-boot", "30", "--device", "cpu",
              "--set", f"up_words=['{UP_WORD}']", "--set", f"down_words=['{DOWN_WORD}']",
              "--set", "protocol.rank_ic=false", "--set", "protocol.jackknife_groups=0", "--set", "protocol.alpha_cv=false"]


@pytest.fixture(scope="module")
def probe_world(tmp_path_factory):
    """A built 6-company world and its market on a volume, and a tiny random model (weights unlike its
    random-init twin, the default control)."""
    from conftest import run_cli

    root = tmp_path_factory.mktemp("probeworld")
    home = root / "home"
    for args in (["world", "build", "w", "--seed", "1", "--set", "n_companies=6", "--set", "n_sectors=2",
                  "--set", "history_docs=0"], ["market", "world", "w", "--world", "w"]):
        code, _, err = run_cli("--home", str(home), *args)
        assert code == 0, err
    return home, save_tiny_model(root / "tiny", seed=5)


def lines(out: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)


def reference_scores(model, tok, prompts: list[str], k: float = 0.2) -> dict[str, np.ndarray]:
    """Per row, one unpadded forward per statement: Min-K% and Min-K%++ of prompt + word, the words' log-prob
    margin, and Min-K% of the prompt's own tokens (the LAP propensity)."""
    import torch

    def lowest_mean(v):
        return float(np.sort(v)[:max(1, int(k * len(v)))].mean())

    out = {key: [] for key in ("mink_up", "mink_down", "minkpp_up", "minkpp_down", "margin", "lap")}
    with torch.no_grad():
        for prompt in prompts:
            n_prompt = len(tok(prompt)["input_ids"])
            word_lp = {}
            for side, word in (("up", UP_WORD), ("down", DOWN_WORD)):
                ids = tok(prompt + word)["input_ids"]
                logp = model(input_ids=torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1).double()
                lp = logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
                mu = (logp.exp() * logp).sum(-1).numpy()
                sd = np.sqrt((logp.exp() * logp ** 2).sum(-1).numpy() - mu ** 2)
                out[f"mink_{side}"].append(lowest_mean(lp))
                out[f"minkpp_{side}"].append(lowest_mean((lp - mu) / sd))
                word_lp[side] = lp[n_prompt - 1:].sum()
                if side == "up":
                    out["lap"].append(lowest_mean(lp[:n_prompt - 1]))
            out["margin"].append(word_lp["up"] - word_lp["down"])
    return {key: np.array(v) for key, v in out.items()}


def reference_stats(s: dict[str, np.ndarray], move: np.ndarray) -> dict[str, float]:
    """The four LM statistics on the original sample (rows with a move), written out without probestats."""
    from sklearn.linear_model import LinearRegression

    keep = np.isfinite(move) & (move != 0)
    up, down = keep & (move > 0), keep & (move < 0)
    out = {}
    for stat in ("mink", "minkpp"):
        d = s[f"{stat}_up"] - s[f"{stat}_down"]
        out[stat] = 0.5 * (d[up].mean() - d[down].mean())
    m = s["margin"]
    out["direction_accuracy"] = 0.5 * (((m[up] > 0) + 0.5 * (m[up] == 0)).mean()
                                       + ((m[down] < 0) + 0.5 * (m[down] == 0)).mean())
    y, f, lap = (((v - v[keep].mean()) / v[keep].std())[keep] for v in (move, m, s["lap"]))
    out["lap_interaction"] = LinearRegression().fit(np.column_stack([f, lap, f * lap]), y).coef_[2]
    return out


def test_probe_end_to_end_recomputes_every_lm_statistic(cli, probe_world):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pitlm.eval.models import load_causal_lm, parse_spec
    from pitlm.eval.pipeline import load_rows
    from pitlm.eval.probe import ProbeConfig
    from pitlm.eval.prompts import build_prompts
    from pitlm.volume import Volume

    home, model_dir = probe_world
    code, out, err = cli("--home", str(home), "probe", "--market", "w", "--model", f"tiny={model_dir}", *PROBE_ARGS)
    assert code == 0, err
    got = lines(out)
    res = json.loads(Path(got["results_json"]).read_text())
    assert res["stage"] == "probe" and res["summary"]["bootstrap_draws"] == 30

    # the same rows as the probe's sample, scored here one statement at a time with the model and its control
    vol = Volume(home)
    rows = load_rows(vol, ProbeConfig(market="w", max_stocks=6, dates_per_stock=8))
    move = rows["Target"].to_numpy(dtype=np.float64)
    assert int(got["rows"]) == len(rows) == res["rows"]["n"]
    assert int(got["rows_with_move"]) == int((move != 0).sum()) and int(got["rows_up"]) == int((move > 0).sum())
    prompts = build_prompts(rows, "bare")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    control = load_causal_lm(parse_spec(f"control:random-init:{model_dir}", vol, seed=0), "cpu", torch.float32)
    ref_model = reference_stats(reference_scores(model, tok, prompts), move)
    ref_control = reference_stats(reference_scores(control, tok, prompts), move)

    entry = res["probes"]["lm"]["tiny"]
    assert entry["control"]["kind"] == "random-init"
    assert set(entry["stats"]) == {"mink", "minkpp", "direction_accuracy", "lap_interaction"}
    for stat, s in entry["stats"].items():
        # float32 scores from padded batches: ~1e-6 apart; the LAP coefficient divides them by the small spread
        # of a random model's prompt familiarity
        tol = {"rel": 1e-3, "abs": 1e-4} if stat == "lap_interaction" else {"rel": 1e-4, "abs": 1e-6}
        assert s["model"]["estimate"] == pytest.approx(ref_model[stat], **tol), stat
        assert s["control"]["estimate"] == pytest.approx(ref_control[stat], **tol), stat
        # paired: the net statistic is the difference per draw, so on the original sample exactly model - control
        assert s["net"]["estimate"] == pytest.approx(s["model"]["estimate"] - s["control"]["estimate"], abs=1e-12)
        assert s["net"]["ci_lo"] <= s["net"]["ci_hi"] and s["net"]["n_draws"] + s["net"]["n_skipped"] == 30
        assert s["flagged"] == (s["net"]["ci_lo"] > 0)
        # the printed lines are the results' numbers
        assert float(got[f"tiny_{stat}"]) == pytest.approx(s["model"]["estimate"], rel=1e-5, abs=1e-9)
        assert float(got[f"tiny_net_{stat}_ci_lo"]) == pytest.approx(s["net"]["ci_lo"], rel=1e-5, abs=1e-9)
        assert got[f"tiny_{stat}_flagged"] == str(s["flagged"]).lower()
    assert ref_model["mink"] != pytest.approx(ref_control["mink"])  # the twin really is another model

    ent = res["probes"]["entity"]["tiny"]
    assert ent["statistic"] == "net_r2_purged" and ent["templates"] == ["bare", "bare-anonymised"]
    assert ent["gap"]["estimate"] == pytest.approx(ent["named"]["estimate"] - ent["anonymised"]["estimate"])
    assert got["tiny_regression_flagged"] == str(ent["flagged"]["named"]).lower()
    assert got["tiny_entity_flagged"] == str(ent["flagged"]["gap"]).lower()
    assert float(got["tiny_entity_gap"]) == pytest.approx(ent["gap"]["estimate"], rel=1e-5, abs=1e-9)
    assert got["probe_statistic_entity"] == "net_r2_purged" and got["move"] == "target"


def test_probe_planted_moves_come_from_the_worlds_ground_truth(cli, probe_world):
    import pandas as pd

    home, model_dir = probe_world
    code, out, err = cli("--home", str(home), "probe", "--market", "w", "--model", f"tiny={model_dir}",
                         "--probe", "lap", "--move", "planted", *PROBE_ARGS)
    assert code == 0, err
    got = lines(out)
    res = json.loads(Path(got["results_json"]).read_text())
    assert set(res["probes"]) == {"lm"} and set(res["probes"]["lm"]["tiny"]["stats"]) == {"lap_interaction"}
    assert "tiny_mink" not in got and got["probe_statistic_entity"] == "none"
    from pitlm.eval.pipeline import load_rows
    from pitlm.eval.probe import ProbeConfig
    from pitlm.volume import Volume

    rows = load_rows(Volume(home), ProbeConfig(market="w", max_stocks=6, dates_per_stock=8))
    gt = pd.read_parquet(home / "world" / "w" / "ground_truth.parquet", columns=["Date", "SecuritiesCode",
                                                                                  "planted_target"])
    planted = rows.merge(gt, on=["Date", "SecuritiesCode"], how="left")["planted_target"].to_numpy()
    assert int(got["rows_with_move"]) == int((np.isfinite(planted) & (planted != 0)).sum())
    assert int(got["rows_up"]) == int((planted > 0).sum())
    assert (planted > 0).sum() != (rows["Target"] > 0).sum()  # the fixture tells planted from Target signs apart


@pytest.mark.parametrize("extra, message", [
    (["--model", "tiny=MODEL", "--probe", "mink,bogus"], "config key 'probes.1'"),
    (["--model", "x=control:random-features", "--probe", "mink"], "has no likelihood"),
    (["--probe", "lap"], "give at least one model"),
    (["--model", "tiny=MODEL", "--probe", "entity", "--template", "seed"], "has no anonymised twin"),
    (["--model", "tiny=MODEL", "--probe", "mink", "--set", "k=0"], "config key 'k'"),
])
def test_probe_bad_input_is_one_error_line(cli, probe_world, extra, message):
    home, model_dir = probe_world
    extra = [a.replace("MODEL", str(model_dir)) for a in extra]
    code, out, err = cli("--home", str(home), "probe", "--market", "w", *extra)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code != 0 and len(errors) == 1 and message in errors[0], err
    assert "results_json" not in out
