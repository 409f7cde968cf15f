"""The leakage protocols on one set of rows, for every model, with one set of paired bootstrap draws.

    result = evaluate_features({"control": Xc, "base": Xb, "lora": Xa}, rows, ProtocolConfig(), control="control", base="base")
    print("\n".join(result.summary_lines()))

`rows` has Date, SecuritiesCode, Target (one row per stock and date); `features[name]` is that model's
(n_rows, n_features) design X = [embedding || numeric], rows in the same order.

Protocols (DESIGN.md §4), every statistic computed for every model on the same draws; each protocol is a
`Protocol` record in its own module (pitlm/eval/protocols/__init__.py says what a record holds), run here by
`build_layouts` -> `run_layout` per layout and model -> `Protocol.metrics`:
- `legacy` (legacy.py, the seed, exactly): `r2_leakage_off` (chronological split), `r2_leakage_on` (GroupKFold),
  `leakage_premium` = on - off;
- `purged` (purged.py): `r2_purged` (out-of-fold R2 of `PurgedPanelSplit`), `r2_purged_foldmean`;
- `walk_forward` (walk_forward.py): `r2_walk_forward_<year>` per test year and `r2_walk_forward`, their mean.
Options:
- rank IC (option): per-date Spearman of out-of-fold predictions against Target, averaged over dates:
  `rank_ic_leakage_off`, `rank_ic_leakage_on`, `rank_ic_premium`, `rank_ic_purged`,
  `rank_ic_walk_forward` (all test dates) and `rank_ic_walk_forward_<year>`.
- portfolio (option, on by default; pitlm/eval/portfolio.py): a daily top-minus-bottom quantile long-short
  return series of the out-of-fold predictions of legacy's chronological test split, purged and walk_forward:
  `sharpe_leakage_off`, `sharpe_purged`, `sharpe_walk_forward` (annualised) and `ls_return_*` per draw; the
  original series and their Newey-West t in `EvalResult.portfolio`.
Derived, per draw, hence paired: `net_<stat>` = model - control; `<stat>_reduction` = base - primary
(`premium_reduction` for the legacy premium). The calibrated leakage estimate of a model is
`net_r2_purged` (else `net_r2_walk_forward`, else `net_leakage_premium`: `Protocol.preference`;
`leakage_statistic` overrides), and a model is *flagged* when the lower end of its 95% interval (`decision_ci`) is
above 0.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import AfterValidator, Field
from pydantic_core import PydanticCustomError

from pitlm.config import StageConfig
from pitlm.errors import PitlmError
from pitlm.eval.bootstrap import draw_counts, jackknife_counts
from pitlm.eval.engine import RankIC, Solver, choose_solver
from pitlm.eval.portfolio import LongShort, series_metrics, tested_dates
from pitlm.eval.protocols import PROTOCOLS, Protocol, get, registry
from pitlm.eval.result import EvalResult
from pitlm.eval.splitters import PanelFolds, as_dates, group_kfold_assignment
from pitlm.log import progress_task

log = logging.getLogger("pitlm.eval")


def _known_protocol(name: str) -> str:
    if name not in registry():  # pydantic's own wording for a Literal: a bad name reads as it always did
        names = [repr(n) for n in registry()]
        expected = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
        raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})
    return name


# a config field's type: the name of a registered protocol (pitlm/eval/protocols/__init__.py)
ProtocolName = Annotated[str, AfterValidator(_known_protocol)]


class ProtocolConfig(StageConfig):
    """Protocols, Ridge, bootstrap and engine settings of one evaluation."""

    protocols: list[ProtocolName] = list(PROTOCOLS)
    alpha: float = Field(1.0, ge=0)
    # alpha per fold by inner leave-one-stock-fold-out CV over alpha_grid, for the calibrated protocols (purged,
    # walk_forward). A protocol with `fixed_alpha` (legacy) keeps the seed's fixed alpha: it must reproduce the seed.
    alpha_cv: bool = False
    alpha_grid: list[float] = [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0]
    n_boot: int = Field(200, ge=0)
    seed: int = 0
    train_end: str = "2020-12-31"  # legacy chronological split
    test_start: str = "2021-01-01"
    n_splits: int = Field(5, ge=2)  # legacy GroupKFold folds; stock folds of the purged grid
    n_time_blocks: int = Field(5, ge=1)
    embargo_days: int = Field(5, ge=0)
    horizon: int = Field(2, ge=0)  # Target window t+1..t+horizon in trading days (JPX Target: 2)
    first_test_year: int | None = None  # walk-forward (default: the calendar's second year)
    demean_target: bool = False  # subtract each date's mean Target over the rows (once, before any draw)
    rank_ic: bool = True
    rank_ic_min_stocks: int = Field(3, ge=2)
    # long-short portfolios of the out-of-fold predictions (pitlm/eval/portfolio.py): top minus bottom quantile
    # per date; a date with fewer rows has no position
    portfolio: bool = True
    ls_quantile: float = Field(0.2, gt=0, le=0.5)
    ls_min_stocks: int = Field(2, ge=2)
    jackknife_groups: int = Field(50, ge=0)  # delete-a-group jackknife for BCa; 0 = no BCa
    ci_level: float = Field(0.95, gt=0, lt=1)
    decision_ci: Literal["percentile", "bca", "basic"] = "percentile"
    leakage_statistic: str | None = None
    device: str = "cpu"
    engine: Literal["auto", "stats", "rows"] = "auto"
    memory_gb: float | None = None  # statistics budget (default: a quarter of free RAM / GPU memory)


class Panel:
    """The rows' dates, stocks and target as the engine needs them."""

    def __init__(self, rows: pd.DataFrame, cfg: ProtocolConfig):
        missing = [c for c in ("Date", "SecuritiesCode", "Target") if c not in rows.columns]
        if missing:
            raise PitlmError(f"rows lack column(s) {', '.join(missing)}")
        self.dates = as_dates(rows["Date"])
        self.codes, self.stock = np.unique(rows["SecuritiesCode"].to_numpy(), return_inverse=True)
        self.calendar, self.date_idx = np.unique(self.dates, return_inverse=True)
        y = rows["Target"].to_numpy(dtype=np.float64)
        if not np.isfinite(y).all():
            raise PitlmError("Target has missing or infinite values; drop those rows first")
        self.target = y  # the realised returns (the long-short legs earn these, demeaned or not)
        if cfg.demean_target:
            y = y - (np.bincount(self.date_idx, y) / np.bincount(self.date_idx))[self.date_idx]
        self.y = y
        self.rows_per_stock = np.bincount(self.stock, minlength=len(self.codes))
        if len(self.codes) < cfg.n_splits:
            raise PitlmError(f"{len(self.codes)} stocks is fewer than n_splits={cfg.n_splits}; sample more stocks")

    @property
    def n_stocks(self) -> int:
        return len(self.codes)

    @property
    def n_dates(self) -> int:
        return len(self.calendar)

    def cells(self, folds: PanelFolds) -> np.ndarray:
        return folds.cell_of_pos[self.date_idx]


def _broadcast_stock_folds(pf: PanelFolds, K: int) -> PanelFolds:
    """A layout that does not split stocks, repeated over K stock folds (for alpha by inner CV)."""
    if pf.n_stock_folds == K:
        return pf
    rep = (1, K, 1)
    return PanelFolds(pf.calendar, pf.cell_of_pos, np.tile(pf.train, rep), np.tile(pf.test, rep), pf.names)


@dataclass
class Layout(PanelFolds):
    """A fold layout of one protocol: its folds plus their out-of-fold sets (`Protocol.ic_groups`) and the sets
    whose long-short series are reported (`Protocol.series`)."""

    groups: dict[str, list[int]] = field(default_factory=dict)
    ls_groups: list[str] = field(default_factory=list)


def build_layouts(protocol: Protocol, calendar: np.ndarray, cfg: ProtocolConfig) -> dict[str, Layout]:
    """The fold layouts of one protocol (legacy has one: the chronological split, then GroupKFold's folds)."""
    try:
        out = protocol.layouts(calendar, cfg)
    except ValueError as e:
        raise PitlmError(f"protocol {protocol.name}: {e}") from None
    if cfg.alpha_cv:
        out = {k: _broadcast_stock_folds(v, cfg.n_splits) for k, v in out.items()}
    series = protocol.series[0] if protocol.series else None
    return {k: Layout(v.calendar, v.cell_of_pos, v.train, v.test, v.names, protocol.ic_groups(v),
                      [series] if series is not None and k == protocol.name else []) for k, v in out.items()}


def stock_fold_assignments(counts: np.ndarray, rows_per_stock: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray]:
    """GroupKFold(K) fold of every stock in every draw (sizes = count x rows), and whether the draw has at
    least K distinct stocks (sklearn refuses fewer groups than folds: such a draw is skipped)."""
    assign = np.full(counts.shape, -1, dtype=np.int64)
    ok = (counts > 0).sum(1) >= K
    for c in np.flatnonzero(ok):
        assign[c] = group_kfold_assignment(counts[c] * rows_per_stock, K)
    return assign, ok


def ic_groups(folds: Layout) -> dict[str, list[int]]:
    """Sets of folds whose test rows are disjoint, each giving one out-of-fold prediction per tested row."""
    return folds.groups


def _ls_groups(folds: Layout) -> list[str]:
    """The out-of-fold groups whose long-short series are reported (legacy: its chronological test split only;
    GroupKFold's "on" predictions mix dates and are not a backtest)."""
    return folds.ls_groups


def run_layout(X: np.ndarray, panel: Panel, folds: PanelFolds, counts: np.ndarray, assign: np.ndarray,
               cfg: ProtocolConfig, advance=None) -> dict[str, np.ndarray]:
    """Fit and score every fold of one layout for every count vector: (C, F) arrays, plus (C, n_dates)
    per-date rank ICs of the out-of-fold predictions of each `ic_groups` set when cfg.rank_ic; `advance(n)`
    is called as count vectors are done (a progress bar)."""
    memory = int(cfg.memory_gb * 2**30) if cfg.memory_gb else None
    solver = choose_solver(X, panel.y, panel.stock, panel.cells(folds), panel.n_stocks, folds, alpha=cfg.alpha,
                           grid=cfg.alpha_grid if cfg.alpha_cv else None, device=cfg.device, mode=cfg.engine,
                           memory_bytes=memory)
    C, F = counts.shape[0], folds.n_folds
    out = {k: np.zeros((C, F)) for k in ("sse", "sst", "n", "sy", "syy", "alpha")}
    out["ok"] = np.zeros((C, F), dtype=bool)
    if cfg.rank_ic:
        out.update({f"ic_{g}": np.full((C, panel.n_dates), np.nan) for g in ic_groups(folds)})
    if cfg.portfolio:
        out.update({f"ls_{g}": np.full((C, panel.n_dates), np.nan) for g in _ls_groups(folds)})
    with solver.threads():
        # batches of at most a tenth of the draws, so that a progress bar moves (a batch's GEMMs are as fast)
        step = min(solver.draw_batch_size(), max(8, -(-len(counts) // 10)))
        _draw_loop(solver, panel, folds, counts, assign, cfg, out, step, advance)
    out["mode"] = solver.mode
    if solver.cv_fallbacks:
        log.info("%d of %d draws had near-tied alphas; chosen by select_alpha", solver.cv_fallbacks, C)
    return out


def _draw_loop(solver: Solver, panel: Panel, folds: PanelFolds, counts: np.ndarray, assign: np.ndarray,
               cfg: ProtocolConfig, out: dict, step: int, advance=None) -> None:
    """Batches of count vectors: fold statistics, fits, scores and rank ICs, written into `out`;
    `advance(n)` after each batch of n."""
    C = counts.shape[0]
    groups = ic_groups(folds)
    ranker = RankIC(panel.date_idx, panel.y, panel.n_dates, cfg.rank_ic_min_stocks) if cfg.rank_ic else None
    book = (LongShort(panel.date_idx, panel.target, panel.n_dates, cfg.ls_quantile, cfg.ls_min_stocks)
            if cfg.portfolio else None)
    want_oof = cfg.rank_ic or cfg.portfolio
    for s in range(0, C, step):
        sl = slice(s, min(s + step, C))
        fit, sc, alpha = solver.solve(counts[sl], assign[sl], list(groups.values()) if want_oof else None)
        for k in ("sse", "sst", "n", "sy", "syy"):
            out[k][sl] = getattr(sc, k).cpu().numpy()
        out["ok"][sl] = fit.ok.cpu().numpy()
        out["alpha"][sl] = alpha
        if want_oof:
            for g, (pred, w) in zip(groups, sc.oof, strict=True):
                if ranker is not None:
                    out[f"ic_{g}"][sl] = ranker.batch(pred, w, solver.workers)
                if book is not None and f"ls_{g}" in out:
                    out[f"ls_{g}"][sl] = book.batch(pred, w, solver.workers)
        if advance is not None:
            advance(sl.stop - sl.start)


def fold_r2(raw: dict) -> np.ndarray:
    """(C, F) R2 of every fold of every count vector; NaN where the fold could not be fit or scored."""
    good = raw["ok"] & (raw["n"] >= 2) & (raw["sst"] > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(good, 1.0 - raw["sse"] / raw["sst"], np.nan)


def mean_ic(ic: np.ndarray, dates: np.ndarray | None = None) -> np.ndarray:
    """(C,) mean over dates (all, or the `dates` mask) of per-date rank ICs, skipping dates without one."""
    sub = ic if dates is None else ic[:, dates]
    good = np.isfinite(sub)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(good.any(1), np.nansum(sub, 1) / good.sum(1), np.nan)


def _add_portfolio(values: dict, portfolio: dict, model: str, protocol: Protocol, raw: dict, folds: Layout,
                   panel: Panel) -> None:
    """The protocol's long-short statistics (per draw) into `values`, its original series into `portfolio`."""
    group, suffix = protocol.series
    tested = tested_dates(folds, ic_groups(folds)[group])
    stats, record = series_metrics(raw[f"ls_{group}"], tested, panel.calendar, suffix)
    values.update(stats)
    entry = portfolio["series"].setdefault(suffix, {k: record[k] for k in ("dates", "periods_per_year", "days",
                                                                           "nw_lags")} | {"models": {}})
    entry["models"][model] = {k: record[k] for k in ("returns", "days_with_position", "nw_t", "nw_se")}


def _step_progress(show: bool, description: str, total: int):
    """A progress bar over one draw loop (`advance(n)`), or a context giving None."""
    if not show:
        return nullcontext(None)
    return progress_task(description, total, "draws")


def count_vectors(n_stocks: int, cfg: ProtocolConfig) -> np.ndarray:
    """[original sample (all ones); cfg.n_boot bootstrap draws; jackknife replicates] x stocks."""
    ones = np.ones((1, n_stocks), dtype=np.int64)
    return np.concatenate([ones, draw_counts(n_stocks, cfg.n_boot, cfg.seed),
                           jackknife_counts(n_stocks, cfg.jackknife_groups, cfg.seed)])


def evaluate_features(features: dict[str, np.ndarray], rows: pd.DataFrame, cfg: ProtocolConfig | None = None,
             control: str | None = "control", base: str | None = None, primary: str | None = None,
             show_progress: bool = False) -> EvalResult:
    """Every protocol for every model on the same rows and the same bootstrap draws (see the module doc);
    `show_progress`: a progress bar (draws done/total, ETA) on stderr for every model x fold layout."""
    cfg = cfg or ProtocolConfig()
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise PitlmError(f"device '{cfg.device}' requested but torch sees no CUDA GPU; use device=cpu")
    for role, name in (("control", control), ("base", base), ("primary", primary)):
        if name is not None and name not in features:
            raise PitlmError(f"{role} model '{name}' is not among the models ({', '.join(features)})")
    t0 = time.perf_counter()
    panel = Panel(rows, cfg)
    for name, X in features.items():
        if np.ndim(X) != 2 or len(X) != len(rows):
            raise PitlmError(f"features of '{name}' must be (n_rows={len(rows)}, n_features), got {np.shape(X)}")
        if not np.isfinite(X).all():
            raise PitlmError(f"features of '{name}' contain NaN or infinite values")
    counts = count_vectors(panel.n_stocks, cfg)
    assign, groups_ok = stock_fold_assignments(counts, panel.rows_per_stock, cfg.n_splits)
    no_split = np.zeros_like(assign)
    values: dict[str, dict[str, np.ndarray]] = {m: {} for m in features}
    alphas: dict[str, dict[str, list]] = {m: {} for m in features}
    modes: dict[str, str] = {}
    seconds: dict[str, float] = {}
    portfolio = ({"quantile": cfg.ls_quantile, "min_stocks": cfg.ls_min_stocks, "series": {}}
                 if cfg.portfolio else None)
    for name in cfg.protocols:
        protocol = get(name)
        t_protocol = time.perf_counter()
        pcfg = cfg.model_copy(update={"alpha_cv": False}) if protocol.fixed_alpha else cfg
        layouts = build_layouts(protocol, panel.calendar, pcfg)
        for model, X in features.items():
            raw = {}
            for lname, folds in layouts.items():
                t1 = time.perf_counter()
                a = assign if folds.n_stock_folds > 1 else no_split
                with _step_progress(show_progress, f"{lname} {model}", len(counts)) as advance:
                    raw[lname] = run_layout(np.asarray(X), panel, folds, counts, a, pcfg, advance)
                modes[lname] = raw[lname]["mode"]
                alphas[model][lname] = raw[lname]["alpha"][0].tolist()
                log.info("%s/%s: %d folds x %d draws in %.2fs (%s engine)", model, lname, folds.n_folds,
                         len(counts), time.perf_counter() - t1, modes[lname])
            values[model].update(protocol.metrics(raw, layouts, panel, groups_ok))
            if cfg.portfolio and protocol.series:
                _add_portfolio(values[model], portfolio, model, protocol, raw[name], layouts[name], panel)
        seconds[name] = round(time.perf_counter() - t_protocol, 3)
    info = {"n_rows": len(rows), "n_stocks": panel.n_stocks, "n_dates": panel.n_dates,
            "first_date": str(panel.calendar[0]), "last_date": str(panel.calendar[-1]),
            "n_features": {m: int(np.shape(X)[1]) for m, X in features.items()}, "engine_modes": modes,
            "alphas": alphas, "protocol_seconds": seconds, "wall_s": round(time.perf_counter() - t0, 3)}
    return EvalResult(cfg.model_dump(mode="json"), info, values, n_boot=cfg.n_boot, control=control, base=base,
                      primary=primary, portfolio=portfolio)
