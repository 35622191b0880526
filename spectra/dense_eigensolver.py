"""Eigenvalues of a dense symmetric matrix, in place, with the fastest LAPACK at hand.

``torch.linalg.eigvalsh`` copies its input, so a 50,890-parameter float32 Hessian
(10.4 GB) needs over 20 GB to diagonalise.  On the CPU the matrix is instead handed
to LAPACK in its own memory (a C-ordered symmetric matrix is its own Fortran-ordered
transpose) and overwritten; the workspace is O(n) to O(100 n) scalars.  Backends,
all eigenvalues-only (``jobz='N'``), reading the upper triangle of the row-major
tensor (LAPACK's ``uplo='L'`` of the column-major view):

``mkl``
    ``?syevd`` of the MKL inside PyTorch, in place (``spectra._lapack``).
``openblas-2stage``
    ``?syevd_2stage`` of SciPy's bundled OpenBLAS, in place: the reduction to a band
    (BLAS 3) then to tridiagonal form, instead of the one-stage reduction whose half
    of the flops are memory-bound matrix-vector products; 1.6-2.2x faster than
    ``scipy`` here, and 1.3-1.7x slower than ``mkl`` (see :data:`PREFERENCE`).
``torch``
    ``torch.linalg.eigvalsh`` (MKL's ``?syevd`` on the CPU): copies the matrix; asked
    for the same triangle (``UPLO="U"``).
``scipy``
    ``scipy.linalg.eigh(driver="evd", overwrite_a=True)``, in place: the fallback that
    is always there, and the only CPU path before these backends existed.

``backend="auto"`` takes, among the backends present in this process, the first in
:data:`PREFERENCE` whose extra memory fits in what is free; on other devices
``torch`` is the only one.  They agree to float rounding, not bit for bit: in float32
each is within a few 1e-6 of the spectral norm of the float64 eigenvalues at n = 1,000-2,000
(``tests/test_dense_eigensolver.py``), and on a random (Wigner) matrix two of them differ by
up to 2e-5 of it at n = 8,000 and 3e-5 at 12,000 -- the old ``scipy`` path from ``mkl`` as
much as ``openblas-2stage`` does.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import torch

from ._checks import all_finite
from ._lapack import LapackConvergenceError, LapackDriver, mkl_driver, openblas_two_stage_driver

__all__ = [
    "BACKENDS",
    "available_backends",
    "PREFERENCE",
    "choose_backend",
    "eigensolver_workspace_bytes",
    "eigvalsh_inplace",
]

#: Every backend name :func:`eigvalsh_inplace` accepts (besides ``"auto"``).
BACKENDS = ("mkl", "openblas-2stage", "torch", "scipy")

#: CPU backends, fastest first.  Float32 CPU seconds on one core of a Xeon (AVX-512) for
#: n = 4,000 / 8,000 / 12,000 (benchmarks/bench_eigensolver.py, --threads 1): mkl 2.1 / 13.7
#: / 43.5, openblas-2stage 2.8 / 20.2 / 75.0, scipy 4.5 / 43.6 / 128.8, torch as mkl plus its
#: copy.  The order is the same at every size measured and the gaps grow with n (fitted
#: exponents 2.8 for mkl against 3.0-3.2), so it does not depend on n.  ``torch`` runs the
#: same MKL routine as ``mkl``, so it only stands in for it (PyTorch with MKL that does not
#: export ``?syevd_64_``), and only where its copy fits.
PREFERENCE = ("mkl", "torch", "openblas-2stage", "scipy")

_FINITE_CHECK_ELEMENTS = 1 << 22  # entries per block of the NaN/Inf scan (16 MiB in float32)


def _drivers() -> dict[str, LapackDriver]:
    """The ctypes LAPACK drivers found in this process, by backend name."""
    found = {"mkl": mkl_driver(), "openblas-2stage": openblas_two_stage_driver()}
    return {name: driver for name, driver in found.items() if driver is not None}


def available_backends(dtype: torch.dtype = torch.float32) -> tuple[str, ...]:
    """CPU backends present in this process for ``dtype`` (float32 or float64), in BACKENDS order.

    ``scipy`` is always present; ``torch`` always (it copies); ``mkl`` needs PyTorch built
    with MKL and exporting ``?syevd_64_``; ``openblas-2stage`` needs SciPy's bundled
    OpenBLAS.
    """
    drivers = _drivers()
    np_dtype = _numpy_dtype(_solver_dtype(dtype))
    return tuple(
        name
        for name in BACKENDS
        if name in ("torch", "scipy") or name in drivers and drivers[name].supports(np_dtype)
    )


def _workspace_bytes(backend: str, n: int, dtype: torch.dtype) -> int:
    """Bytes ``backend`` allocates on the CPU besides the (n, n) matrix it is given."""
    item = torch.empty((), dtype=dtype).element_size()
    if backend == "torch":
        return n * n * item + 8 * n * item  # the copy, then ?syevd's 2n + 1 work and w
    if backend == "scipy":
        # ?syevd's optimal work array: 2n + 1 plus the reduction's n x block panel (the
        # block is at most 64 in OpenBLAS and reference LAPACK), and w
        return (66 * n + 1) * item + 2 * n * item
    return _drivers()[backend].workspace_bytes(n, _numpy_dtype(dtype))


def choose_backend(n: int, dtype: torch.dtype, free_bytes: int | None = None) -> str:
    """The CPU backend ``backend="auto"`` uses for an (n, n) matrix of ``dtype``.

    The first of :data:`PREFERENCE` that is available and whose extra memory
    (:func:`eigensolver_workspace_bytes` of that backend) fits in ``free_bytes``
    (default: what is free now).  ``torch`` only when PyTorch's LAPACK is MKL.
    Raises ``MemoryError`` when none fits.
    """
    dtype = _solver_dtype(dtype)
    free = _free_bytes(torch.device("cpu")) if free_bytes is None else int(free_bytes)
    present = set(available_backends(dtype))
    if not torch.backends.mkl.is_available():
        present.discard("torch")
    needs = {}
    for backend in PREFERENCE:
        if backend in present:
            needs[backend] = _workspace_bytes(backend, n, dtype)
            if needs[backend] <= free:
                return backend
    raise MemoryError(
        f"no eigensolver fits: an (n, n) = ({n:,}, {n:,}) {dtype} matrix needs "
        + ", ".join(f"{b} {need / 2**20:,.1f} MiB" for b, need in needs.items())
        + f" besides the matrix, and {free / 2**20:,.1f} MiB is free"
    )


def eigensolver_workspace_bytes(n: int, dtype: torch.dtype, device: torch.device) -> int:
    """Memory the solver needs beyond the matrix itself, in bytes.

    CPU: the workspace of the fastest available backend for this size (LAPACK's own
    workspace query; ~200 n scalars for ``mkl``, ~100 n for ``openblas-2stage``), so
    a caller that reserves this much gets that backend.  Other devices go through
    ``torch.linalg.eigvalsh``, which copies the matrix: n^2 more.
    """
    dtype = _solver_dtype(dtype)
    if torch.device(device).type != "cpu":
        item = torch.empty((), dtype=dtype).element_size()
        return n * n * item + 8 * n * item
    present = available_backends(dtype)
    backend = next(b for b in PREFERENCE if b in present and b != "torch")
    return _workspace_bytes(backend, n, dtype)


def eigvalsh_inplace(matrix: torch.Tensor, *, backend: str = "auto") -> np.ndarray:
    """Ascending eigenvalues (float64 NumPy, on the host) of a symmetric (n, n) tensor.

    Args:
        matrix: square, symmetric, finite.  On the CPU its storage is overwritten (no
            copy; ``torch`` excepted); do not use it afterwards.  Only the upper triangle
            of the row-major tensor is read, so it must be symmetric (as
            :func:`spectra.exact.exact_hessian` guarantees).  float32 and float64 are
            solved in their precision; other dtypes, and non-contiguous tensors, are
            first copied (to float64, contiguous).
        backend: ``"auto"`` (:func:`choose_backend`), or one of :data:`BACKENDS`.
            Off the CPU only ``"auto"`` and ``"torch"``: ``torch.linalg.eigvalsh``.

    The solver runs on ``torch.get_num_threads()`` threads (set it with
    ``torch.set_num_threads``; it follows ``OMP_NUM_THREADS``).

    Raises:
        ValueError: not square, NaN or infinite entries, an unknown or absent backend.
        MemoryError: the backend's extra memory does not fit.
        All before any work on the matrix.
    """
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {tuple(matrix.shape)}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {BACKENDS}")
    n = matrix.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    _require_finite(matrix)
    if matrix.device.type != "cpu":
        if backend not in ("auto", "torch"):
            raise ValueError(
                f"backend {backend!r} runs on the CPU; the matrix is on "
                f"{matrix.device} (use 'auto' or 'torch')"
            )
        need = eigensolver_workspace_bytes(n, matrix.dtype, matrix.device)
        _require_free(need, _free_bytes(matrix.device), "torch.linalg.eigvalsh", matrix)
        return torch.linalg.eigvalsh(matrix, UPLO="U").double().cpu().numpy()
    dtype = _solver_dtype(matrix.dtype)
    auto = backend == "auto"
    backend = _checked_cpu_backend(matrix, backend, dtype)
    matrix = matrix.detach().to(dtype).contiguous()
    a = matrix.numpy()
    if not auto or backend not in _MAY_NOT_CONVERGE:
        return _solve(a, backend)
    # MKL may fail to converge where reference LAPACK does not (LapackConvergenceError):
    # under "auto" it runs on a spare copy when one fits, else a robust backend runs
    free = _free_bytes(matrix.device)
    if free - _workspace_bytes(backend, n, dtype) - a.nbytes < 0:
        return _solve(a, _robust_fallback(n, dtype, free))
    backup = a.copy()
    try:
        return _solve(a, backend)
    except LapackConvergenceError:
        np.copyto(a, backup)
        del backup
        return _solve(a, _robust_fallback(n, dtype, free))


#: Backends that have been seen to stop without converging (float32 MKL on Hessians with
#: large exactly-degenerate clusters: the 647-parameter smoke Hessian of ``fig1``; on an
#: AMD EPYC, the second run's Hessian of ``fig1_samples 40 --preset smoke`` gave two NaN).
_MAY_NOT_CONVERGE = frozenset({"mkl", "torch"})


def _robust_fallback(n: int, dtype: torch.dtype, free: int) -> str:
    """The first in-place backend outside :data:`_MAY_NOT_CONVERGE` that fits."""
    for backend in PREFERENCE:
        if backend not in _MAY_NOT_CONVERGE and backend in available_backends(dtype):
            if _workspace_bytes(backend, n, dtype) <= free:
                return backend
    return "scipy"


def _solve(a: np.ndarray, backend: str) -> np.ndarray:
    """Ascending float64 eigenvalues of ``a`` (overwritten) with ``backend``, checked
    against the trace and Frobenius norm of ``a`` (see :func:`_check_invariants`)."""
    invariants = _invariants(a)
    w = _run(a, backend)
    _check_invariants(w, invariants, backend, float(np.finfo(a.dtype).eps))
    return w


def _invariants(a: np.ndarray) -> tuple[float, float, float]:
    """``(trace, ||.||_F^2 of the matrix read from the upper triangle, ... from the
    lower)``, accumulated in float64 one row at a time (O(n^2), no n^2 temporary): what
    any eigensolver's eigenvalues must reproduce, whichever triangle it reads."""
    n = a.shape[0]
    diag = np.diagonal(a).astype(np.float64)
    upper = lower = 0.0
    for i in range(n):
        row = a[i].astype(np.float64)
        upper += float(row[i + 1 :] @ row[i + 1 :])
        lower += float(row[:i] @ row[:i])
    d2 = float(diag @ diag)
    return float(diag.sum()), d2 + 2 * upper, d2 + 2 * lower


def _check_invariants(
    w: np.ndarray, invariants: tuple[float, float, float], backend: str, eps: float
) -> None:
    """Raise :class:`LapackConvergenceError` unless sum(w) is the trace and sum(w^2) the
    squared Frobenius norm to within a backward error E of ``100 sqrt(n) eps ||A||_F``
    (Hoffman-Wielandt: ||w - exact||_2 <= ||E||_F; typical Householder backward errors
    are far below this bound, which is there to catch gross errors, not to certify digits).

    A cheap guard against a solver that reports success with wrong values (MKL's float32
    ``ssyevd`` on an AMD EPYC returned NaN with ``info = 0``).  Under ``backend="auto"``
    a failure falls back like a convergence failure."""
    trace, frob_upper, frob_lower = invariants
    if not np.isfinite(w).all():
        raise LapackConvergenceError(
            f"{backend}: {int((~np.isfinite(w)).sum())} non-finite eigenvalues of a finite "
            "matrix (with LAPACK's success code); the matrix is overwritten: rebuild it and "
            "choose another backend (e.g. 'openblas-2stage')"
        )
    n = w.size
    frob2 = min(frob_upper, frob_lower)
    error = 100 * math.sqrt(n) * eps * math.sqrt(max(frob_upper, frob_lower))  # ||E||_F
    sq = float(w @ w)
    tr_bad = abs(float(w.sum()) - trace) > math.sqrt(n) * error
    frob_bad = min(abs(sq - frob_upper), abs(sq - frob_lower)) > error * (
        2 * math.sqrt(frob2) + error
    )
    if tr_bad or frob_bad:
        raise LapackConvergenceError(
            f"{backend}: the eigenvalues fail the invariants of the matrix (sum {w.sum():.9g} "
            f"against the trace {trace:.9g}; sum of squares {sq:.9g} against the squared "
            f"Frobenius norm {frob2:.9g}): the solver returned wrong values; choose another "
            "backend"
        )


def _run(a: np.ndarray, backend: str) -> np.ndarray:
    threads = torch.get_num_threads()
    if backend == "torch":
        try:
            w = torch.linalg.eigvalsh(torch.from_numpy(a), UPLO="U").numpy()
        except torch.linalg.LinAlgError as err:
            raise LapackConvergenceError(f"torch.linalg.eigvalsh: {err}") from err
    elif backend == "scipy":
        w = _scipy_eigvalsh(a, threads)
    else:
        w = _drivers()[backend].eigvalsh(a, threads=threads)
    return np.asarray(w, dtype=np.float64)


def _checked_cpu_backend(matrix: torch.Tensor, backend: str, dtype: torch.dtype) -> str:
    """``backend`` (or auto's choice) once it is known to be present and to fit in memory."""
    n = matrix.shape[0]
    free = _free_bytes(matrix.device)
    if matrix.dtype != dtype or not matrix.is_contiguous():
        copy = n * n * torch.empty((), dtype=dtype).element_size()
        _require_free(copy, free, f"a contiguous {dtype} copy", matrix)
        free -= copy
    if backend == "auto":
        return choose_backend(n, dtype, free_bytes=free)
    if backend not in available_backends(dtype):
        raise ValueError(
            f"backend {backend!r} is not available in this process for {dtype} "
            f"(available: {available_backends(dtype)})"
        )
    _require_free(_workspace_bytes(backend, n, dtype), free, f"the {backend} eigensolver", matrix)
    return backend


def _scipy_eigvalsh(a: np.ndarray, threads: int) -> np.ndarray:
    """SciPy's ``?syevd`` on the Fortran view of ``a`` (overwritten), on ``threads`` threads.

    SciPy's wheel runs its LAPACK on the OpenBLAS ``openblas-2stage`` comes from, so that
    driver's thread control sets the count; without it OpenBLAS keeps its own.
    """
    openblas = _drivers().get("openblas-2stage")
    restore = openblas.swap_threads(threads) if openblas is not None else None
    try:
        return scipy.linalg.eigh(
            a.T, eigvals_only=True, overwrite_a=True, check_finite=False, driver="evd"
        )
    finally:
        if openblas is not None:
            openblas.swap_threads(restore)


def _solver_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float64


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return np.dtype(np.float32) if dtype == torch.float32 else np.dtype(np.float64)


def _free_bytes(device: torch.device) -> int:
    # imported here: spectra.exact imports this module at its top
    from .exact import available_memory_bytes

    free = available_memory_bytes(device)
    if device.type == "cuda":  # blocks PyTorch holds in its cache are free to it too
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free


def _require_free(need: int, free: int, what: str, matrix: torch.Tensor) -> None:
    if need > free:
        raise MemoryError(
            f"{what} needs {need / 2**20:,.1f} MiB besides the {tuple(matrix.shape)} "
            f"{matrix.dtype} matrix, and {free / 2**20:,.1f} MiB is free on {matrix.device}"
        )


def _require_finite(matrix: torch.Tensor) -> None:
    """Raise ``ValueError`` if any entry is NaN or infinite (LAPACK would return garbage)."""
    rows = max(1, _FINITE_CHECK_ELEMENTS // max(1, matrix.shape[1]))
    for start in range(0, matrix.shape[0], rows):
        block = matrix[start : start + rows]
        if not all_finite(block):
            bad = torch.nonzero(~torch.isfinite(block))[0]
            i, j = int(bad[0]) + start, int(bad[1])
            raise ValueError(
                f"the matrix has a non-finite entry ({float(matrix[i, j])} at [{i}, {j}]); "
                "its eigenvalues are undefined"
            )
