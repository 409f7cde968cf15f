"""Exact Ridge-with-intercept for every fold of every bootstrap draw, from cluster sufficient statistics.

A Ridge fit with intercept and a test-set R2 depend on their rows only through sums (n, sum x, sum y, X'X,
X'y, y'y: `stats`), and a stock-clustered bootstrap draw only re-weights each stock's sums by its count, so
every fold of every draw is one Cholesky of a d x d system instead of a pass over its rows. `choose_solver`
picks, from the layout, the device, alpha's handling and the memory budget, one of:

- `PackedSolver` (packed.py): fixed alpha on the CPU (every protocol but alpha by inner CV). Training Grams of
  Z = [1, X, y] per (stock, training pattern) in LAPACK's packed format ("stats") or per draw from the rows
  ("rows"); test sides scored from residuals (fast.py); LAPACK through ctypes on a pool of threads (lapack.py).
- `PackedCVSolver` (packed_cv.py): alpha by inner leave-one-stock-fold-out CV on the CPU, rows mode, one
  Cholesky per inner training set and alpha, one draw per pool worker.
- `DirectSolver` (direct.py): fixed alpha off the CPU: fold statistics straight from per-stock statistics.
- `BlockSolver` (blocks.py): the generic path: block statistics per (stock fold, time cell), and alpha by inner
  CV by eigendecomposition (`select_alpha`), which the fast path's near-tied draws defer to.

Every solver's `solve(counts, assign, ic_groups)` gives (`FoldFit`, `FoldScore`, (B, F) alphas); rank ICs of
the out-of-fold predictions: `RankIC` (rankic.py). Threads and the pool: threads.py; cost model: cost.py.
"""

from __future__ import annotations

from pitlm.eval.engine.blocks import BlockSolver
from pitlm.eval.engine.cost import block_mode
from pitlm.eval.engine.direct import DirectSolver
from pitlm.eval.engine.packed import PackedSolver
from pitlm.eval.engine.packed_cv import PackedCVSolver
from pitlm.eval.engine.rankic import RankIC, per_date_rank_ic
from pitlm.eval.engine.stats import FoldFit, FoldScore, RidgeProblem, Solver
from pitlm.eval.splitters import PanelFolds

MODES = ("auto", "stats", "rows")


def choose_solver(X, y, stock, cell, n_stocks: int, folds: PanelFolds, *, alpha: float, grid=None,
                  device: str = "cpu", mode: str = "auto", memory_bytes: int | None = None) -> Solver:
    """The solver for one design on one fold layout: fixed `alpha`, or (`grid` given) each fold's alpha by
    inner CV over `grid` (`alpha` where no inner fold is usable). `mode` "stats" or "rows" forces where block
    sums come from (`auto`: the cost model's choice); `memory_bytes`: the statistics budget (default: a
    quarter of free RAM / GPU memory). See the module doc for which solver runs where."""
    if mode not in MODES:
        raise ValueError(f"engine mode must be auto, stats or rows (got {mode!r})")
    problem = RidgeProblem(X, y, stock, cell, n_stocks, folds, device=device, memory_bytes=memory_bytes)
    fast = problem.sep is not None and problem.device.type == "cpu"
    if grid is not None:
        if fast and problem.K >= 2 and mode != "stats":
            return PackedCVSolver(problem, grid, alpha)
        return BlockSolver(problem, block_mode(problem, mode), alpha, grid)
    if fast:
        return PackedSolver(problem, mode, alpha)
    chosen = block_mode(problem, mode, direct=True)
    if chosen == "stats" and problem.sep is not None:
        return DirectSolver(problem, alpha)
    return BlockSolver(problem, chosen, alpha)


__all__ = ["BlockSolver", "DirectSolver", "FoldFit", "FoldScore", "PackedCVSolver", "PackedSolver", "RankIC",
           "RidgeProblem", "Solver", "choose_solver", "per_date_rank_ic"]
