"""The CPU fast path's common ground (`FastLayout`), for separable layouts: super-cells, training patterns and
test groups of the layout; per-draw block Gram matrices of the rows; scoring from residuals.

Fold f trains on cells allowed[f] of every stock fold but own[f] and is scored on the rows it tests. Training
systems are Gram matrices of Z = [1, X, y] (centred): with the intercept first, Cholesky's first pivot is n and
the rest is the centred X'X + alpha I that scikit-learn factorises; Z'y rides along. Test sides need no
statistics: every row is tested by one fold (per group), so SSE comes from the rows' residuals, one GEMM of the
rows against the fold coefficients (n*d multiply-adds per fold group instead of a d x d Gram per fold); the
out-of-fold predictions for the rank IC come from the same GEMM. Solves run LAPACK through ctypes (GIL
released) on a pool of `workers` threads, one BLAS thread each.
"""

from __future__ import annotations

import numpy as np
import torch

from pitlm.eval.engine.stats import FoldFit, FoldScore, RidgeProblem, Solver
from pitlm.eval.engine.threads import blas_threads, chunks, par_matmul, run_all, single_thread

BIG_BLOCK = 2e8  # rows mode: mean block work (rows x (d+2)^2) above which blocks run one at a time


class FastLayout(Solver):
    """The layout as the fast path sees it: `_own` (F,) each fold's own stock fold (-1: none), super-cells
    (cells that every training pattern takes or leaves together), training patterns over them with the
    contiguous fold ranges that share one, and test groups (folds sharing their tested cells whose own stock
    folds differ, so that a row of a draw is tested by at most one fold of a group)."""

    def __init__(self, problem: RidgeProblem):
        super().__init__(problem)
        assert problem.sep is not None and problem.device.type == "cpu", "the fast path: separable layouts, CPU"
        own, allowed, inblock = self.problem.sep
        self._own = np.asarray(own)
        m = self.d + 1
        self._tri = m * (m + 1) // 2
        self._training_patterns(allowed.cpu().numpy() > 0)
        self._test_groups = self._group_tests(inblock.cpu().numpy() > 0)
        self._H = self._bufs = self._out = self._Z = None  # work buffers, allocated on first use

    def _training_patterns(self, allowed: np.ndarray) -> None:
        """Super-cells, each row's super-cell, the training patterns over cells and super-cells, and the
        contiguous fold ranges that share a pattern, from `allowed` (F, T): each fold's training cells."""
        F = self.folds.n_folds
        # super-cells: cells that every training pattern takes or leaves together; -1: in no training set
        used = allowed.any(0)
        sig, sc = np.unique(allowed.T, axis=0, return_inverse=True)
        sc = np.asarray(sc).reshape(-1)
        keep_sig = np.flatnonzero(sig.any(1))
        remap = np.full(len(sig), -1)
        remap[keep_sig] = np.arange(len(keep_sig))
        self._sc_of_cell = np.where(used, remap[sc], -1)
        self._T2 = len(keep_sig)
        self._sc_row = self._sc_of_cell[self.problem.cell_np]
        # training patterns over super-cells, and contiguous fold ranges that share one
        pats, q_of_fold = np.unique(allowed, axis=0, return_inverse=True)
        q_of_fold = np.asarray(q_of_fold).reshape(-1)
        self._q_of_fold = q_of_fold
        self._train_cells_of_pattern = pats  # (Q, T) bool
        self._pattern_sc = np.array([[bool(pats[q][self._sc_of_cell == t].any()) for t in range(self._T2)]
                                     for q in range(len(pats))], dtype=bool).reshape(len(pats), self._T2)
        starts = np.flatnonzero(np.r_[True, q_of_fold[1:] != q_of_fold[:-1]])
        self._train_groups = [(int(a), int(b), int(q_of_fold[a]))
                              for a, b in zip(starts, np.r_[starts[1:], F], strict=True)]

    def _group_tests(self, inblock: np.ndarray) -> list[tuple]:
        """Test groups (members, rows, their [1, X, y], their stocks): folds sharing their tested cells (and
        those cells' rows) whose own stock folds differ, so that a row of a draw is tested by at most one fold
        of its group; `inblock` (F, T): each fold's test cells."""
        tpats, t_of_fold = np.unique(inblock, axis=0, return_inverse=True)
        t_of_fold = np.asarray(t_of_fold).reshape(-1)
        groups = []
        for r in range(len(tpats)):
            rows = np.flatnonzero(tpats[r][self.problem.cell_np])
            if len(rows) == 0:
                continue
            Zr = self.problem.Zy if len(rows) == self.n else self.problem.Zy[rows]
            folds_r = np.flatnonzero(t_of_fold == r)
            split = [folds_r[self._own[folds_r] >= 0]] + [[f] for f in folds_r[self._own[folds_r] < 0]]
            for members in split:
                while len(members):  # a repeated own stock fold starts another group
                    _, first = np.unique(self._own[members], return_index=True)
                    take = np.sort(first)
                    groups.append((np.asarray(members)[take], rows, Zr, self.problem.stock_np[rows]))
                    members = np.delete(np.asarray(members), take)
        return groups

    def threads(self):
        """Single-threaded torch and BLAS: the fast path runs its own pool of threads, one BLAS thread each."""
        return single_thread(True)

    def _finish(self, counts, assign, theta, n_train, sy_train, info, ic_groups) -> tuple[FoldFit, FoldScore]:
        """Folds that could not be fit predict their training mean (sklearn has no such fit; the protocols
        skip them); then score every fold from its test rows."""
        ok = (info == 0) & (n_train > 0)
        theta[~ok] = 0.0
        theta[..., 0] = np.where(ok, theta[..., 0], sy_train / np.maximum(n_train, 1.0))
        score = self._score_rows(counts, assign, theta, ic_groups)
        t = torch.from_numpy
        return FoldFit(t(theta[..., 1:]), t(theta[..., 0].copy()), t(ok), t(n_train)), score

    def _block_grams(self, counts, assign, H: np.ndarray, parallel: bool = True) -> None:
        """One draw's count-weighted Gram matrices of [1, X, y] per (stock fold, super-cell) block, into H (K,
        T2, m1, m1): one syrk per block, blocks spread over the pool (`parallel`) or all on this thread (a pool
        worker's own draw)."""
        K, T2, m1 = self.K, self._T2, self.d + 2
        w = counts[self.problem.stock_np]
        k_row = assign[self.problem.stock_np] if K > 1 else np.zeros(self.n, dtype=np.int64)
        keep = np.flatnonzero((w > 0) & (self._sc_row >= 0))
        key = k_row[keep] * T2 + self._sc_row[keep]
        o = np.argsort(key, kind="stable")
        keep, key = keep[o], key[o]
        keys, starts = np.unique(key, return_index=True)
        ends = np.r_[starts[1:], len(key)]
        flatH = H.reshape(K * T2, m1, m1)
        filled = np.zeros(K * T2, dtype=bool)
        filled[keys] = True
        flatH[~filled] = 0.0

        def block(k, idx):
            Z = self.problem.Zy[idx]
            Z *= np.sqrt(w[idx])[:, None]
            np.matmul(Z.T, Z, out=flatH[k])  # numpy uses syrk for a.T @ a

        sizes = ends - starts
        by_size = np.argsort(-sizes, kind="stable")
        if not parallel:
            for i in by_size:
                block(int(keys[i]), keep[starts[i]:ends[i]])
        elif sizes.mean() * m1 * m1 > BIG_BLOCK:  # one at a time, BLAS threads inside (~1.3x the pool's rate)
            self._big_blocks(keep, keys, starts, ends, by_size, w, flatH)
        else:
            run_all(self.workers, block, [(int(keys[i]), keep[starts[i]:ends[i]]) for i in by_size])

    def _big_blocks(self, keep, keys, starts, ends, by_size, w, flatH) -> None:
        """Seed-scale blocks, one at a time: rows gathered by the pool into a kept buffer, then one syrk on
        `workers` BLAS threads."""
        sizes = ends - starts
        if self._Z is None or len(self._Z) < sizes.max():  # kept: fresh pages cost ~as much as the gather
            self._Z = np.empty((int(sizes.max() * 1.25), self.d + 2))

        def gather(Z, idx, lo, hi):
            np.take(self.problem.Zy, idx[lo:hi], axis=0, out=Z[lo:hi])
            Z[lo:hi] *= np.sqrt(w[idx[lo:hi]])[:, None]

        for i in by_size:
            idx = keep[starts[i]:ends[i]]
            Z = self._Z[:len(idx)]
            run_all(self.workers, gather, [(Z, idx, lo, hi) for lo, hi in chunks(len(idx), self.workers)])
            with blas_threads(self.workers):
                np.matmul(Z.T, Z, out=flatH[int(keys[i])])

    def _score_rows(self, counts, assign, theta, ic_groups=None) -> FoldScore:
        """Test-side sums of every fold from its tested rows' residuals: SSE, n, sum y, sum y^2 (weights =
        counts; a row is tested by fold f when its cell is in f's test cells and its stock fold is f's own).
        Per test group one GEMM gives every member's predictions [1, x] . [b0, beta]; each (row, draw) keeps
        its own fold's, and the sums are weighted bincounts over (draw, fold). `ic_groups`: the kept
        predictions are also the groups' out-of-fold predictions (`FoldScore.oof`)."""
        B, F, m = counts.shape[0], self.folds.n_folds, self.d + 1
        sse, n, sy, syy = (np.zeros((B, F)) for _ in range(4))
        oof = None if ic_groups is None else [(np.zeros((B, self.n)), np.zeros((B, self.n))) for _ in ic_groups]
        for members, rows, Zr, stock in self._test_groups:
            G, R = len(members), len(rows)
            res = np.empty((R, B * G))
            par_matmul(Zr[:, :m], theta[:, members, :].reshape(-1, m).T, res, self.workers)
            own = self._own[members]  # everything below is (R, B), C-ordered
            if own[0] < 0:
                g = np.zeros((R, B), dtype=np.int64)
                c = counts.T[stock]
            else:
                pos = np.full(self.K, -1)
                pos[own] = np.arange(G)
                g = pos[assign.T[stock]]
                c = counts.T[stock] * (g >= 0)
                g = g.clip(min=0)
            pred = np.take_along_axis(res.reshape(R, B, G), g[:, :, None], axis=2)[:, :, 0]
            key = (g + np.arange(B) * G).ravel()
            y = Zr[:, m:m + 1]
            e, cy = pred - y, c * y
            for out, w in ((sse, c * e * e), (n, c), (sy, cy), (syy, cy * y)):
                out[:, members] = np.bincount(key, weights=w.ravel(), minlength=B * G).reshape(B, G)
            if oof is not None:
                self._keep_oof(oof, ic_groups, members, rows, pred, c)
        sst = syy - sy ** 2 / np.where(n > 0, n, 1.0)
        t = torch.from_numpy
        return FoldScore(t(sse), t(sst), t(n), t(sy), t(syy), oof)

    def _keep_oof(self, oof, ic_groups, members, rows, pred, c) -> None:
        """Write one test group's (R, B) predictions and weights into the out-of-fold arrays of the IC group
        that holds its folds (the group's folds test disjoint rows, so tested entries never collide)."""
        held = [i for i, g in enumerate(ic_groups) if set(members.tolist()) <= set(g)]
        assert held, f"folds {members.tolist()} of one test group span several IC groups"
        P, W = oof[held[0]]
        tested = c.T > 0
        block = P[:, rows]
        np.copyto(block, pred.T + self.problem.mean_y, where=tested)
        P[:, rows] = block
        W[:, rows] += c.T

