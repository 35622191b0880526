"""Extreme eigenpairs of a symmetric operator: thick-restart Lanczos.

:func:`lanczos` runs the symmetric Lanczos recurrence with full
reorthogonalisation (the shared kernel in :mod:`spectra._krylov`) and restarts
it the Wu & Simon (2000) way: when the basis of ``ncv`` vectors is full, the
wanted Ritz vectors (plus a few nearby ones) are kept and the recurrence carries
on from the last residual direction.  Memory therefore stays at ``ncv + 1``
vectors of length n however many matvecs convergence takes.

Every reported residual is ``||A v - theta v||`` for the returned unit Ritz
vector ``v`` (from the Lanczos relation, plus a rounding margin), and for a
symmetric operator there is an eigenvalue ``lambda`` with
``|theta - lambda| <= residual`` (Weyl / Bauer-Fike), so the residuals are error
bars on the eigenvalues.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import torch

from ._checks import check_int, check_real, check_seed
from ._krylov import breakdown_tolerance, lanczos_step, random_orthogonal
from ._precision import ieee_float32
from ._resources import check_budget, default_memory_budget, format_bytes, progress_bar
from .linear_operator import (
    DenseOperator,
    LinearOperator,
    as_linear_operator,
    check_symmetric,
    operator_precision,
)
from .resumable import KrylovCheckpoint, RunTotals, StoredArrays, load_into

__all__ = ["lanczos", "LanczosResult", "ConvergenceWarning"]

_WHICH = {
    "LA": "LA",
    "largest": "LA",
    "SA": "SA",
    "smallest": "SA",
    "LM": "LM",
    "magnitude": "LM",
    "BE": "BE",
    "both": "BE",
}

#: Operators of at most this size are solved densely (n matvecs + ``eigh``).
DENSE_THRESHOLD = 200

#: ``tol=None`` gives ``max(DEFAULT_TOL, TOL_OVER_FLOOR x floor)``, where ``floor`` is
#: the rounding floor of the residuals (see :func:`lanczos`): 1e-6 wherever the
#: arithmetic allows it (float64), else 10x what the products can resolve (float32).
DEFAULT_TOL = 1e-6
TOL_OVER_FLOOR = 10.0
#: Smallest ``tol / floor`` accepted, and the multiple of the floor at which a pair
#: whose relative tolerance is out of reach (an eigenvalue near zero) is converged.
MIN_TOL_OVER_FLOOR = 2.0
#: The largest default tolerance: an operator whose products are this inexact (two
#: product paths that disagree by ~1e-2, a stochastic forward pass) gets no default, since
#: "converged" would then vouch for eigenvalues off by that much; an explicit tol
#: (below 1) is accepted.
MAX_DEFAULT_TOL = 0.1

#: The smallest basis a memory budget may shrink ncv to: k + MIN_EXTRA_NCV (each thick
#: restart keeps k + 1 vectors and adds at least 2 new ones).
MIN_EXTRA_NCV = 3
#: Vectors of length n the Krylov path holds besides the ncv + 1 basis rows: the
#: product ``A q`` and one temporary (a restart's rotation chunk, a breakdown's new
#: start vector); the k returned eigenvectors come on top.
WORK_VECTORS = 2


class ConvergenceWarning(RuntimeWarning):
    """Not all requested eigenpairs reached the tolerance within the matvec budget."""


@dataclass(frozen=True, eq=False)
class LanczosResult:
    """Ritz pairs with honest error bars.

    Attributes:
        eigenvalues: (k,) float64, ordered per ``which``: descending for "LA",
            ascending for "SA", descending magnitude for "LM", ascending for "BE".
        eigenvectors: (n, k) unit Ritz vectors in the operator's dtype/device, or
            None when ``return_eigenvectors=False``.
        residuals: (k,) float64, ``||A v - theta v||``; bounds ``|theta - lambda|``
            for some eigenvalue ``lambda`` of the operator.
        converged: (k,) bool: the residual reached ``tol`` (see :func:`lanczos`).
        matvecs: operator applications used (including the 2 of the symmetry
            check and, for dense solves, the n of assembling the matrix).
        restarts: number of thick restarts.
        which: the normalised selection ("LA", "SA", "LM" or "BE").
        method: "krylov" or "dense".
        tol: the relative tolerance used (``tol=None`` resolved by the default rule).
        seconds: wall time of the call (summed over the sessions of a resumed run).
        peak_memory_bytes: the process's memory high-water mark at the end, the
            largest over the sessions of a resumed run (CPU:
            ``ru_maxrss``, the whole process's peak resident set since it started,
            so an upper bound on the run's own; CUDA:
            ``torch.cuda.max_memory_allocated``, since its last reset).
        basis_bytes: bytes of the vectors the algorithm itself stored: the
            (ncv + 1, n) basis (dense path: the assembled n x n float64 matrix).
        ncv: the basis size used (given, the default, or what fit
            ``memory_budget``; 0 for the dense path).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None
    residuals: torch.Tensor
    converged: torch.Tensor
    matvecs: int
    restarts: int
    which: str
    method: str = "krylov"
    tol: float = math.nan
    seconds: float = math.nan
    peak_memory_bytes: int = 0
    basis_bytes: int = 0
    ncv: int = 0

    @property
    def all_converged(self) -> bool:
        """True when every requested pair reached the tolerance."""
        return bool(self.converged.all())

    def __repr__(self) -> str:
        ev = ", ".join(f"{x:.6g}" for x in self.eigenvalues.tolist())
        vec = "yes" if self.eigenvectors is not None else "no"
        return (
            f"LanczosResult(which={self.which!r}, eigenvalues=[{ev}], "
            f"max_residual={float(self.residuals.max()):.2e}, "
            f"converged={int(self.converged.sum())}/{self.converged.numel()}, "
            f"tol={self.tol:.1e}, matvecs={self.matvecs}, restarts={self.restarts}, "
            f"method={self.method!r}, eigenvectors={vec}, seconds={self.seconds:.3g})"
        )


@ieee_float32()
def lanczos(
    op: Any,
    k: int,
    which: str = "LA",
    tol: float | None = None,
    max_matvecs: int | None = None,
    seed: int = 0,
    *,
    n: int | None = None,
    v0: torch.Tensor | None = None,
    ncv: int | None = None,
    return_eigenvectors: bool = True,
    check_symmetry: bool = True,
    dense: bool | None = None,
    progress: bool | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: float = 300.0,
    memory_budget: int | None = None,
) -> LanczosResult:
    """k extreme eigenpairs of a symmetric operator by thick-restart Lanczos.

    Args:
        op: anything :func:`~spectra.as_linear_operator` accepts: a
            :class:`~spectra.LinearOperator` (e.g. a Hessian operator), a square
            tensor or array, a SciPy ``LinearOperator``, or a callable on (n, k)
            blocks together with ``n=``.
        k: number of eigenpairs, 1 <= k <= n (k == n solves densely).
        which: "LA"/"largest" (default: the top eigenvalues), "SA"/"smallest",
            "LM"/"magnitude", or "BE"/"both" (k // 2 from the bottom, the rest
            from the top, as in ARPACK).
        tol: relative residual tolerance, 0 < tol < 1: a pair is converged when
            ``||A v - theta v|| <= max(tol max(|theta|, sqrt(eps) ||A||_est),
            2 floor ||A||_est)``.  ``floor`` is the rounding floor every residual
            carries: ``precision + sqrt(ncv) eps`` (the error of one product plus
            the basis's loss of orthogonality; ``eps`` of the operator's dtype,
            ``precision`` the operator's declared relative accuracy, or
            ``sqrt(n) eps`` for an operator that declares none).  Its term lets eigenvalues too small for a
            relative tolerance to be attainable (near zero) converge once their
            residual is at the floor: they are then known to an absolute
            ``residual``, as well as the arithmetic allows.  Default (None):
            ``max(1e-6, 10 floor)``, i.e. 1e-6 in float64 and ~10x what the
            products resolve in float32 (e.g. 7e-6 for a float32 MLP Hessian of
            precision 1.4e-7; 7e-5 for a float32 matrix of n = 3000 that declares
            none): an unreachable default would report a right answer as
            unconverged.  A tol below ``2 floor``
            cannot be reached and raises ``ValueError``; so does the default where
            it would exceed :data:`MAX_DEFAULT_TOL` (0.1: products inexact by ~1e-2,
            where "converged" would vouch for nothing), unless ``tol`` is given.
        max_matvecs: budget of operator applications, all included (default
            ``max(100 k, 1000)``; the last k measure the returned pairs' residuals,
            ``||A y - theta y||``, so it must be at least 2 k + 3).  When it runs out the result is returned with
            ``converged`` False for the unfinished pairs and a
            :class:`ConvergenceWarning`.
        seed: seeds the start vector, the symmetry probe and any restart vector
            after a breakdown; the result is deterministic given it.  An int in
            ``[0, 2**63)``; None is refused (pick one, so the run can be repeated).
        n: size, for a callable ``op``.
        v0: start vector (n,) in the operator's dtype and device (default random
            normal).  A Krylov space only holds eigenvectors its start vector touches:
            a ``v0`` (nearly) orthogonal to a wanted one (a warm start from the previous
            point's eigenvector after two eigenvalues crossed) can return the next
            eigenvalue as converged (its residual is honest for the value it reports)
            when the gap is below what the one verification restart, from a random
            vector, resolves in ``ncv - k`` steps.  Add a random component to a warm
            start (e.g. ``v0 + 1e-3 * torch.randn_like(v0) * v0.norm()``).
        ncv: basis size m (default ``max(2 k + 10, 20)``, at most n - 1, and at
            most what fits ``memory_budget``, not below ``k + 3``).  Memory is
            ``(ncv + 1) n`` elements of the operator's dtype plus 2 vectors of
            temporaries and the k returned eigenvectors.
        return_eigenvectors: keep the (n, k) Ritz vectors in the result.
        check_symmetry: probe symmetry once (2 matvecs) and raise ``ValueError``
            for a non-symmetric operator.
        dense: solve by assembling the matrix (n matvecs) and ``torch.linalg.eigh``
            in float64.  Default: when ``n <= 200`` or ``n <= 2 ncv``, where the
            dense solve costs about as many matvecs as Lanczos would, unless an
            explicit ``max_matvecs`` is below n (then the Krylov path, within it; a
            dense solve over such a budget raises ``ValueError``).
        progress: tqdm progress bar: matvecs done against ``max_matvecs`` (so its
            time left is an upper bound), converged pairs (default: only on a
            terminal).
        checkpoint: a file (or an existing folder, then ``<folder>/lanczos.ckpt``)
            where the whole iteration state is saved, atomically, at most every
            ``checkpoint_every`` seconds at a step or restart boundary and once
            at the end.  Rerun with the same arguments after a crash (even
            SIGKILL) and the run resumes there and returns bit-for-bit what an
            uninterrupted run returns (same eigenvalues, residuals, matvecs,
            restarts), as long as the operator's products are deterministic.
            A checkpoint of another operator (fingerprint: class, n, dtype, and
            for curvature operators weights, data size and loss; plus one probe
            product ``A p`` that tells matrices of the same size apart) or of
            other arguments (k, which, tol, seed, ncv, max_matvecs, v0,
            check_symmetry), or a damaged file, raises
            :class:`~spectra.checkpoint.CheckpointError`.  Size: about
            ``(ncv + 2) n`` numbers of the operator's dtype (the basis), e.g.
            0.2 GB for n = 1e6, ncv = 20 in float32.  Costs 1 extra matvec (the
            probe, not counted in ``matvecs``).  Ignored by the dense path.
            With a distributed operator every rank holds (and writes) the
            same state: give each rank its own path.  The folder must exist and
            be writable; that is checked before the first product (also for the
            dense path, which does not write).
        checkpoint_every: seconds between saves (default 300; 0 saves at every
            step).
        memory_budget: bytes the Krylov path's vectors may take: ``(ncv + 1 + 2
            + k) n`` elements (basis, temporaries, the returned eigenvectors; the
            k only with ``return_eigenvectors``).  Default: half of the free
            memory of the operator's device
            (:func:`spectra.exact.available_memory_bytes`) at the call, the rest
            left for the operator's products.  The default ncv is lowered to fit
            (down to ``k + 3``; fewer basis vectors mean more restarts, not a
            worse answer); when even that, or a given ncv, does not fit, a
            ``MemoryError`` names n, the dtype, the bytes per vector, the vectors
            needed, the budget and the free memory, before any product.  A run
            resumed from a checkpoint keeps the ncv it started with when that
            fits.  Ignored by the dense path.

    Breakdown: when the recurrence hits an invariant subspace (``beta`` at
    rounding level) its Ritz pairs are exact; the iteration continues from a
    random vector orthogonal to the basis, which is also how copies of a
    repeated eigenvalue are found (a single Krylov space contains only one
    direction of each eigenspace).  Convergence is not declared until the new
    block has run k steps (or the basis is full and restarted), so exact Ritz
    values of the first block cannot hide larger eigenvalues of the complement.  With many distinct eigenvalues and no
    breakdown, further copies of a multiple eigenvalue can be missed, as with
    any single-vector Krylov method; ask for extra pairs or use a block method.

    Returns:
        :class:`LanczosResult`.
    """
    t0 = time.perf_counter()
    op = as_linear_operator(op, n=n)
    size = op.shape[0]
    which_n = _check_which(which)
    k = _check_k(k, size)
    seed = check_seed(seed)
    if tol is not None:
        tol = check_real("tol", tol)
        if not 0 < tol < 1:
            raise ValueError(
                f"tol must satisfy 0 < tol < 1, got {tol!r}: it is a relative residual "
                "tolerance (tol=1 would accept eigenvalues off by 100%); typical values are "
                "1e-8 to 1e-3, or tol=None for the default of the operator's precision"
            )
    m = _basis_size(ncv, k, size)
    budget_given = max_matvecs is not None
    if max_matvecs is None:
        max_matvecs = max(100 * k, 1000)
    max_matvecs = check_int("max_matvecs", max_matvecs)
    if max_matvecs < 2 * k + 3:
        raise ValueError(
            f"max_matvecs={max_matvecs} is too small for k={k}; need >= 2 k + 3 = {2 * k + 3} "
            "(the last k measure the residuals)"
        )
    if v0 is not None:
        v0 = _check_v0(v0, op)
    budget = check_budget(memory_budget)
    if checkpoint is not None:
        checkpoint = KrylovCheckpoint.file_for(checkpoint, "lanczos", checkpoint_every)

    if dense is None:
        dense = size <= max(DENSE_THRESHOLD, 2 * m) or k >= size
        if dense and budget_given and max_matvecs < size and m > k:
            dense = False  # the assembly would spend n products, over the budget given
    if dense and budget_given and max_matvecs < size:
        raise ValueError(
            f"the dense solve applies the operator n={size} times, more than "
            f"max_matvecs={max_matvecs}; raise max_matvecs to >= {size}, or pass a larger "
            "ncv (or dense=False) for the Krylov path within the budget"
        )
    if not dense and m <= k:
        raise ValueError(
            f"the Krylov path needs a basis larger than k={k} but n={size} allows ncv={m}; "
            "use dense=True (the default at this size): the dense solve is exact"
        )
    if not dense:
        previous = None
        if checkpoint is not None and ncv is None:
            previous = (KrylovCheckpoint.stored_args(checkpoint, "lanczos") or {}).get("ncv")
        m = _fit_basis(op, k, m, ncv is not None, budget, return_eigenvectors, previous)
    acc = _accuracy(op, tol, m, dense)
    ckpt, saved = None, None
    if checkpoint is not None and not dense:
        args = {
            "k": k,
            "which": which_n,
            "tol": acc.tol,
            "seed": seed,
            "ncv": int(m),
            "max_matvecs": max_matvecs,
            "check_symmetry": bool(check_symmetry),
            "v0_sha256": None if v0 is None else _sha256(v0),
        }
        ckpt = KrylovCheckpoint(checkpoint, "lanczos", op, args, checkpoint_every)
        saved = ckpt.load()
    totals = RunTotals(op, t0)
    if check_symmetry and saved is None:
        check_symmetric(op, seed=seed)
    if dense:
        return _dense(op, k, which_n, acc, totals, return_eigenvectors)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    return _thick_restart(
        op,
        k,
        which_n,
        acc,
        max_matvecs,
        gen,
        v0,
        m,
        totals,
        return_eigenvectors,
        progress,
        ckpt,
        saved,
    )


# --- validation ------------------------------------------------------------------


def _check_which(which: str) -> str:
    if which not in _WHICH:
        raise ValueError(f"which must be one of {sorted(_WHICH)}, got {which!r}")
    return _WHICH[which]


def _check_k(k: Any, size: int) -> int:
    k = check_int("k", k)
    if k > size:
        raise ValueError(f"k={k} eigenpairs requested but the operator has size n={size}")
    return k


def _basis_size(ncv: int | None, k: int, size: int) -> int:
    m = max(2 * k + 10, 20) if ncv is None else check_int("ncv", ncv)
    if ncv is not None and m <= k:
        raise ValueError(f"ncv={ncv} must exceed k={k}")
    return max(min(m, size - 1), 1)


def _fit_basis(
    op: LinearOperator,
    k: int,
    m: int,
    given: bool,
    budget: int | None,
    vectors: bool,
    previous: Any,
) -> int:
    """The basis size for ``budget`` bytes (see ``memory_budget``); raises MemoryError
    before any product when the minimum, or a given ncv, does not fit."""
    size, dtype = op.shape[0], op.dtype
    per_vector = size * torch.empty((), dtype=dtype).element_size()
    extra = WORK_VECTORS + (k if vectors else 0)
    default_budget, free = default_memory_budget(op.device)
    limit = default_budget if budget is None else budget
    fits = limit // per_vector - 1 - extra  # largest ncv that fits
    smallest = max(min(k + MIN_EXTRA_NCV, size - 1), 1)
    if not given and isinstance(previous, int) and smallest <= previous <= m and previous <= fits:
        return previous  # resume with the basis size the run started with
    if not given:
        m = min(m, max(fits, 0))
        if m >= smallest:
            return m
        m = smallest
    elif m <= fits:
        return m
    need = (m + 1 + extra) * per_vector
    which = "ncv" if given else "the smallest basis"
    source = "memory_budget" if budget is not None else "the default budget (half the free memory)"
    raise MemoryError(
        f"lanczos(k={k}) with {which} ncv = {m} needs {m + 1 + extra} vectors (ncv + 1 "
        f"basis + {WORK_VECTORS} temporaries"
        + (f" + k = {k} eigenvectors" if vectors else "")
        + f") of n = {size:,} numbers of {dtype}, {per_vector:,} bytes per vector: "
        f"{format_bytes(need)}; {source} is {format_bytes(limit)}, with "
        f"{format_bytes(free)} free on {op.device}. Use a smaller k"
        + (", return_eigenvectors=False" if vectors else "")
        + (", a smaller ncv" if given else "")
        + ", fewer parameters, or a larger memory_budget"
    )


@dataclass(frozen=True)
class _Accuracy:
    """The tolerance of a run and the rounding floor of its residuals (relative to ||A||)."""

    tol: float
    eps: float  # of the operator's dtype
    floor: float

    def allowance(self, theta: np.ndarray, anorm: float) -> np.ndarray:
        """The residual (and the error) each value may have to count as converged."""
        relative = self.tol * np.maximum(np.abs(theta), math.sqrt(self.eps) * anorm)
        return np.maximum(relative, MIN_TOL_OVER_FLOOR * self.floor * anorm)

    def converged(self, theta: np.ndarray, res: np.ndarray, anorm: float) -> np.ndarray:
        return res <= self.allowance(theta, anorm)

    def advice(self, dtype: torch.dtype) -> str:
        """What to change when pairs do not converge."""
        text = (
            f"raise max_matvecs or ncv, or loosen tol; the residuals cannot fall below "
            f"~{self.floor:.1e} x ||A|| in {dtype}"
        )
        if dtype != torch.float64:
            text += " (for more accuracy, build the operator in float64: dtype=torch.float64)"
        return text


def _accuracy(op: LinearOperator, tol: float | None, m: int, dense: bool) -> _Accuracy:
    """Resolve ``tol`` against the rounding floor of the path taken (see :func:`lanczos`).

    Krylov path: one product is accurate to the declared ``precision``, and never
    better than ``sqrt(n) eps`` (the rounding of an n-term sum), relative to ||A||, and the basis
    is orthonormal to ``sqrt(ncv) eps``.  Dense path: ``eigh`` in float64 is backward
    stable to ``n eps64``, and the assembled matrix carries the products' error,
    except for a stored matrix, whose identity-column products are exact.
    """
    size = op.shape[0]
    eps = torch.finfo(op.dtype).eps
    declared = operator_precision(op)
    # a declared precision compares two product paths; neither is below the rounding of
    # an n-term sum, which the measured residuals ||A y - theta y|| also carry
    product = math.sqrt(size) * eps if declared is None else max(declared, math.sqrt(size) * eps)
    if dense:
        exact = isinstance(op, DenseOperator) or declared is None
        floor = size * torch.finfo(torch.float64).eps + (0.0 if exact else product)
    else:
        floor = product + math.sqrt(m) * eps
    default = max(DEFAULT_TOL, TOL_OVER_FLOOR * floor)
    if tol is None and default > MAX_DEFAULT_TOL:
        raise ValueError(
            f"this operator's products are accurate to only ~{floor:.1e} relative to ||A|| "
            f"(op.precision {declared if declared is not None else float('nan'):.1e}: the "
            "measured disagreement of its two product paths, or its asymmetry), so no "
            "eigenvalue can be resolved better than that and the default tolerance "
            f"({default:.1e}) would call anything converged. Build the operator in float64 "
            "(dtype=torch.float64), make the model's derivative exact (see the warning the "
            f"operator gave), or pass an explicit tol between {MIN_TOL_OVER_FLOOR * floor:.1e} "
            "and 1 to accept that accuracy"
        )
    if tol is None:
        tol = default
    elif tol < MIN_TOL_OVER_FLOOR * floor:
        where = f"n={size}" + (f", precision={declared:.1e}" if declared else "")
        raise ValueError(
            f"tol={tol:g} cannot be reached: {op.dtype} products of this operator ({where}) "
            f"leave residuals of ~{floor:.1e} x ||A||; use tol >= "
            f"{MIN_TOL_OVER_FLOOR * floor:.1e} (or tol=None, the default: {default:.1e})"
            + (
                ""
                if op.dtype == torch.float64
                else ", or build the operator in float64 (dtype=torch.float64) for more accuracy"
            )
        )
    return _Accuracy(tol=float(tol), eps=eps, floor=floor)


def _check_v0(v0: Any, op: LinearOperator) -> torch.Tensor:
    if not isinstance(v0, torch.Tensor):
        raise TypeError(f"v0 must be a torch.Tensor, got {type(v0).__name__}")
    if tuple(v0.shape) != (op.shape[0],):
        raise ValueError(f"v0 must have shape ({op.shape[0]},), got {tuple(v0.shape)}")
    if v0.dtype != op.dtype:
        raise TypeError(f"v0 has dtype {v0.dtype} but the operator is {op.dtype}")
    if v0.device != op.device:
        raise ValueError(f"v0 is on device {v0.device} but the operator lives on {op.device}")
    norm = float(v0.norm())
    if not math.isfinite(norm) or norm == 0.0:
        raise ValueError("v0 must be finite and nonzero")
    return v0 / norm


# --- selection ---------------------------------------------------------------------


def _select(theta: np.ndarray, count: int, which: str) -> np.ndarray:
    """Indices of the ``count`` wanted values of ascending ``theta``, in result order."""
    count = min(count, theta.size)
    if which == "LA":
        return np.arange(theta.size - 1, theta.size - 1 - count, -1)
    if which == "SA":
        return np.arange(count)
    if which == "LM":
        return np.argsort(-np.abs(theta), kind="stable")[:count]
    low = count // 2
    return np.concatenate([np.arange(low), np.arange(theta.size - (count - low), theta.size)])


# --- dense path ----------------------------------------------------------------------


def _dense(
    op: LinearOperator, k: int, which: str, acc: _Accuracy, totals: RunTotals, vectors: bool
) -> LanczosResult:
    """Assemble the matrix and use ``torch.linalg.eigh`` in float64."""
    A = op.to_dense().to(torch.float64)
    A = 0.5 * (A + A.T)
    theta_t, S_t = torch.linalg.eigh(A)
    theta = theta_t.cpu().numpy()
    idx = _select(theta, k, which)
    V = S_t[:, torch.as_tensor(idx, device=S_t.device)]
    th = theta_t[torch.as_tensor(idx, device=theta_t.device)]
    res = torch.linalg.vector_norm(A @ V - V * th, dim=0).cpu()
    anorm = float(np.abs(theta).max()) if theta.size else 0.0
    # backward error of eigh, O(n eps ||A||), and any declared error of the products:
    # added so the bound is honest
    res = res + acc.floor * anorm
    thn = th.cpu().numpy()
    conv = acc.converged(thn, res.numpy(), anorm)
    return LanczosResult(
        eigenvalues=th.cpu().clone(),
        eigenvectors=V.to(op.dtype) if vectors else None,
        residuals=res.to(torch.float64),
        converged=torch.as_tensor(conv),
        restarts=0,
        which=which,
        method="dense",
        tol=acc.tol,
        basis_bytes=A.nbytes,
        ncv=0,
        **totals.result_fields(),
    )


# --- Krylov path -------------------------------------------------------------------


@dataclass
class _State:
    """Mutable iteration state of one thick-restart run (internal); resumable
    (:class:`~spectra.resumable.ResumableState`).

    Checkpoint layout (format 1): ``Q`` (j + 1, n), ``H``, ``anorm``, ``rng`` (the
    generator's state), ``scalars`` = [j, restarts, fresh, matvecs, exhausted,
    finished, idle, verified, since_check], ``dropped`` and the totals' ``seconds`` and
    ``peak_memory_bytes`` (a checkpoint without the last three resumes with 0).
    ``dropped`` is the (m + 1, m + 1) Gram matrix G of the dropped couplings, ``events``
    their count.
    """

    Q: torch.Tensor  # (m + 1, n) basis rows
    H: np.ndarray  # (m + 1, m + 1) projected matrix, float64
    gen: torch.Generator  # draws the vectors that carry on after a breakdown
    totals: RunTotals
    j: int = 0  # number of basis vectors whose product with A is in H
    anorm: float = 0.0  # lower bound on ||A||
    restarts: int = 0
    exhausted: bool = False  # the basis spans the whole space
    fresh: int = 0  # steps since the last breakdown (restart: the kept vectors)
    finished: bool = False  # the run ended (converged or out of budget)
    idle: int = 0  # consecutive steps that broke down at once (a null space: A q ~ 0)
    #: the converged values at the last verification restart (None before one): the
    #: set is accepted when a run from a fresh random vector converges to it again
    checked: np.ndarray | None = None
    since_check: int = 0  # steps since the last verification restart, breakdowns included
    #: the couplings dropped from H at breakdowns above the rounding floor:
    #: A Q = Q H + beta q e^T + sum_e r_e c_e^T with unit r_e;
    #: kept as G = sum_e c_e c_e^T in basis coordinates and the event count, so pair
    #: s's residual carries ||sum_e r_e (c_e . s)|| <= sqrt(events s^T G s)
    dropped: np.ndarray | None = None
    events: int = 0

    def dropped_gram(self) -> np.ndarray:
        """G of the dropped couplings, (m + 1, m + 1), allocated on first use."""
        if self.dropped is None:
            self.dropped = np.zeros_like(self.H)
        return self.dropped

    def drop(self, coupling: float, at: int) -> None:
        """Count one coupling ``coupling`` dropped from basis coordinate ``at``."""
        self.dropped_gram()[at, at] += coupling * coupling
        self.events += 1

    def dropped_residuals(self, S: np.ndarray) -> np.ndarray:
        """Each Ritz pair's bound from the dropped couplings (S: coordinates, (j, p))."""
        if self.dropped is None or not self.events:
            return np.zeros(S.shape[1])
        G = self.dropped[: S.shape[0], : S.shape[0]]
        quad = np.einsum("ip,ij,jp->p", S, G, S)
        return np.sqrt(self.events * np.maximum(quad, 0.0))

    def rotate_dropped(self, Sk: np.ndarray) -> None:
        """The basis became ``Q[:p] <- Sk^T Q[:m]``: G follows (zero past p)."""
        if self.dropped is None or not self.events:
            return
        m, p = Sk.shape
        rotated = Sk.T @ self.dropped[:m, :m] @ Sk
        self.dropped[:] = 0.0
        self.dropped[:p, :p] = rotated

    def to_arrays(self) -> dict[str, Any]:
        """The state at a step or restart boundary; rows past ``j`` of Q are never read
        again, so they are not saved."""
        scalars = [
            self.j,
            self.restarts,
            self.fresh,
            self.totals.matvecs,
            int(self.exhausted),
            int(self.finished),
            self.idle,
            int(self.checked is not None),
            self.since_check,
        ]
        return {
            **self.totals.to_arrays(),
            "Q": self.Q[: self.j + 1].cpu().numpy(),
            "H": self.H,
            "scalars": np.array(scalars, dtype=np.int64),
            "anorm": np.float64(self.anorm),
            "dropped": self.dropped_gram(),
            "events": np.int64(self.events),
            **({} if self.checked is None else {"checked": self.checked}),
            "rng": self.gen.get_state().numpy(),
        }

    def from_arrays(self, arrays: StoredArrays) -> None:
        """Restore in place (the basis is streamed into ``Q``)."""
        scalars = [int(x) for x in arrays["scalars"]] + [0, 0, 0]
        j, restarts, fresh, used, exhausted, finished, idle, verified, since = scalars[:9]
        H = np.array(arrays["H"], dtype=np.float64)
        rows = self.Q.shape[0]
        if not 0 <= j < rows or H.shape != (rows, rows):
            raise ValueError(f"projected matrix {H.shape} / j={j} do not fit ncv={rows - 1}")
        load_into(arrays, "Q", [self.Q[: j + 1]], (j + 1, self.Q.shape[1]))  # checks the shape
        self.gen.set_state(torch.from_numpy(arrays["rng"]))
        self.anorm = float(arrays["anorm"])
        self.totals.from_arrays(arrays)
        self.totals.resume_matvecs(used)  # matvecs count as in the uninterrupted run
        self.H, self.j, self.restarts, self.fresh = H, j, restarts, fresh
        self.exhausted, self.finished = bool(exhausted), bool(finished)
        self.idle, self.since_check = idle, since
        self.checked = np.array(arrays["checked"]) if verified and "checked" in arrays else None
        if "dropped" in arrays:
            self.dropped = np.array(arrays["dropped"], dtype=np.float64)
            self.events = int(arrays["events"])


def _thick_restart(
    op: LinearOperator,
    k: int,
    which: str,
    acc: _Accuracy,
    max_matvecs: int,
    gen: torch.Generator,
    v0: torch.Tensor | None,
    m: int,
    totals: RunTotals,
    vectors: bool,
    progress: bool | None,
    ckpt: KrylovCheckpoint | None = None,
    saved: StoredArrays | None = None,
) -> LanczosResult:
    size = op.shape[0]
    Q = torch.zeros((m + 1, size), dtype=op.dtype, device=op.device)
    st = _State(Q=Q, H=np.zeros((m + 1, m + 1)), gen=gen, totals=totals)
    if saved is None:
        if v0 is None:
            v0 = random_orthogonal(Q[:0], gen)
        Q[0] = v0
    else:
        ckpt.restore(st, saved)
    nkeep = min(k + max((m - k) // 2, 1), m - 1)

    def save(final: bool = False) -> None:
        if ckpt is not None:
            ckpt.save_state(st, final)

    final = max_matvecs
    max_matvecs -= k  # kept for measuring the returned pairs' residuals
    calibration = 1.0  # measured / estimated residual, once a measurement disagreed
    with progress_bar(final, f"lanczos(k={k}, {which})", progress) as bar:
        bar.update(totals.matvecs)
        while True:
            while not st.finished:
                done = False
                while st.j < m and not st.exhausted:
                    if totals.matvecs >= max_matvecs:
                        done = True
                        break
                    _expand(op, st, totals.matvecs, acc.floor)
                    bar.update(1)
                    # after a verification restart the random vector gets a whole basis
                    # cycle (m - k steps) to grow towards a missed copy before a check
                    if st.checked is None:
                        ready = st.fresh >= k or st.idle >= k
                    else:
                        ready = st.since_check >= max(k, m - k)
                    if st.j >= k and ready:
                        theta, _, res, conv, idx = _ritz(st, k, which, acc, calibration)
                        nconv = int(conv[idx].sum())
                        bar.set_postfix(converged=f"{nconv}/{k}")
                        order = np.argsort(theta[idx])  # checked is sorted: pair values and res
                        # the same values to the run's accuracy (what convergence allows;
                        # with every pair converged, at least its residual): residual
                        # estimates sit at the rounding floor, below the drift of restarts
                        # between checks, and comparing with them re-verified until the
                        # budget ran out
                        allowed = acc.allowance(theta[idx][order], st.anorm)
                        same = st.checked is not None and bool(
                            np.all(np.abs(theta[idx][order] - st.checked) <= allowed)
                        )
                        if nconv == k and same:
                            done = True
                            break
                        if nconv == k and not st.exhausted and totals.matvecs + k < max_matvecs:
                            st.checked = np.sort(theta[idx])
                            _verification_restart(st, k, which)
                        elif nconv == k:
                            done = True  # no budget (or no space) left to look further
                            break
                    save()  # resume point: the top of this loop
                if done or st.exhausted or totals.matvecs >= max_matvecs:
                    break  # (never restart without budget for a step after it)
                _restart(st, nkeep, which)
                save()
            if not st.finished:
                st.finished = True
                save(final=True)
            theta, S, res, conv, idx = _ritz(st, k, which, acc, calibration)
            estimated = res[idx].copy()
            Y = st.Q[: st.j].T @ torch.as_tensor(S[:, idx], dtype=op.dtype, device=op.device)
            res[idx] = _measured_residuals(op, Y, theta[idx], acc.floor * st.anorm)
            bar.update(k)
            conv = acc.converged(theta, res, st.anorm)
            if conv[idx].all() or st.exhausted or totals.matvecs + k + 1 >= final:
                break
            # the estimates were optimistic (float32: lost orthogonality, product error):
            # scale them by what the measurement showed and iterate on
            ratio = float(np.max(res[idx] / np.maximum(estimated, 1e-300)))
            if calibration > 1.0 and ratio < 2.0:
                break  # recalibrated once and the measurement did not improve: a floor
            calibration = max(calibration, ratio)
            st.finished = False
            if st.j >= m:
                _restart(st, nkeep, which)
    if not conv[idx].all():
        warnings.warn(
            f"lanczos: {int(conv[idx].sum())}/{k} eigenpairs converged to tol={acc.tol:.1e} "
            f"within max_matvecs={final} (ncv={m}); {acc.advice(op.dtype)}",
            ConvergenceWarning,
            stacklevel=3,
        )
    if not vectors:
        Y = None
    return LanczosResult(
        eigenvalues=torch.as_tensor(theta[idx].copy()),
        eigenvectors=Y,
        residuals=torch.as_tensor(res[idx].copy()),
        converged=torch.as_tensor(conv[idx].copy()),
        restarts=st.restarts,
        which=which,
        method="krylov",
        tol=acc.tol,
        basis_bytes=Q.nbytes,
        ncv=m,
        **totals.result_fields(),
    )


def _measured_residuals(
    op: LinearOperator, Y: torch.Tensor, theta: np.ndarray, floor: float
) -> np.ndarray:
    """``||A y - theta y||`` of the returned Ritz pairs (k products, one block), plus the
    rounding floor of a product: the residuals a user is given are measured, so a
    dropped coupling, a lost orthogonality or a missed copy cannot make one look
    smaller than it is."""
    AY = op @ Y
    R = AY - Y * torch.as_tensor(theta, dtype=Y.dtype, device=Y.device)
    return torch.linalg.vector_norm(R, dim=0).double().cpu().numpy() + floor


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(
        t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    ).hexdigest()


def _expand(op: LinearOperator, st: _State, iteration: int, floor: float) -> None:
    """One Lanczos step on basis vector ``st.j``; handles breakdown.

    A coupling dropped at a breakdown is counted in :attr:`_State.dropped` where it
    exceeds the rounding floor (``floor x ||A||``, which every residual carries
    already): in float32 the tolerance can drop couplings several times the floor."""
    j = st.j
    Q3 = st.Q.unsqueeze(0)
    h, beta = lanczos_step(op, Q3, j, [0], iteration)
    h, b = h[0], float(beta[0])
    st.H[: j + 1, j] = h
    st.H[j, : j + 1] = h
    st.anorm = max(st.anorm, math.sqrt(float(h @ h) + b * b))
    if b <= breakdown_tolerance(st.anorm, op.shape[0], op.dtype):
        if b > floor * st.anorm:  # below the tolerance, yet above rounding
            st.drop(b, j)
        st.idle = st.idle + 1 if st.fresh == 0 else 1
        b = 0.0
        fresh = random_orthogonal(st.Q[: j + 1], st.gen)
        if fresh is None:
            st.exhausted = True
        else:
            st.Q[j + 1] = fresh
        st.fresh = -1
    else:
        st.idle = 0
    st.H[j + 1, j] = st.H[j, j + 1] = b
    st.j = j + 1
    st.fresh += 1
    st.since_check += 1


def _ritz(
    st: _State, k: int, which: str, acc: _Accuracy, calibration: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ritz values, vectors (in basis coordinates), residuals, converged, wanted idx.

    Residual of Ritz pair i: ``|beta_j s_{j,i}|`` from the Lanczos relation
    ``A Q_j = Q_j H_j + beta_j q_{j+1} e_j^T``, plus the couplings dropped from H at
    breakdowns (:attr:`_State.dropped`, per pair), plus the rounding floor
    ``acc.floor ||A||`` for the error in that relation: a product is exact only to
    ~precision ||A|| (never below ``sqrt(n) eps ||A||``) and the basis is orthonormal
    only to ~sqrt(ncv) eps.  These are estimates: the returned residuals are measured.
    """
    j = st.j
    theta, S = scipy.linalg.eigh(st.H[:j, :j])
    beta = 0.0 if st.exhausted else st.H[j, j - 1]
    res = np.abs(beta * S[j - 1, :]) + acc.floor * st.anorm + st.dropped_residuals(S)
    res = res * calibration  # >= 1 once a measured residual exceeded its estimate
    conv = acc.converged(theta, res, st.anorm)
    idx = _select(theta, k, which)
    return theta, S, res, conv, idx


def _verification_restart(st: _State, k: int, which: str) -> None:
    """Keep the k converged Ritz vectors and go on from a random vector orthogonal to them.

    A single Krylov space holds one direction of each eigenspace, so copies of a
    repeated eigenvalue (or a tight cluster) are invisible to it; the random vector
    has a component along every missing copy, and the run must converge again, a
    basis cycle (ncv - k steps) later, to the same values before the set is accepted
    (each new copy found means another verification).  The converged vectors' couplings
    (each below its residual) are dropped: the returned residuals are measured
    (:func:`_measured_residuals`), not estimated, so nothing rests on them.
    """
    theta, _ = _keep_ritz_vectors(st, k, which)  # their couplings are not kept
    fresh = random_orthogonal(st.Q[:k], st.gen)
    st.H[:] = 0.0
    st.H[np.arange(k), np.arange(k)] = theta
    st.j = k
    if fresh is None:
        st.exhausted = True
    else:
        st.Q[k] = fresh
    st.fresh = 0
    st.idle = 0
    st.since_check = 0
    st.restarts += 1


def _keep_ritz_vectors(st: _State, count: int, which: str) -> tuple[np.ndarray, np.ndarray]:
    """Rotate the basis so its first ``count`` rows are the wanted Ritz vectors; returns
    their values and their couplings to the residual direction ``Q[j]``."""
    m = st.j
    theta, S = scipy.linalg.eigh(st.H[:m, :m])
    keep = np.sort(_select(theta, count, which))
    Sk = torch.as_tensor(S[:, keep], dtype=st.Q.dtype, device=st.Q.device)
    _rotate_rows(st.Q, Sk, m)
    st.rotate_dropped(S[:, keep])
    return theta[keep], st.H[m, m - 1] * S[m - 1, keep]


def _restart(st: _State, nkeep: int, which: str) -> None:
    """Thick restart: keep ``nkeep`` Ritz vectors and the residual direction."""
    m = st.j
    theta, coupling = _keep_ritz_vectors(st, nkeep, which)
    st.Q[nkeep] = st.Q[m]
    st.H[:] = 0.0
    st.H[np.arange(nkeep), np.arange(nkeep)] = theta
    st.H[:nkeep, nkeep] = coupling
    st.H[nkeep, :nkeep] = coupling
    st.j = nkeep
    st.fresh = nkeep
    st.restarts += 1


def _rotate_rows(Q: torch.Tensor, Sk: torch.Tensor, m: int) -> None:
    """``Q[:p] = Sk.T @ Q[:m]`` in column chunks so the temporary stays <= n elements."""
    p = Sk.shape[1]
    size = Q.shape[1]
    chunk = max(size // max(p, 1), 1)
    for c0 in range(0, size, chunk):
        c1 = min(size, c0 + chunk)
        Q[:p, c0:c1] = Sk.T @ Q[:m, c0:c1]
