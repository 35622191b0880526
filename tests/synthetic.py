"""Synthetic problems for the Krylov tests: matrices of known spectrum, an interrupted operator.

Imported by the test modules as ``from synthetic import ...`` (pytest puts ``tests/`` on
``sys.path``, as for ``conftest``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def with_eigenvalues(
    lam: np.ndarray, seed: int = 0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Q diag(lam) Q^T, (n, n) for lam of shape (n,), with Q a seeded random orthogonal matrix.

    Built in float64 and symmetrised there, then cast to ``dtype``, so its eigenvalues are
    ``lam`` to float64 rounding before the cast (the reference the tests compare against).
    """
    g = torch.Generator().manual_seed(seed)
    n = lam.size
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    A = (Q * torch.as_tensor(lam)) @ Q.T
    return (0.5 * (A + A.T)).to(dtype)


class Stop(Exception):
    """Raised by an operator from :func:`stopping_at` to interrupt a run mid-way."""


def stopping_at(A: torch.Tensor, stop_at: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``V -> A @ V`` that raises :class:`Stop` on its ``stop_at``-th call (1-based).

    Stands for a run killed after ``stop_at - 1`` products: a checkpointed algorithm given
    this operator must leave a checkpoint from which a resumed run is bit-identical.
    """
    calls = 0

    def matvec(V: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == stop_at:
            raise Stop
        return A @ V

    return matvec
