"""The oracle: how much of the JPX Target the planted component explains on the eval sample. It is the ceiling
that a perfectly leaky model could reach, and the check that a world's planted signal is measurable at all."""

from __future__ import annotations

from typing import Protocol

import numpy as np
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score
from sklearn.model_selection import GroupKFold

from pitlm.market.features import add_features, sample_rows


class KnowledgeSettings(Protocol):
    """How much an oracle knows (pitlm.eval.calibrate.CalibrateConfig has these fields)."""

    knowledge_gain: float
    knowledge_noise: float
    knowledge_dim: int
    seed: int


def oracle_r2(market, max_stocks: int = 12, dates_per_stock: int = 75, seed: int = 0) -> dict[str, float]:
    """R2 of Ridge(alpha=1) on the standardised true planted component of each row's Target window, on the eval
    sample (`sample_rows` of the featured panel; defaults: the demo eval's 12 stocks x 75 dates): in-sample and
    GroupKFold(5)-by-stock out-of-sample."""
    rows = sample_rows(add_features(market.panel()), max_stocks, dates_per_stock, seed)
    rows = rows.merge(market.ground_truth[["Date", "SecuritiesCode", "planted_target"]],
                      on=["Date", "SecuritiesCode"], how="left", validate="one_to_one")
    x = rows["planted_target"].to_numpy(dtype=float)
    y = rows["Target"].to_numpy(dtype=float)
    X = ((x - x.mean()) / (x.std() if x.std() > 0 else 1.0))[:, None]
    in_sample = r2_score(y, Ridge(alpha=1.0).fit(X, y).predict(X))
    groups = rows["SecuritiesCode"].to_numpy()
    n_splits = min(5, len(np.unique(groups)))
    cv = [r2_score(y[te], Ridge(alpha=1.0).fit(X[tr], y[tr]).predict(X[te]))
          for tr, te in GroupKFold(n_splits).split(X, y, groups)] if n_splits >= 2 else [float("nan")]
    return {"oracle_r2": float(in_sample), "oracle_r2_cv": float(np.mean(cv)), "oracle_rows": len(rows)}


def oracle_features(control: np.ndarray, planted_target: np.ndarray, cfg: KnowledgeSettings, planted_daily: float,
                    world_seed: int) -> np.ndarray:
    """The `oracle:planted` embedding of `pitlm calibrate` (pitlm/eval/calibrate.py says why this form): the
    control's features after a random projection w of q = gain * planted_target / planted_daily + noise * e.
    `cfg` carries knowledge_gain, knowledge_noise, knowledge_dim and seed (a CalibrateConfig)."""
    rng = np.random.default_rng([world_seed, 7])
    q = cfg.knowledge_gain * np.nan_to_num(planted_target) / planted_daily
    q = q + cfg.knowledge_noise * rng.standard_normal(len(q))
    w = np.random.default_rng([cfg.seed, 11]).standard_normal(cfg.knowledge_dim)
    return np.hstack([np.outer(q, w), control]).astype(np.float32)
