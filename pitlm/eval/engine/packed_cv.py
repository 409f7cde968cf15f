"""The CPU fast path with alpha by inner CV over stock folds (the eval's default for the calibrated protocols):
`PackedCVSolver`, rows mode, one draw per pool worker.

Fold f trains on pattern q = q_of_fold[f] (its allowed super-cells) of every stock fold but own[f]. With
per-draw sums part[q, i] (stock fold i's Gram of [1, X, y] over q's super-cells) and tot[q] = sum_i,
    outer training = tot[q] - part[q, own]        inner fold (f, j), j != own: training tot[q] -
    part[q, own] - part[q, j], test part[q, j]
which is select_alpha's leave-one-stock-fold-out inner CV within f's training blocks (own = -1: no stock
fold left out). One inner training set (q, {own, j}) serves folds (own, q) and (j, q); each is solved by
one Cholesky per alpha of the grid (~7 d^3/3 multiply-adds against eigh's ~9 d^3, and LAPACK's Cholesky runs
near its peak at d ~ 130-260), and an inner test SSE is the quadratic form [b0, beta, -1] G [b0, beta, -1]'
of the test Gram; each fold is then solved with its own alpha.
Exactness: where two alphas' pooled inner SSEs lie within TIE_RTOL of each other (or a solve fails), the
argmin would be decided by rounding, so that draw's choice is left to `BlockSolver.select_alpha` (the generic
path, which keeps eigh: one decomposition for all alphas, on GPUs).
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from pitlm.eval.engine.blocks import BlockSolver
from pitlm.eval.engine.fast import FastLayout
from pitlm.eval.engine.lapack import get_lapack
from pitlm.eval.engine.stats import FoldFit, FoldScore, RidgeProblem
from pitlm.eval.engine.threads import next_locked, run_all, single_thread

# pooled inner SSEs of two alphas closer than this (relative) are a tie that rounding would decide; the fast
# path leaves such a draw to select_alpha, so that the choice stays the generic path's
TIE_RTOL = 1e-7


class PackedCVSolver(FastLayout):
    """Every fold's alpha chosen from `grid` by inner CV (`select_alpha`'s choice; `default` where no inner
    fold is usable), then every fold solved with its alpha."""

    mode = "rows"

    def __init__(self, problem: RidgeProblem, grid, default: float):
        super().__init__(problem)
        if self.K < 2:
            raise ValueError("alpha by inner CV needs a layout with stock folds (n_stock_folds >= 2)")
        self.grid, self.default = list(grid), float(default)
        self._cv_setup()
        self.workers = max(1, min(self.workers, problem.memory_bytes // self._cv_work_bytes()))
        self._generic = BlockSolver(problem, "rows")  # near-tied draws' alphas

    def draw_batch_size(self) -> int:
        """Draws per batch: the scoring residuals within the memory budget (a draw's Grams are a worker's)."""
        per_draw = 8 * 4 * self.n * max(self.K, 1)
        return int(max(1, min(64, self.problem.memory_bytes // max(per_draw, 1))))

    def _cv_setup(self) -> None:
        """Distinct inner training sets (q, excluded stock folds), the live inner folds (f, set, q, j), and the
        live inner folds grouped by test set (q, j)."""
        systems, live = {}, []
        for f in range(self.folds.n_folds):
            q, k = int(self._q_of_fold[f]), int(self._own[f])
            if not self._pattern_sc[q].any():
                continue  # no training cells: no inner fold tests anything (select_alpha's `live`)
            for j in range(self.K):
                if j != k:
                    key = (q, tuple(sorted({k, j} - {-1})))
                    live.append((f, systems.setdefault(key, len(systems)), q, j))
        self._cv_systems = list(systems)
        self._cv_live = np.array(live, dtype=np.int64).reshape(-1, 4)
        tests = {}
        for i, (_, _, q, j) in enumerate(self._cv_live.tolist()):
            tests.setdefault((q, j), []).append(i)
        self._cv_tests = [(q, j, np.array(ls)) for (q, j), ls in tests.items()]
        self._cv_cells = [(np.flatnonzero(p), np.flatnonzero(~p)) for p in self._pattern_sc]
        self._cv_ws: list[_CVWork] = []
        self.cv_fallbacks = 0  # draws whose alpha choice went to select_alpha

    def _cv_work_bytes(self, n_alphas: int = 7) -> int:
        """Bytes of one pool worker's buffers (`_CVWork`): the memory budget caps the workers."""
        Q, m1 = len(self._pattern_sc), self.d + 2
        return 8 * m1 * m1 * (self.K * self._T2 + (Q + 1) * (self.K + 1) + n_alphas + 2)

    def solve(self, counts, assign, ic_groups=None) -> tuple[FoldFit, FoldScore, np.ndarray]:
        counts = np.asarray(counts, dtype=np.float64)
        assign = np.asarray(assign, dtype=np.int64).clip(min=0)
        grid, default = np.asarray(list(self.grid), dtype=np.float64), self.default
        B, F, m = counts.shape[0], self.folds.n_folds, self.d + 1
        out = {"theta": np.zeros((B, F, m)), "n_train": np.zeros((B, F)), "sy_train": np.zeros((B, F)),
               "info": np.ones((B, F), dtype=np.int64), "alpha": np.full((B, F), float(default))}
        while len(self._cv_ws) < self.workers:
            self._cv_ws.append(_CVWork(self, len(grid)))
        pending, lock, fallback = iter(range(B)), threading.Lock(), []

        def worker(ws):
            while (b := next_locked(pending, lock)) is not None:
                if not self._cv_draw(ws, counts, assign, b, grid, default, out):
                    with lock:
                        fallback.append(b)

        with single_thread(True):
            run_all(self.workers, worker, [(ws,) for ws in self._cv_ws[:self.workers]])
            for b in sorted(fallback):  # rare: near-tied alphas, decided as the generic path decides them
                alpha = self._reference_alpha(counts[b], assign[b], grid, default)
                self._cv_draw(self._cv_ws[0], counts, assign, b, grid, default, out, alpha=alpha)
            self.cv_fallbacks += len(fallback)
            fit, score = self._finish(counts, assign, out["theta"], out["n_train"], out["sy_train"], out["info"],
                                      ic_groups)
        return fit, score, out["alpha"]

    def _reference_alpha(self, counts, assign, grid, default) -> np.ndarray:
        """(F,) alphas of one draw by the generic path: block statistics from the rows, `select_alpha`."""
        H = self._generic.block_stats(torch.as_tensor(counts[None], dtype=torch.float64), torch.as_tensor(assign[None]))
        return self._generic.select_alpha(H, grid.tolist(), default)[0].numpy()

    def _cv_draw(self, ws, counts, assign, b, grid, default, out, alpha=None) -> bool:
        """One draw on this thread: block Grams, pattern sums, alphas (unless given), outer solves. False
        when the alpha choice must be left to select_alpha."""
        self._block_grams(counts[b], assign[b], ws.H, parallel=False)
        self._pattern_sums(ws)
        if alpha is None:
            self._inner_solves(ws, grid)
            alpha = self._pick_alpha(ws, grid, default)
            if alpha is None:
                return False
        out["alpha"][b] = alpha
        m, lap, diag = self.d + 1, get_lapack(), np.arange(1, self.d + 1)
        for f in range(self.folds.n_folds):
            q, k = int(self._q_of_fold[f]), int(self._own[f])
            buf = ws.fold
            np.copyto(buf, ws.tot[q]) if k < 0 else np.subtract(ws.tot[q], ws.part[q, k], out=buf)
            out["n_train"][b, f], out["sy_train"][b, f] = buf[0, 0], buf[0, m]
            buf[diag, diag] += alpha[f]
            out["info"][b, f] = lap.spd_full(buf, m)
            out["theta"][b, f] = buf[m, :m]
        return True

    def _pattern_sums(self, ws) -> None:
        """ws.part[q, i] = sum of H[i, t] over pattern q's super-cells (through the complement when shorter),
        ws.tot[q] = sum over stock folds."""
        H = ws.H
        H.sum(1, out=ws.all)
        for q, (inq, outq) in enumerate(self._cv_cells):
            part = ws.part[q]
            if len(inq) == 0:
                part[:] = 0.0
            elif len(outq) + 1 < len(inq):
                np.copyto(part, ws.all)
                for t in outq:
                    part -= H[:, t]
            else:
                np.copyto(part, H[:, inq[0]])
                for t in inq[1:]:
                    part += H[:, t]
            part.sum(0, out=ws.tot[q])

    def _inner_solves(self, ws, grid) -> None:
        """ws.theta[u, a] = [b0, beta, -1] (centred) of inner training set u at alpha grid[a]; ws.n_tr[u], its
        rows; ws.info[u, a], LAPACK's info (1 where the set is empty)."""
        m, lap = self.d + 1, get_lapack()
        G, sys = ws.G, ws.sys
        for u, (q, excl) in enumerate(self._cv_systems):
            np.copyto(G, ws.tot[q])
            for e in excl:
                G -= ws.part[q, e]
            ws.n_tr[u] = G[0, 0]
            if G[0, 0] <= 0:
                ws.info[u] = 1
                continue
            np.copyto(sys, G[None])
            ws.sys_diag += grid[:, None]
            lap.spd_full_many(sys, m, ws.info[u])
            ws.theta[u, :, :m] = sys[:, m, :m]
        ws.theta[..., m] = -1.0

    def _pick_alpha(self, ws, grid, default) -> np.ndarray | None:
        """(F,) alphas minimising the pooled inner SSE of each fold (`default` where no inner fold is usable);
        None where select_alpha must decide (a failed solve, or a near-tie)."""
        live, A, m1 = self._cv_live, len(grid), self.d + 2
        F = self.folds.n_folds
        n_te = ws.part[live[:, 2], live[:, 3], 0, 0]
        usable = (ws.n_tr[live[:, 1]] > 0) & (n_te > 0)
        if (ws.info[live[usable, 1]] != 0).any():
            return None
        sse = np.zeros((len(live), A))
        for q, j, ls in self._cv_tests:
            ls = ls[usable[ls]]
            if len(ls):
                Th = ws.theta[live[ls, 1]].reshape(-1, m1)
                sse[ls] = np.einsum("ij,ij->i", Th @ ws.part[q, j], Th).reshape(-1, A)
        total = np.zeros((F, A))
        np.add.at(total, live[usable, 0], sse[usable])
        any_inner = np.bincount(live[usable, 0], minlength=F) > 0
        if A > 1:
            low = np.sort(total[any_inner], axis=1)
            if not (low[:, 1] - low[:, 0] > TIE_RTOL * np.abs(low[:, 0])).all():  # also catches NaN
                return None
        return np.where(any_inner, grid[total.argmin(1)], float(default))



class _CVWork:
    """One pool worker's buffers for a draw of `PackedCVSolver.solve` (kept: fresh pages cost more than the sums)."""

    def __init__(self, eng: PackedCVSolver, n_alphas: int):
        K, m1, Q, U = eng.K, eng.d + 2, len(eng._pattern_sc), len(eng._cv_systems)
        self.H = np.zeros((K, eng._T2, m1, m1))  # block Grams
        self.all = np.empty((K, m1, m1))  # per stock fold, over every super-cell
        self.part = np.empty((Q, K, m1, m1))  # per pattern and stock fold
        self.tot = np.empty((Q, m1, m1))  # per pattern
        self.G, self.fold = np.empty((m1, m1)), np.empty((m1, m1))
        self.sys = np.empty((n_alphas, m1, m1))  # one inner training set's systems, one per alpha
        # (n_alphas, d) view of their penalised diagonals (entries 1..d: not the intercept's, not y's)
        self.sys_diag = np.lib.stride_tricks.as_strided(self.sys.reshape(-1)[m1 + 1:], (n_alphas, eng.d),
                                                        (8 * m1 * m1, 8 * (m1 + 1)))
        self.theta = np.empty((U, n_alphas, m1))
        self.n_tr = np.empty(U)
        self.info = np.empty((U, n_alphas), dtype=np.int64)


