"""`pitlm calibrate --probe mink,entity,lap`: false-positive rate and power of the knowledge probes' tests.

What this calibrates, and what it does not. An LM per world (20 + 20 worlds) would need a model trained on each
world's corpus (minutes each on a CPU, and the knowledge it picks up is then itself uncontrolled). Instead each world
scores a *simulated* LM's per-row probe values and runs the probes' own statistics on them, on the world's real rows
(its Target with market, sector and planted components), with the same paired stock-clustered draws and the same
net-of-control decision as `pitlm probe`:

    r, m    two knowledge-free scalar functions of the row's prompt text ("On <date>, <name> (code <code>) shares
            had"): a random-features map (pitlm/eval/embed.py) projected to 2 columns and standardised. r stands for
            an LM's arbitrary preference for "risen" over "fallen" on this text, m for how familiar the prompt is
            (its Min-K%). Both depend on the date's characters, so rows of one date share them, as an LM's do;
            a date's market move is shared too: this is the dependence a stock-clustered bootstrap might miss.
    q       the oracle's knowledge, as `oracle:planted` (pitlm/eval/calibrate.py): gain * planted_target /
            planted_daily + knowledge_noise * e (planted_target = 0 in a null world: q is noise)
    oracle  z = r + probe_gain * q * (1 + tanh m): the up-minus-down score (knowledge shows more where the prompt
            is familiar), forecast f = z, propensity l = m
    control z', l' from an independent random-features map (another seed), no q

`mink` = true_minus_false of z (Min-K% and Min-K%++ share this statistic: only their per-row score differs),
`direction_accuracy` = balanced accuracy of sign(z), `lap_interaction` = the f*l coefficient (probestats.py), each
oracle - control per draw; `entity_gap` = the net leakage statistic (net_r2_purged) of the oracle embedding with the
named prompt minus that with the anonymised prompt, where the anonymised oracle knows nothing (it cannot tell the
companies apart) and each template has its own spectrum-matched control, as `pitlm probe` runs it.

The LAP interaction is a slope change, so under this link its sign depends on how much of the forecast is knowledge:
the slope of y on f where the prompt is familiar is Cov(y, q) g (1 + tanh m) / Var(f | m), which rises with m while
the arbitrary part r dominates f and falls once g q does (planted worlds 0-2, 200 draws, mean net estimate +0.04
at probe_gain 0.25, +0.06 at the default 0.5, +0.02 at 1, -0.05 at 2, -0.09 at 3). A flagged (positive) LAP interaction is therefore evidence
of weak, familiarity-gated knowledge; strong knowledge can show as a negative one.

So this measures whether each probe's *test* holds its size on the panel's real dependence (FPR) and how often it
detects knowledge of a given strength (power for the simulated link). It does not measure whether a real LM's token
scores carry its knowledge (that link, and any LM-specific bias, is what the demo's leaky and PIT models show on one
world), nor the membership attacks' known weakness (member and non-member texts from different times: here the
realised and the opposite statement of one row are compared, so there is no time shift to exploit).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pitlm.eval.bootstrap import summarize, wilson
from pitlm.eval.embed import random_features
from pitlm.eval.pipeline import design_matrix, match_control
from pitlm.eval.probestats import balanced_accuracy, lap_interaction, row_weights, true_minus_false
from pitlm.eval.prompts import build_prompts
from pitlm.eval.protocols.run import Panel, count_vectors, evaluate_features
from pitlm.world.oracle import oracle_features

PROBE_STATS = {"mink": ("mink", "direction_accuracy"), "lap": ("lap_interaction",), "entity": ("entity_gap",)}
PROBE_OF = {s: p for p, stats in PROBE_STATS.items() for s in stats}
CHANCE = {"direction_accuracy": 0.5}


def _standardise(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)


def simulated_lm(prompts: list[str], q: np.ndarray | None, gain: float, seed: int) -> dict[str, np.ndarray]:
    """A simulated LM's per-row probe values (see the module doc): z (up-minus-down score) and lap (propensity)."""
    F = random_features(prompts, 64, seed=seed).astype(np.float64)
    rm = _standardise(F @ np.random.default_rng([seed, 3]).standard_normal((64, 2)))
    r, m = rm[:, 0], rm[:, 1]
    z = r if q is None else r + gain * q * (1 + np.tanh(m))
    return {"z": z, "lap": m}


def probe_values(sim: dict[str, np.ndarray], y: np.ndarray, W: np.ndarray) -> dict[str, np.ndarray]:
    up = y > 0
    return {"mink": true_minus_false(W, sim["z"], up), "direction_accuracy": balanced_accuracy(W, sim["z"], up),
            "lap_interaction": lap_interaction(W, y, sim["z"], sim["lap"])}


def entity_values(rows: pd.DataFrame, cfg, pcfg, planted_daily: float, world_seed: int) -> np.ndarray:
    """Per draw: net leakage statistic with the named prompt minus with the anonymised prompt (oracle embeddings)."""
    features = {}
    planted = rows["planted_target"].to_numpy()
    for tag, template, knows in (("", "bare", True), ("@anonymised", "bare-anonymised", False)):
        prompts = build_prompts(rows, template)
        own = random_features(prompts, cfg.features_dim, seed=cfg.seed)
        oracle = oracle_features(own, planted if knows else np.zeros_like(planted), cfg, planted_daily, world_seed)
        control, _ = match_control(random_features(prompts, oracle.shape[1], seed=cfg.seed + 1), oracle,
                                   cfg.control_match)
        features[f"oracle{tag}"] = design_matrix(oracle, rows, numeric=False)
        features[f"control{tag}"] = design_matrix(control, rows, numeric=False)
    result = evaluate_features(features, rows[["Date", "SecuritiesCode", "Target"]], pcfg, control="control")
    stat = result.leakage_statistic()
    V = result.values
    return (V["oracle"][stat] - V["control"][stat]) - (V["oracle@anonymised"][stat] - V["control@anonymised"][stat])


def probe_world(rows: pd.DataFrame, cfg, pcfg, planted_daily: float, world_seed: int) -> dict[str, dict]:
    """One world: per probe statistic the oracle's net estimate, its interval and the flags."""
    panel = Panel(rows[["Date", "SecuritiesCode", "Target"]], pcfg)
    counts = count_vectors(panel.n_stocks, pcfg)
    y = rows["Target"].to_numpy(dtype=np.float64)
    W = row_weights(counts, panel.stock, np.isfinite(y) & (y != 0))  # rows without a move are left out, as in probe
    y = np.nan_to_num(y)
    out: dict[str, dict] = {}
    if {"mink", "lap"} & set(cfg.probes):
        prompts = build_prompts(rows, "bare")
        rng = np.random.default_rng([world_seed, 9])
        q = cfg.knowledge_gain * np.nan_to_num(rows["planted_target"].to_numpy()) / planted_daily
        q = q + cfg.knowledge_noise * rng.standard_normal(len(q))
        oracle = probe_values(simulated_lm(prompts, q, cfg.probe_gain, cfg.seed + 100), y, W)
        control = probe_values(simulated_lm(prompts, None, cfg.probe_gain, cfg.seed + 200), y, W)
        stats = [s for p in cfg.probes if p != "entity" for s in PROBE_STATS[p]]
        pairs = {s: (oracle[s], control[s]) for s in stats}
    else:
        pairs = {}
    if "entity" in cfg.probes:
        gap = entity_values(rows, cfg, pcfg, planted_daily, world_seed)
        pairs["entity_gap"] = (gap, np.zeros_like(gap))  # already net of each template's control
    for s, (o, c) in pairs.items():
        net, raw = summarize(o - c, pcfg.n_boot, pcfg.ci_level), summarize(o, pcfg.n_boot, pcfg.ci_level)
        chance = CHANCE.get(s, 0.0)
        out[s] = {"net_estimate": net["estimate"], "net_ci_lo": net["ci_lo"], "net_ci_hi": net["ci_hi"],
                  "flagged": bool(np.isfinite(net["ci_lo"]) and net["ci_lo"] > 0),
                  "oracle_estimate": raw["estimate"],
                  "oracle_raw_flagged": bool(np.isfinite(raw["ci_lo"]) and raw["ci_lo"] > chance),
                  "skipped": net["n_skipped"]}
    return out


def _finite_mean(values: list[float]) -> float:
    v = np.asarray(values, dtype=np.float64)
    return float(v[np.isfinite(v)].mean()) if np.isfinite(v).any() else float("nan")


def probe_rates(records: list[dict], cfg) -> dict[str, dict]:
    """Per probe statistic: FPR and power of its net test, the raw (not net) rejection rates, the verdict."""
    out = {}
    stats = list(records[0]["probes"]) if records else []
    for s in stats:
        null = [r["probes"][s] for r in records if r["kind"] == "null"]
        planted = [r["probes"][s] for r in records if r["kind"] == "planted"]
        k_fp, k_tp = sum(r["flagged"] for r in null), sum(r["flagged"] for r in planted)
        fpr, power = k_fp / len(null), k_tp / len(planted)
        out[s] = {"probe": PROBE_OF[s], "statistic": f"net_{s}", "worlds": len(null), "fpr": fpr,
                  "fpr_ci": wilson(k_fp, len(null)),
                  "power": power, "power_ci": wilson(k_tp, len(planted)),
                  "raw_rejection_null": sum(r["oracle_raw_flagged"] for r in null) / len(null),
                  "mean_net_null": _finite_mean([r["net_estimate"] for r in null]),
                  "mean_net_planted": _finite_mean([r["net_estimate"] for r in planted]),
                  "calibrated": fpr <= cfg.fpr_limit, "power_ok": power >= cfg.power_goal}
    return out


def format_probe_table(table: dict[str, dict], cfg) -> str:
    head = f"{'probe':<20} {'FPR':>5} {'FPR 95% CI':>12} {'power':>6} {'power 95% CI':>12} {'raw null':>9}  verdict"
    lines = [head, "-" * (len(head) + 8)]
    for s, r in table.items():
        lines.append(f"{s:<20} {r['fpr']:>5.2f} [{r['fpr_ci'][0]:.2f}, {r['fpr_ci'][1]:.2f}] {r['power']:>6.2f} "
                     f"[{r['power_ci'][0]:.2f}, {r['power_ci'][1]:.2f}] {r['raw_rejection_null']:>9.2f}  "
                     f"{'calibrated' if r['calibrated'] else 'NOT calibrated'}")
    worlds = next(iter(table.values()))["worlds"] if table else 0
    lines.append(f"(nominal 5%: flagged = 95% interval of the net statistic above 0; calibrated = FPR <= "
                 f"{cfg.fpr_limit:.0%} of {worlds} null worlds; simulated LM scores on the worlds' real rows: calibrates "
                 "each probe's test, not the link from an LM's reading to its token scores; 'raw null' = the oracle's "
                 "statistic flagged without the control)")
    return "\n".join(lines)


def probe_summary(table: dict[str, dict]) -> dict[str, object]:
    """The grep-able lines: probe_fpr_<stat>, its Wilson interval, probe_power_<stat>, ..., probe_calibrated_<stat>."""
    out: dict[str, object] = {}
    for s, r in table.items():
        out.update({f"probe_fpr_{s}": r["fpr"], f"probe_fpr_{s}_ci_lo": r["fpr_ci"][0],
                    f"probe_fpr_{s}_ci_hi": r["fpr_ci"][1], f"probe_power_{s}": r["power"],
                    f"probe_power_{s}_ci_lo": r["power_ci"][0], f"probe_power_{s}_ci_hi": r["power_ci"][1],
                    f"probe_raw_rejection_null_{s}": r["raw_rejection_null"],
                    f"probe_calibrated_{s}": r["calibrated"]})
    out["probe_calibrated_all"] = all(r["calibrated"] for r in table.values())
    return out
