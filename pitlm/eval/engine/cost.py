"""The cost and memory model: where a solver's block sums come from ("stats": per-stock statistics and a GEMM
per batch of draws, or "rows": a pass over the rows per draw), and when a draw is too small for threads."""

from __future__ import annotations

from pitlm.eval.engine.stats import RidgeProblem


def _check_stats_fit(mode: str, stats_bytes: int, memory_bytes: int) -> None:
    if mode == "stats" and stats_bytes > memory_bytes * 4:
        raise ValueError(f"per-stock statistics need {stats_bytes / 2**30:.1f} GiB; use mode='rows'")


def block_mode(pb: RidgeProblem, mode: str, direct: bool = False) -> str:
    """"stats" or "rows" for the block-statistics and direct paths (`direct`: fold statistics straight from
    per-stock statistics, which then take at most 2 per fold)."""
    n_patterns = 2 * pb.folds.n_folds if direct and pb.sep is not None else 0  # at most
    stats_bytes = pb.S * (pb.T + min(n_patterns, 2 * pb.T)) * pb.p * 8
    _check_stats_fit(mode, stats_bytes, pb.memory_bytes)
    if mode != "auto":
        return mode
    # Cost per draw in multiply-adds: the direct path does one GEMM per fold and side (2*F*S*p), the block
    # path K*T*S*p (plus 2*F*S*p for layouts that are not separable); the rows pass a rank-k update over the
    # ~63% of rows whose stock is drawn (half of d*d on CPU, where numpy uses syrk) plus one Python step per
    # block. Measured on 2 cores, the rows pass runs ~3x slower per multiply-add than the batched GEMM.
    F = pb.folds.n_folds
    if n_patterns:
        gemm = 2 * F * pb.S * pb.p
    else:
        gemm = (pb.K * pb.T + (2 * F if pb.sep is None else 0)) * pb.S * pb.p
    rows = 0.63 * pb.n * pb.d * pb.d * (0.5 if pb.device.type == "cpu" else 1.0) + 5e5 * pb.K * pb.T
    return "stats" if stats_bytes <= pb.memory_bytes and gemm <= 3 * rows else "rows"


def light(pb: RidgeProblem, mode: str, direct: bool) -> bool:
    """Whether a draw's work is small (< ~5e7 multiply-adds): then one thread is faster (and on a shared
    CPU, far faster: every OpenMP region waits for its slowest, possibly descheduled, thread)."""
    if pb.device.type != "cpu":
        return False
    F = pb.folds.n_folds
    gemm = 2 * F * pb.S * pb.p if direct else pb.K * pb.T * pb.S * pb.p
    work = gemm if mode == "stats" else pb.n * pb.d * pb.d
    return work + F * pb.d ** 3 / 3 < 5e7


def packed_mode(pb: RidgeProblem, n_patterns: int, n_train_rows: int, n_super_cells: int, mode: str) -> str:
    """"stats" or "rows" for the fast path with fixed alpha (`PackedSolver`): `n_patterns` training patterns,
    `n_train_rows` rows in some training set, `n_super_cells` super-cells."""
    m1 = pb.d + 2
    tri = (pb.d + 1) * (pb.d + 2) // 2
    pt = tri + pb.d + 1
    stats_bytes = n_patterns * pb.S * pt * 8
    _check_stats_fit(mode, stats_bytes, pb.memory_bytes)
    if mode != "auto":
        return mode
    # multiply-adds per draw: the stats GEMM, one row of S weights per fold and packed statistic; the rows
    # pass, a syrk over the ~63% of training rows whose stock is drawn, plus block combinations (memory
    # passes, ~10 multiply-adds' worth per element) and per-block Python work (~2e5 multiply-adds' worth)
    F = pb.folds.n_folds
    gemm = F * pb.S * pt
    blocks = pb.K * n_super_cells
    rows = 0.63 * n_train_rows * m1 * m1 / 2 + 10 * (blocks + 3 * F) * m1 * m1 + 2e5 * (blocks + F)
    return "stats" if stats_bytes <= pb.memory_bytes and gemm <= rows else "rows"
