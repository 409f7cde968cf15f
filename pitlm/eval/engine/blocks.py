"""The generic solver: block statistics per (stock fold, time cell) for a batch of draws, every fold's
statistics from them, and alpha by inner cross-validation over stock folds (`select_alpha`). It runs on any
layout and device; on the CPU the fast paths (`packed`, `packed_cv`) take every layout here.

A stock-clustered bootstrap draw multiplies stock s's rows by its count c_s (a duplicated stock keeps its id,
so its copies share a fold), so every fold's sums are sums over (stock fold, time cell) *blocks* of
count-weighted stock sums. Two ways to get the block sums of a draw, chosen by cost and memory:

- "stats": per-(stock, cell) sums are computed once; a batch of draws is one GEMM (draws x stock folds,
  stocks) @ (stocks, cells x stats). Best when stocks have many rows per cell and d is small.
- "rows": one pass per draw of count-weighted Gram matrices per block straight from the rows (draws with
  count 0 skip their rows). Used when per-stock d x d statistics do not fit (the seed: 1000 stocks x 2053^2).
Either way each fold costs one Cholesky of its d x d system instead of a pass over its rows.
"""

from __future__ import annotations

import numpy as np
import torch

from pitlm.eval.engine.cost import light
from pitlm.eval.engine.lapack import batched_eigh
from pitlm.eval.engine.stats import FoldFit, FoldScore, RidgeProblem, Solver
from pitlm.eval.engine.threads import single_thread


class BlockSolver(Solver):
    """Block statistics H (B, K*T, p) per batch of draws, then every fold's fit and score; `grid`: each fold's
    alpha by inner CV over it (`select_alpha`, `alpha` where no inner fold is usable), else `alpha` for all."""

    def __init__(self, problem: RidgeProblem, mode: str, alpha: float = 1.0, grid=None):
        super().__init__(problem)
        self.mode, self.alpha, self.grid = mode, float(alpha), None if grid is None else list(grid)
        with single_thread(light(problem, mode, direct=False)):
            self.cell_stats = problem.cell_stats() if mode == "stats" else None

    def threads(self):
        return single_thread(light(self.problem, self.mode, direct=False))

    def draw_batch_size(self) -> int:
        F = self.folds.n_folds
        blocks = self.K * self.T * self.p + F * self.p
        per_draw = 8 * (blocks + 2 * F * self.p + 2 * F * self.d * self.d)
        return self.draws_within(per_draw)

    def solve(self, counts, assign, ic_groups=None) -> tuple[FoldFit, FoldScore, np.ndarray]:
        pb = self.problem
        cnt, asg, alpha = self.draw_tensors(counts, assign, self.alpha)
        H = self.block_stats(cnt, asg)
        if self.grid is not None:
            alpha = self.select_alpha(H, self.grid, self.alpha)
        fit = pb.fit(H, alpha)
        score = pb.score(H, fit)
        if ic_groups is not None:
            score.oof = pb.oof_predictions(counts, assign, fit, ic_groups)
        return fit, score, alpha.cpu().numpy()

    # ---- block statistics -------------------------------------------------------------------------
    def block_stats(self, counts: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
        """(B, K*T, p) count-weighted statistics per (stock fold, cell) block for a batch of draws."""
        B = counts.shape[0]
        if self.mode == "stats":
            onehot = torch.nn.functional.one_hot(assign.clamp(min=0), self.K).to(torch.float64)  # (B, S, K)
            W = (counts[:, :, None] * onehot).transpose(1, 2).reshape(B * self.K, self.S)
            return (W @ self.cell_stats).reshape(B, self.K * self.T, self.p)
        out = torch.empty(B, self.K * self.T, self.p, dtype=torch.float64, device=self.device)
        with single_thread(self.device.type == "cpu" and self.n * self.d * self.d < 5e7 * self.K * self.T):
            for b in range(B):
                self._fill_draw(out[b], counts[b], assign[b])
        return out

    def _fill_draw(self, out: torch.Tensor, counts: torch.Tensor, assign: torch.Tensor) -> None:
        """One draw's (K*T, p) block statistics, straight from the rows."""
        pb = self.problem
        w = counts[pb.stock]
        blk = assign.clamp(min=0)[pb.stock] * self.T + pb.cell
        keep = torch.nonzero(w > 0).squeeze(1)
        order = keep[torch.argsort(blk[keep])]
        keys, sizes = torch.unique_consecutive(blk[order], return_counts=True)
        empty = torch.ones(self.K * self.T, dtype=torch.bool)
        for k, idx in zip(keys.tolist(), torch.split(order, sizes.tolist()), strict=True):
            pb.row_stats(idx, w[idx], out=out[k])
            empty[k] = False
        out[empty.to(self.device)] = 0.0

    # ---- alpha by inner cross-validation -----------------------------------------------------------
    def inner_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(F*K, K*T) inner train/test masks: within fold f's training blocks, leave stock fold j out."""
        tr = torch.as_tensor(self.problem.train_cells)
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
        A0, b, n1, sx, sy = self.problem.centred_system(s_tr)
        lam, V = batched_eigh(A0)
        grid_t = torch.as_tensor(list(grid), dtype=torch.float64, device=self.device)
        vb = (V.transpose(-1, -2) @ b[..., None])[..., 0]  # (B, U, d)
        beta = torch.einsum("...ij,...aj->...ai", V, vb[..., None, :] / (lam[..., None, :] + grid_t[:, None]))
        b0 = (sy[..., None] - (sx[..., None, :] * beta).sum(-1)) / n1[..., None]  # (B, U, A)
        beta, b0, n_tr = beta[:, inv], b0[:, inv], s_tr[:, inv, 0]  # per live inner fold
        n, tsy, tsyy, tsx, tsxy, tgram = self.problem.unpack(s_te)
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
