"""Stock-clustered bootstrap: seeded draws, a grouped jackknife for BCa, and interval summaries.

A draw is a count vector over stocks: stocks drawn with replacement, as many as there are (the seed's
scheme); a stock drawn c times contributes its rows c times under its ORIGINAL id, so its copies share a
fold. The same count vectors are used for every model and protocol, which makes differences between models
(model minus control, base minus arm) *paired*: each draw's difference is computed on identical rows.

Intervals from the valid draws (a draw that could not be fit is NaN, skipped and counted):
- percentile: the 2.5/97.5 percentiles (np.percentile, linear), the seed's interval;
- basic: 2*estimate - the upper/lower percentile (corrects a shift of the bootstrap distribution);
- BCa: bias-corrected and accelerated; bias from the share of draws below the estimate, acceleration from
  a delete-a-group jackknife over stocks (stocks split into `n_groups` seeded groups; one group left out
  per jackknife replicate), which keeps the cost at n_groups refits instead of one per stock.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm


def draw_counts(n_stocks: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_stocks) int counts: how often each stock is drawn in each bootstrap draw."""
    if n_stocks < 1 or n_boot < 0:
        raise ValueError(f"need n_stocks >= 1 and n_boot >= 0 (got {n_stocks}, {n_boot})")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_stocks, size=(n_boot, n_stocks))
    offsets = np.arange(n_boot)[:, None] * n_stocks
    return np.bincount((picks + offsets).ravel(), minlength=n_boot * n_stocks).reshape(n_boot, n_stocks)


def jackknife_counts(n_stocks: int, n_groups: int, seed: int) -> np.ndarray:
    """(G, n_stocks) counts of a delete-a-group jackknife: all ones except one seeded group of stocks."""
    G = min(n_groups, n_stocks)
    if G < 2:
        return np.ones((0, n_stocks), dtype=np.int64)
    perm = np.random.default_rng([seed, 1]).permutation(n_stocks)
    out = np.ones((G, n_stocks), dtype=np.int64)
    for g, members in enumerate(np.array_split(perm, G)):
        out[g, members] = 0
    return out


def percentile_interval(draws: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(lower, median, upper) percentiles of the valid draws."""
    v = draws[np.isfinite(draws)]
    if len(v) == 0:
        return (np.nan, np.nan, np.nan)
    q = 100 * (1 - level) / 2
    lo, mid, hi = np.percentile(v, [q, 50.0, 100 - q])
    return float(lo), float(mid), float(hi)


def basic_interval(estimate: float, draws: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    lo, _, hi = percentile_interval(draws, level)
    return 2 * estimate - hi, 2 * estimate - lo


def bca_interval(estimate: float, draws: np.ndarray, jack: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """BCa interval; NaN when undefined (no valid jackknife, or every draw on one side of the estimate)."""
    v = draws[np.isfinite(draws)]
    j = jack[np.isfinite(jack)]
    if len(v) == 0 or len(j) < 2 or not np.isfinite(estimate):
        return (np.nan, np.nan)
    share = (np.sum(v < estimate) + 0.5 * np.sum(v == estimate)) / len(v)
    if share <= 0 or share >= 1:
        return (np.nan, np.nan)
    z0 = norm.ppf(share)
    dev = j.mean() - j
    denom = 6 * np.sum(dev ** 2) ** 1.5
    a = np.sum(dev ** 3) / denom if denom > 0 else 0.0
    z = norm.ppf([(1 - level) / 2, (1 + level) / 2])
    adj = norm.cdf(z0 + (z0 + z) / (1 - a * (z0 + z)))
    lo, hi = np.percentile(v, 100 * adj)
    return float(lo), float(hi)


def summarize(values: np.ndarray, n_boot: int, level: float = 0.95) -> dict:
    """Summary of one statistic: `values` = [estimate, n_boot bootstrap draws, jackknife replicates...]."""
    estimate = float(values[0])
    draws, jack = values[1:1 + n_boot], values[1 + n_boot:]
    lo, mid, hi = percentile_interval(draws, level)
    basic = basic_interval(estimate, draws, level)
    bca = bca_interval(estimate, draws, jack, level)
    valid = int(np.isfinite(draws).sum())
    return {
        "estimate": estimate, "median": mid, "ci_lo": lo, "ci_hi": hi,
        "basic_lo": basic[0], "basic_hi": basic[1], "bca_lo": bca[0], "bca_hi": bca[1],
        "se": float(np.std(draws[np.isfinite(draws)], ddof=1)) if valid > 1 else float("nan"),
        "n_draws": valid, "n_skipped": n_boot - valid,
        "outside_ci": bool(np.isfinite(estimate) and np.isfinite(lo) and not lo <= estimate <= hi),
    }


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson 95% interval of a binomial rate (k of n): with 20 worlds an FPR of 0.05 could be 0.01..0.24."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))
