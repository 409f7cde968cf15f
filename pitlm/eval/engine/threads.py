"""Threads for the engine: BLAS and torch limited to one thread per pool worker, and the pool itself.

Small LAPACK/BLAS calls gain nothing from their libraries' own threads, and on a shared CPU those pools'
barriers stall whenever a core is busy elsewhere; the engine instead runs one call per core on a pool of
Python threads (ctypes and numpy release the GIL), each with one BLAS thread."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import scipy.linalg  # noqa: F401  (scipy's own OpenBLAS, behind its Cython LAPACK, must be loaded for threadpoolctl)
import torch
from threadpoolctl import ThreadpoolController

_CONTROLLER: ThreadpoolController | None = None
_POOLS: dict[int, ThreadPoolExecutor] = {}


def blas_threads(n: int):
    """Context limiting BLAS libraries to n threads (threadpoolctl; its library scan, ~ms, done once)."""
    global _CONTROLLER
    if _CONTROLLER is None:
        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER.limit(limits=n)


@contextmanager
def single_thread(active: bool):
    """Run torch and BLAS on one thread: small ops gain nothing from threads, and on a shared CPU the
    pools' barriers stall whenever a core is busy elsewhere."""
    if not active:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with blas_threads(1):
            yield
    finally:
        torch.set_num_threads(before)


def pool(n: int) -> ThreadPoolExecutor:
    if n not in _POOLS:
        _POOLS[n] = ThreadPoolExecutor(n, thread_name_prefix="pitlm-engine")
    return _POOLS[n]


def chunks(n: int, parts: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges splitting range(n) into at most `parts` non-empty pieces of near-equal size."""
    bounds = np.linspace(0, n, max(1, min(parts, n)) + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def run_all(workers: int, fn, arg_tuples) -> None:
    """fn(*args) for every args in `arg_tuples` on the engine's pool; waits for all (the first error is raised)."""
    executor = pool(workers)
    for job in [executor.submit(fn, *args) for args in arg_tuples]:
        job.result()


def map_draws(fn, pred: np.ndarray, w: np.ndarray, width: int, workers: int = 1) -> np.ndarray:
    """(B, width) rows `fn(pred[b], w[b])` of (B, n) predictions and weights, the draws spread over the pool (the
    per-date statistics' numpy sorts and bincounts release the GIL)."""
    out = np.empty((len(pred), width))

    def rows(lo, hi):
        for b in range(lo, hi):
            out[b] = fn(pred[b], w[b])

    run_all(workers, rows, chunks(len(pred), workers))
    return out


def par_matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray, workers: int) -> None:
    """out = a @ b, rows of `a` split over the pool (one BLAS thread each)."""
    run_all(workers, lambda lo, hi: np.matmul(a[lo:hi], b, out=out[lo:hi]), chunks(len(a), workers))


def next_locked(it, lock: threading.Lock):
    """next(it, None) under `lock`: pool workers taking draws off one shared iterator."""
    with lock:
        return next(it, None)
