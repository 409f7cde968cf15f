"""`pitlm bench stats`: the exact engine against a plain scikit-learn implementation of the same protocol.

Both sides run the same bootstrap draws of random panel data (one model): scikit-learn materialises each
draw by row duplication and refits every fold (the seed's loop); the engine runs `evaluate` (the public
path, one-time statistics included). scikit-learn runs `sklearn_draws` draws (at the seed's scale a few, and
its time per draw is extrapolated), the engine `draws`; the figures of the shared draws must agree. Each side
first runs once on a few stocks, so that one-time process set-up (imports, thread pools, CUDA context) is not
counted as per-draw work; the engine's own set-up for the data (per-stock statistics) is counted.

Presets (stocks x dates per stock x features): demo-small 30x30x133 (the demo world: 128-d model + 5
numeric), demo 100x30x256, us-473 473x30x133 (a user's US daily panel, issue 22), seed 1000x30x2053 (the
seed's 30k rows x 2053 features).

`--protocol eval` times what `pitlm eval` runs: legacy + purged + walk_forward with the eval's defaults (alpha
by inner CV for the calibrated protocols, the jackknife and rank IC on) for `--designs` designs (a control and
N-1 models); scikit-learn has no counterpart there, so only the engine is timed, per protocol.
`--save-values` / `--compare-values` write / check every statistic of every draw (an .npz), so that a change
to the engine can be checked against the previous code's numbers at the bench's shape.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score
from sklearn.model_selection import GroupKFold

from pitlm.errors import PitlmError
from pitlm.eval.bootstrap import draw_counts
from pitlm.eval.pipeline import EVAL_PROTOCOL_DEFAULTS
from pitlm.eval.protocols import PROTOCOLS
from pitlm.eval.protocols.run import ProtocolConfig, evaluate_features
from pitlm.eval.splitters import PurgedPanelSplit

PRESETS = {"demo-small": (30, 30, 133), "demo": (100, 30, 256), "us-473": (473, 30, 133), "seed": (1000, 30, 2053)}
BENCH_PROTOCOLS = (*PROTOCOLS, "eval")


def random_panel(n_stocks: int, dates_per_stock: int, n_features: int, seed: int = 0):
    """Rows (Date, SecuritiesCode, Target) on JPX's 2017-01-04..2021-12-03 business days, and a design."""
    rng = np.random.default_rng(seed)
    cal = pd.bdate_range("2017-01-04", "2021-12-03").to_numpy()
    dates = np.concatenate([np.sort(rng.choice(cal, dates_per_stock, replace=False)) for _ in range(n_stocks)])
    rows = pd.DataFrame({"Date": dates, "SecuritiesCode": np.repeat(np.arange(n_stocks) + 1000, dates_per_stock)})
    rows["Target"] = rng.normal(0, 0.02, len(rows))
    X = rng.normal(size=(len(rows), n_features)) * rng.uniform(0.2, 3.0, n_features)
    return rows, X


def random_designs(X: np.ndarray, n_designs: int, seed: int = 0) -> dict[str, np.ndarray]:
    """{control: X, model1: ..., ...}: n_designs designs of X's shape, the others drawn like X."""
    rng = np.random.default_rng([seed, 1])
    out = {"control" if n_designs > 1 else "model": X}
    for i in range(1, n_designs):
        out[f"model{i}"] = rng.normal(size=X.shape) * rng.uniform(0.2, 3.0, X.shape[1])
    return out


def save_values(path: str, res) -> None:
    """Every statistic of every count vector, and the point estimate's alphas, as one .npz."""
    arrays = {f"{m}|{k}": v for m, vals in res.values.items() for k, v in vals.items()}
    arrays.update({f"alpha|{m}|{lay}": np.asarray(a) for m, by in res.info["alphas"].items() for lay, a in by.items()})
    np.savez(path, **arrays)


def compare_values(path: str, res) -> dict:
    """Largest difference to a saved .npz over every statistic and draw, absolute and scaled (|a - b| /
    max(1, |b|)); NaN must match NaN; and whether the point estimate's alphas are identical."""
    saved = np.load(path)
    now = {f"{m}|{k}": v for m, vals in res.values.items() for k, v in vals.items()}
    worst, scaled, nan_mismatch, alphas_equal = 0.0, 0.0, 0, True
    for key in saved.files:
        if key.startswith("alpha|"):
            _, m, lay = key.split("|")
            alphas_equal &= np.array_equal(saved[key], np.asarray(res.info["alphas"][m][lay]))
            continue
        a, b = saved[key], now[key]
        nan_mismatch += int((np.isnan(a) != np.isnan(b)).sum())
        both = np.isfinite(a) & np.isfinite(b)
        diff = np.abs(a[both] - b[both])
        worst = max(worst, float(diff.max(initial=0.0)))
        scaled = max(scaled, float((diff / np.maximum(1.0, np.abs(a[both]))).max(initial=0.0)))
    return {"compared_statistics": len([k for k in saved.files if not k.startswith("alpha|")]),
            "max_abs_diff_saved": worst, "max_scaled_diff_saved": scaled, "nan_mismatch_saved": nan_mismatch, "alphas_equal_saved": bool(alphas_equal)}


def sklearn_protocol(X: np.ndarray, rows: pd.DataFrame, counts: np.ndarray, protocol: str, cfg) -> dict[str, float]:
    """One bootstrap draw of a protocol, plainly: duplicate the drawn stocks' rows, refit every fold."""
    codes = rows["SecuritiesCode"].to_numpy()
    uniq, inv = np.unique(codes, return_inverse=True)
    by_stock = [np.flatnonzero(inv == s) for s in range(len(uniq))]
    idx = np.concatenate([by_stock[s] for s in np.flatnonzero(counts) for _ in range(counts[s])])
    Xb, yb, gb = X[idx], rows["Target"].to_numpy()[idx], codes[idx]
    db = rows["Date"].to_numpy().astype("datetime64[D]")[idx]

    def r2(tr, te):
        return r2_score(yb[te], Ridge(alpha=cfg.alpha).fit(Xb[tr], yb[tr]).predict(Xb[te]))

    if protocol == "legacy":
        off = r2(db <= np.datetime64(cfg.train_end), db >= np.datetime64(cfg.test_start))
        on = float(np.mean([r2(tr, te) for tr, te in GroupKFold(cfg.n_splits).split(Xb, yb, gb)]))
        return {"r2_leakage_off": off, "r2_leakage_on": on, "leakage_premium": on - off}
    splitter = PurgedPanelSplit(cfg.n_splits, cfg.n_time_blocks, cfg.embargo_days, cfg.horizon,
                                calendar=np.unique(rows["Date"].to_numpy().astype("datetime64[D]")))
    pred = np.zeros(len(yb))
    for tr, te in splitter.split(Xb, yb, gb, dates=db):
        pred[te] = Ridge(alpha=cfg.alpha).fit(Xb[tr], yb[tr]).predict(Xb[te])
    return {"r2_purged": r2_score(yb, pred)}


@dataclass
class StatsBench:
    """What `pitlm bench stats` runs (see the module doc)."""

    scale: str = "demo"
    stocks: int | None = None
    dates_per_stock: int | None = None
    features: int | None = None
    draws: int = 200
    sklearn_draws: int = 10
    protocol: str = "legacy"
    designs: int = 1
    device: str = "cpu"
    engine: str = "auto"
    seed: int = 0
    save_values: str | None = None
    compare_values: str | None = None

    def shape(self) -> tuple[int, int, int]:
        given = (self.stocks, self.dates_per_stock, self.features)
        return tuple(v if v is not None else p for v, p in zip(given, PRESETS[self.scale], strict=True))

    def protocol_config(self):
        common = {"n_boot": self.draws, "seed": self.seed, "device": self.device, "engine": self.engine}
        if self.protocol == "eval":  # the eval's defaults: jackknife and rank IC on, alpha by inner CV
            return ProtocolConfig(protocols=list(PROTOCOLS), **EVAL_PROTOCOL_DEFAULTS, **common)
        return ProtocolConfig(protocols=[self.protocol], jackknife_groups=0, rank_ic=False, **common)


def _check(b: StatsBench) -> None:
    if b.scale not in PRESETS:
        raise PitlmError(f"unknown scale '{b.scale}'; known: {', '.join(PRESETS)}")
    if b.protocol not in BENCH_PROTOCOLS:
        raise PitlmError(f"bench stats protocol must be one of {', '.join(BENCH_PROTOCOLS)} (got '{b.protocol}')")
    if b.designs < 1:
        raise PitlmError(f"--designs must be >= 1 (got {b.designs})")
    if b.device.startswith("cuda") and not torch.cuda.is_available():
        raise PitlmError("--device cuda but torch sees no CUDA GPU")


def run_bench_stats(bench: StatsBench | None = None, **options) -> dict:
    """Time the engine (and scikit-learn, where it has the same protocol) on the same draws; returns the
    summary (key -> value). `options` are StatsBench fields."""
    b = bench or StatsBench(**options)
    _check(b)
    S, m, d = b.shape()
    rows, X = random_panel(S, m, d, b.seed)
    features = random_designs(X, b.designs, b.seed)
    control = "control" if b.designs > 1 else None
    cfg = b.protocol_config()
    with_sklearn = b.protocol in ("legacy", "purged") and b.designs == 1
    # one-time process set-up is not per-draw work: a tiny run of each side first (CUDA context and
    # cuBLAS/cuSOLVER handles; the thread pool, threadpoolctl's library scan, LAPACK symbols; sklearn's lazy
    # imports and first-call validation)
    small = (rows["SecuritiesCode"] < rows["SecuritiesCode"].min() + 2 * cfg.n_splits).to_numpy()
    rows_small = rows[small].reset_index(drop=True)
    evaluate_features({"model": X[small]}, rows_small, cfg.model_copy(update={"n_boot": 2}), control=None)
    if with_sklearn:
        sklearn_protocol(X[small], rows_small, np.ones(2 * cfg.n_splits, dtype=np.int64), b.protocol, cfg)
    if b.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = evaluate_features(features, rows, cfg, control=control, show_progress=True)
    if b.device.startswith("cuda"):
        torch.cuda.synchronize()
    engine_s = time.perf_counter() - t0
    n_vectors = 1 + b.draws + (min(cfg.jackknife_groups, S) if cfg.jackknife_groups >= 2 else 0)
    out = {
        "bench": "stats", "protocol": b.protocol, "scale": b.scale, "rows": len(rows), "stocks": S, "features": d,
        "designs": b.designs, "device": b.device, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "engine_modes": ",".join(f"{k}={v}" for k, v in res.info["engine_modes"].items()),
        "engine_draws": b.draws, "count_vectors": n_vectors, "engine_s_total": round(engine_s, 3),
        "engine_s_per_draw": engine_s / n_vectors,
        **{f"engine_s_{p}": s for p, s in res.info["protocol_seconds"].items()},
    }
    if with_sklearn:
        out.update(_sklearn_side(b, X, rows, res, cfg, engine_s / n_vectors, draw_counts(S, b.draws, b.seed)))
    if b.save_values:
        save_values(b.save_values, res)
    if b.compare_values:
        out.update(compare_values(b.compare_values, res))
    return out


def _sklearn_side(b: StatsBench, X, rows, res, cfg, engine_per_draw: float, counts) -> dict:
    n_sk = min(b.sklearn_draws, b.draws)
    t0 = time.perf_counter()
    ref = [sklearn_protocol(X, rows, counts[i], b.protocol, cfg) for i in range(n_sk)]
    sklearn_per_draw = (time.perf_counter() - t0) / max(n_sk, 1)
    diffs = [abs(r[k] - res.values["model"][k][1 + i]) for i, r in enumerate(ref) for k in r]
    return {"sklearn_draws": n_sk, "sklearn_s_per_draw": sklearn_per_draw,
            "sklearn_s_extrapolated": sklearn_per_draw * (b.draws + 1),
            "speedup": sklearn_per_draw / engine_per_draw, "max_abs_diff": max(diffs) if diffs else float("nan")}
