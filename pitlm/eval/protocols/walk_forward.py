"""`walk_forward`: `WalkForwardSplit` (expanding window by calendar year, purged and embargoed).
`r2_walk_forward_<year>` per test year and `r2_walk_forward` = their mean; with rank IC `rank_ic_walk_forward`
(all test dates) and `rank_ic_walk_forward_<year>`. Its long-short series covers the test years
(`sharpe_walk_forward`). The per-year R2 is the knowledge matrix's cell (pitlm/eval/family.py).
"""

from __future__ import annotations

import numpy as np

from pitlm.eval.protocols import Protocol
from pitlm.eval.protocols.run import Panel, ProtocolConfig, fold_r2, mean_ic
from pitlm.eval.splitters import PanelFolds, WalkForwardSplit

PER_YEAR = "r2_walk_forward_"


def layouts(calendar: np.ndarray, cfg: ProtocolConfig) -> dict[str, PanelFolds]:
    return {"walk_forward": WalkForwardSplit(cfg.embargo_days, cfg.horizon, cfg.first_test_year).folds(calendar)}


def metrics(raw: dict, layouts: dict, panel: Panel, groups_ok: np.ndarray) -> dict[str, np.ndarray]:
    """One fold per test year (fold names are the years)."""
    raw, folds = raw["walk_forward"], layouts["walk_forward"]
    r2 = fold_r2(raw)
    out = {"r2_walk_forward": r2.mean(1)}
    years = panel.calendar.astype("datetime64[Y]").astype(int) + 1970
    for f, name in enumerate(folds.names):
        out[f"{PER_YEAR}{name}"] = r2[:, f]
    if "ic_all" in raw:
        out["rank_ic_walk_forward"] = mean_ic(raw["ic_all"])
        for name in folds.names:
            out[f"rank_ic_walk_forward_{name}"] = mean_ic(raw["ic_all"], years == int(name))
    return out


PROTOCOL = Protocol(name="walk_forward", layouts=layouts, metrics=metrics, statistic="r2_walk_forward",
                    preference=1, headline=("r2_walk_forward", "rank_ic_walk_forward"), series=("all", "walk_forward"),
                    per_year=PER_YEAR)
