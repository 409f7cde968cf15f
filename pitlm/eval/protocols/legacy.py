"""`legacy`: the seed's protocol, exactly. Ridge(alpha) with the seed's fixed alpha (also under `alpha_cv`);
`r2_leakage_off` = R2 on rows dated >= test_start of a fit on rows <= train_end; `r2_leakage_on` = mean over
sklearn GroupKFold(n_splits) by stock of the fold R2s; `leakage_premium` = on - off. With rank IC:
`rank_ic_leakage_off`, `rank_ic_leakage_on`, `rank_ic_premium`. Its long-short series is the chronological test
split's (`sharpe_leakage_off`): GroupKFold's "on" predictions mix dates and are not a backtest.
"""

from __future__ import annotations

import numpy as np

from pitlm.errors import PitlmError
from pitlm.eval.protocols import Protocol
from pitlm.eval.protocols.run import Panel, ProtocolConfig, fold_r2, mean_ic
from pitlm.eval.splitters import PanelFolds, legacy_folds


def layouts(calendar: np.ndarray, cfg: ProtocolConfig) -> dict[str, PanelFolds]:
    """One layout: fold 0 the chronological split, folds 1.. GroupKFold's; each side must have rows."""
    chrono = legacy_folds(calendar, cfg.train_end, cfg.test_start, cfg.n_splits)
    for cell, side in ((0, "train"), (1, "test")):
        if not (chrono.cell_of_pos == cell).any():
            raise PitlmError(f"legacy: no rows on the chronological {side} side (train_end={cfg.train_end}, "
                             f"test_start={cfg.test_start}, panel {calendar[0]}..{calendar[-1]})")
    return {"legacy": chrono}


def ic_groups(folds: PanelFolds) -> dict[str, list[int]]:
    """Two out-of-fold sets: "off" the chronological test split, "on" GroupKFold's folds (each row tested once)."""
    return {"off": [0], "on": list(range(1, folds.n_folds))}


def metrics(raw: dict, layouts: dict, panel: Panel, groups_ok: np.ndarray) -> dict[str, np.ndarray]:
    """Fold 0 is the chronological split, folds 1.. GroupKFold's; a draw missing either side is skipped."""
    raw = raw["legacy"]
    r2 = fold_r2(raw)
    off, on = r2[:, 0], np.where(groups_ok, r2[:, 1:].mean(1), np.nan)
    both = np.isfinite(off) & np.isfinite(on)
    off, on = np.where(both, off, np.nan), np.where(both, on, np.nan)
    out = {"r2_leakage_off": off, "r2_leakage_on": on, "leakage_premium": on - off}
    if "ic_off" in raw:
        ic_off, ic_on = mean_ic(raw["ic_off"]), np.where(groups_ok, mean_ic(raw["ic_on"]), np.nan)
        out.update(rank_ic_leakage_off=ic_off, rank_ic_leakage_on=ic_on, rank_ic_premium=ic_on - ic_off)
    return out


PROTOCOL = Protocol(
    name="legacy", layouts=layouts, metrics=metrics, ic_groups=ic_groups,
    statistic="leakage_premium", reduction="premium_reduction", preference=2,  # the seed's artifact: last resort
    headline=("r2_leakage_off", "r2_leakage_on", "leakage_premium", "rank_ic_leakage_off", "rank_ic_leakage_on",
              "rank_ic_premium"),
    series=("off", "leakage_off"), fixed_alpha=True)
