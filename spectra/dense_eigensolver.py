"""Eigenvalues of a dense symmetric matrix without a second n x n copy.

``torch.linalg.eigvalsh`` copies its input, so a 50,890-parameter float32
Hessian (10.4 GB) needs over 20 GB to diagonalise.  On the CPU we call LAPACK's
divide-and-conquer ``?syevd`` through SciPy with ``overwrite_a=True`` on the
transposed (Fortran-ordered) view of the row-major tensor: for a symmetric
matrix that view *is* the matrix, so LAPACK works in the tensor's own memory
and the extra workspace is O(n) (eigenvalues only).  The input is destroyed.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch

__all__ = ["eigvalsh_inplace", "eigensolver_workspace_bytes"]


def eigensolver_workspace_bytes(n: int, dtype: torch.dtype, device: torch.device) -> int:
    """Memory the solver needs beyond the matrix itself, in bytes.

    CPU: ``?syevd`` without vectors needs 2n + 1 work entries plus the tridiagonal
    (about 4n scalars); counted as 8n to leave room.  Other devices go through
    ``torch.linalg.eigvalsh``, which copies the matrix: n^2 more.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    if torch.device(device).type == "cpu":
        return 8 * n * itemsize
    return n * n * itemsize + 8 * n * itemsize


def eigvalsh_inplace(matrix: torch.Tensor) -> np.ndarray:
    """Ascending eigenvalues (float64 NumPy, on the host) of a symmetric (n, n) tensor.

    On the CPU the tensor's storage is overwritten (no copy); do not use it
    afterwards.  On other devices ``torch.linalg.eigvalsh`` is used.  Only the
    lower triangle is read on the CPU path, so the matrix must be symmetric (as
    :func:`spectra.exact.exact_hessian` guarantees).
    """
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {tuple(matrix.shape)}")
    if matrix.device.type != "cpu":
        return torch.linalg.eigvalsh(matrix).double().cpu().numpy()
    if matrix.dtype not in (torch.float32, torch.float64):
        matrix = matrix.to(torch.float64)
    if not matrix.is_contiguous():
        matrix = matrix.contiguous()
    a = matrix.detach().numpy().T  # Fortran-ordered view of the same memory
    w = scipy.linalg.eigh(
        a, eigvals_only=True, overwrite_a=True, check_finite=False, driver="evd"
    )
    return np.asarray(w, dtype=np.float64)
