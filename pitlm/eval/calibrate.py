"""`pitlm calibrate`: false-positive rate and power of each protocol over seeded synthetic worlds.

For each world seed s in seed..seed+K-1 the market is generated twice (`pitlm.world.generate_market`, prices only):
with `leak_strength=0` (the null twin: every random number is shared) and with the planted strength. On each, the
eval sample is drawn as `pitlm eval` draws it and two "models" are scored on the same rows and bootstrap draws:

- `control`: the knowledge-free random-features map of the prompt (pitlm/eval/embed.py, `features_dim` wide);
- `oracle` (spec `oracle:planted`), a stand-in for an LM that has read the future: its embedding is
      [ q * w  ||  the control's features ],   q = gain * planted_target / planted_daily + knowledge_noise * e
  where planted_target is the ground-truth planted log return inside the row's Target window (0 in a null world),
  planted_daily the world's typical planted daily drift (so the signal is O(gain)), e ~ N(0, 1) per row, and w a
  fixed Gaussian vector of `knowledge_dim` entries (a random projection of the scalar q). `knowledge_noise` sets how
  well the "LM" knows the future (0 = perfectly). By default (`control_design=matched`, with alpha by inner CV) the
  control is an independent random-features map as wide as the oracle, matched to it by `control_match` (singular
  values, or total variance) the way `pitlm eval` matches its control to a real model: calibrate checks the eval's
  own design. With `control_design=nested` the oracle contains the control's features, so oracle - control
  isolates exactly what the knowledge adds; in a null world the knowledge columns are pure noise.

With `--family` it calibrates instead the per-cell test of the knowledge matrix (`pitlm eval --family`,
pitlm/eval/family.py): each world gets a family of oracles, member m_K knowing the planted moves of the years
<= K only (K = each year from the world's first to its second-to-last: q as above in those years, knowledge noise
alone after), scored with the matched control on the walk-forward protocol. Every (member, test year) cell is
flagged when the lower end of its 95% interval of net walk-forward R2 lies above 0, and has a type: `known`
(planted world, y <= K: power), `unknown` (planted world, y > K: the member does not know a move that exists,
false positives) and `null` (null twin: nothing to know, false positives). Reported: the flagged share per type
over all worlds with Wilson intervals, power per test year, and how often a world's whole staircase is exact.

With `--probe mink,entity,lap` it calibrates instead the tests of the knowledge probes (`pitlm probe`): each world's
rows get a simulated LM's per-row probe values (oracle and knowledge-free control) and the probes' own statistics on
the paired stock-clustered draws, the entity probe on the purged protocol as `pitlm probe` runs it
(pitlm/eval/probecal.py, which says what this does and does not calibrate). Per probe statistic: FPR and power of
its net test with Wilson intervals; a probe whose FPR is above `fpr_limit` is reported NOT calibrated.

Per protocol, a world is *flagged* when the lower end of the 95% decision interval of the oracle's leakage
statistic net of the control is above 0 (`Protocol.statistic`; legacy: `net_leakage_premium`; purged:
`net_r2_purged`; walk_forward: `net_r2_walk_forward`). FPR = flagged share of null worlds, power = flagged share of planted worlds; a protocol is
calibrated when FPR <= 10% at nominal 5%. Also reported: how often the *raw* (not net) statistic of the
knowledge-free control is "significant" -- for the legacy premium this is the seed's artifact.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from datetime import date
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from pitlm.config import StageConfig, build_config
from pitlm.errors import ConfigError
from pitlm.eval.bootstrap import summarize, wilson
from pitlm.eval.embed import random_features
from pitlm.eval.family import knowledge_matrix
from pitlm.eval.pipeline import design_matrix, match_control, protocol_config
from pitlm.eval.probecal import format_probe_table, probe_rates, probe_summary, probe_world
from pitlm.eval.prompts import build_prompts
from pitlm.eval.protocols import PROTOCOLS, get
from pitlm.eval.protocols.run import ProtocolName, evaluate_features
from pitlm.eval.result import INTERVALS
from pitlm.log import progress
from pitlm.market.features import add_features, sample_rows
from pitlm.world import WorldConfig, generate_market
from pitlm.world.oracle import oracle_features

log = logging.getLogger("pitlm.eval")
# Calibration needs only R2 statistics and percentile intervals: rank ICs and BCa jackknife replicates would
# triple the cost of every world.
# alpha by inner CV, as `pitlm eval` does by default: calibrate measures the eval's own configuration.
PROTOCOL_DEFAULTS = {"n_boot": 200, "rank_ic": False, "jackknife_groups": 0, "alpha_cv": True}
# 60 companies: enough stocks for stock folds and a clustered bootstrap; ~25 s a world on 2 cores with alpha by
# inner CV (20 null + 20 planted worlds: ~17 min; ~4 s a world with a fixed alpha).
WORLD_DEFAULTS = {"n_companies": 60}


class CalibrateConfig(StageConfig):
    family: bool = Field(False, description="Calibrate the knowledge matrix's per-cell test (walk-forward R2 per "
                         "test year of a family of oracles with staircase knowledge) instead of the protocols.")
    probes: list[Literal["mink", "entity", "lap"]] = Field(
        default_factory=list, description="Calibrate these knowledge probes' tests (simulated LM scores, "
        "pitlm/eval/probecal.py; entity on the purged protocol) instead of the protocols.")
    probe_gain: float = Field(0.5, ge=0, description="With probes: how strongly the simulated LM's up-minus-down "
                              "score carries its knowledge q (its arbitrary per-prompt preference has sd 1).")
    worlds: int = Field(20, ge=1, description="Null and planted worlds each (paired twins).")
    seed: int = Field(0, description="World seeds are seed .. seed+worlds-1; also the bootstrap seed.")
    protocols: list[ProtocolName] = list(PROTOCOLS)
    leak_strength: float | None = Field(None, gt=0, description="Planted worlds' strength (default: the world's).")
    world: dict[str, Any] = Field(default_factory=dict, description="WorldConfig options, over WORLD_DEFAULTS.")
    max_stocks: int = Field(1000, ge=1)
    # 60 companies x 60 dates = 3,600 rows a world (the seed's eval had 30k). With 30 dates (1,800 rows) purged power
    # on the default world was 0.75; with 60 it is 0.95 at the same false-positive rate (0 of 20) and the same cost
    # (the inner-CV eigendecompositions do not grow with rows).
    dates_per_stock: int = Field(60, ge=1)
    template: str = "seed"
    features_dim: int = Field(64, ge=1, description="Width of the control's random features (the oracle adds "
                              "knowledge_dim columns). 64 (+16 +5 numeric) features on 3,600 rows: the seed's order of "
                              "rows per feature (30k rows / 2053).")
    knowledge_dim: int = Field(16, ge=1)
    knowledge_gain: float = Field(1.0, ge=0)
    knowledge_noise: float = Field(0.5, ge=0, description="Noise of the oracle's knowledge (signal sd ~1): 0.5 "
                                   "= correlation ~0.9 with the planted component.")
    control_design: Literal["nested", "matched"] = Field(
        "matched", description="nested: the control is the oracle's own random-feature block (oracle - control = "
        "the knowledge); matched: an independent random-features map as wide as the oracle, matched to it by "
        "control_match, the way `pitlm eval` matches its control to a real model.")
    control_match: Literal["spectrum", "dim+scale", "none"] = Field(
        "spectrum", description="With control_design=matched: how the control is matched (as `pitlm eval`).")
    fpr_limit: float = Field(0.10, gt=0, lt=1, description="Calibrated when the null rejection rate is <= this.")
    power_goal: float = Field(0.80, gt=0, le=1)
    protocol: dict[str, Any] = Field(default_factory=dict, description="pitlm.eval.protocols.run.ProtocolConfig "
                                     "options, over PROTOCOL_DEFAULTS.")

    @model_validator(mode="after")
    def _one_mode(self) -> CalibrateConfig:
        if self.family and self.probes:
            raise ConfigError("--family and --probe calibrate different tests; run them as two calibrations")
        return self


def score_world(rows: pd.DataFrame, cfg: CalibrateConfig, pcfg, planted_daily: float, world_seed: int) -> dict:
    """Evaluate control and oracle on one world's rows; per protocol the net/raw estimates and flags."""
    prompts = build_prompts(rows, cfg.template)
    control = random_features(prompts, cfg.features_dim, seed=cfg.seed)
    oracle = oracle_features(control, rows["planted_target"].to_numpy(), cfg, planted_daily, world_seed)
    if cfg.control_design == "matched":  # as `pitlm eval` builds it: an independent map, same width and variance
        control, _ = match_control(random_features(prompts, oracle.shape[1], seed=cfg.seed + 1), oracle,
                                   cfg.control_match)
    features = {"control": design_matrix(control, rows), "oracle": design_matrix(oracle, rows)}
    result = evaluate_features(features, rows[["Date", "SecuritiesCode", "Target"]], pcfg, control="control")
    lo_key = INTERVALS[pcfg.decision_ci][0]
    out = {}
    for protocol in pcfg.protocols:
        stat = get(protocol).statistic
        net = summarize(result.values["oracle"][stat] - result.values["control"][stat], pcfg.n_boot, pcfg.ci_level)
        raw_control = summarize(result.values["control"][stat], pcfg.n_boot, pcfg.ci_level)
        raw_oracle = summarize(result.values["oracle"][stat], pcfg.n_boot, pcfg.ci_level)
        out[protocol] = {
            "statistic": stat, "net_estimate": net["estimate"], "net_ci_lo": net[lo_key], "net_ci_hi": net["ci_hi"],
            "flagged": bool(np.isfinite(net[lo_key]) and net[lo_key] > 0),
            "control_estimate": raw_control["estimate"], "control_ci_lo": raw_control[lo_key],
            "control_flagged": bool(np.isfinite(raw_control[lo_key]) and raw_control[lo_key] > 0),
            "oracle_estimate": raw_oracle["estimate"],
            "oracle_flagged": bool(np.isfinite(raw_oracle[lo_key]) and raw_oracle[lo_key] > 0),
            "skipped": max(net["n_skipped"], raw_control["n_skipped"])}
    return out


def family_members(world_years: list[int]) -> dict[str, int]:
    """The oracle family of a world: member name -> the last year it knows (each year but the world's last)."""
    return {f"knows_{k}": k for k in world_years[:-1]}


def family_features(control_dim: int, rows: pd.DataFrame, cfg: CalibrateConfig, planted_daily: float,
                    world_seed: int, prompts: list[str]) -> dict[str, np.ndarray]:
    """The control (matched to the first member, as `pitlm eval` matches it to its primary model) and one
    `oracle_features` embedding per member with the planted signal kept in the years it knows."""
    control = random_features(prompts, control_dim, seed=cfg.seed)
    year = rows["Date"].dt.year.to_numpy()
    planted = rows["planted_target"].to_numpy()
    feats = {}
    for name, k in family_members(sorted(np.unique(year).tolist())).items():
        feats[name] = oracle_features(control, np.where(year <= k, planted, 0.0), cfg, planted_daily, world_seed)
    first = next(iter(feats.values()))
    feats["control"], _ = match_control(random_features(prompts, first.shape[1], seed=cfg.seed + 1), first,
                                        cfg.control_match)
    return feats


def score_family_world(rows: pd.DataFrame, cfg: CalibrateConfig, pcfg, planted_daily: float, world_seed: int,
                       kind: str) -> list[dict]:
    """One world's knowledge-matrix cells: member, test year, type (known | unknown | null), flagged, estimate."""
    prompts = build_prompts(rows, cfg.template)
    feats = family_features(cfg.features_dim, rows, cfg, planted_daily, world_seed, prompts)
    members = family_members(sorted(rows["Date"].dt.year.unique().tolist()))
    features = {name: design_matrix(X, rows) for name, X in feats.items()}
    result = evaluate_features(features, rows[["Date", "SecuritiesCode", "Target"]], pcfg, control="control")
    matrix = knowledge_matrix(result, {m: date(k, 12, 31) for m, k in members.items()})
    cells = []
    for m, k in members.items():
        for y in matrix["years"]:
            c = matrix["cells"][m][str(y)]
            cells.append({"member": m, "knows_through": k, "year": y, "flagged": c["flagged"],
                          "estimate": c["estimate"], "ci_lo": c["ci_lo"],
                          "type": "null" if kind == "null" else ("known" if y <= k else "unknown")})
    return cells


def family_rates(records: list[dict], cfg: CalibrateConfig) -> dict[str, Any]:
    """Flagged share per cell type (FPR for unknown and null cells, power for known ones) with Wilson intervals,
    power per test year, and the share of planted (null) worlds whose staircase is exact (no cell flagged)."""
    cells = [c for r in records for c in r["cells"]]
    out: dict[str, Any] = {"types": {}}
    for t in ("known", "unknown", "null"):
        flags = [c["flagged"] for c in cells if c["type"] == t]
        k = int(sum(flags))
        out["types"][t] = {"cells": len(flags), "flagged": k, "rate": k / len(flags) if flags else float("nan"),
                           "rate_ci": wilson(k, len(flags)), "meaning": "power" if t == "known" else "fpr"}
    years = sorted({c["year"] for c in cells})
    out["power_by_year"] = {}
    for y in years:
        flags = [c["flagged"] for c in cells if c["type"] == "known" and c["year"] == y]
        if flags:
            out["power_by_year"][str(y)] = {"cells": len(flags), "rate": sum(flags) / len(flags),
                                            "rate_ci": wilson(int(sum(flags)), len(flags))}
    planted = [r for r in records if r["kind"] == "planted"]
    null = [r for r in records if r["kind"] == "null"]
    out["staircase_exact_planted"] = float(np.mean([all(c["flagged"] == (c["type"] == "known") for c in r["cells"])
                                                    for r in planted])) if planted else float("nan")
    out["null_worlds_without_flags"] = float(np.mean([not any(c["flagged"] for c in r["cells"]) for r in null])) \
        if null else float("nan")
    out["fpr_limit"] = cfg.fpr_limit
    out["calibrated"] = all(out["types"][t]["rate"] <= cfg.fpr_limit for t in ("unknown", "null")
                            if out["types"][t]["cells"])
    return out


def format_family_table(fam: dict[str, Any]) -> str:
    lines = [f"{'cell type':<10} {'cells':>6} {'flagged':>8} {'rate':>6} {'95% CI':>14}  meaning", "-" * 60]
    for t, r in fam["types"].items():
        lines.append(f"{t:<10} {r['cells']:>6} {r['flagged']:>8} {r['rate']:>6.3f} "
                     f"[{r['rate_ci'][0]:.3f}, {r['rate_ci'][1]:.3f}]  {r['meaning']}")
    lines.append("power by test year: " + ", ".join(f"{y} {r['rate']:.2f} ({r['cells']} cells)"
                                                   for y, r in fam["power_by_year"].items()))
    lines.append(f"exact staircase in {fam['staircase_exact_planted']:.0%} of planted worlds; no flag in "
                 f"{fam['null_worlds_without_flags']:.0%} of null worlds; "
                 f"{'calibrated' if fam['calibrated'] else 'NOT calibrated'} (FPR <= {fam['fpr_limit']:.0%} for "
                 "unknown and null cells)")
    return "\n".join(lines)


@contextmanager
def quiet(logger: logging.Logger):
    """Raise a logger to WARNING for a block (unless it is at DEBUG, i.e. --verbose)."""
    level = logger.level
    if logger.getEffectiveLevel() > logging.DEBUG:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def rates(records: list[dict], protocols: list[str], cfg: CalibrateConfig) -> dict[str, dict]:
    """Per protocol: FPR and power of the net statistic, the control's raw rejection rates, the verdict."""
    out = {}
    for p in protocols:
        null = [r["protocols"][p] for r in records if r["kind"] == "null"]
        planted = [r["protocols"][p] for r in records if r["kind"] == "planted"]
        k_fp, k_tp = sum(r["flagged"] for r in null), sum(r["flagged"] for r in planted)
        fpr, power = k_fp / len(null), k_tp / len(planted)
        out[p] = {"statistic": f"net_{get(p).statistic}", "worlds": len(null), "fpr": fpr, "fpr_ci": wilson(k_fp, len(null)),
                  "power": power, "power_ci": wilson(k_tp, len(planted)),
                  "control_raw_rejection_null": sum(r["control_flagged"] for r in null) / len(null),
                  "control_raw_rejection_planted": sum(r["control_flagged"] for r in planted) / len(planted),
                  "oracle_raw_rejection_null": sum(r["oracle_flagged"] for r in null) / len(null),
                  "oracle_raw_rejection_planted": sum(r["oracle_flagged"] for r in planted) / len(planted),
                  "mean_skipped_draws": float(np.mean([r["skipped"] for r in null + planted])),
                  "mean_net_null": float(np.nanmean([r["net_estimate"] for r in null])),
                  "mean_net_planted": float(np.nanmean([r["net_estimate"] for r in planted])),
                  "calibrated": fpr <= cfg.fpr_limit, "power_ok": power >= cfg.power_goal}
    return out


def format_table(table: dict[str, dict], cfg: CalibrateConfig) -> str:
    head = (f"{'protocol':<13} {'statistic':<22} {'FPR':>5} {'FPR 95% CI':>12} {'power':>6} {'power 95% CI':>12} "
            f"{'ctl raw null':>12} {'ctl raw planted':>15}  verdict")
    lines = [head, "-" * (len(head) + 8)]
    for p, r in table.items():
        verdict = "calibrated" if r["calibrated"] else "NOT calibrated"
        lines.append(f"{p:<13} {r['statistic']:<22} {r['fpr']:>5.2f} [{r['fpr_ci'][0]:.2f}, {r['fpr_ci'][1]:.2f}] "
                     f"{r['power']:>6.2f} [{r['power_ci'][0]:.2f}, {r['power_ci'][1]:.2f}] "
                     f"{r['control_raw_rejection_null']:>12.2f} {r['control_raw_rejection_planted']:>15.2f}  {verdict}")
    worlds = next(iter(table.values()))["worlds"]
    lines.append(f"(nominal 5%: flagged = 95% interval above 0; calibrated = FPR <= {cfg.fpr_limit:.0%} of {worlds} null "
                 f"worlds; power goal {cfg.power_goal:.0%}; 'ctl raw' = the knowledge-free control's own statistic "
                 f"flagged, not net)")
    return "\n".join(lines)


def run_calibrate(cfg: CalibrateConfig, run=None) -> dict[str, Any]:
    # the family's cells are walk-forward years; the entity probe runs `pitlm probe`'s default protocol
    protocols = ["walk_forward"] if cfg.family else ["purged"] if cfg.probes else cfg.protocols
    pcfg = protocol_config(protocols, {**PROTOCOL_DEFAULTS, **cfg.protocol}, cfg.seed)
    base = build_config(WorldConfig, {**WORLD_DEFAULTS, **cfg.world})
    strength = cfg.leak_strength if cfg.leak_strength is not None else base.leak_strength
    mode = "cells" if cfg.family else "probes" if cfg.probes else "protocols"
    what = {"cells": "the knowledge matrix's cells", "probes": "the probes " + ",".join(cfg.probes)}
    log.info("calibrating %s over %d null + %d planted worlds (strength %g, %d draws each)",
             what.get(mode, ",".join(pcfg.protocols)), cfg.worlds, cfg.worlds, strength, pcfg.n_boot)
    t0 = time.time()
    records = []
    jobs = [(s, kind) for s in range(cfg.seed, cfg.seed + cfg.worlds) for kind in ("null", "planted")]
    for world_seed, kind in progress(jobs, "calibrate worlds", unit="worlds"):
        wcfg = base.model_copy(update={"seed": world_seed, "leak_strength": 0.0 if kind == "null" else strength})
        market = generate_market(wcfg)
        rows = sample_rows(add_features(market.panel()), cfg.max_stocks, cfg.dates_per_stock, cfg.seed)
        rows = rows.merge(market.ground_truth[["Date", "SecuritiesCode", "planted_target"]],
                          on=["Date", "SecuritiesCode"], how="left", validate="one_to_one")
        t1 = time.time()
        with quiet(logging.getLogger("pitlm.eval")):  # one line per fold layout x 40 worlds drowns the progress bar
            if cfg.family:
                scores = score_family_world(rows, cfg, pcfg, base.planted_daily, world_seed, kind)
            elif cfg.probes:
                scores = probe_world(rows, cfg, pcfg, base.planted_daily, world_seed)
            else:
                scores = score_world(rows, cfg, pcfg, base.planted_daily, world_seed)
        rec = {"world_seed": world_seed, "kind": kind, "leak_strength": wcfg.leak_strength, "rows": len(rows),
               mode: scores, "seconds": round(time.time() - t1, 2)}
        records.append(rec)
        if run is not None:
            flags = ({"cells_flagged": sum(c["flagged"] for c in scores)} if cfg.family else
                     {f"{p}_flagged": r["flagged"] for p, r in scores.items()})
            run.log_metrics(**{k: v for k, v in rec.items() if k != mode}, **flags)
    if cfg.family:
        fam = family_rates(records, cfg)
        print(format_family_table(fam))
        return _finish(cfg, pcfg, base, strength, records, t0, run, {"family": fam}, family_summary(fam),
                       "family of oracle:planted members, member knows_K keeping the planted signal in years <= K; "
                       "see pitlm/eval/calibrate.py")
    if cfg.probes:
        table = probe_rates(records, cfg)
        print(format_probe_table(table, cfg))
        return _finish(cfg, pcfg, base, strength, records, t0, run, {"probes": table},
                       {**probe_summary(table), "probe_gain": cfg.probe_gain},
                       "simulated LM: z = r + probe_gain * q * (1 + tanh m), q as oracle:planted's; control z' = r'; "
                       "see pitlm/eval/probecal.py")
    table = rates(records, list(pcfg.protocols), cfg)
    print(format_table(table, cfg))
    summary: dict[str, Any] = {}
    for p, r in table.items():
        summary.update({f"fpr_{p}": r["fpr"], f"power_{p}": r["power"], f"calibrated_{p}": r["calibrated"],
                        f"control_raw_rejection_null_{p}": r["control_raw_rejection_null"]})
    return _finish(cfg, pcfg, base, strength, records, t0, run, {"table": table}, summary,
                   "oracle:planted = [q * w || control features], q = gain * planted_target / planted_daily "
                   "+ knowledge_noise * e; see pitlm/eval/calibrate.py")


def family_summary(fam: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for t, r in fam["types"].items():
        key = "power" if t == "known" else "fpr"
        summary.update({f"family_{key}_{t}": r["rate"], f"family_{key}_{t}_ci_lo": r["rate_ci"][0],
                        f"family_{key}_{t}_ci_hi": r["rate_ci"][1], f"family_cells_{t}": r["cells"]})
    for y, r in fam["power_by_year"].items():
        summary[f"family_power_known_{y}"] = r["rate"]
    summary.update({"family_staircase_exact_planted": fam["staircase_exact_planted"],
                    "family_calibrated": fam["calibrated"]})
    return summary


def _finish(cfg: CalibrateConfig, pcfg, base, strength: float, records: list[dict], t0: float, run,
            block: dict[str, Any], summary: dict[str, Any], oracle: str) -> dict[str, Any]:
    """calibration.json (config, the mode's block: table | family | probes, every world's record) and the summary
    lines: the mode's keys, then worlds, rows_per_world, n_boot, leak_strength, wall_seconds, calibration_json."""
    report = {"config": cfg.model_dump(mode="json"), "protocol_resolved": pcfg.model_dump(mode="json"),
              "world_config": base.model_dump(mode="json"), "leak_strength": strength, **block,
              "worlds": records, "wall_seconds": round(time.time() - t0, 2), "oracle": oracle}
    summary = {**summary, "worlds": cfg.worlds, "rows_per_world": int(np.mean([r["rows"] for r in records])),
               "n_boot": pcfg.n_boot, "leak_strength": strength, "wall_seconds": report["wall_seconds"]}
    if run is not None:
        path = run.save_json("calibration.json", report)
        summary["calibration_json"] = str(path)
        run.finish(summary)
    return report
