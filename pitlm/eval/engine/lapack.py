"""LAPACK for the engine: Cholesky solves through ctypes (the GIL released, so a pool of threads runs one per
core), LAPACK's rectangular full packed (RFP) layout, and batched torch solves split over the pool."""

from __future__ import annotations

import ctypes

import numpy as np
import torch
from scipy.linalg import cython_lapack, lapack

from pitlm.eval.engine.threads import chunks, pool


def rfp_index(m: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions in a C-ordered m x m matrix of each entry of its lower triangle in LAPACK's rectangular full
    packed format (TRANSR='N', UPLO='L'), position of each diagonal entry in that packed array)."""
    flat = np.arange(m * m, dtype=np.float64).reshape(m, m)
    arf, info = lapack.dtrttf(np.asfortranarray(flat), transr="N", uplo="L")
    assert info == 0
    index = np.rint(arf).astype(np.int64)
    where = np.empty(m * m, dtype=np.int64)
    where[index] = np.arange(len(index))
    return index, where[np.arange(m) * (m + 1)]


class Lapack:
    """dpotrf/dpotrs and the rectangular-full-packed dpftrf/dpftrs from scipy's Cython LAPACK exports, called
    through ctypes, which releases the GIL (scipy.linalg.lapack's wrappers hold it), so a pool of threads runs
    one factorisation per core. Same LAPACK, same arithmetic as scipy.linalg."""

    def __init__(self):
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


_LAPACK: Lapack | None = None


def get_lapack() -> Lapack:
    """The process's `Lapack` (its ctypes prototypes made once)."""
    global _LAPACK
    if _LAPACK is None:
        _LAPACK = Lapack()
    return _LAPACK


def cholesky_solve(A: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
        parts = list(pool(n_threads).map(lambda r: fn(*(a[r[0]:r[1]] for a in flat)), chunks(n, n_threads)))
    finally:
        torch.set_num_threads(n_threads)
    return tuple(torch.cat([p[j] for p in parts]).reshape(*lead, *parts[0][j].shape[1:]) for j in range(len(parts[0])))


def batched_eigh(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.linalg.eigh over a batch of symmetric matrices (see batched_linalg)."""
    return batched_linalg(lambda a: tuple(torch.linalg.eigh(a)), A)
