"""Statistics of the knowledge probes (`pitlm probe`), per row and per stock-clustered bootstrap draw.

Token scores of one text (Shi et al. 2023; Zhang et al. 2024), from the log-probability `lp[t]` of each token given
the text before it, and the mean `mu[t]` and standard deviation `sd[t]` of log p(z) under the model's next-token
distribution at that position:
    min_k       mean of the lowest max(1, int(k * T)) of lp                              (Min-K% Prob)
    min_k_pp    the same over (lp - mu) / sd                                              (Min-K%++)
Per-row probe values (what `pitlm probe` computes with an LM, and `pitlm calibrate --probe` simulates):
    z       a score of the statement of the row's realised move minus that of the opposite move (`mink`, `minkpp`),
            or the next-token direction margin (`direction`: logsumexp over up-words - down-words)
    up      whether the realised move was up (rows without a move are masked out)
Per draw (row weight = the draw's count of the row's stock, 0 for masked rows), every statistic a (C,) array over
count vectors [original rows, bootstrap draws, jackknife replicates] (pitlm.eval.protocols.run.count_vectors), so that
a model's statistic, its control's, and the regression's share the draws (paired):
    true_minus_false    0.5 * (mean z over up rows - mean z over down rows) of the up-minus-down score z: the
                        realised statement's advantage over the opposite one, with up and down rows weighted
                        equally, so a model's general preference for "risen" cancels (in nats for min_k)
    balanced_accuracy   0.5 * (share of up rows with margin > 0 + share of down rows with margin < 0), ties
                        half; chance 0.5 whatever the share of up moves
    lap_interaction     OLS y ~ 1 + f + l + f*l on standardised y (the move), f (the forecast) and l (the
                        look-ahead propensity score): the coefficient of f*l, i.e. how much a 1-sd higher
                        propensity raises the forecast's slope (Gao, Jiang & Yan's LAP test)
"""

from __future__ import annotations

import numpy as np


def n_lowest(T: int, k: float) -> int:
    """How many of T tokens Min-K% averages: int(k * T), at least 1."""
    return max(1, int(k * T))


def min_k(lp: np.ndarray, k: float = 0.2) -> float:
    """Min-K% Prob: the mean of the lowest k share of the token log-probabilities."""
    lp = np.asarray(lp, dtype=np.float64)
    return float(np.sort(lp)[:n_lowest(len(lp), k)].mean())


def min_k_pp(lp: np.ndarray, mu: np.ndarray, sd: np.ndarray, k: float = 0.2) -> float:
    """Min-K%++: Min-K% of the token log-probabilities standardised by the next-token distribution's own mean
    and standard deviation of log p (a token is scored against what the model expected at that position)."""
    z = (np.asarray(lp, np.float64) - np.asarray(mu, np.float64)) / np.maximum(np.asarray(sd, np.float64), 1e-12)
    return min_k(z, k)


def row_weights(counts: np.ndarray, stock: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """(C, n) row weights of count vectors (C, n_stocks): each row weighs its stock's count; masked rows 0."""
    W = np.asarray(counts, dtype=np.float64)[:, stock]
    return W if mask is None else W * np.asarray(mask, dtype=np.float64)


def _wmean(W: np.ndarray, v: np.ndarray, sel: np.ndarray) -> np.ndarray:
    w = W * sel
    total = w.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (w * np.nan_to_num(v)).sum(1) / total, np.nan)


def true_minus_false(W: np.ndarray, z: np.ndarray, up: np.ndarray) -> np.ndarray:
    """0.5 * (weighted mean of z over up rows - over down rows), per draw."""
    up = np.asarray(up, dtype=bool)
    return 0.5 * (_wmean(W, z, up) - _wmean(W, z, ~up))


def balanced_accuracy(W: np.ndarray, margin: np.ndarray, up: np.ndarray) -> np.ndarray:
    """Mean of the up rows' and the down rows' direction hit rates (a tie counts half), per draw."""
    up = np.asarray(up, dtype=bool)
    m = np.asarray(margin, dtype=np.float64)
    tie = 0.5 * (m == 0)
    return 0.5 * (_wmean(W, (m > 0) + tie, up) + _wmean(W, (m < 0) + tie, ~up))


def _standardise(v: np.ndarray, keep: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    mean, sd = v[keep].mean(), v[keep].std()
    return (v - mean) / sd if sd > 0 else np.zeros_like(v)


def lap_interaction(W: np.ndarray, y: np.ndarray, f: np.ndarray, lap: np.ndarray) -> np.ndarray:
    """Per draw, the f*l coefficient of the weighted least squares y ~ 1 + f + l + f*l (y, f, l standardised on
    the rows with weight in the first count vector, the original sample); NaN where the design is singular."""
    keep = W[0] > 0
    ys, fs, ls = (_standardise(v, keep) for v in (y, f, lap))
    X = np.stack([np.ones_like(fs), fs, ls, fs * ls], axis=1)           # (n, 4)
    X, ys = np.where(keep[:, None], X, 0.0), np.where(keep, ys, 0.0)  # masked rows (weight 0) may hold NaN
    A = np.einsum("cn,ni,nj->cij", W, X, X)                              # (C, 4, 4)
    b = np.einsum("cn,ni,n->ci", W, X, ys)
    out = np.full(len(W), np.nan)
    good = np.linalg.cond(A) < 1e12
    if good.any():
        out[good] = np.linalg.solve(A[good], b[good][..., None])[:, 3, 0]
    return out
