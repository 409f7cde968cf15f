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
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from pitlm.eval.splitters import PanelFolds


@contextmanager
def _single_thread(active: bool):
    """Run torch and BLAS on one thread: small ops gain nothing from threads, and on a shared CPU the
    pools' barriers stall whenever a core is busy elsewhere."""
    if not active:
        yield
        return
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
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
                 mode: str = "auto", memory_bytes: int | None = None):
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
        kw = {"dtype": torch.float64, "device": self.device}
        self.X = torch.as_tensor(X - self.mean_x, **kw)
        self.y = torch.as_tensor(y - self.mean_y, **kw)
        self.stock = torch.as_tensor(np.asarray(stock), dtype=torch.long, device=self.device)
        self.cell = torch.as_tensor(np.asarray(cell), dtype=torch.long, device=self.device)
        self.p = 3 + 2 * self.d + self.d * self.d
        self.train_mask = torch.as_tensor(self.train_cells.reshape(folds.n_folds, -1), **kw)
        self.test_mask = torch.as_tensor(self.test_cells.reshape(folds.n_folds, -1), **kw)
        self._sep = self._separable()
        self.memory_bytes = memory_bytes or default_memory_bytes(self.device)
        self.mode = self._choose_mode(mode)
        with self.threads():
            self.cell_stats = self._cell_stats() if self.mode == "stats" else None
            self.patterns = self._patterns() if self.mode == "stats" else None

    # ---- block statistics -------------------------------------------------------------------------
    def _choose_mode(self, mode: str) -> str:
        if mode not in ("auto", "stats", "rows"):
            raise ValueError(f"engine mode must be auto, stats or rows (got {mode!r})")
        n_patterns = 2 * self.folds.n_folds if self._sep is not None else 0  # at most; usually far fewer
        stats_bytes = self.S * (self.T + min(n_patterns, 2 * self.T)) * self.p * 8
        if mode == "stats" and stats_bytes > self.memory_bytes * 4:
            raise ValueError(f"per-stock statistics need {stats_bytes / 2**30:.1f} GiB; use mode='rows'")
        if mode != "auto":
            return mode
        # Cost per draw in multiply-adds: the stats path does one GEMM per fold and side (2*F*S*p; blocks
        # K*T*S*p for other layouts); the rows pass a rank-k update over the ~63% of rows whose stock is drawn
        # (half of d*d on CPU, where numpy uses syrk) plus one Python step per block. Measured on 2 cores,
        # the rows pass runs ~3x slower per multiply-add (gathers, small blocks) than the batched GEMM.
        F = self.folds.n_folds
        gemm = 2 * F * self.S * self.p if self._sep is not None else (self.K * self.T + 2 * F) * self.S * self.p
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
        direct = self.mode == "stats" and self._sep is not None
        gemm = 2 * F * self.S * self.p if direct else self.K * self.T * self.S * self.p
        work = gemm if self.mode == "stats" else self.n * self.d * self.d
        return work + F * self.d ** 3 / 3 < 5e7

    def threads(self):
        """Context for the draw loop: single-threaded when `light()`."""
        return _single_thread(self.light())

    def draw_batch_size(self) -> int:
        """Draws per batch so that block and fold statistics stay within the memory budget."""
        F = self.folds.n_folds
        blocks = 0 if self.direct else self.K * self.T * self.p + F * self.p
        per_draw = 8 * (blocks + 2 * F * self.p + 2 * F * self.d * self.d)
        cap = 256 if self.device.type == "cuda" else 64  # more draws per kernel launch on a GPU
        return int(max(1, min(cap, self.memory_bytes // max(per_draw, 1))))

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
    from concurrent.futures import ThreadPoolExecutor

    flat = [a.reshape(n, *a.shape[len(lead):]) for a in args]
    bounds = np.linspace(0, n, n_threads + 1).astype(int)
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(n_threads) as pool:
            parts = list(pool.map(lambda i: fn(*(a[bounds[i]:bounds[i + 1]] for a in flat)), range(n_threads)))
    finally:
        torch.set_num_threads(n_threads)
    return tuple(torch.cat([p[j] for p in parts]).reshape(*lead, *parts[0][j].shape[1:]) for j in range(len(parts[0])))


def batched_eigh(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.linalg.eigh over a batch of symmetric matrices (see batched_linalg)."""
    return batched_linalg(lambda a: tuple(torch.linalg.eigh(a)), A)


def _weighted_midranks(group: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Average ranks of v within each group, a row of weight w counting as w tied copies (scipy's
    rankdata(method="average") on the expanded data)."""
    order = np.lexsort((v, group))
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


def per_date_rank_ic(date: np.ndarray, pred: np.ndarray, y: np.ndarray, w: np.ndarray, n_dates: int,
                     min_stocks: int = 3) -> np.ndarray:
    """(n_dates,) Spearman correlation of predictions and targets across the rows of each date (row weight
    = bootstrap count, 0 = not tested); NaN where fewer than `min_stocks` rows or a constant side."""
    keep = w > 0
    date, pred, y, w = date[keep], pred[keep], y[keep], w[keep]
    out = np.full(n_dates, np.nan)
    if len(date) == 0:
        return out
    rp, ry = _weighted_midranks(date, pred, w), _weighted_midranks(date, y, w)

    def wsum(v):
        return np.bincount(date, weights=w * v, minlength=n_dates)

    sw = wsum(np.ones_like(rp))
    with np.errstate(invalid="ignore", divide="ignore"):
        mp, my = wsum(rp) / sw, wsum(ry) / sw
        cov = wsum(rp * ry) / sw - mp * my
        vp, vy = wsum(rp * rp) / sw - mp ** 2, wsum(ry * ry) / sw - my ** 2
        ic = cov / np.sqrt(vp * vy)
    enough = np.bincount(date, minlength=n_dates) >= min_stocks
    good = enough & (vp > 1e-12 * sw ** 2) & (vy > 1e-12 * sw ** 2)
    out[good] = ic[good]
    return out
