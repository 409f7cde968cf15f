"""Bitwise identity of the Ridge engine across a refactor (issue 26 item 2: eval/engine.py -> eval/engine/).

    OMP_NUM_THREADS=1 ... PYTHONPATH=<tree> python scripts/engine_identity.py OUT.pkl   # record
    PYTHONPATH=<tree> python scripts/engine_identity.py --cuda OUT.pkl                  # record, on a GPU
    python scripts/engine_identity.py --compare A.pkl B.pkl                              # every array equal?

<tree> is a checkout: a761444 is the last one with eval/engine.py (BENCHMARKS.md, the renovation); run it from
outside the repo root (or with the old tree first on PYTHONPATH) so that the checkout's pitlm is the one imported.

Records `evaluate`'s per-draw values, alphas, engine modes and portfolio series on a small synthetic panel under
every CPU engine path reachable from `evaluate` (packed stats / rows, packed inner CV, block statistics +
select_alpha, big-block rows, forced batching by a tiny memory budget, two pool workers, near-tied alpha grid),
plus, through the engine's own API (old: ClusterRidge; new: the solver classes), the two paths `evaluate`
takes only off the CPU: the direct path and the block path with fixed alpha (stats and rows modes), with
their out-of-fold predictions.
"""

import pickle
import sys

import numpy as np
import pandas as pd
import torch

import pitlm.eval.engine as engine_pkg

try:  # protocols.py became the package protocols/ (records) with the code in protocols/run.py
    import pitlm.eval.protocols.run as protocols
    from pitlm.eval.protocols import get as get_protocol
except ImportError:
    from pitlm.eval import protocols

    def get_protocol(name):
        return name

Panel, ProtocolConfig, evaluate = protocols.Panel, protocols.ProtocolConfig, getattr(protocols, "evaluate_features", getattr(protocols, "evaluate", None))
count_vectors, ic_groups, stock_fold_assignments = (protocols.count_vectors, protocols.ic_groups,
                                                    protocols.stock_fold_assignments)

NEW = not hasattr(engine_pkg, "ClusterRidge")
if NEW:
    import pitlm.eval.engine.fast as big_block_module
else:
    big_block_module = engine_pkg


def panel(n_stocks=30, per_stock=40, seed=3, widths=(("control", 3), ("base", 8), ("arm", 17))):
    rng = np.random.default_rng(seed)
    cal = pd.bdate_range("2017-01-04", "2021-12-03")
    codes = np.sort(rng.choice(9000, n_stocks, replace=False)) + 1000
    parts = [pd.DataFrame({"Date": np.sort(rng.choice(cal, per_stock, replace=False)), "SecuritiesCode": c})
             for c in codes]
    rows = pd.concat(parts, ignore_index=True)
    rows["Target"] = rng.normal(0, 0.02, len(rows))
    feats = {}
    for m, d in widths:
        X = rng.normal(size=(len(rows), d)) * rng.uniform(0.5, 5, d) + rng.normal(size=d)
        rows["Target"] += 0.002 * X[:, 0] / (1 + len(feats))
        feats[m] = X
    return rows, feats


BASE = {"n_boot": 6, "jackknife_groups": 4, "n_time_blocks": 3, "seed": 7, "rank_ic": True, "portfolio": True}
CASES = {
    "auto_fixed": {},
    "stats_fixed": {"engine": "stats"},
    "rows_fixed": {"engine": "rows"},
    "auto_cv": {"alpha_cv": True},
    "stats_cv": {"alpha_cv": True, "engine": "stats"},
    "rows_cv": {"alpha_cv": True, "engine": "rows", "demean_target": True},
    "auto_cv_grid": {"alpha_cv": True, "alpha_grid": [0.1, 3.0, 100.0]},
    "tied_grid_cv": {"alpha_cv": True, "alpha_grid": [1e3, 1.0, 1.0, 1e3]},
    "tied_grid_stats_cv": {"alpha_cv": True, "alpha_grid": [1e3, 1.0, 1.0, 1e3], "engine": "stats"},
    "tiny_memory_fixed": {"memory_gb": 2e-5},
    "tiny_memory_cv": {"memory_gb": 2e-5, "alpha_cv": True},
    "tiny_memory_stats_cv": {"memory_gb": 1e-3, "alpha_cv": True, "engine": "stats"},
    "no_ic_no_portfolio": {"rank_ic": False, "portfolio": False, "alpha": 3.0},
    "no_ic_cv": {"rank_ic": False, "alpha_cv": True},
}


def record_result(res) -> dict:
    return {"values": res.values, "alphas": res.info["alphas"], "engine_modes": res.info["engine_modes"],
            "portfolio": res.portfolio}


def engine_paths(rows, feats) -> dict:
    """The direct path and the fixed-alpha block path (stats, rows), which `evaluate` takes off the CPU only."""
    cfg = ProtocolConfig(**BASE)
    pn = Panel(rows, cfg)

    counts = count_vectors(pn.n_stocks, cfg)
    assign, _ = stock_fold_assignments(counts, pn.rows_per_stock, cfg.n_splits)
    out = {}
    for lname in ("purged", "walk_forward", "legacy"):
        folds = protocols.build_layouts(get_protocol(lname), pn.calendar, cfg)[lname]
        a = assign if folds.n_stock_folds > 1 else np.zeros_like(assign)
        groups = ic_groups(folds)
        for model, X in feats.items():
            for path in ("direct", "block_stats", "block_rows"):
                parts = []
                solver = make_solver(path, X, pn, folds, alpha=1.5)
                for s in range(0, len(counts), 4):
                    sl = slice(s, s + 4)
                    parts.append(solve(solver, path, pn, folds, counts[sl], a[sl], 1.5, groups))
                out[f"{path}/{lname}/{model}"] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return out


def make_solver(path, X, pn, folds, alpha):
    cell = pn.cells(folds)
    mode = "rows" if path == "block_rows" else "stats"
    if NEW:
        from pitlm.eval.engine import BlockSolver, DirectSolver, RidgeProblem

        problem = RidgeProblem(X, pn.y, pn.stock, cell, pn.n_stocks, folds)
        if path == "direct":
            return DirectSolver(problem, alpha) if problem.sep is not None else BlockSolver(problem, mode, alpha)
        return BlockSolver(problem, mode, alpha)
    eng = engine_pkg.ClusterRidge(X, pn.y, pn.stock, cell, pn.n_stocks, folds, mode=mode)
    if path == "direct":
        eng.patterns = eng._patterns()
    return eng


def solve(solver, path, pn, folds, counts, assign, alpha, groups):
    if NEW:
        fit, sc, alphas = solver.solve(counts, assign, list(groups.values()))
        oof = sc.oof
    else:
        cfg = ProtocolConfig(**BASE, alpha=alpha)
        fit, sc, alphas = protocols._solve(solver, counts, assign, cfg, None)
        oof = protocols._oof_predictions(solver, folds, pn, counts, assign, fit, groups)
    rec = {k: getattr(sc, k).cpu().numpy() for k in ("sse", "sst", "n", "sy", "syy")}
    rec.update(beta=fit.beta.cpu().numpy(), intercept=fit.intercept.cpu().numpy(), ok=fit.ok.cpu().numpy(),
               n_train=fit.n_train.cpu().numpy(), alphas=np.asarray(alphas))
    for i, (p, w) in enumerate(oof):
        rec[f"oof_pred_{i}"], rec[f"oof_w_{i}"] = p, w
    return rec


GPU_CASES = ("auto_fixed", "stats_fixed", "rows_fixed", "auto_cv", "stats_cv", "rows_cv", "tiny_memory_fixed",
             "tiny_memory_cv", "no_ic_no_portfolio")


def record_gpu(path: str) -> None:
    """Off the CPU `evaluate` takes the direct path (fixed alpha, stats) and the block path (rows, or alpha by
    inner CV with select_alpha)."""
    rows, feats = panel()
    out = {}
    for name in GPU_CASES:
        cfg = ProtocolConfig(**(BASE | CASES[name] | {"device": "cuda"}))
        out[name] = record_result(evaluate(feats, rows, cfg, control="control", base="base"))
        print(name, out[name]["engine_modes"], flush=True)
    with open(path, "wb") as fh:
        pickle.dump(out, fh)
    print("recorded", len(out), "cases to", path)


def record(path: str) -> None:
    rows, feats = panel()
    out = {}
    for name, upd in CASES.items():
        out[name] = record_result(evaluate(feats, rows, ProtocolConfig(**(BASE | upd)), control="control",
                                           base="base"))
        print(name, out[name]["engine_modes"], flush=True)
    old = big_block_module.BIG_BLOCK
    big_block_module.BIG_BLOCK = 0.0  # seed-scale rows branch: blocks one at a time
    try:
        out["big_blocks_rows"] = record_result(evaluate(feats, rows, ProtocolConfig(**BASE, engine="rows")))
    finally:
        big_block_module.BIG_BLOCK = old
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # two pool workers
    try:
        out["two_workers_auto"] = record_result(evaluate(feats, rows, ProtocolConfig(**BASE)))
        out["two_workers_cv"] = record_result(evaluate(feats, rows, ProtocolConfig(**BASE, alpha_cv=True)))
        out["two_workers_stats_cv"] = record_result(evaluate(feats, rows, ProtocolConfig(**BASE, alpha_cv=True,
                                                                                         engine="stats")))
    finally:
        torch.set_num_threads(before)
    out["engine_paths"] = engine_paths(rows, feats)
    with open(path, "wb") as fh:
        pickle.dump(out, fh)
    print("recorded", len(out), "cases to", path)


def compare(a, b, where="") -> int:
    """Number of leaves that differ (arrays: np.array_equal with equal_nan; others: ==)."""
    if isinstance(a, dict):
        if set(a) != set(b):
            print(f"{where}: keys differ: {sorted(set(a) ^ set(b))}")
            return 1
        return sum(compare(a[k], b[k], f"{where}/{k}") for k in a)
    if isinstance(a, (list, tuple)) and not all(np.isscalar(x) for x in a):
        if len(a) != len(b):
            print(f"{where}: lengths differ")
            return 1
        return sum(compare(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True)))
    if isinstance(a, (np.ndarray, list, tuple, float, int)) and not isinstance(a, bool):
        x, y = np.asarray(a), np.asarray(b)
        same = x.shape == y.shape and x.dtype == y.dtype and (
            np.array_equal(x, y, equal_nan=True) if x.dtype.kind in "fc" else np.array_equal(x, y))
        if not same:
            print(f"{where}: arrays differ")
        return 0 if same else 1
    if a != b:
        print(f"{where}: {a!r} != {b!r}")
        return 1
    return 0


def count_leaves(a) -> int:
    if isinstance(a, dict):
        return sum(count_leaves(v) for v in a.values())
    if isinstance(a, (list, tuple)) and not all(np.isscalar(x) for x in a):
        return sum(count_leaves(v) for v in a)
    return 1


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        with open(sys.argv[2], "rb") as fa, open(sys.argv[3], "rb") as fb:
            A, B = pickle.load(fa), pickle.load(fb)
        bad = compare(A, B)
        print(f"leaves compared: {count_leaves(A)}; differing: {bad}")
        sys.exit(1 if bad else 0)
    if sys.argv[1] == "--cuda":
        record_gpu(sys.argv[2])
    else:
        record(sys.argv[1])
