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

Arithmetic only: saving and restoring a run is :mod:`spectra.resumable`'s, memory
budgets and progress are :mod:`spectra._resources`'.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ._checks import all_finite
from .linear_operator import LinearOperator

__all__ = [
    "lanczos_step",
    "CompactBases",
    "rademacher_columns",
    "PackedSigns",
    "random_block",
    "random_orthogonal",
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

    Drawn on the CPU from ``gen`` (normal: in float64) and then cast and moved, so
    results are identical across devices for a given seed.  Rademacher blocks are
    drawn in row chunks (:func:`rademacher_columns`), with the same values as one
    (n, k) draw and no (n, k) temporary.
    """
    if kind == "normal":
        X = torch.randn((n, k), generator=gen, dtype=torch.float64)
    elif kind == "rademacher":
        return rademacher_columns(n, k, gen, dtype, device)
    else:
        raise ValueError(f"unknown random kind {kind!r}")
    return X.to(dtype=dtype, device=device)


#: Random draws per chunk of :func:`rademacher_columns` (an int8 temporary of this size).
_RADEMACHER_CHUNK = 1 << 22


def rademacher_columns(
    n: int,
    k: int,
    gen: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
    cols: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Columns ``c0:c1`` of the (n, k) Rademacher block that ``gen`` gives.

    ``torch.randint`` on the CPU draws its elements one after another in row-major
    order, so drawing the (n, k) block in chunks of rows gives the same values and
    leaves ``gen`` in the same state as one draw; only the wanted columns are kept.
    This is how SLQ draws the start vectors of one block of probes without holding
    the others (each block redraws the stream from the seed: n k draws, cheap next to
    one product).  Temporaries: an int8 chunk of ``_RADEMACHER_CHUNK`` draws.
    """
    c0, c1 = (0, k) if cols is None else cols
    out = torch.empty((n, c1 - c0), dtype=dtype, device=device)
    rows = max(1, _RADEMACHER_CHUNK // max(k, 1))
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        R = torch.randint(0, 2, (r1 - r0, k), generator=gen, dtype=torch.int8)
        out[r0:r1] = (2 * R[:, c0:c1] - 1).to(dtype=dtype, device=device)
    return out


class PackedSigns:
    """The (n, k) Rademacher block that ``gen`` gives, held as bits: n k / 8 bytes.

    The draws are those of :func:`rademacher_columns` (the same values, and ``gen``
    left in the same state), made once; :meth:`columns` unpacks any columns later.
    For an algorithm that applies the operator to a few columns at a time at large n
    (Hutch++ at 124M parameters: 10 sketch vectors, 155 MB instead of 5 GB in float32),
    without redrawing the whole stream for every block (n k draws per block, which at
    that size cost more than a product).
    """

    def __init__(self, n: int, k: int, gen: torch.Generator) -> None:
        self.n, self.k = n, k
        self._packed = torch.empty(((n + 7) // 8, k), dtype=torch.uint8)
        rows = max(8, _RADEMACHER_CHUNK // max(k, 1) // 8 * 8)  # whole bytes per chunk
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            R = torch.randint(0, 2, (r1 - r0, k), generator=gen, dtype=torch.int8)
            R = torch.cat([R, R.new_zeros((-(r1 - r0)) % 8, k)]).to(torch.uint8)
            bytes_ = (R.view(-1, 8, k) << _BIT_SHIFTS.view(1, 8, 1)).sum(1, dtype=torch.uint8)
            self._packed[r0 // 8 : r0 // 8 + bytes_.shape[0]] = bytes_

    def columns(self, c0: int, c1: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Columns ``c0:c1`` as an (n, c1 - c0) block of +-1 in ``dtype`` on ``device``."""
        bits = (self._packed[:, c0:c1].unsqueeze(1) >> _BIT_SHIFTS.view(1, 8, 1)) & 1
        signs = bits.reshape(8 * bits.shape[0], c1 - c0)[: self.n]
        return (2 * signs.to(torch.int8) - 1).to(dtype=dtype, device=device)


_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


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
    if not all_finite(W):
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
        H = torch.cat(
            [_reorthogonalize(Q[p, None, : j + 1], W[i, None]) for i, p in enumerate(idx)]
        )
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


class CompactBases:
    """b independent Lanczos recurrences for SLQ that do not keep a full-precision basis.

    Each recurrence holds its last two vectors ``prev``, ``cur`` in the operator's
    dtype and runs the three-term recurrence on them, orthogonalising each new
    vector twice against both ("local" reorthogonalisation).  With ``store`` (a
    floating dtype narrower than the operator's) it also keeps copies of the older
    vectors in that dtype and orthogonalises the new vector against them with two
    classical Gram-Schmidt passes (products and sums in the operator's dtype, in
    column chunks so the up-cast temporary stays at about one vector):
    reorthogonalisation against a rounded basis, which leaves the true basis
    orthogonal to about the storage's rounding (see :func:`spectra.spectral_density`
    for the measured effect on the density).  float16 copies are stored scaled by
    sqrt(n), so the entries of a unit vector (~1/sqrt(n)) sit in float16's normal
    range whatever n is.

    Memory: ``2 n`` elements of the operator's dtype per recurrence plus
    ``(steps - 2) n`` of ``store`` (the two newest vectors are never stored twice).
    """

    def __init__(
        self,
        b: int,
        steps: int,
        n: int,
        dtype: torch.dtype,
        device: torch.device,
        store: torch.dtype | None,
    ) -> None:
        self.cur = torch.zeros((b, n), dtype=dtype, device=device)
        self.prev = torch.zeros((b, n), dtype=dtype, device=device)
        self.beta = np.zeros(b)  # beta_{j-1}: coupling of cur to prev
        self.store = store
        rows = max(steps - 2, 0) if store is not None else 0
        self.S = torch.zeros((b, rows, n), dtype=store, device=device) if store else None
        self.scale = math.sqrt(n) if store == torch.float16 else 1.0

    @staticmethod
    def bytes_per_recurrence(
        steps: int, n: int, dtype: torch.dtype, store: torch.dtype | None
    ) -> int:
        rows = max(steps - 2, 0) if store is not None else 0
        low = 0 if store is None else torch.empty((), dtype=store).element_size()
        return 2 * n * torch.empty((), dtype=dtype).element_size() + rows * n * low

    @property
    def nbytes(self) -> int:
        total = self.cur.nbytes + self.prev.nbytes
        return total + (0 if self.S is None else self.S.nbytes)

    def filled(self, j: int) -> int:
        """Stored rows at the start of step j (q_0 .. q_{j-2})."""
        return 0 if self.S is None else min(max(j - 1, 0), self.S.shape[1])

    def step(
        self, op: LinearOperator, j: int, active: Sequence[int], iteration: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Multiply ``cur`` (step j) of the ``active`` recurrences; returns (alpha, beta)
        float64 arrays of len(active) and advances ``prev``, ``cur`` and the store."""
        idx = list(active)
        n = self.cur.shape[1]
        if len(idx) == self.cur.shape[0]:
            X = self.cur
        else:
            X = self.cur[torch.as_tensor(idx, device=self.cur.device)]
        W = (op @ X[0]).reshape(1, n) if len(idx) == 1 else (op @ X.T).T.contiguous()
        if not all_finite(W):
            raise FloatingPointError(
                f"the operator returned NaN or Inf at Lanczos iteration {iteration} "
                f"(basis vector {j}); check the model/loss for non-finite values"
            )
        if W.untyped_storage().data_ptr() == X.untyped_storage().data_ptr():
            W = W.clone()  # the operator returned a view of its input
        alphas = np.zeros(len(idx))
        betas = np.zeros(len(idx))
        for i, p in enumerate(idx):
            x, w, prev = X[i], W[i], self.prev[p]
            if j > 0:
                w.add_(prev, alpha=-float(self.beta[p]))
            alpha = float(torch.dot(x, w))
            w.add_(x, alpha=-alpha)
            c = float(torch.dot(x, w))  # second local pass
            w.add_(x, alpha=-c)
            alpha += c
            if j > 0:
                w.add_(prev, alpha=-float(torch.dot(prev, w)))
            rows = self.filled(j)
            if rows > 0:
                _reorthogonalize_stored(self.S[p, :rows], w, self.scale)
            beta = float(torch.linalg.vector_norm(w))
            alphas[i], betas[i] = alpha, beta
            # advance: q_{j-1} leaves the working pair (stored if a later step needs it)
            if self.S is not None and 0 < j and j - 1 < self.S.shape[1]:
                self.S[p, j - 1].copy_(prev if self.scale == 1.0 else prev * self.scale)
            prev.copy_(x)
            if beta > 0:
                torch.div(w, beta, out=self.cur[p])
            else:
                self.cur[p] = 0.0
            self.beta[p] = beta
        return alphas, betas


def _reorthogonalize_stored(S: torch.Tensor, w: torch.Tensor, scale: float) -> None:
    """Two classical Gram-Schmidt passes of ``w`` (n,) against the rows of the stored
    (narrow-dtype, ``scale`` x unit) basis ``S`` (r, n), in place.  Each sweep up-casts
    column chunks of S so the temporary stays at about one vector of w's dtype."""
    r, n = S.shape
    chunk = max(n // max(r, 1), 1 << 16)
    for _ in range(2):
        h = torch.zeros(r, dtype=w.dtype, device=w.device)
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            h += S[:, c0:c1].to(w.dtype) @ w[c0:c1]
        h /= scale * scale
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            w[c0:c1] -= h @ S[:, c0:c1].to(w.dtype)
