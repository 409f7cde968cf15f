"""`pitlm bench stats`: the exact engine against a plain scikit-learn implementation of the same protocol.

Both sides run the same bootstrap draws of random panel data (one model): scikit-learn materialises each
draw by row duplication and refits every fold (the seed's loop); the engine runs `evaluate` (the public
path, one-time statistics included). scikit-learn runs `sklearn_draws` draws (at the seed's scale a few, and
its time per draw is extrapolated), the engine `draws`; the figures of the shared draws must agree. Each side
first runs once on a few stocks, so that one-time process set-up (imports, thread pools, CUDA context) is not
counted as per-draw work; the engine's own set-up for the data (per-stock statistics) is counted.

Presets (stocks x dates per stock x features): demo-small 30x30x133 (the demo world: 128-d model + 5
numeric), demo 100x30x256, seed 1000x30x2053 (the seed's 30k rows x 2053 features).
"""

from __future__ import annotations

import os
import time
from typing import Annotated

import numpy as np
import pandas as pd
import typer

PRESETS = {"demo-small": (30, 30, 133), "demo": (100, 30, 256), "seed": (1000, 30, 2053)}


def random_panel(n_stocks: int, dates_per_stock: int, n_features: int, seed: int = 0):
    """Rows (Date, SecuritiesCode, Target) on JPX's 2017-01-04..2021-12-03 business days, and a design."""
    rng = np.random.default_rng(seed)
    cal = pd.bdate_range("2017-01-04", "2021-12-03").to_numpy()
    dates = np.concatenate([np.sort(rng.choice(cal, dates_per_stock, replace=False)) for _ in range(n_stocks)])
    rows = pd.DataFrame({"Date": dates, "SecuritiesCode": np.repeat(np.arange(n_stocks) + 1000, dates_per_stock)})
    rows["Target"] = rng.normal(0, 0.02, len(rows))
    X = rng.normal(size=(len(rows), n_features)) * rng.uniform(0.2, 3.0, n_features)
    return rows, X


def sklearn_protocol(X: np.ndarray, rows: pd.DataFrame, counts: np.ndarray, protocol: str, cfg) -> dict[str, float]:
    """One bootstrap draw of a protocol, plainly: duplicate the drawn stocks' rows, refit every fold."""
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score
    from sklearn.model_selection import GroupKFold

    from pitlm.eval.splitters import PurgedPanelSplit

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


def run_bench_stats(scale: str = "demo", stocks: int | None = None, dates_per_stock: int | None = None,
                    features: int | None = None, draws: int = 200, sklearn_draws: int = 10,
                    protocol: str = "legacy", device: str = "cpu", engine: str = "auto", seed: int = 0) -> dict:
    """Time both implementations on the same draws; returns the summary (key -> value)."""
    import torch

    from pitlm.errors import PitlmError
    from pitlm.eval.bootstrap import draw_counts
    from pitlm.eval.protocols import ProtocolConfig, evaluate

    if scale not in PRESETS:
        raise PitlmError(f"unknown scale '{scale}'; known: {', '.join(PRESETS)}")
    if protocol not in ("legacy", "purged"):
        raise PitlmError(f"bench stats protocol must be legacy or purged (got '{protocol}')")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PitlmError("--device cuda but torch sees no CUDA GPU")
    S, m, d = (v if v is not None else p for v, p in zip((stocks, dates_per_stock, features), PRESETS[scale], strict=True))
    rows, X = random_panel(S, m, d, seed)
    cfg = ProtocolConfig(protocols=[protocol], n_boot=draws, seed=seed, jackknife_groups=0, rank_ic=False,
                         device=device, engine=engine)
    # one-time process set-up is not per-draw work: a tiny run of each side first (CUDA context and
    # cuBLAS/cuSOLVER handles; the thread pool, threadpoolctl's library scan, LAPACK symbols; sklearn's lazy
    # imports and first-call validation)
    small = (rows["SecuritiesCode"] < rows["SecuritiesCode"].min() + 2 * cfg.n_splits).to_numpy()
    rows_small = rows[small].reset_index(drop=True)
    evaluate({"model": X[small]}, rows_small, cfg.model_copy(update={"n_boot": 2}), control=None)
    sklearn_protocol(X[small], rows_small, np.ones(2 * cfg.n_splits, dtype=np.int64), protocol, cfg)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = evaluate({"model": X}, rows, cfg, control=None)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    engine_s = time.perf_counter() - t0
    counts = draw_counts(S, draws, seed)
    n_sk = min(sklearn_draws, draws)
    t0 = time.perf_counter()
    ref = [sklearn_protocol(X, rows, counts[i], protocol, cfg) for i in range(n_sk)]
    sklearn_s = time.perf_counter() - t0
    diffs = [abs(r[k] - res.values["model"][k][1 + i]) for i, r in enumerate(ref) for k in r]
    engine_per_draw = engine_s / (draws + 1)  # the point estimate is one more count vector
    sklearn_per_draw = sklearn_s / max(n_sk, 1)
    return {
        "bench": "stats", "protocol": protocol, "scale": scale, "rows": len(rows), "stocks": S, "features": d,
        "device": device, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "engine_modes": ",".join(f"{k}={v}" for k, v in res.info["engine_modes"].items()),
        "engine_draws": draws, "engine_s_total": round(engine_s, 3), "engine_s_per_draw": engine_per_draw,
        "sklearn_draws": n_sk, "sklearn_s_per_draw": sklearn_per_draw,
        "sklearn_s_extrapolated": sklearn_per_draw * (draws + 1),
        "speedup": sklearn_per_draw / engine_per_draw, "max_abs_diff": max(diffs) if diffs else float("nan"),
    }


def bench_stats(
    scale: Annotated[str, typer.Option(help="Preset: demo-small (30x30x133), demo (100x30x256), seed (1000x30x2053).")] = "demo",
    stocks: Annotated[int | None, typer.Option(help="Override the preset's number of stocks.")] = None,
    dates_per_stock: Annotated[int | None, typer.Option(help="Override the preset's dates per stock.")] = None,
    features: Annotated[int | None, typer.Option(help="Override the preset's number of features.")] = None,
    draws: Annotated[int, typer.Option(help="Bootstrap draws for the engine.")] = 200,
    sklearn_draws: Annotated[int, typer.Option(help="Draws for scikit-learn (its time per draw is extrapolated).")] = 10,
    protocol: Annotated[str, typer.Option(help="legacy (chronological + GroupKFold) or purged.")] = "legacy",
    device: Annotated[str, typer.Option(help="cpu or cuda (float64 torch).")] = "cpu",
    engine: Annotated[str, typer.Option(help="Engine mode: auto, stats (per-stock statistics) or rows.")] = "auto",
    seed: Annotated[int, typer.Option(help="Data and bootstrap seed.")] = 0,
) -> None:
    """Time the exact statistics engine against scikit-learn on the same bootstrap draws; print the ratio."""
    from pitlm.log import emit_summary

    emit_summary(run_bench_stats(scale, stocks, dates_per_stock, features, draws, sklearn_draws, protocol, device,
                                 engine, seed))
