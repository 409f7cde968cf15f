"""Portfolio economics of the out-of-fold predictions: a daily long-short return series per model and protocol,
its annualised Sharpe ratio with a Newey-West t-statistic, net of the control, and the leaky-minus-PIT gap.

The series. On every tested date of a protocol (legacy: the chronological test split, dated >= test_start;
purged: every date; walk_forward: the test years), the date's rows are ranked by their out-of-fold prediction;
the long leg is the top `ls_quantile` of them and the short leg the bottom, k = max(1, floor(q * N)) rows each of
the date's N rows, equal-weighted: r_t = mean Target(long) - mean Target(short). A date with fewer than
`ls_min_stocks` rows has no position (r_t = 0): the strategy is flat that day. A row of bootstrap weight c counts
as c identical rows (so a leg may take part of a duplicated stock's copies); equal predictions keep the rows'
order. Target is the return from t+1 to t+2, so a position formed on date t holds one day and consecutive
dates' positions do not overlap; per-date demeaning of Target cancels between the legs.

The figures, over the T tested dates of the calendar (the dates the eval's rows fall on):
    sharpe = mean(r) / std(r, ddof=1) * sqrt(P),   P = (T - 1) / years from the first to the last tested date
(the dates' own density: ~250 on a full trading calendar, fewer when the rows sample some dates only);
    ls_return = mean(r) * P  (annualised mean long-short return);
    nw_t = mean(r) / se_NW(mean),  se_NW^2 = (g_0 + 2 sum_{l=1..L} (1 - l/(L+1)) g_l) / T,
g_l = sum_t (r_t - m)(r_{t-l} - m) / T, Bartlett weights, no small-sample correction, L = floor(4 (T/100)^(2/9))
(Newey and West 1994; statsmodels' OLS on a constant with cov_type="HAC", maxlags=L, use_correction=False).

Intervals come from the eval's own paired, stock-clustered bootstrap: each draw re-forms every date's legs from
the drawn stocks' out-of-fold predictions of that draw's refits, the same draws for every model, so
`net_sharpe_*` (model - control) and `sharpe_gap_*` (base - arm: leaky minus PIT) are paired differences. The
draws resample the cross-section, not the days: what the days' own randomness adds is in the Newey-West t,
which is computed on the original rows only. A draw's duplicated stocks make its legs less diversified (a leg of
k rows holds fewer distinct stocks), which biases draw Sharpes toward 0 -- for a strong signal the point
estimate can lie above its percentile interval (listed in `portfolio_outside_ci`; the interval errs toward 0).

Hence a second interval, over days: a stationary bootstrap (Politis and Romano 1994; mean block length
T^(1/3), DAY_DRAWS resamples, seeded) of the original rows' series, the same resampled days for every model, so
that `*_day_ci` of a gap is paired too. It holds the fits fixed and measures the days' sampling error of the
Sharpe ratio, the usual interval of a backtest's Sharpe.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pitlm.eval.engine.threads import map_draws


class LongShort:
    """Per-date top-minus-bottom quantile returns of many prediction vectors against one target."""

    def __init__(self, date: np.ndarray, y: np.ndarray, n_dates: int, quantile: float = 0.2, min_stocks: int = 2):
        if not 0 < quantile <= 0.5:
            raise ValueError(f"quantile must be in (0, 0.5], got {quantile}")
        self.date, self.y, self.n_dates = np.asarray(date), np.asarray(y, dtype=np.float64), n_dates
        self.quantile, self.min_stocks = quantile, int(min_stocks)
        self._date_key = self.date.astype(np.int16 if n_dates < 2**15 else np.int64)

    def __call__(self, pred: np.ndarray, w: np.ndarray) -> np.ndarray:
        """(n_dates,) long-short return of one prediction vector (row weight = bootstrap count, 0 = not
        tested); NaN where the date has fewer than `min_stocks` (weighted) rows."""
        out = np.full(self.n_dates, np.nan)
        keep = w > 0
        if not keep.any():
            return out
        date, pred, y, w = self.date[keep], pred[keep], self.y[keep], np.asarray(w, dtype=np.float64)[keep]
        by_pred = np.argsort(pred, kind="stable")
        order = by_pred[np.argsort(self._date_key[keep][by_pred], kind="stable")]  # = np.lexsort((pred, date))
        d, ws, ys = date[order], w[order], y[order]
        N = np.bincount(d, weights=ws, minlength=self.n_dates)
        k = np.maximum(1.0, np.floor(self.quantile * N + 1e-9))
        end = np.cumsum(ws)
        first = np.r_[True, d[1:] != d[:-1]]
        start_of_date = (end - ws)[first][np.cumsum(first) - 1]
        lo, hi = end - ws - start_of_date, end - start_of_date  # the row's span of positions within its date
        kd, Nd = k[d], N[d]
        short = np.clip(np.minimum(hi, kd) - lo, 0.0, None)
        long = np.clip(hi - np.maximum(lo, Nd - kd), 0.0, None)
        ls = np.bincount(d, weights=(long - short) * ys, minlength=self.n_dates) / k
        enough = N >= self.min_stocks
        out[enough] = ls[enough]
        return out

    def batch(self, pred: np.ndarray, w: np.ndarray, workers: int = 1) -> np.ndarray:
        """(B, n_dates) long-short returns of (B, n) predictions and weights, draws over a thread pool."""
        return map_draws(self, pred, w, self.n_dates, workers)


def tested_dates(folds, members: list[int]) -> np.ndarray:
    """(n_dates,) bool: calendar positions that some fold of `members` tests (the series' dates)."""
    return folds.test[members].any(axis=(0, 1))[folds.cell_of_pos]


def periods_per_year(dates: np.ndarray) -> float:
    """(T - 1) / years between the first and the last date: the dates' own density (NaN for T < 2)."""
    d = np.asarray(dates, dtype="datetime64[D]")
    if len(d) < 2 or d[-1] <= d[0]:
        return float("nan")
    return (len(d) - 1) / ((d[-1] - d[0]).astype(np.int64) / 365.25)


def nw_lags(T: int) -> int:
    """Newey-West (1994) automatic lag: floor(4 (T/100)^(2/9))."""
    return int(np.floor(4 * (T / 100.0) ** (2.0 / 9.0)))


def newey_west_t(r: np.ndarray, lags: int | None = None) -> tuple[float, float, int]:
    """(t, standard error of the mean, lags): the mean of r over its Newey-West (Bartlett) standard error."""
    r = np.asarray(r, dtype=np.float64)
    T = len(r)
    L = nw_lags(T) if lags is None else int(lags)
    if T < 2:
        return float("nan"), float("nan"), L
    e = r - r.mean()
    lrv = e @ e / T
    for lag in range(1, min(L, T - 1) + 1):
        lrv += 2 * (1 - lag / (L + 1)) * (e[lag:] @ e[:-lag]) / T
    se = float(np.sqrt(lrv / T)) if lrv > 0 else float("nan")
    return (float(r.mean() / se) if se > 0 else float("nan")), se, L


def sharpe(r: np.ndarray, ppy: float) -> np.ndarray:
    """Annualised Sharpe ratio along the last axis: mean / std(ddof=1) * sqrt(ppy); NaN for a constant series."""
    r = np.asarray(r, dtype=np.float64)
    if r.shape[-1] < 2:
        return np.full(r.shape[:-1], np.nan)
    sd = r.std(axis=-1, ddof=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sd > 0, r.mean(axis=-1) / sd * np.sqrt(ppy), np.nan)


def series_metrics(ls: np.ndarray, tested: np.ndarray, calendar: np.ndarray, suffix: str) -> tuple[dict, dict]:
    """From (C, n_dates) long-short returns of every count vector (NaN = no position): per-draw
    `sharpe_<suffix>`, `ls_return_<suffix>`, and the original sample's series record (dates, returns, nw_t)."""
    r = np.nan_to_num(ls[:, tested], nan=0.0)
    dates = np.asarray(calendar)[tested]
    ppy = periods_per_year(dates)
    t, se, L = newey_west_t(r[0])
    values = {f"sharpe_{suffix}": sharpe(r, ppy), f"ls_return_{suffix}": r.mean(axis=1) * ppy}
    record = {"dates": [str(np.datetime64(x, "D")) for x in dates], "returns": r[0].tolist(),
              "periods_per_year": ppy, "days": int(len(dates)), "days_with_position": int(np.isfinite(ls[0, tested]).sum()),
              "nw_t": t, "nw_se": se, "nw_lags": L}
    return values, record


DAY_DRAWS = 1000


def stationary_indices(T: int, n_draws: int, mean_block: float, seed: int) -> np.ndarray:
    """(n_draws, T) day indices of a stationary bootstrap: each day starts a new block (a uniform day) with
    probability 1 / mean_block, else continues the previous one (wrapping around the end)."""
    rng = np.random.default_rng([seed, 24])
    starts = rng.integers(0, T, size=(n_draws, T))
    new = rng.random((n_draws, T)) < 1.0 / mean_block
    idx = np.empty((n_draws, T), dtype=np.int64)
    idx[:, 0] = starts[:, 0]
    for t in range(1, T):
        idx[:, t] = np.where(new[:, t], starts[:, t], (idx[:, t - 1] + 1) % T)
    return idx


def day_intervals(returns: dict[str, np.ndarray], ppy: float, gaps: dict[str, tuple[str, str]], seed: int,
                  level: float = 0.95, n_draws: int = DAY_DRAWS) -> tuple[dict[str, list[float]], float]:
    """Percentile intervals of each model's Sharpe and of each gap (a - b) over the same stationary-bootstrap
    resamples of the days; returns ({name: [lo, hi]}, mean block length)."""
    T = len(next(iter(returns.values())))
    if T < 3:
        return {}, float("nan")
    L = T ** (1 / 3)
    idx = stationary_indices(T, n_draws, L, seed)
    draws = {m: sharpe(np.asarray(r)[idx], ppy) for m, r in returns.items()}
    draws.update({g: draws[a] - draws[b] for g, (a, b) in gaps.items()})
    q = 100 * (1 - level) / 2
    out = {}
    for name, v in draws.items():
        v = v[np.isfinite(v)]
        out[name] = [float(x) for x in np.percentile(v, [q, 100 - q])] if len(v) else [float("nan")] * 2
    return out, L


def long_short_returns(dates, pred, y, quantile: float = 0.2, min_stocks: int = 2):
    """The long-short series of one prediction vector (no bootstrap): a pandas Series by date, NaN where a date
    has no position. For notebooks and checks; the eval computes the same inside its draw loop."""
    d = pd.to_datetime(pd.Series(dates)).to_numpy()
    cal, idx = np.unique(d, return_inverse=True)
    ls = LongShort(idx, y, len(cal), quantile, min_stocks)(np.asarray(pred, dtype=np.float64), np.ones(len(idx)))
    return pd.Series(ls, index=pd.DatetimeIndex(cal, name="Date"), name="long_short")
