"""The exact engine equals scikit-learn (Ridge + GroupKFold / chronological / purged / walk-forward loops on
bootstrap draws materialised by row duplication) to 1e-8 relative; rank IC equals scipy's spearmanr."""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score
from sklearn.model_selection import GroupKFold

import pitlm.eval.engine.fast as fast_module
from pitlm.eval.bootstrap import draw_counts
from pitlm.eval.engine import (
    BlockSolver,
    DirectSolver,
    PackedCVSolver,
    PackedSolver,
    RidgeProblem,
    choose_solver,
    per_date_rank_ic,
)
from pitlm.eval.engine.cost import block_mode
from pitlm.eval.engine.lapack import batched_eigh, batched_linalg, cholesky_solve
from pitlm.eval.engine.rankic import RankIC, weighted_midranks
from pitlm.eval.protocols.run import Panel, ProtocolConfig, _broadcast_stock_folds
from pitlm.eval.splitters import (
    ChronologicalSplit,
    PurgedPanelSplit,
    WalkForwardSplit,
    group_kfold_assignment,
    group_kfold_folds,
    legacy_folds,
)

TOL = 1e-8


def data(n_stocks=24, per_stock=14, d=6, seed=0):
    rng = np.random.default_rng(seed)
    cal = pd.bdate_range("2017-01-04", "2021-12-03").to_numpy().astype("datetime64[D]")
    stock = np.repeat(np.arange(n_stocks), per_stock)
    dates = np.concatenate([np.sort(rng.choice(cal, per_stock, replace=False)) for _ in range(n_stocks)])
    X = rng.normal(size=(len(stock), d)) * rng.uniform(0.5, 20, d) + rng.uniform(-50, 50, d)  # scaled, offset
    y = X @ rng.normal(size=d) * 0.01 + rng.normal(size=len(stock))
    return X, y, stock, dates, np.unique(dates)


def expand(counts, stock):
    """Row indices of a bootstrap draw: stock s's rows repeated counts[s] times."""
    return np.concatenate([np.flatnonzero(stock == s) for s in range(len(counts)) for _ in range(counts[s])])


def close(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    assert np.allclose(a, b, rtol=TOL, atol=TOL * np.abs(b).max()), (a, b)


def generic(X, y, stock, cell, S, folds, mode="auto", device="cpu") -> BlockSolver:
    """The block-statistics solver (`mode` auto: the cost model's choice)."""
    pb = RidgeProblem(X, y, stock, cell, S, folds, device=device)
    return BlockSolver(pb, block_mode(pb, mode))


def engine_r2(X, y, stock, dates, folds, counts, alpha=1.0, mode="stats"):
    cell = folds.cell_of_pos[folds.positions(dates)]
    S = len(counts)
    eng = generic(X, y, stock, cell, S, folds, mode=mode)
    sizes = counts * np.bincount(stock, minlength=S)
    assign = group_kfold_assignment(sizes, folds.n_stock_folds) if folds.n_stock_folds > 1 else np.zeros(S, int)
    H = eng.block_stats(torch.tensor(counts[None], dtype=torch.float64), torch.tensor(assign[None]))
    fit = eng.problem.fit(H, alpha)
    return eng.problem.score(H, fit), eng, fit


def _materialised_folds(sc, X, y, stock, cell, folds, counts, assign):
    """Every (draw b, fold f) with rows on both sides, as scikit-learn would see it: the draw materialised by
    row duplication, (b, f, Xb, yb, train mask, test mask); checks the engine's test-row count of every fold."""
    for b, c in enumerate(counts):
        idx = expand(c, stock)
        Xb, yb, kb, tb = X[idx], y[idx], assign[b][stock][idx], cell[idx]
        for f in range(folds.n_folds):
            tr, te = folds.train[f][kb, tb], folds.test[f][kb, tb]
            assert sc.n[b, f].item() == te.sum()
            if te.any() and tr.any():
                yield b, f, Xb, yb, tr, te


@pytest.mark.parametrize("mode", ["stats", "rows"])
@pytest.mark.parametrize("draw", range(4))
def test_group_kfold_and_chronological_equal_sklearn(mode, draw):
    X, y, stock, dates, cal = data(seed=draw)
    counts = np.ones(24, int) if draw == 0 else draw_counts(24, 3, seed=draw)[draw - 1]
    idx = expand(counts, stock)
    Xb, yb, gb, db = X[idx], y[idx], stock[idx], dates[idx]
    ref = [r2_score(yb[te], Ridge(alpha=1.0).fit(Xb[tr], yb[tr]).predict(Xb[te]))
           for tr, te in GroupKFold(5).split(Xb, yb, gb)]
    sc, _, _ = engine_r2(X, y, stock, dates, group_kfold_folds(cal, 5), counts, mode=mode)
    close(sc.r2[0].numpy(), ref)
    tr, te = db <= np.datetime64("2020-12-31"), db >= np.datetime64("2021-01-01")
    ref_off = r2_score(yb[te], Ridge(alpha=1.0).fit(Xb[tr], yb[tr]).predict(Xb[te]))
    sc, _, _ = engine_r2(X, y, stock, dates, ChronologicalSplit().folds(cal), counts, mode=mode)
    close(sc.r2[0, 0].item(), ref_off)


@pytest.mark.parametrize("mode", ["stats", "rows"])
def test_purged_and_walk_forward_equal_sklearn_loop_on_a_draw(mode):
    X, y, stock, dates, cal = data(seed=7)
    counts = draw_counts(24, 1, seed=3)[0]
    idx = expand(counts, stock)
    Xb, yb, gb, db = X[idx], y[idx], stock[idx], dates[idx]
    for splitter in (PurgedPanelSplit(4, 3, embargo_days=5, horizon=2, calendar=cal),
                     WalkForwardSplit(embargo_days=5, horizon=2, calendar=cal)):
        sc, _, _ = engine_r2(X, y, stock, dates, splitter.folds(cal), counts, alpha=3.0, mode=mode)
        eng_r2 = sc.r2[0].numpy()[sc.n[0].numpy() > 0]
        ref = [r2_score(yb[te], Ridge(alpha=3.0).fit(Xb[tr], yb[tr]).predict(Xb[te]))
               for tr, te in splitter.split(Xb, yb, gb, dates=db)]
        close(eng_r2, ref)


def test_predictions_and_coefficients_equal_sklearn():
    X, y, stock, dates, cal = data(seed=3)
    counts = np.ones(24, int)
    _, eng, fit = engine_r2(X, y, stock, dates, group_kfold_folds(cal, 5), counts, alpha=0.5)
    pred = eng.problem.predict(fit)[0].numpy()
    for j, (tr, _) in enumerate(GroupKFold(5).split(X, y, stock)):
        m = Ridge(alpha=0.5).fit(X[tr], y[tr])
        close(pred[j], m.predict(X))
        close(fit.beta[0, j].numpy(), m.coef_)


def test_inner_cv_alpha_equals_brute_force():
    X, y, stock, dates, cal = data(seed=5, d=4)
    folds = group_kfold_folds(cal, 4)
    grid = [0.01, 1.0, 100.0, 1e4]
    cell = np.zeros(len(y), int)
    eng = generic(X, y, stock, cell, 24, folds)
    assign = group_kfold_assignment(np.bincount(stock), 4)
    H = eng.block_stats(torch.ones(1, 24, dtype=torch.float64), torch.tensor(assign[None]))
    chosen = eng.select_alpha(H, grid, default=1.0)[0].numpy()
    k = assign[stock]
    for f in range(4):
        sse = []
        for a in grid:
            total = 0.0
            for j in range(4):
                if j == f:
                    continue
                tr, te = (k != f) & (k != j), k == j
                total += ((y[te] - Ridge(alpha=a).fit(X[tr], y[tr]).predict(X[te])) ** 2).sum()
            sse.append(total)
        assert chosen[f] == grid[int(np.argmin(sse))]


@pytest.mark.parametrize("draw", [0, 1])
def test_inner_cv_alpha_on_purged_grid_equals_brute_force(draw):
    """The stock x time grid, where inner folds share training sets (deduplicated in select_alpha): the chosen
    alpha of every outer fold equals an sklearn loop over that fold's inner leave-one-stock-fold-out folds, on
    a bootstrap draw materialised by row duplication."""
    X, y, stock, dates, cal = data(seed=11 + draw, d=5)
    counts = np.ones(24, int) if draw == 0 else draw_counts(24, 1, seed=4)[0]
    folds = PurgedPanelSplit(3, 3, embargo_days=5, horizon=2, calendar=cal).folds(cal)
    grid = [0.01, 1.0, 30.0, 1e3, 1e5]
    cell = folds.cell_of_pos[folds.positions(dates)]
    eng = generic(X, y, stock, cell, 24, folds)
    assign = group_kfold_assignment(counts * np.bincount(stock, minlength=24), 3)
    H = eng.block_stats(torch.tensor(counts[None], dtype=torch.float64), torch.tensor(assign[None]))
    chosen = eng.select_alpha(H, grid, default=-1.0)[0].numpy()
    idx = expand(counts, stock)
    k, t = assign[stock][idx], cell[idx]
    tr_cells = eng.problem.train_cells  # (F, K, T)
    for f in range(tr_cells.shape[0]):
        in_train = tr_cells[f][k, t]
        sse = np.zeros(len(grid))
        used = False
        for j in range(tr_cells.shape[1]):
            tr, te = in_train & (k != j), in_train & (k == j)
            if not tr.any() or not te.any():
                continue
            used = True
            for a_i, a in enumerate(grid):
                pred = Ridge(alpha=a).fit(X[idx][tr], y[idx][tr]).predict(X[idx][te])
                sse[a_i] += ((y[idx][te] - pred) ** 2).sum()
        assert chosen[f] == (grid[int(np.argmin(sse))] if used else -1.0), (f, chosen[f], sse)


def test_thread_pooled_linalg_equals_one_call():
    """The CPU thread pool over a batch of small solves (fits and inner-CV eigh) gives what one call gives, for
    any batch shape, and leaves torch's intra-op thread count as it found it."""
    g = torch.Generator().manual_seed(0)
    M = torch.randn(3, 50, 12, 20, dtype=torch.float64, generator=g)
    A = M @ M.mT + 0.1 * torch.eye(12, dtype=torch.float64)
    b = torch.randn(3, 50, 12, dtype=torch.float64, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, info = batched_linalg(cholesky_solve, A, b)
        assert torch.get_num_threads() == 2
        assert x.shape == b.shape and info.shape == (3, 50) and (info == 0).all()
        torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-10, atol=1e-12)
        lam, V = batched_eigh(A)
        lam_ref = torch.linalg.eigvalsh(A)
        torch.testing.assert_close(lam, lam_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(V @ torch.diag_embed(lam) @ V.mT, A, rtol=1e-10, atol=1e-10)
    finally:
        torch.set_num_threads(before)


def test_rank_ic_equals_scipy_on_expanded_rows():
    rng = np.random.default_rng(0)
    n, n_dates = 300, 12
    date = rng.integers(0, n_dates, n)
    pred = rng.normal(size=n)
    y = np.round(rng.normal(size=n), 1)  # ties in the target, like JPX's exact zeros
    w = rng.integers(0, 3, n).astype(float)
    ic = per_date_rank_ic(date, pred, y, w, n_dates, min_stocks=3)
    idx = np.repeat(np.arange(n), w.astype(int))
    for t in range(n_dates):
        rows = idx[date[idx] == t]
        if (w[date == t] > 0).sum() >= 3:
            close(ic[t], spearmanr(pred[rows], y[rows]).statistic)
        else:
            assert np.isnan(ic[t])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_engine_equals_cpu():
    X, y, stock, dates, cal = data(seed=2)
    counts = draw_counts(24, 1, seed=1)[0]
    folds = group_kfold_folds(cal, 5)
    assign = torch.tensor(group_kfold_assignment(counts * np.bincount(stock), 5)[None])
    out = []
    for device in ("cpu", "cuda"):
        eng = generic(X, y, stock, np.zeros(len(y), int), 24, folds, device=device)
        H = eng.block_stats(torch.tensor(counts[None], dtype=torch.float64, device=device), assign.to(device))
        out.append(eng.problem.score(H, eng.problem.fit(H, 1.0)).r2.cpu().numpy())
    close(out[1], out[0])


def _fast_layout(name, cal):
    if name == "legacy":
        return legacy_folds(cal, "2020-12-31", "2021-01-01", 5)
    if name == "purged":
        return PurgedPanelSplit(4, 3, embargo_days=5, horizon=2).folds(cal)
    return WalkForwardSplit(embargo_days=5, horizon=2).folds(cal)


@pytest.mark.parametrize("mode", ["stats", "rows", "rows-big-blocks"])
@pytest.mark.parametrize("layout", ["legacy", "purged", "walk_forward"])
def test_fast_path_equals_sklearn_on_draws(mode, layout, monkeypatch):
    """PackedSolver (fixed alpha: packed statistics + RFP Cholesky, or row blocks + dpotrf; test sides from
    residuals) gives every fold's coefficients, predictions, SSE, SST and R2 of a scikit-learn Ridge refit on
    bootstrap draws materialised by row duplication."""
    X, y, stock, dates, cal = data(seed=21, d=7)
    S, alpha = 24, 2.5
    folds = _fast_layout(layout, cal)
    cell = folds.cell_of_pos[folds.positions(dates)]
    if mode == "rows-big-blocks":  # the seed-scale branch: blocks one at a time, gathered into a kept buffer
        monkeypatch.setattr(fast_module, "BIG_BLOCK", 0.0)
        mode = "rows"
    eng = choose_solver(X, y, stock, cell, S, folds, alpha=alpha, mode=mode)
    assert isinstance(eng, PackedSolver) and eng.mode == mode
    counts = np.concatenate([np.ones((1, S), int), draw_counts(S, 2, seed=5)])
    K = folds.n_stock_folds
    assign = np.stack([group_kfold_assignment(c * np.bincount(stock, minlength=S), K) if K > 1 else np.zeros(S, int)
                       for c in counts])
    fit, sc, alphas = eng.solve(counts, assign)
    assert (alphas == alpha).all()
    pred = eng.problem.predict(fit).numpy()
    checked = 0
    for b, f, Xb, yb, tr, te in _materialised_folds(sc, X, y, stock, cell, folds, counts, assign):
        assert fit.ok[b, f]
        m = Ridge(alpha=alpha).fit(Xb[tr], yb[tr])
        close(fit.beta[b, f].numpy(), m.coef_)
        close(pred[b, f], m.predict(X))
        close(sc.sse[b, f].item(), ((yb[te] - m.predict(Xb[te])) ** 2).sum())
        close(sc.sst[b, f].item(), ((yb[te] - yb[te].mean()) ** 2).sum())
        if te.sum() >= 2:
            close(sc.r2[b, f].item(), r2_score(yb[te], m.predict(Xb[te])))
        checked += 1
    assert checked >= 2 * folds.n_folds


def test_fast_modes_agree_and_match_the_general_path():
    """stats and rows modes of the fast path, and the general block-statistics path, on the same draws."""
    X, y, stock, dates, cal = data(seed=4, d=5)
    folds = PurgedPanelSplit(3, 4, embargo_days=3, horizon=2).folds(cal)
    cell = folds.cell_of_pos[folds.positions(dates)]
    counts = draw_counts(24, 5, seed=9)
    assign = np.stack([group_kfold_assignment(c * np.bincount(stock, minlength=24), 3) for c in counts])
    out = []
    for mode in ("stats", "rows"):
        eng = choose_solver(X, y, stock, cell, 24, folds, alpha=0.7, mode=mode)
        out.append(eng.solve(counts, assign)[:2])
    eng = generic(X, y, stock, cell, 24, folds, mode="stats")
    H = eng.block_stats(torch.tensor(counts, dtype=torch.float64), torch.tensor(assign))
    fit = eng.problem.fit(H, 0.7)
    out.append((fit, eng.problem.score(H, fit)))
    (f0, s0), rest = out[0], out[1:]
    for f1, s1 in rest:
        assert torch.equal(f0.ok, f1.ok)
        torch.testing.assert_close(f1.beta, f0.beta, rtol=1e-9, atol=1e-12)
        for k in ("sse", "sst", "n", "sy"):
            torch.testing.assert_close(getattr(s1, k), getattr(s0, k), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("mode", ["stats", "rows"])
def test_fast_path_flags_a_fold_without_training_rows(mode):
    """One drawn stock: GroupKFold's fold holding it has no training rows (not ok, zero coefficients); the
    others test nothing and train on that stock alone (equal to sklearn)."""
    X, y, stock, dates, cal = data(seed=6, d=4)
    folds = group_kfold_folds(cal, 4)
    eng = choose_solver(X, y, stock, np.zeros(len(y), int), 24, folds, alpha=1.0, mode=mode)
    counts = np.zeros((1, 24), int)
    counts[0, 3] = 2
    assign = (np.arange(24) % 4)[None]
    fit, sc, _ = eng.solve(counts, assign)
    own = 3
    assert not fit.ok[0, own] and (fit.beta[0, own] == 0).all() and sc.n[0, own] == 28
    rows = np.flatnonzero(stock == 3)
    m = Ridge(alpha=1.0).fit(X[np.r_[rows, rows]], y[np.r_[rows, rows]])
    for f in set(range(4)) - {own}:
        assert fit.ok[0, f] and sc.n[0, f] == 0
        close(fit.beta[0, f].numpy(), m.coef_)


def test_direct_path_equals_block_path():
    """The direct path (fixed alpha off the CPU: fold statistics straight from per-stock statistics, one GEMM
    per fold group) gives what the block-statistics path gives; run here on the CPU."""
    X, y, stock, dates, cal = data(seed=8, d=5)
    folds = PurgedPanelSplit(3, 3, embargo_days=3, horizon=2).folds(cal)
    cell = folds.cell_of_pos[folds.positions(dates)]
    counts = draw_counts(24, 3, seed=2)
    assign = np.stack([group_kfold_assignment(c * np.bincount(stock, minlength=24), 3) for c in counts])
    eng = generic(X, y, stock, cell, 24, folds, mode="stats")
    H = eng.block_stats(torch.tensor(counts, dtype=torch.float64), torch.tensor(assign))
    fit = eng.problem.fit(H, 1.5)
    ref = eng.problem.score(H, fit)
    fit_d, sc, alphas = DirectSolver(eng.problem, alpha=1.5).solve(counts, assign)
    assert (alphas == 1.5).all()
    torch.testing.assert_close(fit_d.beta, fit.beta, rtol=1e-9, atol=1e-12)
    for k in ("sse", "sst", "n"):
        torch.testing.assert_close(getattr(sc, k), getattr(ref, k), rtol=1e-9, atol=1e-10)


def _cv_layout(name, cal, K=3):
    if name == "purged":
        return PurgedPanelSplit(K, 3, embargo_days=5, horizon=2).folds(cal)
    return _broadcast_stock_folds(WalkForwardSplit(embargo_days=5, horizon=2).folds(cal), K)


def _cv_draws(stock, S, K, n=3, seed=5):
    counts = np.concatenate([np.ones((1, S), int), draw_counts(S, n, seed=seed)])
    assign = np.stack([group_kfold_assignment(c * np.bincount(stock, minlength=S), K) for c in counts])
    return counts, assign


@pytest.mark.parametrize("layout", ["purged", "walk_forward"])
def test_fast_inner_cv_equals_generic_path_and_sklearn(layout):
    """PackedCVSolver (alpha by inner CV from block Grams, one Cholesky per inner training set and alpha)
    chooses select_alpha's alpha for every fold of every draw, and each fold's fit with that alpha equals a
    scikit-learn Ridge refit on the draw materialised by row duplication."""
    X, y, stock, dates, cal = data(seed=31, d=5)
    S, K, grid = 24, 3, [0.01, 1.0, 30.0, 1e3, 1e5]
    folds = _cv_layout(layout, cal, K)
    cell = folds.cell_of_pos[folds.positions(dates)]
    counts, assign = _cv_draws(stock, S, K)
    eng = choose_solver(X, y, stock, cell, S, folds, alpha=-1.0, grid=grid)
    assert isinstance(eng, PackedCVSolver) and eng.mode == "rows"
    fit, sc, alpha = eng.solve(counts, assign)
    ref = generic(X, y, stock, cell, S, folds, mode="rows")
    H = ref.block_stats(torch.tensor(counts, dtype=torch.float64), torch.tensor(assign))
    np.testing.assert_array_equal(alpha, ref.select_alpha(H, grid, default=-1.0).numpy())
    assert eng.cv_fallbacks == 0
    checked = 0
    for b, f, Xb, yb, tr, te in _materialised_folds(sc, X, y, stock, cell, folds, counts, assign):
        m = Ridge(alpha=alpha[b, f]).fit(Xb[tr], yb[tr])
        close(fit.beta[b, f].numpy(), m.coef_)
        close(sc.sse[b, f].item(), ((yb[te] - m.predict(Xb[te])) ** 2).sum())
        checked += 1
    assert checked >= 2 * folds.n_folds and len(set(alpha.ravel())) > 1


def test_fast_inner_cv_leaves_ties_to_select_alpha():
    """Exactly tied alphas (a grid that repeats a value) are decided by select_alpha (its first minimum), as
    are the draws' other folds: the same alphas as the generic path, counted as fallbacks."""
    X, y, stock, dates, cal = data(seed=32, d=4)
    S, K, grid = 24, 3, [1e3, 1.0, 1.0, 1e3]
    folds = _cv_layout("purged", cal, K)
    cell = folds.cell_of_pos[folds.positions(dates)]
    counts, assign = _cv_draws(stock, S, K, n=2, seed=8)
    eng = choose_solver(X, y, stock, cell, S, folds, alpha=5.0, grid=grid)
    _, _, alpha = eng.solve(counts, assign)
    ref = generic(X, y, stock, cell, S, folds, mode="rows")
    H = ref.block_stats(torch.tensor(counts, dtype=torch.float64), torch.tensor(assign))
    np.testing.assert_array_equal(alpha, ref.select_alpha(H, grid, default=5.0).numpy())
    assert eng.cv_fallbacks == len(counts)


def test_fast_inner_cv_out_of_fold_predictions_equal_predict():
    """The out-of-fold predictions the fast path keeps while scoring (for the rank IC) equal every fold's
    predictions masked by the folds that test each row, and the row weights equal the tested counts."""
    X, y, stock, dates, cal = data(seed=33, d=5)
    rows = pd.DataFrame({"Date": dates, "SecuritiesCode": stock + 100, "Target": y})
    folds = _cv_layout("purged", cal, 3)
    panel = Panel(rows, ProtocolConfig(n_splits=3))
    counts, assign = _cv_draws(stock, 24, 3)
    eng = choose_solver(X, y, stock, panel.cells(folds), 24, folds, alpha=1.0, grid=[0.1, 10.0])
    fit, sc, _ = eng.solve(counts, assign, ic_groups=[list(range(folds.n_folds))])
    (pred, w), = eng.problem.oof_predictions(counts, assign, fit, [list(range(folds.n_folds))])
    (got_pred, got_w), = sc.oof
    np.testing.assert_array_equal(got_w, w)
    close(got_pred[w > 0], pred[w > 0])


def test_rank_ic_with_presorted_target_equals_lexsort_ranks():
    """RankIC (the target sorted once, predictions by argsort + a stable date sort) gives bit for bit what
    ranking each draw's kept rows by np.lexsort gives, with ties on both sides and rows of weight 0."""
    rng = np.random.default_rng(1)
    n, n_dates = 400, 30
    date = rng.integers(0, n_dates, n)
    y = np.round(rng.normal(size=n), 1)
    ranker = RankIC(date, y, n_dates, min_stocks=3)
    for _ in range(5):
        pred = np.round(rng.normal(size=n), 1)
        w = rng.integers(0, 3, n).astype(float)
        keep = w > 0
        d, p, t, wk = date[keep], pred[keep], y[keep], w[keep]
        rp, ry = weighted_midranks(d, p, wk), weighted_midranks(d, t, wk)
        want = np.full(n_dates, np.nan)
        want = ranker._correlate(d, rp, ry, wk, want)
        np.testing.assert_array_equal(ranker(pred, w), want)
    batch = ranker.batch(np.stack([pred, -pred]), np.stack([w, w]), workers=2)
    np.testing.assert_array_equal(batch[0], ranker(pred, w))


def test_choose_solver_by_alpha_mode_and_memory():
    """Fixed alpha on the CPU: PackedSolver; alpha by inner CV: PackedCVSolver, or BlockSolver (with
    select_alpha) when stats mode is forced; a bad mode or per-stock statistics far over budget: ValueError."""
    X, y, stock, dates, cal = data(seed=9, d=4)
    folds = PurgedPanelSplit(3, 3, embargo_days=3, horizon=2).folds(cal)
    cell = folds.cell_of_pos[folds.positions(dates)]
    assert isinstance(choose_solver(X, y, stock, cell, 24, folds, alpha=1.0), PackedSolver)
    assert isinstance(choose_solver(X, y, stock, cell, 24, folds, alpha=1.0, grid=[1.0, 2.0]), PackedCVSolver)
    block = choose_solver(X, y, stock, cell, 24, folds, alpha=1.0, grid=[1.0, 2.0], mode="stats")
    assert isinstance(block, BlockSolver) and block.mode == "stats" and block.grid == [1.0, 2.0]
    with pytest.raises(ValueError, match="engine mode"):
        choose_solver(X, y, stock, cell, 24, folds, alpha=1.0, mode="fast")
    with pytest.raises(ValueError, match="per-stock statistics"):
        choose_solver(X, y, stock, cell, 24, folds, alpha=1.0, mode="stats", memory_bytes=1)


def test_every_solver_gives_the_same_out_of_fold_predictions():
    """The out-of-fold predictions and weights that `solve` returns for the rank IC and portfolios agree across
    the four solvers (the fast paths keep them while scoring; the others predict every row)."""
    X, y, stock, dates, cal = data(seed=10, d=5)
    folds = PurgedPanelSplit(3, 3, embargo_days=3, horizon=2).folds(cal)
    cell = folds.cell_of_pos[folds.positions(dates)]
    counts, assign = _cv_draws(stock, 24, 3, n=2, seed=3)
    groups = [list(range(folds.n_folds))]
    pb = RidgeProblem(X, y, stock, cell, 24, folds)
    grid = [0.1, 10.0]
    runs = {"packed": PackedSolver(pb, "rows", alpha=2.0), "direct": DirectSolver(pb, alpha=2.0),
            "block": BlockSolver(pb, "stats", alpha=2.0), "packed_cv": PackedCVSolver(pb, grid, default=2.0),
            "block_cv": BlockSolver(pb, "rows", alpha=2.0, grid=grid)}
    oof = {name: solver.solve(counts, assign, groups)[1].oof[0] for name, solver in runs.items()}
    for name, (pred, w) in oof.items():
        ref_pred, ref_w = oof["block_cv" if name.endswith("cv") else "packed"]
        np.testing.assert_array_equal(w, ref_w, err_msg=name)
        close(pred[w > 0], ref_pred[w > 0])
