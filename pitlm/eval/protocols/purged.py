"""`purged`: `PurgedPanelSplit` (stock folds x date blocks, purge + embargo). `r2_purged` = out-of-fold R2: every
row is predicted once, by the fold that tests it, and R2 = 1 - sum SSE / SST of all rows around their mean
(sklearn's r2_score on cross_val_predict output); `r2_purged_foldmean` = the mean of fold R2s; with rank IC
`rank_ic_purged`. Its long-short series covers every date (`sharpe_purged`). The preferred calibrated statistic.
"""

from __future__ import annotations

import numpy as np

from pitlm.eval.protocols import Protocol
from pitlm.eval.protocols.run import Panel, ProtocolConfig, fold_r2, mean_ic
from pitlm.eval.splitters import PanelFolds, PurgedPanelSplit


def layouts(calendar: np.ndarray, cfg: ProtocolConfig) -> dict[str, PanelFolds]:
    return {"purged": PurgedPanelSplit(cfg.n_splits, cfg.n_time_blocks, cfg.embargo_days, cfg.horizon).folds(calendar)}


def metrics(raw: dict, layouts: dict, panel: Panel, groups_ok: np.ndarray) -> dict[str, np.ndarray]:
    """A draw is skipped when a fold that tests rows could not be fit, or it has too few stocks for the folds."""
    raw = raw["purged"]
    tested = raw["n"] > 0
    fits = np.all(raw["ok"] | ~tested, axis=1) & groups_ok
    n, sy = raw["n"].sum(1), raw["sy"].sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        sst = raw["syy"].sum(1) - sy ** 2 / n
        pooled = np.where(fits & (sst > 0), 1.0 - raw["sse"].sum(1) / sst, np.nan)
    r2 = fold_r2(raw)
    good = np.isfinite(r2)
    with np.errstate(invalid="ignore", divide="ignore"):
        foldmean = np.where(fits & good.any(1), np.nansum(r2, 1) / good.sum(1), np.nan)
    out = {"r2_purged": pooled, "r2_purged_foldmean": foldmean}
    if "ic_all" in raw:
        out["rank_ic_purged"] = np.where(fits, mean_ic(raw["ic_all"]), np.nan)
    return out


PROTOCOL = Protocol(name="purged", layouts=layouts, metrics=metrics, statistic="r2_purged", preference=0,
                    headline=("r2_purged", "rank_ic_purged"), series=("all", "purged"))
