"""The CPU fast path with fixed alpha (every protocol but alpha by inner CV): `PackedSolver`.

Two ways to a fold's training Gram of Z = [1, X, y], chosen by cost and memory (`cost.packed_mode`):
- "stats": per (stock, training pattern) Gram matrices kept in LAPACK's rectangular full packed (RFP) format,
  half a full Gram; a batch of draws is one GEMM per pattern group (fold weights count x [stock fold != own]),
  written in RFP, which dpftrf factorises in place (no unpacking).
- "rows": per draw, one syrk per (stock fold, super-cell) block from the count-weighted rows, blocks combined
  slab by slab into each fold's training Gram (total minus own stock fold), factorised by dpotrf.
"""

from __future__ import annotations

import numpy as np

from pitlm.eval.engine.cost import packed_mode
from pitlm.eval.engine.fast import FastLayout
from pitlm.eval.engine.lapack import get_lapack, rfp_index
from pitlm.eval.engine.stats import FoldFit, FoldScore, RidgeProblem
from pitlm.eval.engine.threads import chunks, par_matmul, run_all, single_thread

STATS_BATCH_BYTES = 32 << 20  # stats mode: packed systems per batch, at most


class PackedSolver(FastLayout):
    """Fixed alpha on the fast path; `mode` "auto" is resolved by the cost model."""

    def __init__(self, problem: RidgeProblem, mode: str = "auto", alpha: float = 1.0):
        super().__init__(problem)
        self.alpha = float(alpha)
        n_train_rows = int((self._sc_row >= 0).sum())
        self.mode = packed_mode(problem, len(self._train_cells_of_pattern), n_train_rows, self._T2, mode)
        if self.mode == "stats":
            self._pattern_stats()

    def draw_batch_size(self) -> int:
        """stats mode: the batch's packed systems, at most the larger of ~32 MB and the per-stock statistics
        that the batch's GEMMs read once (fresh pages, and systems falling out of the cache before their
        Cholesky, cost more than re-reading the statistics); both modes: scoring residuals."""
        F = self.folds.n_folds
        packed = 8 * F * (self._tri + self.d + 1) if self.mode == "stats" else 0
        per_draw = packed + 8 * 4 * self.n * max(self.K, 1)
        cap = 64 if not packed else max(1, min(64, max(STATS_BATCH_BYTES, self._P.nbytes) // packed))
        return int(max(1, min(cap, self.problem.memory_bytes // max(per_draw, 1))))

    def solve(self, counts, assign, ic_groups=None) -> tuple[FoldFit, FoldScore, np.ndarray]:
        counts = np.asarray(counts, dtype=np.float64)
        assign = np.asarray(assign, dtype=np.int64).clip(min=0)
        B, F, m = counts.shape[0], self.folds.n_folds, self.d + 1
        theta = np.zeros((B, F, m))
        n_train, sy_train = np.zeros((B, F)), np.zeros((B, F))
        info = np.ones((B, F), dtype=np.int64)
        with single_thread(True):
            if self.mode == "stats":
                self._fit_stats_mode(counts, assign, self.alpha, theta, n_train, sy_train, info)
            else:
                for b in range(B):
                    self._fit_rows_mode(counts[b], assign[b], self.alpha, theta[b], n_train[b], sy_train[b], info[b])
            fit, score = self._finish(counts, assign, theta, n_train, sy_train, info, ic_groups)
        return fit, score, np.full((B, F), self.alpha)

    def _pattern_stats(self) -> None:
        """(Q, S, tri + m) packed training statistics of every stock over every training pattern's cells:
        [Z'Z in RFP order (Z = [1, X]), Z'y]; stocks split over the pool."""
        m = self.d + 1
        self._rfp, self._rfp_diag = rfp_index(m)
        rfp = (self._rfp // m) * (m + 1) + self._rfp % m  # the same entries of an (m+1) x (m+1) matrix
        pats = self._train_cells_of_pattern
        P = np.empty((len(pats), self.S, self._tri + m))
        order = np.argsort(self.problem.stock_np, kind="stable")
        bounds = np.searchsorted(self.problem.stock_np[order], np.arange(self.S + 1))
        in_q = [q[self.problem.cell_np] for q in pats]

        def stocks(lo, hi):
            G = np.empty((m + 1, m + 1))
            for s in range(lo, hi):
                rows = order[bounds[s]:bounds[s + 1]]
                for q in range(len(pats)):
                    idx = rows[in_q[q][rows]]
                    if len(idx) == 0:
                        P[q, s] = 0.0
                        continue
                    Z = self.problem.Zy[idx]
                    np.matmul(Z.T, Z, out=G)
                    np.take(G.reshape(-1), rfp, out=P[q, s, :self._tri])
                    P[q, s, self._tri:] = G[m, :m]

        with single_thread(True):
            run_all(self.workers, stocks, chunks(self.S, self.workers))
        self._P = P

    def _fit_stats_mode(self, counts, assign, alpha, theta, n_train, sy_train, info) -> None:
        B, F, S, m = counts.shape[0], self.folds.n_folds, self.S, self.d + 1
        pt = self._tri + m
        if self._out is None or self._out.size < F * B * pt:  # kept: fresh pages cost more than the GEMM
            self._out = np.empty(F * B * pt)
        out = self._out[:F * B * pt].reshape(F, B, pt)
        for a, b, q in self._train_groups:
            own = self._own[a:b]
            W = counts[None] * ((assign[None] != own[:, None, None]) | (own < 0)[:, None, None])
            par_matmul(W.reshape(-1, S), self._P[q], out[a:b].reshape(-1, pt), self.workers)
        flat = out.reshape(F * B, pt)
        n_train[:] = flat[:, self._rfp_diag[0]].reshape(F, B).T
        sy_train[:] = flat[:, self._tri].reshape(F, B).T
        flat[:, self._rfp_diag[1:]] += alpha
        res = np.empty(F * B, dtype=np.int64)
        lap = get_lapack()

        def solve(lo, hi):
            for i in range(lo, hi):
                res[i] = lap.spd_rfp(flat[i], m)

        run_all(self.workers, solve, chunks(F * B, self.workers))
        theta[:] = flat[:, self._tri:].reshape(F, B, m).transpose(1, 0, 2)
        info[:] = res.reshape(F, B).T

    def _fit_rows_mode(self, counts, assign, alpha, theta, n_train, sy_train, info) -> None:
        """One draw: (F, m) solutions from count-weighted block Gram matrices of the rows."""
        F, m = self.folds.n_folds, self.d + 1
        m1 = m + 1
        if self._H is None:
            self._H = np.zeros((self.K, self._T2, m1, m1))
            self._bufs = np.empty((F, m1, m1))
        H, bufs = self._H, self._bufs
        self._block_grams(counts, assign, H)
        # fold training Gram matrices, slab by slab of rows so that the sums stay in cache
        slabs = chunks(m1, max(1, m1 * m1 // 16384))
        run_all(self.workers, self._combine,
                 [(H, bufs, part) for part in np.array_split(np.arange(len(slabs)), self.workers) if len(part)])
        n_train[:], sy_train[:] = bufs[:, 0, 0], bufs[:, 0, m]
        diag = np.arange(1, m)
        bufs[:, diag, diag] += alpha
        lap = get_lapack()

        def fold(f):
            info[f] = lap.spd_full(bufs[f], m)
            theta[f] = bufs[f, m, :m]

        run_all(self.workers, fold, [(f,) for f in range(F)])

    def _combine(self, H: np.ndarray, bufs: np.ndarray, slab_ids) -> None:
        """Rows of the slabs `slab_ids` of every fold's training Gram from the block Gram matrices H (K, T2, m1,
        m1): the pattern's total over stock folds minus the own stock fold's (via the complement when shorter)."""
        T2, m1 = H.shape[1], H.shape[-1]
        slabs = chunks(m1, max(1, m1 * m1 // 16384))
        pats = self._pattern_sc
        for i in slab_ids:
            lo, hi = slabs[i]
            Hs = H[:, :, lo:hi]
            U = Hs.sum(0)  # (T2, r, m1): every stock fold
            Hall = None
            UA = {}
            for f in range(len(self._own)):
                q, k = int(self._q_of_fold[f]), int(self._own[f])
                inq, outq = np.flatnonzero(pats[q]), np.flatnonzero(~pats[q])
                if q not in UA:
                    UA[q] = U[inq].sum(0) if len(inq) > 1 else U[inq[0]]
                buf = bufs[f, lo:hi]
                if k < 0:
                    np.copyto(buf, UA[q])
                elif 2 * len(inq) > T2 + 1:  # fewer terms through the complement
                    if Hall is None:
                        Hall = Hs.sum(1)
                    np.subtract(UA[q], Hall[k], out=buf)
                    for t in outq:
                        buf += Hs[k, t]
                else:
                    np.subtract(UA[q], Hs[k, inq[0]], out=buf)
                    for t in inq[1:]:
                        buf -= Hs[k, t]

