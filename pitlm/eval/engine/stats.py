"""Sufficient statistics of Ridge-with-intercept: the design and fold layout one solver works on
(`RidgeProblem`), the per-(draw, fold) results (`FoldFit`, `FoldScore`) and the maths from statistics to them.

A Ridge fit with intercept (scikit-learn semantics: X and y centred by their training means, alpha*I on the
coefficients only) depends on its training rows only through n, sum x, sum y, X'X, X'y, y'y, and a test-set
R2 (sklearn's r2_score: 1 - SSE/SST, SST around the test mean) only through the same sums over the test rows:

    A = X'X - sx sx'/n + alpha I,   b = X'y - sx sy/n,   beta = A^-1 b,   b0 = (sy - sx'beta)/n
    SSE = y'y - 2 b0 sy - 2 beta'X'y + n b0^2 + 2 b0 beta'sx + beta'X'X beta,   SST = y'y - sy^2/n

Statistics are flat vectors [n, sy, yy, sx (d), sxy (d), X'X (d*d)]: full Gram matrices rather than packed
triangles, so that a fold's system is a view, never an unpacking gather (memory-bound, and slower than the
GEMM it would save). X and y are centred by their global means first (Ridge with intercept and R2 are
invariant to that shift; it keeps the sums well scaled).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from pitlm.eval.engine.lapack import batched_linalg, cholesky_solve
from pitlm.eval.splitters import PanelFolds


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
    # when asked for: per group of folds with disjoint test rows, (B, n) out-of-fold predictions (original
    # units) and (B, n) row weights (bootstrap count where a fold of the group tests the row, else 0)
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


class RidgeProblem:
    """One design (X, y) on one fold layout (`PanelFolds`), and the maths from sufficient statistics to fits.

    `stock` (n,) indexes stocks 0..n_stocks-1, `cell` (n,) indexes the layout's time cells. Draws are count
    vectors over stocks (all ones = the original sample); `assign` gives each stock's stock fold per draw
    (ignored when the layout does not split stocks)."""

    def __init__(self, X, y, stock, cell, n_stocks: int, folds: PanelFolds, *, device: str = "cpu",
                 memory_bytes: int | None = None):
        self.device = torch.device(device)
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        assert X.ndim == 2 and len(X) == len(y) == len(stock) == len(cell) > 0
        self.n, self.d = X.shape
        self.S, self.folds = n_stocks, folds
        self.layout_cell = np.asarray(cell)  # each row's cell of the layout (out-of-fold predictions index by it)
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
        self.stock_np, self.cell_np = np.asarray(stock, dtype=np.int64), np.asarray(cell, dtype=np.int64)
        self.stock = torch.as_tensor(self.stock_np, device=self.device)
        self.cell = torch.as_tensor(self.cell_np, device=self.device)
        self.p = 3 + 2 * self.d + self.d * self.d
        self.train_mask = torch.as_tensor(self.train_cells.reshape(folds.n_folds, -1), **kw)
        self.test_mask = torch.as_tensor(self.test_cells.reshape(folds.n_folds, -1), **kw)
        self.sep = self._separable()
        self.memory_bytes = memory_bytes or default_memory_bytes(self.device)
        self.workers = max(1, min(torch.get_num_threads(), os.cpu_count() or 1))

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

    # ---- statistics from rows ---------------------------------------------------------------------
    def row_stats(self, idx: torch.Tensor, w: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
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

    def cell_stats(self) -> torch.Tensor:
        """(S, T*p) statistics of every (stock, cell), unweighted (one small Gram per non-empty cell)."""
        out = torch.zeros(self.S * self.T, self.p, dtype=torch.float64, device=self.device)
        key = self.stock * self.T + self.cell
        order = torch.argsort(key, stable=True)
        keys, sizes = torch.unique_consecutive(key[order], return_counts=True)
        for k, idx in zip(keys.tolist(), torch.split(order, sizes.tolist()), strict=True):
            self.row_stats(idx, out=out[k])
        return out.reshape(self.S, self.T * self.p)

    # ---- solving and scoring ---------------------------------------------------------------------
    def unpack(self, s: torch.Tensor):
        """(n, sy, syy, sx, sxy, gram) views of statistics `s` (..., p)."""
        d = self.d
        n, sy, syy = s[..., 0], s[..., 1], s[..., 2]
        sx, sxy = s[..., 3:3 + d], s[..., 3 + d:3 + 2 * d]
        gram = s[..., 3 + 2 * d:].unflatten(-1, (d, d))
        return n, sy, syy, sx, sxy, gram

    def centred_system(self, s: torch.Tensor):
        """(A0, b, n, sx, sy) with A0 = centred X'X (no penalty), b = centred X'y; n=0 -> 1. The Gram part
        of `s` (a temporary of the caller's) is centred in place when contiguous, saving a d*d copy per fold."""
        n, sy, _, sx, sxy, gram = self.unpack(s)
        n1 = torch.where(n > 0, n, torch.ones_like(n))
        u = (sx / n1.sqrt()[..., None]).reshape(-1, self.d, 1)
        b = sxy - sx * (sy / n1)[..., None]
        if s.is_contiguous():
            A0 = torch.as_strided(s, (u.shape[0], self.d, self.d), (self.p, self.d, 1), 3 + 2 * self.d)
            A0.baddbmm_(u, u.transpose(1, 2), alpha=-1.0)
        else:
            A0 = torch.baddbmm(gram.reshape(-1, self.d, self.d), u, u.transpose(1, 2), alpha=-1.0)
        return A0.reshape(gram.shape), b, n1, sx, sy

    def fold_stats(self, H: torch.Tensor, side: str) -> torch.Tensor:
        """(B, F, p) training or test statistics of every fold from (B, K*T, p) block statistics. For separable
        layouts a fold's training sums are (all stock folds) - (its own stock fold) over its allowed cells, a
        K-fold smaller GEMM."""
        if self.sep is None:
            return (self.train_mask if side == "train" else self.test_mask) @ H
        own, allowed, inblock = self.sep
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
        beta, info = batched_linalg(cholesky_solve, A0, b)
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
        n, sy, syy, sx, sxy, gram = self.unpack(s)
        beta, b0 = fit.beta, fit.intercept
        sse = (syy - 2 * b0 * sy - 2 * (beta * sxy).sum(-1) + n * b0 ** 2 + 2 * b0 * (beta * sx).sum(-1)
               + self.quad(gram, beta))
        sst = syy - sy ** 2 / torch.where(n > 0, n, torch.ones_like(n))
        return FoldScore(sse, sst, n, sy, syy)

    def predict(self, fit: FoldFit) -> torch.Tensor:
        """(B, F, n) predictions of every fold's model for every row (original units)."""
        return torch.einsum("nd,bfd->bfn", self.X, fit.beta) + fit.intercept[..., None] + self.mean_y

    def oof_predictions(self, counts: np.ndarray, assign: np.ndarray, fit: FoldFit,
                        groups: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per group of folds with disjoint test rows, (B, n) out-of-fold predictions and row weights (count
        where a fold of the group tests the row), from every fold's predictions (`predict`)."""
        cnt = torch.as_tensor(counts, dtype=torch.float64, device=self.device)
        asg = torch.as_tensor(assign, dtype=torch.long, device=self.device)
        test = torch.as_tensor(self.folds.test, device=self.device)
        cell_t = torch.as_tensor(self.layout_cell, device=self.device)
        k_row = asg.clamp(min=0)[:, self.stock] if self.K > 1 else torch.zeros_like(asg[:, self.stock])
        tested_all = test[:, k_row, cell_t].permute(1, 0, 2)  # (B, F, n)
        pred = self.predict(fit)
        out = []
        for members in groups:
            tested = tested_all[:, members]
            out.append(((pred[:, members] * tested).sum(1).cpu().numpy(),
                        (cnt[:, self.stock] * tested.any(1)).cpu().numpy()))
        return out


class Solver:
    """Fits and scores every fold of every draw of one `RidgeProblem`, one way. Subclasses give `solve`,
    `draw_batch_size` and `threads`; `mode` ("stats" or "rows": where block sums come from) is reported."""

    mode: str
    cv_fallbacks = 0  # draws whose alpha choice went to the generic path (alpha by inner CV, fast path only)

    def __init__(self, problem: RidgeProblem):
        self.problem = problem
        # the problem's shape, read everywhere
        self.n, self.d, self.S, self.K, self.T, self.p = problem.n, problem.d, problem.S, problem.K, problem.T, problem.p
        self.folds, self.device, self.workers = problem.folds, problem.device, problem.workers

    def solve(self, counts: np.ndarray, assign: np.ndarray, ic_groups: list[list[int]] | None = None):
        """(FoldFit, FoldScore, (B, F) alphas) for a batch of count vectors (B, S) and stock-fold assignments
        (B, S); `ic_groups` (lists of folds whose test rows are disjoint): also each group's out-of-fold
        predictions (`FoldScore.oof`)."""
        raise NotImplementedError

    def draw_batch_size(self) -> int:
        """Draws per `solve` call so that the solver's statistics stay within the memory budget."""
        raise NotImplementedError

    def threads(self):
        """Context for the draw loop (one thread where threads would not pay)."""
        raise NotImplementedError

    def draws_within(self, per_draw_bytes: int) -> int:
        """Draws per call whose statistics (`per_draw_bytes` each) fit the memory budget, at most 256 on a GPU (more
        draws per kernel launch) and 64 on the CPU."""
        cap = 256 if self.device.type == "cuda" else 64
        return int(max(1, min(cap, self.problem.memory_bytes // max(per_draw_bytes, 1))))

    def draw_tensors(self, counts: np.ndarray, assign: np.ndarray,
                     alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch's counts (float64) and stock-fold assignments (long) on the solver's device, and a (B, F) alpha
        filled with `alpha`."""
        cnt = torch.as_tensor(counts, dtype=torch.float64, device=self.device)
        asg = torch.as_tensor(assign, dtype=torch.long, device=self.device)
        alpha = torch.full((counts.shape[0], self.folds.n_folds), alpha, dtype=torch.float64, device=self.device)
        return cnt, asg, alpha
