"""Exact Ridge-with-intercept for every fold of every bootstrap draw, from cluster sufficient statistics.

A Ridge fit with intercept (scikit-learn semantics: X and y centred by their training means, alpha*I on the
coefficients only) depends on its training rows only through n, sum x, sum y, X'X, X'y, y'y, and a test-set
R2 (sklearn's r2_score: 1 - SSE/SST, SST around the test mean) only through the same sums over the test rows:

    A = X'X - sx sx'/n + alpha I,   b = X'y - sx sy/n,   beta = A^-1 b,   b0 = (sy - sx'beta)/n
    SSE = y'y - 2 b0 sy - 2 beta'X'y + n b0^2 + 2 b0 beta'sx + beta'X'X beta,   SST = y'y - sy^2/n

A stock-clustered bootstrap draw multiplies stock s's rows by its count c_s (a duplicated stock keeps its id,
so its copies share a fold), so every fold's sums are sums over (stock fold, time cell) *blocks* of
count-weighted stock sums. Two ways to get the block sums of a draw, chosen by cost and memory:

- "stats": per-(stock, cell) sums are computed once; a batch of draws is one GEMM (draws x stock folds,
  stocks) @ (stocks, cells x stats). Best when stocks have many rows per cell and d is small.
- "rows": one pass per draw of count-weighted Gram matrices per block straight from the rows (draws with
  count 0 skip their rows). Used when per-stock d x d statistics do not fit (the seed: 1000 stocks x 2053^2).
Either way each fold costs one Cholesky of its d x d system instead of a pass over its rows.

Statistics are flat vectors [n, sy, yy, sx (d), sxy (d), X'X (d*d)]: full Gram matrices rather than packed
triangles, so that a fold's system is a view, never an unpacking gather (memory-bound, and slower than the
GEMM it would save). X and y are centred by their global means first (Ridge with intercept and R2 are
invariant to that shift; it keeps the sums well scaled).

Fixed alpha on the CPU (every protocol but alpha by inner CV) takes a faster path, `solve_batch`, built on
two facts: a fold's training system is the Gram matrix of Z = [1, X] (intercept first: Cholesky's first pivot
is n, the rest is the centred X'X + alpha I) with Z'y beside it, and a fold's test side needs no statistics at
all -- each (row, draw) is tested by one fold of its group, so SSE comes from residuals, one GEMM of the rows
against the fold coefficients. Training statistics are kept per (stock, training pattern) in LAPACK's
rectangular full packed (RFP) format, half a full Gram and factorised in place by dpftrf ("stats"), or built
per draw by syrk per (stock fold, super-cell) block and combined slab by slab ("rows"). The factorisations
are LAPACK's, called through ctypes so that a pool of threads (one BLAS thread each) runs one per core.

Alpha by inner CV on the CPU (the eval's default for the calibrated protocols) takes the same path in rows
mode, `solve_batch_cv`, one draw per pool worker: from the draw's block Gram matrices, per training pattern
and stock fold sums give every outer and inner (leave one more stock fold out) training Gram and every inner
test Gram; each distinct inner training set is solved by one Cholesky per alpha of the grid (~7 d^3/3
multiply-adds against eigh's ~9 d^3, and LAPACK's Cholesky runs near its peak at d ~ 130-260), an inner SSE is
the quadratic form of [b0, beta, -1] with its test Gram, and each fold is then solved with its own alpha.
The choice is `select_alpha`'s (the generic path, which keeps eigh: one decomposition for all alphas, on
GPUs): where two alphas' pooled SSEs lie within TIE_RTOL (rounding would decide), the draw is handed to it.
Out-of-fold predictions for the rank IC come from the scoring GEMM, and the rank IC (`RankIC`) sorts the
target's per-date order once.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from pitlm.eval.splitters import PanelFolds

_CONTROLLER = None
STATS_BATCH_BYTES = 32 << 20  # stats mode: packed systems per batch, at most
BIG_BLOCK = 2e8  # rows mode: mean block work (rows x (d+2)^2) above which blocks run one at a time
# alpha by inner CV: pooled inner SSEs of two alphas closer than this (relative) are a tie that rounding would
# decide; the fast path leaves such a draw to select_alpha, so that the choice stays the generic path's
TIE_RTOL = 1e-7


def _blas_threads(n: int):
    """Context limiting BLAS libraries to n threads (threadpoolctl; its library scan, ~ms, done once)."""
    global _CONTROLLER
    if _CONTROLLER is None:
        import scipy.linalg  # noqa: F401  (scipy's own OpenBLAS, behind its Cython LAPACK, must be loaded)
        from threadpoolctl import ThreadpoolController

        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER.limit(limits=n)


@contextmanager
def _single_thread(active: bool):
    """Run torch and BLAS on one thread: small ops gain nothing from threads, and on a shared CPU the
    pools' barriers stall whenever a core is busy elsewhere."""
    if not active:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _blas_threads(1):
            yield
    finally:
        torch.set_num_threads(before)


@dataclass
class FoldFit:
    """Per (draw, fold): coefficients and intercept in centred coordinates, and whether the fit exists."""

    beta: torch.Tensor  # (B, F, d)
    intercept: torch.Tensor  # (B, F)
    ok: torch.Tensor  # (B, F) bool: training side non-empty and the system factorised
    n_train: torch.Tensor  # (B, F)


@dataclass
class FoldScore:
    """Per (draw, fold) test-side sums: SSE, SST (around the fold's test mean), n, sum y, sum y^2."""

    sse: torch.Tensor
    sst: torch.Tensor
    n: torch.Tensor
    sy: torch.Tensor
    syy: torch.Tensor
    # fast path, when asked for: per group of folds with disjoint test rows, (B, n) out-of-fold predictions
    # (original units) and (B, n) row weights (bootstrap count where a fold of the group tests the row, else 0)
    oof: list[tuple[np.ndarray, np.ndarray]] | None = None

    @property
    def r2(self) -> torch.Tensor:
        return 1.0 - self.sse / self.sst


def default_memory_bytes(device: torch.device) -> int:
    """Budget for statistics: a quarter of free GPU memory, or a quarter of available RAM (at most 8 GiB)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.25)
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
        return int(min(info.get("MemAvailable", 8 << 30) * 0.25, 8 << 30))
    except OSError:
        return 2 << 30


class ClusterRidge:
    """Ridge from cluster statistics for one design (X, y) and one fold layout (`PanelFolds`).

    `stock` (n,) indexes stocks 0..n_stocks-1, `cell` (n,) indexes the layout's time cells. Draws are count
    vectors over stocks (all ones = the original sample); `assign` gives each stock's stock fold per draw
    (ignored when the layout does not split stocks)."""

    def __init__(self, X, y, stock, cell, n_stocks: int, folds: PanelFolds, *, device: str = "cpu",
                 mode: str = "auto", memory_bytes: int | None = None, fixed_alpha: bool = False,
                 inner_cv: bool = False):
        if fixed_alpha and inner_cv:
            raise ValueError("fixed_alpha and inner_cv exclude each other")
        self.device = torch.device(device)
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        assert X.ndim == 2 and len(X) == len(y) == len(stock) == len(cell) > 0
        self.n, self.d = X.shape
        self.S, self.folds = n_stocks, folds
        # only cells that hold rows take part: an empty cell would only add zeros to every GEMM
        present, cell = np.unique(np.asarray(cell), return_inverse=True)
        self.train_cells, self.test_cells = folds.train[:, :, present], folds.test[:, :, present]
        self.K, self.T = folds.n_stock_folds, len(present)
        self.mean_x, self.mean_y = X.mean(0), float(y.mean())
        # [1, X, y] centred, one row per row: the fast path's Gram matrices hold n, sums, X'X, X'y, y'y at once
        self.Zy = np.empty((self.n, self.d + 2))
        self.Zy[:, 0] = 1.0
        np.subtract(X, self.mean_x, out=self.Zy[:, 1:self.d + 1])
        self.Zy[:, -1] = y - self.mean_y
        kw = {"dtype": torch.float64, "device": self.device}
        if self.device.type == "cpu":  # views, no second copy of X
            self.X, self.y = torch.from_numpy(self.Zy)[:, 1:self.d + 1], torch.from_numpy(self.Zy)[:, -1]
        else:
            self.X, self.y = torch.as_tensor(self.Zy[:, 1:self.d + 1], **kw), torch.as_tensor(self.Zy[:, -1], **kw)
        self._stock_np, self._cell_np = np.asarray(stock, dtype=np.int64), np.asarray(cell, dtype=np.int64)
        self.stock = torch.as_tensor(self._stock_np, device=self.device)
        self.cell = torch.as_tensor(self._cell_np, device=self.device)
        self.p = 3 + 2 * self.d + self.d * self.d
        self.train_mask = torch.as_tensor(self.train_cells.reshape(folds.n_folds, -1), **kw)
        self.test_mask = torch.as_tensor(self.test_cells.reshape(folds.n_folds, -1), **kw)
        self._sep = self._separable()
        self.memory_bytes = memory_bytes or default_memory_bytes(self.device)
        if mode not in ("auto", "stats", "rows"):
            raise ValueError(f"engine mode must be auto, stats or rows (got {mode!r})")
        self.workers = max(1, min(torch.get_num_threads(), os.cpu_count() or 1))
        # the fast path, on the CPU for any separable layout (every layout here): fixed alpha (`solve_batch`), or
        # alpha by inner CV over stock folds in rows mode (`solve_batch_cv`, `inner_cv`); fixed alpha elsewhere:
        # the direct path (`direct_fold_stats`); else block statistics (`block_stats`, `select_alpha`)
        fast_layout = self._sep is not None and self.device.type == "cpu"
        self.inner_cv = bool(inner_cv) and fast_layout and self.K >= 2 and mode != "stats"
        self.fast = (bool(fixed_alpha) and fast_layout) or self.inner_cv
        if self.fast:
            self._fast_setup()
            if self.inner_cv:
                self._cv_setup()
                self.workers = max(1, min(self.workers, self.memory_bytes // self._cv_work_bytes()))
            self.mode = "rows" if self.inner_cv else self._choose_fast_mode(mode)
            if self.mode == "stats":
                self._pattern_stats()
            self.cell_stats = self.patterns = None
            return
        self.mode = self._choose_mode(mode, direct=fixed_alpha)
        self.patterns = None
        with self.threads():
            self.cell_stats = self._cell_stats() if self.mode == "stats" else None
            # the direct path (fixed alpha off the CPU): fold statistics straight from per-stock statistics
            self.patterns = self._patterns() if self.mode == "stats" and fixed_alpha else None

    # ---- block statistics -------------------------------------------------------------------------
    def _choose_mode(self, mode: str, direct: bool = False) -> str:
        n_patterns = 2 * self.folds.n_folds if direct and self._sep is not None else 0  # at most
        stats_bytes = self.S * (self.T + min(n_patterns, 2 * self.T)) * self.p * 8
        if mode == "stats" and stats_bytes > self.memory_bytes * 4:
            raise ValueError(f"per-stock statistics need {stats_bytes / 2**30:.1f} GiB; use mode='rows'")
        if mode != "auto":
            return mode
        # Cost per draw in multiply-adds: the direct path does one GEMM per fold and side (2*F*S*p), the block
        # path K*T*S*p (plus 2*F*S*p for layouts that are not separable); the rows pass a rank-k update over the
        # ~63% of rows whose stock is drawn (half of d*d on CPU, where numpy uses syrk) plus one Python step per
        # block. Measured on 2 cores, the rows pass runs ~3x slower per multiply-add than the batched GEMM.
        F = self.folds.n_folds
        if n_patterns:
            gemm = 2 * F * self.S * self.p
        else:
            gemm = (self.K * self.T + (2 * F if self._sep is None else 0)) * self.S * self.p
        rows = 0.63 * self.n * self.d * self.d * (0.5 if self.device.type == "cpu" else 1.0) + 5e5 * self.K * self.T
        return "stats" if stats_bytes <= self.memory_bytes and gemm <= 3 * rows else "rows"

    def _row_stats(self, idx: torch.Tensor, w: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Statistics of rows `idx` weighted by `w` (one block), written into `out` (p,): from the rows scaled
        by sqrt(w), one gather, and X'WX = Xs'Xs is a symmetric rank-k update."""
        d = self.d
        out = torch.empty(self.p, dtype=torch.float64, device=self.device) if out is None else out
        Xs, ys = self.X[idx], self.y[idx]  # gathered copies
        r = torch.ones_like(ys) if w is None else w.sqrt()
        if w is not None:
            Xs.mul_(r[:, None])
            ys = ys * r
        gram = out[3 + 2 * d:].view(d, d)
        # numpy turns A.T @ A into syrk (half a GEMM's flops); only for big blocks: alternating small numpy
        # (OpenBLAS) and torch (OpenMP) calls makes their thread pools fight, >10x slower on 2 cores
        if self.device.type == "cpu" and Xs.shape[0] * d * d > 5e7:
            a = Xs.numpy()
            np.matmul(a.T, a, out=gram.numpy())
        else:
            torch.mm(Xs.T, Xs, out=gram)
        out[0], out[1], out[2] = (r * r).sum(), (r * ys).sum(), (ys * ys).sum()
        torch.mv(Xs.T, r, out=out[3:3 + d])
        torch.mv(Xs.T, ys, out=out[3 + d:3 + 2 * d])
        return out

    def _cell_stats(self) -> torch.Tensor:
        """(S, T*p) statistics of every (stock, cell), unweighted (one small Gram per non-empty cell)."""
        out = torch.zeros(self.S * self.T, self.p, dtype=torch.float64, device=self.device)
        key = self.stock * self.T + self.cell
        order = torch.argsort(key, stable=True)
        keys, sizes = torch.unique_consecutive(key[order], return_counts=True)
        for k, idx in zip(keys.tolist(), torch.split(order, sizes.tolist()), strict=True):
            self._row_stats(idx, out=out[k])
        return out.reshape(self.S, self.T * self.p)

    def block_stats(self, counts: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
        """(B, K*T, p) count-weighted statistics per (stock fold, cell) block for a batch of draws."""
        B = counts.shape[0]
        if self.mode == "stats":
            onehot = torch.nn.functional.one_hot(assign.clamp(min=0), self.K).to(torch.float64)  # (B, S, K)
            W = (counts[:, :, None] * onehot).transpose(1, 2).reshape(B * self.K, self.S)
            return (W @ self.cell_stats).reshape(B, self.K * self.T, self.p)
        out = torch.empty(B, self.K * self.T, self.p, dtype=torch.float64, device=self.device)
        with _single_thread(self.device.type == "cpu" and self.n * self.d * self.d < 5e7 * self.K * self.T):
            for b in range(B):
                self._fill_draw(out[b], counts[b], assign[b])
        return out

    def _fill_draw(self, out: torch.Tensor, counts: torch.Tensor, assign: torch.Tensor) -> None:
        """One draw's (K*T, p) block statistics, straight from the rows."""
        w = counts[self.stock]
        blk = assign.clamp(min=0)[self.stock] * self.T + self.cell
        keep = torch.nonzero(w > 0).squeeze(1)
        order = keep[torch.argsort(blk[keep])]
        keys, sizes = torch.unique_consecutive(blk[order], return_counts=True)
        empty = torch.ones(self.K * self.T, dtype=torch.bool)
        for k, idx in zip(keys.tolist(), torch.split(order, sizes.tolist()), strict=True):
            self._row_stats(idx, w[idx], out=out[k])
            empty[k] = False
        out[empty.to(self.device)] = 0.0

    def _patterns(self) -> dict | None:
        """For separable layouts in stats mode: per side, the per-stock statistics contracted over each
        distinct cell pattern of the folds ((Q, S, p) tensors), and the folds sorted into groups that share
        both patterns, so that each group's statistics are one GEMM into a contiguous slice."""
        if self._sep is None:
            return None
        St = self.cell_stats.view(self.S, self.T, self.p)
        inv, stats = {}, {}
        for side, cells in (("train", self._sep[1]), ("test", self._sep[2])):
            pats, idx = np.unique(cells.cpu().numpy(), axis=0, return_inverse=True)
            P = torch.as_tensor(pats, dtype=torch.float64, device=self.device)
            inv[side], stats[side] = np.asarray(idx).reshape(-1), torch.einsum("qt,stp->qsp", P, St).contiguous()
        key = inv["train"] * (stats["test"].shape[0]) + inv["test"]
        order = np.argsort(key, kind="stable")
        starts = np.flatnonzero(np.r_[True, key[order][1:] != key[order][:-1]])
        ends = np.r_[starts[1:], len(order)]
        groups = [(int(a), int(b), int(inv["train"][order[a]]), int(inv["test"][order[a]])) for a, b in zip(starts, ends, strict=True)]
        return {"stats": stats, "order": order, "groups": groups,
                "unsort": torch.as_tensor(np.argsort(order), device=self.device)}

    @property
    def direct(self) -> bool:
        """Whether fold statistics come straight from per-stock statistics (no block tensor)."""
        return self.patterns is not None

    def direct_fold_stats(self, counts: torch.Tensor, assign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(train, test) statistics of every fold, laid out (F, B, p) with folds in `patterns["order"]`: per
        group one GEMM of per-draw stock weights (count x [stock fold is / is not the fold's own]) against
        the contracted statistics. `fit_stats`/`score_stats` take them; `unsort` restores (B, F)."""
        pt = self.patterns
        own = torch.as_tensor(self._sep[0][pt["order"]], device=self.device)
        B, F = counts.shape[0], len(own)
        everyone = (own < 0)[:, None, None]
        mine = (assign.clamp(min=0)[None, :, :] == own[:, None, None]) | everyone  # (F, B, S)
        w = {"test": counts[None] * mine, "train": counts[None] * (~mine | everyone)}
        out = {side: torch.empty(F, B, self.p, dtype=torch.float64, device=self.device) for side in w}
        for a, b, q_train, q_test in pt["groups"]:
            for side, q in (("train", q_train), ("test", q_test)):
                torch.mm(w[side][a:b].reshape(-1, self.S), pt["stats"][side][q], out=out[side][a:b].view(-1, self.p))
        return out["train"], out["test"]

    def unsort(self, fit: FoldFit, score: FoldScore) -> tuple[FoldFit, FoldScore]:
        """(F, B)-laid, fold-sorted results of the direct path back to (B, F) in fold order."""
        inv = self.patterns["unsort"]

        def back(t):
            return t[inv].transpose(0, 1)

        return (FoldFit(back(fit.beta), back(fit.intercept), back(fit.ok), back(fit.n_train)),
                FoldScore(*(back(getattr(score, k)) for k in ("sse", "sst", "n", "sy", "syy"))))

    def light(self) -> bool:
        """Whether a draw's work is small (< ~5e7 multiply-adds): then one thread is faster (and on a shared
        CPU, far faster: every OpenMP region waits for its slowest, possibly descheduled, thread)."""
        if self.device.type != "cpu":
            return False
        F = self.folds.n_folds
        gemm = 2 * F * self.S * self.p if self.direct else self.K * self.T * self.S * self.p
        work = gemm if self.mode == "stats" else self.n * self.d * self.d
        return work + F * self.d ** 3 / 3 < 5e7

    def threads(self):
        """Context for the draw loop: single-threaded when `light()`, and always for the fast path (which
        runs its own pool of threads, one BLAS thread each)."""
        return _single_thread(self.fast or self.light())

    def draw_batch_size(self) -> int:
        """Draws per batch so that block and fold statistics stay within the memory budget."""
        F = self.folds.n_folds
        if self.fast:  # stats mode: the batch's packed systems, at most the larger of ~32 MB and the per-stock
            # statistics that the batch's GEMMs read once (fresh pages, and systems falling out of the cache
            # before their Cholesky, cost more than re-reading the statistics); both modes: scoring residuals
            packed = 8 * F * (self._tri + self.d + 1) if self.mode == "stats" else 0
            per_draw = packed + 8 * 4 * self.n * max(self.K, 1)
            cap = 64 if not packed else max(1, min(64, max(STATS_BATCH_BYTES, self._P.nbytes) // packed))
            return int(max(1, min(cap, self.memory_bytes // max(per_draw, 1))))
        blocks = 0 if self.direct else self.K * self.T * self.p + F * self.p
        per_draw = 8 * (blocks + 2 * F * self.p + 2 * F * self.d * self.d)
        cap = 256 if self.device.type == "cuda" else 64  # more draws per kernel launch on a GPU
        return int(max(1, min(cap, self.memory_bytes // max(per_draw, 1))))

    # ---- fast path: fixed alpha, separable layouts, CPU ------------------------------------------------
    # Fold f trains on cells allowed[f] of every stock fold but own[f] and is scored on the rows it tests.
    # Training systems are Gram matrices of Z = [1, X, y] (centred): with the intercept first, Cholesky's first
    # pivot is n and the rest is the centred X'X + alpha I that scikit-learn factorises; Z'y rides along.
    # Test sides need no statistics: every row is tested by one fold (per group), so SSE comes from the rows'
    # residuals, n*d multiply-adds per fold group instead of a d x d Gram per fold.
    # - "stats": per (stock, training pattern) packed Gram matrices; a batch of draws is one GEMM per pattern
    #   group (fold weights count x [stock fold != own]), written in LAPACK's rectangular full packed format,
    #   which dpftrf factorises in place (no unpacking).
    # - "rows": per draw, one syrk per (stock fold, super-cell) block from the count-weighted rows, blocks
    #   combined into each fold's training Gram (total minus own stock fold), factorised by dpotrf.
    # Solves run LAPACK through ctypes (GIL released) on a pool of `workers` threads, one BLAS thread each.
    def _fast_setup(self) -> None:
        own, allowed, inblock = self._sep
        self._own = np.asarray(own)
        allowed = allowed.cpu().numpy() > 0
        inblock = inblock.cpu().numpy() > 0
        d, F = self.d, self.folds.n_folds
        m = d + 1
        self._tri = m * (m + 1) // 2
        # super-cells: cells that every training pattern takes or leaves together; -1: in no training set
        used = allowed.any(0)
        sig, sc = np.unique(allowed.T, axis=0, return_inverse=True)
        sc = np.asarray(sc).reshape(-1)
        keep_sig = np.flatnonzero(sig.any(1))
        remap = np.full(len(sig), -1)
        remap[keep_sig] = np.arange(len(keep_sig))
        self._sc_of_cell = np.where(used, remap[sc], -1)
        self._T2 = len(keep_sig)
        self._sc_row = self._sc_of_cell[self._cell_np]
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
        # test groups: folds sharing their tested cells (and those cells' rows [1, X, y]) whose own stock folds
        # differ, so that a row of a draw is tested by at most one fold of its group
        tpats, t_of_fold = np.unique(inblock, axis=0, return_inverse=True)
        t_of_fold = np.asarray(t_of_fold).reshape(-1)
        self._test_groups = []
        for r in range(len(tpats)):
            rows = np.flatnonzero(tpats[r][self._cell_np])
            if len(rows) == 0:
                continue
            Zr = self.Zy if len(rows) == self.n else self.Zy[rows]
            folds_r = np.flatnonzero(t_of_fold == r)
            split = [folds_r[self._own[folds_r] >= 0]] + [[f] for f in folds_r[self._own[folds_r] < 0]]
            for members in split:
                while len(members):  # a repeated own stock fold starts another group
                    _, first = np.unique(self._own[members], return_index=True)
                    take = np.sort(first)
                    self._test_groups.append((np.asarray(members)[take], rows, Zr, self._stock_np[rows]))
                    members = np.delete(np.asarray(members), take)
        self._H = self._bufs = self._out = self._Z = None  # work buffers, allocated on first use

    def _choose_fast_mode(self, mode: str) -> str:
        m1 = self.d + 2
        pt = self._tri + self.d + 1
        Q = len(self._train_cells_of_pattern)
        stats_bytes = Q * self.S * pt * 8
        if mode == "stats" and stats_bytes > self.memory_bytes * 4:
            raise ValueError(f"per-stock statistics need {stats_bytes / 2**30:.1f} GiB; use mode='rows'")
        if mode != "auto":
            return mode
        # multiply-adds per draw: the stats GEMM, one row of S weights per fold and packed statistic; the rows
        # pass, a syrk over the ~63% of training rows whose stock is drawn, plus block combinations (memory
        # passes, ~10 multiply-adds' worth per element) and per-block Python work (~2e5 multiply-adds' worth)
        F = self.folds.n_folds
        gemm = F * self.S * pt
        n_train = int((self._sc_row >= 0).sum())
        blocks = self.K * self._T2
        rows = 0.63 * n_train * m1 * m1 / 2 + 10 * (blocks + 3 * F) * m1 * m1 + 2e5 * (blocks + F)
        return "stats" if stats_bytes <= self.memory_bytes and gemm <= rows else "rows"

    def _pattern_stats(self) -> None:
        """(Q, S, tri + m) packed training statistics of every stock over every training pattern's cells:
        [Z'Z in RFP order (Z = [1, X]), Z'y]; stocks split over the pool."""
        m = self.d + 1
        self._rfp, self._rfp_diag = _rfp_index(m)
        rfp = (self._rfp // m) * (m + 1) + self._rfp % m  # the same entries of an (m+1) x (m+1) matrix
        pats = self._train_cells_of_pattern
        P = np.empty((len(pats), self.S, self._tri + m))
        order = np.argsort(self._stock_np, kind="stable")
        bounds = np.searchsorted(self._stock_np[order], np.arange(self.S + 1))
        in_q = [q[self._cell_np] for q in pats]

        def stocks(lo, hi):
            G = np.empty((m + 1, m + 1))
            for s in range(lo, hi):
                rows = order[bounds[s]:bounds[s + 1]]
                for q in range(len(pats)):
                    idx = rows[in_q[q][rows]]
                    if len(idx) == 0:
                        P[q, s] = 0.0
                        continue
                    Z = self.Zy[idx]
                    np.matmul(Z.T, Z, out=G)
                    np.take(G.reshape(-1), rfp, out=P[q, s, :self._tri])
                    P[q, s, self._tri:] = G[m, :m]

        with _single_thread(True):
            _run_all(self.workers, stocks, _chunks(self.S, self.workers))
        self._P = P

    def solve_batch(self, counts, assign, alpha: float, ic_groups=None) -> tuple[FoldFit, FoldScore]:
        """Fit and score every fold for a batch of count vectors (B, S) and stock-fold assignments (B, S):
        (B, F) results as torch tensors, in fold order; `ic_groups` (lists of folds whose test rows are
        disjoint): also each group's out-of-fold predictions (`FoldScore.oof`)."""
        counts = np.asarray(counts, dtype=np.float64)
        assign = np.asarray(assign, dtype=np.int64).clip(min=0)
        B, F, m = counts.shape[0], self.folds.n_folds, self.d + 1
        theta = np.zeros((B, F, m))
        n_train, sy_train = np.zeros((B, F)), np.zeros((B, F))
        info = np.ones((B, F), dtype=np.int64)
        with _single_thread(True):
            if self.mode == "stats":
                self._fit_stats_mode(counts, assign, float(alpha), theta, n_train, sy_train, info)
            else:
                for b in range(B):
                    self._fit_rows_mode(counts[b], assign[b], float(alpha), theta[b], n_train[b], sy_train[b], info[b])
            return self._finish(counts, assign, theta, n_train, sy_train, info, ic_groups)

    def _finish(self, counts, assign, theta, n_train, sy_train, info, ic_groups) -> tuple[FoldFit, FoldScore]:
        """Folds that could not be fit predict their training mean (sklearn has no such fit; the protocols
        skip them); then score every fold from its test rows."""
        ok = (info == 0) & (n_train > 0)
        theta[~ok] = 0.0
        theta[..., 0] = np.where(ok, theta[..., 0], sy_train / np.maximum(n_train, 1.0))
        score = self._score_rows(counts, assign, theta, ic_groups)
        t = torch.from_numpy
        return FoldFit(t(theta[..., 1:]), t(theta[..., 0].copy()), t(ok), t(n_train)), score

    def _fit_stats_mode(self, counts, assign, alpha, theta, n_train, sy_train, info) -> None:
        B, F, S, m = counts.shape[0], self.folds.n_folds, self.S, self.d + 1
        pt = self._tri + m
        if self._out is None or self._out.size < F * B * pt:  # kept: fresh pages cost more than the GEMM
            self._out = np.empty(F * B * pt)
        out = self._out[:F * B * pt].reshape(F, B, pt)
        for a, b, q in self._train_groups:
            own = self._own[a:b]
            W = counts[None] * ((assign[None] != own[:, None, None]) | (own < 0)[:, None, None])
            _par_matmul(W.reshape(-1, S), self._P[q], out[a:b].reshape(-1, pt), self.workers)
        flat = out.reshape(F * B, pt)
        n_train[:] = flat[:, self._rfp_diag[0]].reshape(F, B).T
        sy_train[:] = flat[:, self._tri].reshape(F, B).T
        flat[:, self._rfp_diag[1:]] += alpha
        res = np.empty(F * B, dtype=np.int64)
        lap = _lapack()

        def solve(lo, hi):
            for i in range(lo, hi):
                res[i] = lap.spd_rfp(flat[i], m)

        _run_all(self.workers, solve, _chunks(F * B, self.workers))
        theta[:] = flat[:, self._tri:].reshape(F, B, m).transpose(1, 0, 2)
        info[:] = res.reshape(F, B).T

    def _block_grams(self, counts, assign, H: np.ndarray, parallel: bool = True) -> None:
        """One draw's count-weighted Gram matrices of [1, X, y] per (stock fold, super-cell) block, into H (K,
        T2, m1, m1): one syrk per block, blocks spread over the pool (`parallel`) or all on this thread (a pool
        worker's own draw)."""
        K, T2, m1 = self.K, self._T2, self.d + 2
        w = counts[self._stock_np]
        k_row = assign[self._stock_np] if K > 1 else np.zeros(self.n, dtype=np.int64)
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
            Z = self.Zy[idx]
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
            _run_all(self.workers, block, [(int(keys[i]), keep[starts[i]:ends[i]]) for i in by_size])

    def _big_blocks(self, keep, keys, starts, ends, by_size, w, flatH) -> None:
        """Seed-scale blocks, one at a time: rows gathered by the pool into a kept buffer, then one syrk on
        `workers` BLAS threads."""
        sizes = ends - starts
        if self._Z is None or len(self._Z) < sizes.max():  # kept: fresh pages cost ~as much as the gather
            self._Z = np.empty((int(sizes.max() * 1.25), self.d + 2))

        def gather(Z, idx, lo, hi):
            np.take(self.Zy, idx[lo:hi], axis=0, out=Z[lo:hi])
            Z[lo:hi] *= np.sqrt(w[idx[lo:hi]])[:, None]

        for i in by_size:
            idx = keep[starts[i]:ends[i]]
            Z = self._Z[:len(idx)]
            _run_all(self.workers, gather, [(Z, idx, lo, hi) for lo, hi in _chunks(len(idx), self.workers)])
            with _blas_threads(self.workers):
                np.matmul(Z.T, Z, out=flatH[int(keys[i])])

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
        slabs = _chunks(m1, max(1, m1 * m1 // 16384))
        _run_all(self.workers, self._combine,
                 [(H, bufs, part) for part in np.array_split(np.arange(len(slabs)), self.workers) if len(part)])
        n_train[:], sy_train[:] = bufs[:, 0, 0], bufs[:, 0, m]
        diag = np.arange(1, m)
        bufs[:, diag, diag] += alpha
        lap = _lapack()

        def fold(f):
            info[f] = lap.spd_full(bufs[f], m)
            theta[f] = bufs[f, m, :m]

        _run_all(self.workers, fold, [(f,) for f in range(F)])

    def _combine(self, H: np.ndarray, bufs: np.ndarray, slab_ids) -> None:
        """Rows of the slabs `slab_ids` of every fold's training Gram from the block Gram matrices H (K, T2, m1,
        m1): the pattern's total over stock folds minus the own stock fold's (via the complement when shorter)."""
        T2, m1 = H.shape[1], H.shape[-1]
        slabs = _chunks(m1, max(1, m1 * m1 // 16384))
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

    # ---- fast path with alpha by inner CV (rows mode) -----------------------------------------------
    # Fold f trains on pattern q = q_of_fold[f] (its allowed super-cells) of every stock fold but own[f]. With
    # per-draw sums part[q, i] (stock fold i's Gram of [1, X, y] over q's super-cells) and tot[q] = sum_i,
    #     outer training = tot[q] - part[q, own]        inner fold (f, j), j != own: training tot[q] -
    #     part[q, own] - part[q, j], test part[q, j]
    # which is select_alpha's leave-one-stock-fold-out inner CV within f's training blocks (own = -1: no stock
    # fold left out). One inner training set (q, {own, j}) serves folds (own, q) and (j, q); each is solved by
    # one Cholesky per alpha of the grid (~7 x d^3/3 against eigh's ~9 d^3), and an inner test SSE is the
    # quadratic form [b0, beta, -1] G [b0, beta, -1]' of the test Gram. A draw runs on one pool worker.
    # Exactness: where two alphas' pooled inner SSEs lie within TIE_RTOL of each other (or a solve fails), the
    # argmin would be decided by rounding, so that draw's choice is left to `select_alpha` (the generic path).
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
        Q, m1 = len(self._pattern_sc), self.d + 2
        return 8 * m1 * m1 * (self.K * self._T2 + (Q + 1) * (self.K + 1) + n_alphas + 2)

    def solve_batch_cv(self, counts, assign, grid, default: float, ic_groups=None):
        """Like `solve_batch`, with every fold's alpha chosen from `grid` by inner CV (`select_alpha`'s
        choice; `default` where no inner fold is usable). Returns (FoldFit, FoldScore, (B, F) alphas)."""
        counts = np.asarray(counts, dtype=np.float64)
        assign = np.asarray(assign, dtype=np.int64).clip(min=0)
        grid = np.asarray(list(grid), dtype=np.float64)
        B, F, m = counts.shape[0], self.folds.n_folds, self.d + 1
        out = {"theta": np.zeros((B, F, m)), "n_train": np.zeros((B, F)), "sy_train": np.zeros((B, F)),
               "info": np.ones((B, F), dtype=np.int64), "alpha": np.full((B, F), float(default))}
        while len(self._cv_ws) < self.workers:
            self._cv_ws.append(_CVWork(self, len(grid)))
        pending, lock, fallback = iter(range(B)), threading.Lock(), []

        def worker(ws):
            while (b := _next_locked(pending, lock)) is not None:
                if not self._cv_draw(ws, counts, assign, b, grid, default, out):
                    with lock:
                        fallback.append(b)

        with _single_thread(True):
            _run_all(self.workers, worker, [(ws,) for ws in self._cv_ws[:self.workers]])
            for b in sorted(fallback):  # rare: near-tied alphas, decided as the generic path decides them
                alpha = self._reference_alpha(counts[b], assign[b], grid, default)
                self._cv_draw(self._cv_ws[0], counts, assign, b, grid, default, out, alpha=alpha)
            self.cv_fallbacks += len(fallback)
            fit, score = self._finish(counts, assign, out["theta"], out["n_train"], out["sy_train"], out["info"],
                                      ic_groups)
        return fit, score, out["alpha"]

    def _reference_alpha(self, counts, assign, grid, default) -> np.ndarray:
        """(F,) alphas of one draw by the generic path: block statistics from the rows, `select_alpha`."""
        H = self.block_stats(torch.as_tensor(counts[None], dtype=torch.float64), torch.as_tensor(assign[None]))
        return self.select_alpha(H, grid.tolist(), default)[0].numpy()

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
        m, lap, diag = self.d + 1, _lapack(), np.arange(1, self.d + 1)
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
        m, lap = self.d + 1, _lapack()
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
            _par_matmul(Zr[:, :m], theta[:, members, :].reshape(-1, m).T, res, self.workers)
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
        np.copyto(block, pred.T + self.mean_y, where=tested)
        P[:, rows] = block
        W[:, rows] += c.T

    # ---- solving and scoring ---------------------------------------------------------------------
    def _unpack(self, s: torch.Tensor):
        d = self.d
        n, sy, syy = s[..., 0], s[..., 1], s[..., 2]
        sx, sxy = s[..., 3:3 + d], s[..., 3 + d:3 + 2 * d]
        gram = s[..., 3 + 2 * d:].unflatten(-1, (d, d))
        return n, sy, syy, sx, sxy, gram

    def centred_system(self, s: torch.Tensor):
        """(A0, b, n, sx, sy) with A0 = centred X'X (no penalty), b = centred X'y; n=0 -> 1. The Gram part
        of `s` (a temporary of the caller's) is centred in place when contiguous, saving a d*d copy per fold."""
        n, sy, _, sx, sxy, gram = self._unpack(s)
        n1 = torch.where(n > 0, n, torch.ones_like(n))
        u = (sx / n1.sqrt()[..., None]).reshape(-1, self.d, 1)
        b = sxy - sx * (sy / n1)[..., None]
        if s.is_contiguous():
            A0 = torch.as_strided(s, (u.shape[0], self.d, self.d), (self.p, self.d, 1), 3 + 2 * self.d)
            A0.baddbmm_(u, u.transpose(1, 2), alpha=-1.0)
        else:
            A0 = torch.baddbmm(gram.reshape(-1, self.d, self.d), u, u.transpose(1, 2), alpha=-1.0)
        return A0.reshape(gram.shape), b, n1, sx, sy

    def _separable(self):
        """(own, allowed, inblock) when every fold f trains on cells `allowed[f]` of every stock fold but
        `own[f]` and tests on cells `inblock[f]` of stock fold `own[f]` (own = -1: no stock split, all
        stock folds on both sides) -- true of every layout here; None for any other layout."""
        tr, te = self.train_cells, self.test_cells
        own, allowed, inblock = [], [], []
        for f in range(tr.shape[0]):
            dead = [k for k in range(self.K) if not tr[f, k].any()]
            k_f = dead[0] if self.K > 1 and len(dead) == 1 else -1
            others = [k for k in range(self.K) if k != k_f]
            a, t = tr[f, others[0]], te[f, k_f if k_f >= 0 else 0]
            same_train = all((tr[f, k] == a).all() for k in others)
            same_test = all((te[f, k] == t).all() for k in range(self.K)) if k_f < 0 else not te[f, others].any()
            if not (same_train and same_test):
                return None
            own.append(k_f)
            allowed.append(a)
            inblock.append(t)
        conv = {"dtype": torch.float64, "device": self.device}
        return (np.array(own), torch.as_tensor(np.array(allowed), **conv), torch.as_tensor(np.array(inblock), **conv))

    def fold_stats(self, H: torch.Tensor, side: str) -> torch.Tensor:
        """(B, F, p) training or test statistics of every fold. For separable layouts a fold's training sums
        are (all stock folds) - (its own stock fold) over its allowed cells, a K-fold smaller GEMM."""
        if self._sep is None:
            return (self.train_mask if side == "train" else self.test_mask) @ H
        own, allowed, inblock = self._sep
        Hk = H.unflatten(1, (self.K, self.T))  # (B, K, T, p)
        total = Hk.sum(1)
        cells = allowed if side == "train" else inblock
        out = cells @ total if side == "train" else torch.empty(H.shape[0], len(own), self.p, dtype=H.dtype, device=H.device)
        for k in np.unique(own).tolist():
            idx = torch.as_tensor(np.flatnonzero(own == k), device=H.device)
            part = cells[idx] @ (total if k < 0 else Hk[:, k])
            if side == "test":
                out[:, idx] = part
            elif k >= 0:
                out[:, idx] -= part
        return out

    def fit(self, H: torch.Tensor, alpha, mask: torch.Tensor | None = None) -> FoldFit:
        """Solve every fold of every draw in the batch from block statistics H; `alpha`: float or (B, F)."""
        return self.fit_stats(self.fold_stats(H, "train") if mask is None else mask @ H, alpha)

    def fit_stats(self, s: torch.Tensor, alpha) -> FoldFit:
        """Solve every fold from its (B, F, p) training statistics."""
        n = s[..., 0]
        A0, b, n1, sx, sy = self.centred_system(s)
        alpha = torch.as_tensor(alpha, dtype=torch.float64, device=self.device)
        A0.diagonal(dim1=-2, dim2=-1).add_(alpha[..., None] if alpha.ndim else alpha)
        beta, info = batched_linalg(_cholesky_solve, A0, b)
        ok = (n > 0) & (info == 0)
        beta = torch.where(ok[..., None], beta, torch.zeros_like(beta))
        intercept = (sy - (sx * beta).sum(-1)) / n1
        return FoldFit(beta, intercept, ok, n)

    def quad(self, gram: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """beta' G beta for every fold."""
        v = beta.reshape(-1, self.d, 1)
        return (torch.bmm(gram.reshape(-1, self.d, self.d), v) * v).sum((1, 2)).reshape(beta.shape[:-1])

    def score(self, H: torch.Tensor, fit: FoldFit, mask: torch.Tensor | None = None) -> FoldScore:
        """Test-side SSE and SST of every fold from the test blocks' statistics."""
        return self.score_stats(self.fold_stats(H, "test") if mask is None else mask @ H, fit)

    def score_stats(self, s: torch.Tensor, fit: FoldFit) -> FoldScore:
        """SSE and SST of every fold from its (B, F, p) test statistics."""
        n, sy, syy, sx, sxy, gram = self._unpack(s)
        beta, b0 = fit.beta, fit.intercept
        sse = (syy - 2 * b0 * sy - 2 * (beta * sxy).sum(-1) + n * b0 ** 2 + 2 * b0 * (beta * sx).sum(-1)
               + self.quad(gram, beta))
        sst = syy - sy ** 2 / torch.where(n > 0, n, torch.ones_like(n))
        return FoldScore(sse, sst, n, sy, syy)

    def predict(self, fit: FoldFit) -> torch.Tensor:
        """(B, F, n) predictions of every fold's model for every row (original units)."""
        return torch.einsum("nd,bfd->bfn", self.X, fit.beta) + fit.intercept[..., None] + self.mean_y

    # ---- alpha by inner cross-validation -----------------------------------------------------------
    def inner_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(F*K, K*T) inner train/test masks: within fold f's training blocks, leave stock fold j out."""
        tr = torch.as_tensor(self.train_cells)
        F, K, T = tr.shape
        eye = torch.eye(K, dtype=torch.bool)[None, :, :, None]  # (1, j, k, 1)
        inner_test = tr[:, None] & eye
        inner_train = tr[:, None] & ~eye
        conv = {"dtype": torch.float64, "device": self.device}
        return inner_train.reshape(F * K, K * T).to(**conv), inner_test.reshape(F * K, K * T).to(**conv)

    def select_alpha(self, H: torch.Tensor, grid, default: float) -> torch.Tensor:
        """(B, F) alpha per fold minimising pooled inner-CV SSE over leave-one-stock-fold-out inner folds
        of that fold's training blocks (eigendecomposition once per inner fold, all alphas from it).

        Inner folds with the same training cells share their fit (in a stock x time grid, fold (k, t)'s inner
        fold j trains on what fold (j, t)'s inner fold k trains on), and inner folds with no test cell add
        nothing: one eigendecomposition per distinct non-empty inner training set, ~2.5x fewer on the purged
        5 x 5 grid. Exact: the same sums as solving every inner fold separately."""
        if self.K < 2:
            raise ValueError("alpha by inner CV needs a layout with stock folds (n_stock_folds >= 2)")
        B, F, K = H.shape[0], self.folds.n_folds, self.K
        tr_mask, te_mask = self.inner_masks()
        live = torch.nonzero(te_mask.any(1)).flatten()  # inner folds that test something
        if len(live) == 0:
            return torch.full((B, F), float(default), dtype=torch.float64, device=self.device)
        uniq, inv = torch.unique(tr_mask[live], dim=0, return_inverse=True)
        s_tr, s_te = uniq @ H, te_mask[live] @ H  # (B, U, p), (B, L, p)
        A0, b, n1, sx, sy = self.centred_system(s_tr)
        lam, V = batched_eigh(A0)
        grid_t = torch.as_tensor(list(grid), dtype=torch.float64, device=self.device)
        vb = (V.transpose(-1, -2) @ b[..., None])[..., 0]  # (B, U, d)
        beta = torch.einsum("...ij,...aj->...ai", V, vb[..., None, :] / (lam[..., None, :] + grid_t[:, None]))
        b0 = (sy[..., None] - (sx[..., None, :] * beta).sum(-1)) / n1[..., None]  # (B, U, A)
        beta, b0, n_tr = beta[:, inv], b0[:, inv], s_tr[:, inv, 0]  # per live inner fold
        n, tsy, tsyy, tsx, tsxy, tgram = self._unpack(s_te)
        quad = ((tgram @ beta.transpose(-1, -2)) * beta.transpose(-1, -2)).sum(-2)  # (B, L, A)
        sse = (tsyy[..., None] - 2 * b0 * tsy[..., None] - 2 * (beta * tsxy[..., None, :]).sum(-1)
               + n[..., None] * b0 ** 2 + 2 * b0 * (beta * tsx[..., None, :]).sum(-1) + quad)
        usable = (n_tr > 0) & (n > 0)  # (B, L)
        owner = (live // K).to(self.device)  # outer fold of each live inner fold
        total = torch.zeros(B, F, len(grid_t), dtype=torch.float64, device=self.device)
        total.index_add_(1, owner, torch.where(usable[..., None], sse, torch.zeros_like(sse)))
        any_inner = torch.zeros(B, F, dtype=torch.float64, device=self.device).index_add_(
            1, owner, usable.to(torch.float64)) > 0
        best = grid_t[total.argmin(-1)]
        return torch.where(any_inner, best, torch.full_like(best, default))


class _CVWork:
    """One pool worker's buffers for a draw of `solve_batch_cv` (kept: fresh pages cost more than the sums)."""

    def __init__(self, eng: ClusterRidge, n_alphas: int):
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


def _next_locked(it, lock):
    with lock:
        return next(it, None)


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(n: int) -> ThreadPoolExecutor:
    if n not in _POOLS:
        _POOLS[n] = ThreadPoolExecutor(n, thread_name_prefix="pitlm-engine")
    return _POOLS[n]


def _chunks(n: int, parts: int) -> list[tuple[int, int]]:
    bounds = np.linspace(0, n, max(1, min(parts, n)) + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def _run_all(workers: int, fn, arg_tuples) -> None:
    """fn(*args) for every args in `arg_tuples` on the engine's pool; waits for all (the first error is raised)."""
    pool = _pool(workers)
    for job in [pool.submit(fn, *args) for args in arg_tuples]:
        job.result()


def _par_matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray, workers: int) -> None:
    """out = a @ b, rows of `a` split over the pool (one BLAS thread each)."""
    _run_all(workers, lambda lo, hi: np.matmul(a[lo:hi], b, out=out[lo:hi]), _chunks(len(a), workers))


def _rfp_index(m: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions in a C-ordered m x m matrix of each entry of its lower triangle in LAPACK's rectangular full
    packed format (TRANSR='N', UPLO='L'), position of each diagonal entry in that packed array)."""
    from scipy.linalg import lapack

    flat = np.arange(m * m, dtype=np.float64).reshape(m, m)
    arf, info = lapack.dtrttf(np.asfortranarray(flat), transr="N", uplo="L")
    assert info == 0
    index = np.rint(arf).astype(np.int64)
    where = np.empty(m * m, dtype=np.int64)
    where[index] = np.arange(len(index))
    return index, where[np.arange(m) * (m + 1)]


class _Lapack:
    """dpotrf/dpotrs and the rectangular-full-packed dpftrf/dpftrs from scipy's Cython LAPACK exports, called
    through ctypes, which releases the GIL (scipy.linalg.lapack's wrappers hold it), so a pool of threads runs
    one factorisation per core. Same LAPACK, same arithmetic as scipy.linalg."""

    def __init__(self):
        import ctypes

        from scipy.linalg import cython_lapack

        self.c = ctypes
        get_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", ctypes.pythonapi))
        get_ptr = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
            ("PyCapsule_GetPointer", ctypes.pythonapi))
        Ip, P, C = ctypes.POINTER(ctypes.c_int), ctypes.c_void_p, ctypes.c_char_p

        def fn(name, *argtypes):
            cap = cython_lapack.__pyx_capi__[name]
            return ctypes.CFUNCTYPE(None, *argtypes)(get_ptr(cap, get_name(cap)))

        self.potrf = fn("dpotrf", C, Ip, P, Ip, Ip)
        self.potrs = fn("dpotrs", C, Ip, Ip, P, Ip, P, Ip, Ip)
        self.pftrf = fn("dpftrf", C, C, Ip, P, Ip)
        self.pftrs = fn("dpftrs", C, C, Ip, Ip, P, P, Ip, Ip)

    def spd_full(self, a: np.ndarray, m: int) -> int:
        """Solve in place; `a` is a C-contiguous (m+1, m+1) array: its leading m x m block (upper triangle
        read) the system, the first m entries of its last row the right-hand side, overwritten by the
        solution. Returns LAPACK's info (0: solved; > 0: not positive definite)."""
        assert a.flags.c_contiguous and a.shape == (m + 1, m + 1)
        c = self.c
        n, lda, one, info = c.c_int(m), c.c_int(m + 1), c.c_int(1), c.c_int(0)
        ptr = a.ctypes.data
        self.potrf(b"L", c.byref(n), ptr, c.byref(lda), c.byref(info))
        if info.value == 0:
            self.potrs(b"L", c.byref(n), c.byref(one), ptr, c.byref(lda), ptr + 8 * m * (m + 1), c.byref(lda),
                       c.byref(info))
        return info.value

    def spd_full_many(self, a: np.ndarray, m: int, info: np.ndarray) -> None:
        """`spd_full` on each of the C-contiguous (k, m+1, m+1) systems of `a`, LAPACK's info into `info`
        (k,): the ctypes arguments made once (their conversion costs more than a 134 x 134 solve's rest)."""
        assert a.flags.c_contiguous and a.shape[1:] == (m + 1, m + 1)
        c = self.c
        n, lda, one, res = c.c_int(m), c.c_int(m + 1), c.c_int(1), c.c_int(0)
        bn, blda, bone, bres = c.byref(n), c.byref(lda), c.byref(one), c.byref(res)
        step, rhs = 8 * (m + 1) * (m + 1), 8 * m * (m + 1)
        base = a.ctypes.data
        for i in range(a.shape[0]):
            ptr = base + i * step
            self.potrf(b"L", bn, ptr, blda, bres)
            if res.value == 0:
                self.potrs(b"L", bn, bone, ptr, blda, ptr + rhs, blda, bres)
            info[i] = res.value

    def spd_rfp(self, row: np.ndarray, m: int) -> int:
        """Solve in place; `row` = [system in RFP (m(m+1)/2), right-hand side (m)], contiguous."""
        tri = m * (m + 1) // 2
        assert row.flags.c_contiguous and row.shape[0] >= tri + m
        c = self.c
        n, one, info = c.c_int(m), c.c_int(1), c.c_int(0)
        ptr = row.ctypes.data
        self.pftrf(b"N", b"L", c.byref(n), ptr, c.byref(info))
        if info.value == 0:
            self.pftrs(b"N", b"L", c.byref(n), c.byref(one), ptr, ptr + 8 * tri, c.byref(n), c.byref(info))
        return info.value


_LAPACK: _Lapack | None = None


def _lapack() -> _Lapack:
    global _LAPACK
    if _LAPACK is None:
        _LAPACK = _Lapack()
    return _LAPACK


def _cholesky_solve(A: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(solution of A x = b, cholesky info) for a batch; two triangular solves are several times faster than
    torch.cholesky_solve on CPU."""
    L, info = torch.linalg.cholesky_ex(A)
    half = torch.linalg.solve_triangular(L, b[..., None], upper=False)
    return torch.linalg.solve_triangular(L.mT, half, upper=True)[..., 0], info


def batched_linalg(fn, *args: torch.Tensor, min_batch: int = 64) -> tuple[torch.Tensor, ...]:
    """fn(*args) over batches of small matrices (args share their leading batch dims). On a multi-core CPU the
    batch is split over a thread pool with one intra-op thread each: LAPACK parallelises poorly at d ~ 100-300
    (measured 1.6x for eigh on 2 cores); elsewhere one call. Exact: each matrix is solved by the same routine."""
    n_threads = torch.get_num_threads()
    lead = args[0].shape[:-2]
    n = int(np.prod(lead)) if lead else 1
    if args[0].device.type != "cpu" or n_threads < 2 or n < min_batch:
        return fn(*args)
    flat = [a.reshape(n, *a.shape[len(lead):]) for a in args]
    torch.set_num_threads(1)
    try:
        parts = list(_pool(n_threads).map(lambda r: fn(*(a[r[0]:r[1]] for a in flat)), _chunks(n, n_threads)))
    finally:
        torch.set_num_threads(n_threads)
    return tuple(torch.cat([p[j] for p in parts]).reshape(*lead, *parts[0][j].shape[1:]) for j in range(len(parts[0])))


def batched_eigh(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.linalg.eigh over a batch of symmetric matrices (see batched_linalg)."""
    return batched_linalg(lambda a: tuple(torch.linalg.eigh(a)), A)


def _weighted_midranks(group: np.ndarray, v: np.ndarray, w: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
    """Average ranks of v within each group, a row of weight w counting as w tied copies (scipy's
    rankdata(method="average") on the expanded data); `order`: the rows sorted by (group, v), ties in row
    order (np.lexsort((v, group))), when known."""
    order = np.lexsort((v, group)) if order is None else order
    g, vs, ws = group[order], v[order], w[order]
    new_group = np.r_[True, g[1:] != g[:-1]]
    new_tie = new_group | np.r_[True, vs[1:] != vs[:-1]]
    before = np.cumsum(ws) - ws  # weight before each row, over all groups
    group_base = before[new_group][np.cumsum(new_group) - 1]
    tie_id = np.cumsum(new_tie) - 1
    tie_weight = np.bincount(tie_id, weights=ws)
    rank = before[new_tie][tie_id] - group_base + (tie_weight[tie_id] + 1) / 2
    out = np.empty_like(rank)
    out[order] = rank
    return out


class RankIC:
    """Per-date Spearman correlations of many prediction vectors with one target (`per_date_rank_ic`), the
    target's order sorted once: a draw only re-weights it. Predictions are ordered by a stable argsort and a
    stable (radix) sort by date, the same order as np.lexsort((pred, date)) at ~half its cost."""

    def __init__(self, date: np.ndarray, y: np.ndarray, n_dates: int, min_stocks: int = 3):
        self.date, self.y, self.n_dates, self.min_stocks = np.asarray(date), np.asarray(y), n_dates, min_stocks
        self._date_key = self.date.astype(np.int16 if n_dates < 2**15 else np.int64)
        self._y_order = np.lexsort((self.y, self.date))

    def __call__(self, pred: np.ndarray, w: np.ndarray) -> np.ndarray:
        """(n_dates,) rank IC of one prediction vector (row weight = bootstrap count, 0 = not tested); NaN
        where fewer than `min_stocks` rows or a constant side."""
        keep = w > 0
        out = np.full(self.n_dates, np.nan)
        if not keep.any():
            return out
        date, pred, y, w = self.date[keep], pred[keep], self.y[keep], w[keep]
        kept_pos = np.cumsum(keep) - 1
        y_order = kept_pos[self._y_order[keep[self._y_order]]]
        by_pred = np.argsort(pred, kind="stable")
        p_order = by_pred[np.argsort(self._date_key[keep][by_pred], kind="stable")]
        rp, ry = _weighted_midranks(date, pred, w, p_order), _weighted_midranks(date, y, w, y_order)
        return self._correlate(date, rp, ry, w, out)

    def _correlate(self, date, rp, ry, w, out) -> np.ndarray:
        n_dates = self.n_dates

        def wsum(v):
            return np.bincount(date, weights=w * v, minlength=n_dates)

        sw = wsum(np.ones_like(rp))
        with np.errstate(invalid="ignore", divide="ignore"):
            mp, my = wsum(rp) / sw, wsum(ry) / sw
            cov = wsum(rp * ry) / sw - mp * my
            vp, vy = wsum(rp * rp) / sw - mp ** 2, wsum(ry * ry) / sw - my ** 2
            ic = cov / np.sqrt(vp * vy)
        enough = np.bincount(date, minlength=n_dates) >= self.min_stocks
        good = enough & (vp > 1e-12 * sw ** 2) & (vy > 1e-12 * sw ** 2)
        out[good] = ic[good]
        return out

    def batch(self, pred: np.ndarray, w: np.ndarray, workers: int = 1) -> np.ndarray:
        """(B, n_dates) rank ICs of (B, n) predictions and weights, draws spread over the engine's pool
        (numpy's sorts release the GIL)."""
        out = np.empty((len(pred), self.n_dates))

        def rows(lo, hi):
            for b in range(lo, hi):
                out[b] = self(pred[b], w[b])

        _run_all(workers, rows, _chunks(len(pred), workers))
        return out


def per_date_rank_ic(date: np.ndarray, pred: np.ndarray, y: np.ndarray, w: np.ndarray, n_dates: int,
                     min_stocks: int = 3) -> np.ndarray:
    """(n_dates,) Spearman correlation of predictions and targets across the rows of each date (row weight
    = bootstrap count, 0 = not tested); NaN where fewer than `min_stocks` rows or a constant side."""
    return RankIC(date, y, n_dates, min_stocks)(pred, w)
