"""The direct solver (fixed alpha off the CPU, separable layouts, per-stock statistics that fit in memory):
every fold's training and test statistics straight from per-stock statistics, one GEMM per group of folds
that share their cell patterns, no block tensor."""

from __future__ import annotations

import numpy as np
import torch

from pitlm.eval.engine.cost import light
from pitlm.eval.engine.stats import FoldFit, FoldScore, RidgeProblem, Solver
from pitlm.eval.engine.threads import single_thread


class DirectSolver(Solver):
    """Per side (train, test), the per-stock statistics contracted over each distinct cell pattern of the
    folds; a batch of draws is one GEMM per fold group of per-draw stock weights (count x [stock fold is / is
    not the fold's own]) against them."""

    mode = "stats"

    def __init__(self, problem: RidgeProblem, alpha: float = 1.0):
        super().__init__(problem)
        assert problem.sep is not None, "the direct path needs a separable layout"
        self.alpha = float(alpha)
        with single_thread(light(problem, "stats", direct=False)):
            self.cell_stats = problem.cell_stats()
            self.patterns = self._patterns()

    def threads(self):
        return single_thread(light(self.problem, self.mode, direct=True))

    def draw_batch_size(self) -> int:
        F = self.folds.n_folds
        per_draw = 8 * (2 * F * self.p + 2 * F * self.d * self.d)
        return self.draws_within(per_draw)

    def solve(self, counts, assign, ic_groups=None) -> tuple[FoldFit, FoldScore, np.ndarray]:
        pb = self.problem
        cnt, asg, alpha = self.draw_tensors(counts, assign, self.alpha)
        train_s, test_s = self.direct_fold_stats(cnt, asg)
        fit = pb.fit_stats(train_s, alpha.T)
        fit, score = self.unsort(fit, pb.score_stats(test_s, fit))
        if ic_groups is not None:
            score.oof = pb.oof_predictions(counts, assign, fit, ic_groups)
        return fit, score, alpha.cpu().numpy()

    def _patterns(self) -> dict:
        """Per side, the per-stock statistics contracted over each distinct cell pattern of the folds ((Q, S, p)
        tensors), and the folds sorted into groups that share both patterns, so that each group's statistics
        are one GEMM into a contiguous slice."""
        St = self.cell_stats.view(self.S, self.T, self.p)
        inv, stats = {}, {}
        for side, cells in (("train", self.problem.sep[1]), ("test", self.problem.sep[2])):
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

    def direct_fold_stats(self, counts: torch.Tensor, assign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(train, test) statistics of every fold, laid out (F, B, p) with folds in `patterns["order"]`: per
        group one GEMM of per-draw stock weights (count x [stock fold is / is not the fold's own]) against
        the contracted statistics. `fit_stats`/`score_stats` take them; `unsort` restores (B, F)."""
        pt = self.patterns
        own = torch.as_tensor(self.problem.sep[0][pt["order"]], device=self.device)
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
