"""The one Lanczos kernel shared by :func:`spectra.lanczos` and SLQ.

A single step of the symmetric Lanczos recurrence with *full*
reorthogonalisation, vectorised over a batch of independent Krylov bases (one
basis for eigenvalue problems, one per probe for stochastic Lanczos
quadrature).  The basis is stored row-major as ``Q`` of shape (b, m + 1, n):
row ``Q[p, j]`` is the j-th unit vector of basis p, so projections are GEMVs on
contiguous memory.  Orthogonalisation is classical Gram-Schmidt applied twice
("twice is enough", Giraud et al. 2005), which keeps the basis orthonormal to
working precision and makes the projected coefficients trustworthy.

Everything random is drawn on the CPU in float64 from a seeded
``torch.Generator`` and only then cast and moved, so a seed gives the same
vectors on every device.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .linear_operator import LinearOperator

__all__ = [
    "lanczos_step",
    "random_block",
    "random_orthogonal",
    "progress_bar",
    "breakdown_tolerance",
]


def random_block(
    n: int,
    k: int,
    gen: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
    kind: str = "normal",
) -> torch.Tensor:
    """Random (n, k) block: ``"normal"`` or ``"rademacher"`` (+-1) entries.

    Drawn in float64 on the CPU from ``gen`` and then cast and moved, so results
    are identical across devices for a given seed.
    """
    if kind == "normal":
        X = torch.randn((n, k), generator=gen, dtype=torch.float64)
    elif kind == "rademacher":
        X = torch.randint(0, 2, (n, k), generator=gen, dtype=torch.int64).to(torch.float64)
        X = 2.0 * X - 1.0
    else:
        raise ValueError(f"unknown random kind {kind!r}")
    return X.to(dtype=dtype, device=device)


def random_orthogonal(
    basis: torch.Tensor, gen: torch.Generator, rtol: float = 1e-3
) -> torch.Tensor | None:
    """A random unit vector orthogonal to the rows of ``basis`` (j, n).

    Used after a Lanczos breakdown (an invariant subspace was found) to carry on
    in the orthogonal complement.  Returns None when the complement is empty to
    working precision (the basis already spans the space).
    """
    j, n = basis.shape
    if j >= n:
        return None
    v = random_block(n, 1, gen, basis.dtype, basis.device)[:, 0]
    norm0 = float(v.norm())
    for _ in range(2):
        v = v - basis.T @ (basis @ v)
    norm = float(v.norm())
    if norm <= rtol * norm0:
        return None
    return v / norm


def breakdown_tolerance(anorm: float, n: int, dtype: torch.dtype) -> float:
    """Below this ``beta`` the Krylov space is treated as invariant.

    After two Gram-Schmidt passes, the part of ``A q`` left over when the basis is
    invariant is rounding noise of size ~ sqrt(n) eps ||A||; a factor 10 margin
    keeps genuine (tiny but real) couplings from being dropped only when they
    are already below what the arithmetic can resolve.
    """
    eps = torch.finfo(dtype).eps
    return 10.0 * max(n, 1) ** 0.5 * eps * anorm


def lanczos_step(
    op: LinearOperator,
    Q: torch.Tensor,
    j: int,
    active: Sequence[int],
    iteration: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Expand the bases ``Q[p]`` (p in ``active``) from column j to column j + 1.

    Args:
        op: symmetric operator; applied once to the block of the ``len(active)``
            current vectors ``Q[active, j]`` (one block matvec).
        Q: (b, m + 1, n) basis storage in the operator's dtype and device; rows
            ``0..j`` of each active basis must be orthonormal.  Row ``j + 1`` is
            overwritten with the normalised new direction (left untouched when
            ``j + 1 == m + 1``); when the new direction is exactly zero it is set
            to zero and the caller must handle the breakdown.
        j: index of the vector to multiply.
        active: which bases to expand.
        iteration: reported in the error message when the operator returns a
            non-finite value.

    Returns:
        ``h`` (len(active), j + 1) float64: the projections ``Q[p, :j+1] @ A q_j``
        (the j-th column of the projected matrix; ``h[:, j]`` is alpha_j), and
        ``beta`` (len(active),) float64: the norm of the reorthogonalised
        remainder, i.e. the coupling to the next basis vector.
    """
    n = Q.shape[2]
    idx = list(active)
    if len(idx) == 1:
        W = (op @ Q[idx[0], j]).reshape(n, 1)
    else:
        W = op @ Q[idx, j].T
    if not bool(torch.isfinite(W).all()):
        raise FloatingPointError(
            f"the operator returned NaN or Inf at Lanczos iteration {iteration} "
            f"(basis vector {j}); check the model/loss for non-finite values"
        )
    W = W.T.contiguous()  # (b, n): each vector contiguous; orthogonalised in place below
    if W.untyped_storage().data_ptr() == Q.untyped_storage().data_ptr():
        W = W.clone()  # the operator returned a view of its input (e.g. the identity)
    if len(idx) == Q.shape[0]:
        # every basis active: one batched GEMV per pass instead of b small ones
        H = _reorthogonalize(Q[:, : j + 1], W)
    else:
        H = torch.cat([_reorthogonalize(Q[p, None, : j + 1], W[i, None]) for i, p in enumerate(idx)])
    hs = H.to(torch.float64).cpu().numpy()
    betas = torch.linalg.vector_norm(W, dim=1).to(torch.float64).cpu().numpy()
    if j + 1 < Q.shape[1]:
        for i, p in enumerate(idx):
            if betas[i] > 0:
                torch.div(W[i], float(betas[i]), out=Q[p, j + 1])
            else:
                Q[p, j + 1] = 0.0
    return hs, betas


def _reorthogonalize(basis: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Two passes of classical Gram-Schmidt of ``W`` (b, n) against ``basis`` (b, j, n).

    ``W`` is updated in place; returns the accumulated projections (b, j).  The
    correction is formed as the row product ``h^T basis`` so the basis is never
    transposed or copied: the temporaries are one (b, n) block.
    """
    h = torch.bmm(basis, W.unsqueeze(2)).squeeze(2)
    W.sub_(torch.bmm(h.unsqueeze(1), basis).squeeze(1))
    h2 = torch.bmm(basis, W.unsqueeze(2)).squeeze(2)
    W.sub_(torch.bmm(h2.unsqueeze(1), basis).squeeze(1))
    return h + h2


def progress_bar(total: int, desc: str, progress: bool | None) -> tqdm:
    """A tqdm bar; ``progress=None`` shows it only when stderr is a terminal."""
    if progress is None:
        progress = bool(getattr(sys.stderr, "isatty", lambda: False)())
    return tqdm(total=total, desc=desc, disable=not progress, leave=False, unit="matvec")
