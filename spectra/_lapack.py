"""LAPACK's eigenvalue-only symmetric drivers, called in place through ``ctypes``.

Two libraries already loaded by this package carry faster drivers than the ones
SciPy wraps:

* PyTorch's statically linked MKL exports ``?syevd_64_`` (ILP64) from
  ``libtorch_cpu``; ``torch.linalg.eigvalsh`` runs the same routine, but on a copy.
* SciPy's bundled OpenBLAS exports the two-stage reduction ``?syevd_2stage``
  (``scipy_ssyevd_2stage_``), which ``scipy.linalg.lapack`` does not wrap.

Both are Fortran routines: every argument by reference, the two character
arguments' hidden lengths appended, column-major storage.  A C-ordered symmetric
matrix is its own Fortran-ordered transpose, so the caller's memory is passed as
is and overwritten; ``uplo='L'`` of that column-major view is the upper triangle
of the row-major array, the triangle SciPy's path reads too.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "LapackConvergenceError",
    "LapackDriver",
    "load_driver",
    "mkl_driver",
    "openblas_two_stage_driver",
]


class LapackConvergenceError(RuntimeError):
    """LAPACK returned ``info > 0``: the tridiagonal QL/QR iteration did not converge.

    MKL's float32 ``ssyevd`` does this on some Hessians with large clusters of equal
    (e.g. exactly zero) eigenvalues where reference LAPACK converges; on AMD CPUs it
    can instead report success and return NaN, which counts as the same failure.  The
    matrix has been overwritten by then.
    """


_LETTER = {np.dtype(np.float32): "s", np.dtype(np.float64): "d"}


@dataclass(frozen=True)
class LapackDriver:
    """One eigenvalues-only ``?syevd``-shaped LAPACK routine per precision, found in a library.

    Attributes:
        name: the backend's name as :func:`spectra.dense_eigensolver.eigvalsh_inplace` knows it.
        routines: ``{numpy dtype: ctypes function}`` for float32 and/or float64; each has the
            argument list ``(jobz, uplo, n, a, lda, w, work, lwork, iwork, liwork, info,
            len(jobz), len(uplo))`` shared by ``?syevd`` and ``?syevd_2stage``.
        index: the library's integer type (``ctypes.c_int32`` for LP64, ``c_int64`` for ILP64).
        swap_threads: sets the library's thread count and returns what restores the old
            setting when passed back; :meth:`eigvalsh` runs with the count it is given.
    """

    name: str
    routines: dict[np.dtype, Callable[..., object]]
    index: type[ctypes.c_int32] | type[ctypes.c_int64]
    swap_threads: Callable[[int], int]

    def supports(self, dtype: np.dtype) -> bool:
        """Whether the library has this routine in ``dtype`` (float32 or float64)."""
        return np.dtype(dtype) in self.routines

    def workspace(self, n: int, dtype: np.dtype) -> tuple[int, int]:
        """``(lwork, liwork)``: optimal work-array lengths (scalars, integers) for order n.

        LAPACK's workspace query (``lwork = liwork = -1``); it reads no matrix entry.
        """
        dummy = np.zeros(1, dtype=dtype)
        work, iwork, info = self._call(
            n, dummy, dummy.copy(), -1, np.zeros(1, dtype), -1, np.zeros(1, self._iwork_dtype)
        )
        if info != 0:
            raise RuntimeError(f"{self.name}: workspace query for n = {n} failed (info {info})")
        # a float32 work[0] above 2**24 may be rounded down: take the next float up
        lwork = int(np.nextafter(work[0], np.inf)) if work.dtype == np.float32 else int(work[0])
        return max(1, lwork), max(1, int(iwork[0]))

    def workspace_bytes(self, n: int, dtype: np.dtype) -> int:
        """Bytes this driver allocates besides the matrix: work arrays and the eigenvalues."""
        lwork, liwork = self.workspace(n, dtype)
        item = np.dtype(dtype).itemsize
        return (lwork + n) * item + liwork * np.dtype(self._iwork_dtype).itemsize

    def eigvalsh(self, a: np.ndarray, threads: int) -> np.ndarray:
        """Ascending eigenvalues of the symmetric C-contiguous (n, n) ``a``, overwriting ``a``.

        Runs on ``threads`` threads of the library, then restores its thread count.
        Raises ``RuntimeError`` if LAPACK reports failure (``info != 0``).
        """
        n = a.shape[0]
        restore = self.swap_threads(threads)
        try:  # MKL's optimal workspace depends on the thread count: query under it
            lwork, liwork = self.workspace(n, a.dtype)
            w = np.empty(n, dtype=a.dtype)
            work = np.empty(lwork, dtype=a.dtype)
            iwork = np.empty(liwork, dtype=self._iwork_dtype)
            _, _, info = self._call(n, a, w, lwork, work, liwork, iwork)
        finally:
            self.swap_threads(restore)
        if info > 0:
            raise LapackConvergenceError(
                f"{self.name} ?syevd did not converge (info = {info}); the matrix is "
                "overwritten: rebuild it and choose another backend (e.g. 'openblas-2stage')"
            )
        if info < 0:
            raise RuntimeError(f"{self.name} ?syevd: illegal argument {-info} (info = {info})")
        return w  # NaN with info 0 (MKL on an AMD EPYC) is caught by the invariant check

    @property
    def _iwork_dtype(self) -> type[np.signedinteger]:
        return np.int64 if self.index is ctypes.c_int64 else np.int32

    def _call(self, n, a, w, lwork, work, liwork, iwork) -> tuple[np.ndarray, np.ndarray, int]:
        index = self.index
        n_, lwork_, liwork_, info = index(n), index(lwork), index(liwork), index(0)
        self.routines[np.dtype(a.dtype)](
            b"N",
            b"L",
            ctypes.byref(n_),
            _pointer(a),
            ctypes.byref(index(max(1, n))),
            _pointer(w),
            _pointer(work),
            ctypes.byref(lwork_),
            _pointer(iwork),
            ctypes.byref(liwork_),
            ctypes.byref(info),
            ctypes.c_size_t(1),
            ctypes.c_size_t(1),
        )
        return work, iwork, info.value


def _pointer(array: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(array.ctypes.data)


ThreadSwapFactory = Callable[[ctypes.CDLL], Callable[[int], int]]


def load_driver(
    name: str,
    library: str,
    routine: str,
    index: type[ctypes.c_int32] | type[ctypes.c_int64],
    threads: ThreadSwapFactory,
) -> LapackDriver | None:
    """A :class:`LapackDriver` over ``library``, or None when it lacks the symbols.

    Args:
        name: the backend's name.
        library: path of the shared library (already loaded by Python: opening it again
            returns the same handle).
        routine: the symbol with ``{x}`` for the precision letter, e.g. ``"{x}syevd_64_"``.
        index: ``ctypes.c_int32`` (LP64) or ``ctypes.c_int64`` (ILP64).
        threads: builds the library's thread-count swap (see :class:`LapackDriver`); raises
            ``AttributeError`` when the library lacks its symbols.

    A driver needs the thread control and at least one of the float32/float64 routines.
    """
    try:
        lib = ctypes.CDLL(library)
        swap_threads = threads(lib)
    except (OSError, AttributeError):
        return None
    routines = {}
    for dtype, letter in _LETTER.items():
        fn = getattr(lib, routine.format(x=letter), None)
        if fn is not None:
            fn.restype = None
            routines[dtype] = fn
    if not routines:
        return None
    return LapackDriver(name, routines, index, swap_threads)


def _mkl_threads(lib: ctypes.CDLL) -> Callable[[int], int]:
    # thread-local, so the setting never leaks to other threads; it returns the previous
    # local setting (0: "follow the global one", which torch.set_num_threads sets).  The
    # lower-case mkl_set_num_threads_local is MKL's Fortran entry (argument by reference).
    swap = lib.MKL_Set_Num_Threads_Local
    swap.restype, swap.argtypes = ctypes.c_int, [ctypes.c_int]
    return swap


def _openblas_threads(prefix: str) -> ThreadSwapFactory:
    def build(lib: ctypes.CDLL) -> Callable[[int], int]:
        get = getattr(lib, prefix + "openblas_get_num_threads")
        set_ = getattr(lib, prefix + "openblas_set_num_threads")
        get.restype, get.argtypes = ctypes.c_int, []
        set_.restype, set_.argtypes = None, [ctypes.c_int]

        def swap(count: int) -> int:
            before = int(get())
            set_(count)
            return before

        return swap

    return build


@functools.lru_cache(maxsize=1)
def mkl_driver() -> LapackDriver | None:
    """MKL's ``?syevd`` (ILP64) from PyTorch's ``libtorch_cpu``, or None if torch has no MKL."""
    import torch

    pattern = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.*")
    for library in sorted(glob.glob(pattern)):
        driver = load_driver("mkl", library, "{x}syevd_64_", ctypes.c_int64, _mkl_threads)
        if driver is not None:
            return driver
    return None


@functools.lru_cache(maxsize=1)
def openblas_two_stage_driver() -> LapackDriver | None:
    """``?syevd_2stage`` from the OpenBLAS bundled with SciPy's wheel, or None.

    Looks in ``scipy.libs`` (the wheel's vendored libraries) for ``scipy_openblas``
    (symbols prefixed ``scipy_``) or an older ``openblas`` (no prefix).  OpenBLAS's
    thread count is process-wide: it is set for the call and put back after it.
    """
    import scipy

    folder = os.path.join(os.path.dirname(os.path.dirname(scipy.__file__)), "scipy.libs")
    for library in sorted(glob.glob(os.path.join(folder, "lib*openblas*"))):
        for prefix in ("scipy_", ""):
            driver = load_driver(
                "openblas-2stage",
                library,
                prefix + "{x}syevd_2stage_",
                ctypes.c_int32,
                _openblas_threads(prefix),
            )
            if driver is not None:
                return driver
    return None
