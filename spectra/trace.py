"""Matrix-free trace estimation: Hutchinson and Hutch++ with standard errors.

Hutchinson: ``tr(A) ~ mean_i g_i^T A g_i`` over Rademacher probes g_i; its
standard error is the sample standard deviation over sqrt(m).

Hutch++ (Meyer, Musco, Musco & Woodruff 2021) spends a third of the budget on a
sketch ``A S``, takes its orthonormal basis Q, computes ``tr(Q^T A Q)`` exactly
(another third) and runs Hutchinson on the deflated ``(I - QQ^T) A (I - QQ^T)``
with the last third.  The top of the spectrum, which dominates Hutchinson's
variance for Hessians with outliers, is taken exactly, so the error falls like
1/m instead of 1/sqrt(m) for quickly decaying spectra.  Its standard error is
that of the Hutchinson part (the sketched part has no sampling error given Q).

A budget of n products or more buys the trace itself: ``sum_i e_i^T A e_i`` from
the n unit vectors, with no sampling error, so no estimator spends more than n.

Memory: the probes are held as bits (:class:`~spectra._krylov.PackedSigns`) and applied a
block of columns at a time, the block sized to a memory budget together with what the
operator needs per column; Hutch++ holds its sketch basis (m // 3 vectors, orthonormalised
in place) and nothing else of length n beyond one block.  At GPT-2 small (124M
parameters, float32) a 30-product Hutch++ holds 10 x 124M x 4 bytes = 5 GB of basis, and
with the default budget (half of ~20 GB free) the rule leaves room for one column: single-
vector products.  The random draws do not depend on the block size, so neither does the
result.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ._checks import all_finite, check_int, check_seed
from ._krylov import PackedSigns, breakdown_tolerance
from ._precision import ieee_float32
from ._resources import (
    check_budget,
    default_memory_budget,
    format_bytes,
    peak_memory_bytes,
    progress_bar,
)
from .linear_operator import LinearOperator, as_linear_operator

__all__ = ["trace", "TraceEstimate"]

_METHODS = ("hutch++", "hutchinson")


def confidence_interval(
    value: float, stderr: float, draws: int | None, confidence: float = 0.95
) -> tuple[float, float]:
    """``value +- q stderr``, q the two-sided ``confidence`` quantile of Student's t with
    ``draws - 1`` degrees of freedom (normal where ``draws`` is None or < 2).

    A standard error from a few probes is itself uncertain, so a normal quantile is too
    narrow: at Hutch++'s 2-4 residual probes (m = 6-12), 3 standard errors covered 80-91%
    of seeded trials and t's 99.7% interval 98-100% (``tests/test_trace.py``)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    from scipy.stats import norm, t

    q = 0.5 + confidence / 2
    factor = float(t.ppf(q, draws - 1) if draws is not None and draws > 1 else norm.ppf(q))
    return value - factor * stderr, value + factor * stderr


@dataclass(frozen=True)
class TraceEstimate:
    """A trace estimate with its standard error.

    Attributes:
        estimate: the estimated trace.
        stderr: standard error of ``estimate`` (0.0 for method "exact").
        matvecs: operator applications used.
        method: "hutch++", "hutchinson", or "exact" (the budget reached n).
        samples: the Hutchinson probes the standard error is the spread of (m - 2 (m // 3)
            for Hutch++, m for Hutchinson; 0 for "exact").  Few probes make ``stderr``
            itself uncertain: :meth:`interval` accounts for it.
        seconds: wall time of the call.
        peak_memory_bytes: the process's memory high-water mark at the end (CPU:
            ``ru_maxrss``, the whole process's peak since it started; CUDA:
            ``torch.cuda.max_memory_allocated``).  Neither takes part in ``==``.
    """

    estimate: float
    stderr: float
    matvecs: int
    method: str
    samples: int = 0
    seconds: float = field(default=math.nan, compare=False)
    peak_memory_bytes: int = field(default=0, compare=False)

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """A two-sided ``confidence`` interval for the trace (:func:`confidence_interval`
        over ``samples`` probes); (estimate, estimate) for an exact trace.

        Known failure mode: with few residual probes (Hutch++ at a small budget) and more
        large eigenvalues than the sketch holds, the probes' values are skewed and the
        t interval undercovers (measured: 81% for a nominal 95% with m = 12 on a rank-5
        matrix; about 95% at the default m = 99 and whenever the sketch captures the
        large eigenvalues).  Spend more products, not a higher confidence, to fix it."""
        if self.method == "exact":
            confidence_interval(self.estimate, 0.0, None, confidence)  # checks confidence
            return self.estimate, self.estimate
        if self.samples < 2:
            raise ValueError("no interval from fewer than 2 probes")
        return confidence_interval(self.estimate, self.stderr, self.samples, confidence)

    def __repr__(self) -> str:
        return (
            f"TraceEstimate({self.estimate:.6g} +- {self.stderr:.2g}, "
            f"method={self.method!r}, matvecs={self.matvecs}, seconds={self.seconds:.3g})"
        )


@ieee_float32()
def trace(
    op: Any,
    method: str = "hutch++",
    num_matvecs: int = 99,
    seed: int = 0,
    *,
    n: int | None = None,
    block_size: int | None = None,
    memory_budget: int | None = None,
    progress: bool | None = None,
) -> TraceEstimate:
    """Estimate ``tr(op)`` with Rademacher probes.

    Args:
        op: anything :func:`~spectra.as_linear_operator` accepts (a callable needs
            ``n=``).  Symmetry is not required.
        method: "hutch++" (default; best for spectra with a few large
            eigenvalues, as Hessians have) or "hutchinson".
        num_matvecs: total budget m (default 99, divisible by 3; an integral
            float such as 99.0 is accepted).  Hutch++ uses m // 3 for the sketch,
            m // 3 for ``tr(Q^T A Q)`` and the remaining m - 2 (m // 3) probes for
            the residual, so it needs m >= 4 for a standard error from at least 2
            probes; Hutchinson needs m >= 2.  When m >= n the trace is computed
            exactly from the n unit-vector products instead (method "exact",
            stderr 0, n matvecs): as cheap as the estimate and without its error.
        seed: seeds the probes; deterministic given it.  An int in ``[0, 2**63)``;
            None is refused (pick one, so the run can be repeated).
        n: size, for a callable ``op``.
        block_size: columns per block product (default: as many as fit the memory
            budget, at most 64).  Each column of a block takes 3 length-n vectors
            here, and each column after the first also the operator's own
            :meth:`~spectra.LinearOperator.column_workspace_bytes` (a curvature
            operator's tangent activations), so at 100M+ parameters the default is 1:
            single-vector products, which reuse one gradient graph.
        memory_budget: bytes the estimate may hold (default: half of the memory free
            on the operator's device now): the Hutch++ basis (m // 3 vectors) and one
            block.  The temporaries of a single product are left to the memory
            outside the budget, as in :func:`~spectra.lanczos` and
            :func:`~spectra.spectral_density`.  When not even a single-column
            product's vectors fit, ``MemoryError`` names the numbers before any product.
        progress: tqdm progress bar: matvecs done of the budget and the estimated
            time left (default: only on a terminal).
    """
    t0 = time.perf_counter()
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    op = as_linear_operator(op, n=n)
    size = op.shape[0]
    budget = check_int("num_matvecs", num_matvecs)
    minimum = 4 if method == "hutch++" else 2
    if budget < min(minimum, size):
        raise ValueError(
            f"{method} needs num_matvecs >= {minimum} (to estimate a standard error), "
            f"got {num_matvecs!r}"
        )
    if block_size is not None:
        block_size = check_int("block_size", block_size)
    memory_budget = check_budget(memory_budget)
    gen = torch.Generator(device="cpu").manual_seed(check_seed(seed))
    start = op.matvecs
    exact = budget >= size
    held = budget // 3 if method == "hutch++" and not exact else 0
    block = _block_size(op, held, block_size, memory_budget)
    with progress_bar(min(budget, size), f"trace({method})", progress) as bar:
        if exact:
            est, se = _exact(op, block, bar), 0.0
        elif method == "hutchinson":
            est, se = _hutchinson(op, budget, gen, None, block, bar)
        else:
            est, se = _hutchpp(op, budget, gen, block, bar)
    return TraceEstimate(
        float(est),
        float(se),
        op.matvecs - start,
        "exact" if exact else method,
        0 if exact else budget - 2 * held,
        seconds=time.perf_counter() - t0,
        peak_memory_bytes=peak_memory_bytes(op.device),
    )


#: Largest default block (columns per product).
MAX_BLOCK = 64

#: Length-n vectors the estimate holds per column of a block: the probe, its product
#: and the deflated probe (or the product's float64 accumulation).
_VECTORS_PER_COLUMN = 3


def _block_size(
    op: LinearOperator, held_vectors: int, requested: int | None, memory_budget: int | None
) -> int:
    """Columns per product: ``requested``, or as many as fit the budget next to the
    ``held_vectors`` length-n vectors (at most :data:`MAX_BLOCK`); ``MemoryError``
    naming the numbers when not even a single-column product's vectors fit."""
    free = None
    if memory_budget is None:
        memory_budget, free = default_memory_budget(op.device)
    itemsize = torch.empty((), dtype=op.dtype).element_size()
    vector = op.shape[0] * itemsize
    # one product's own temporaries are what the memory outside the budget is for (as in
    # lanczos and SLQ); each further column of a block is charged its workspace here
    room = memory_budget - (held_vectors + _VECTORS_PER_COLUMN) * vector
    if room < 0:
        where = "" if free is None else f" (default: half of the {format_bytes(free)} free)"
        raise MemoryError(
            f"trace needs {held_vectors} basis vector(s) and {_VECTORS_PER_COLUMN} for a "
            f"single-column product, {held_vectors + _VECTORS_PER_COLUMN} x "
            f"{format_bytes(vector)} (n = {op.shape[0]:,} numbers of {op.dtype}), but "
            f"memory_budget is {format_bytes(memory_budget)}{where}; use a smaller "
            "num_matvecs (Hutch++ holds num_matvecs // 3 vectors), method='hutchinson', "
            "or raise memory_budget"
        )
    if requested is not None:
        return requested
    per_column = _VECTORS_PER_COLUMN * vector + op.column_workspace_bytes()
    return int(max(1, min(MAX_BLOCK, 1 + room // per_column)))


def _exact(op: LinearOperator, block_size: int, bar: Any) -> float:
    """``sum_i e_i^T A e_i`` over the n unit vectors, in blocks, accumulated in float64."""
    size = op.shape[0]
    total = 0.0
    for c0 in range(0, size, block_size):
        c1 = min(size, c0 + block_size)
        cols = torch.arange(c0, c1, device=op.device)
        E = torch.zeros((size, c1 - c0), dtype=op.dtype, device=op.device)
        E[cols, cols - c0] = 1
        AE = _product(op, E)
        bar.update(c1 - c0)
        total += float(AE[cols, cols - c0].to(torch.float64).sum())
    return total


def _hutchinson(
    op: LinearOperator,
    probes: int,
    gen: torch.Generator,
    basis: torch.Tensor | None,
    block_size: int,
    bar: Any,
) -> tuple[float, float]:
    """Mean and standard error of ``g^T P A P g`` (P = I - Q^T Q for the orthonormal
    rows Q of ``basis``, or I)."""
    size = op.shape[0]
    signs = PackedSigns(size, probes, gen)
    samples: list[np.ndarray] = []
    for c0 in range(0, probes, block_size):
        c1 = min(probes, c0 + block_size)
        G = signs.columns(c0, c1, op.dtype, op.device)
        if basis is not None and basis.shape[0]:
            G -= basis.T @ (basis @ G)
        samples.append(_column_dots(G, _product(op, G)))
        bar.update(c1 - c0)
    z = np.concatenate(samples)
    return float(z.mean()), float(z.std(ddof=1) / math.sqrt(z.size))


def _hutchpp(
    op: LinearOperator, m: int, gen: torch.Generator, block_size: int, bar: Any
) -> tuple[float, float]:
    size = op.shape[0]
    s = m // 3
    sketch = PackedSigns(size, s, gen)
    Q = torch.empty((s, size), dtype=op.dtype, device=op.device)  # rows: A S, then Q
    for c0 in range(0, s, block_size):
        c1 = min(s, c0 + block_size)
        Q[c0:c1] = _product(op, sketch.columns(c0, c1, op.dtype, op.device)).T
        bar.update(c1 - c0)
    del sketch
    Q = _orthonormalise_rows_(Q)
    t_sketch = sketch_size = 0.0
    for r0 in range(0, Q.shape[0], block_size):
        block = Q[r0 : r0 + block_size].T.contiguous()
        product = _product(op, block)
        t_sketch += float(_column_dots(block, product).sum())
        sketch_size += float(torch.linalg.vector_norm(product.double(), dim=0).sum())
        bar.update(block.shape[1])
    bar.update(s - Q.shape[0])  # products not needed: the sketch's rank was lower
    mean, se = _hutchinson(op, m - 2 * s, gen, Q, block_size, bar)
    # The residual probes' spread misses the sketch's own rounding: where the sketch
    # holds the whole operator (an exactly low-rank GGN) it would be ~0 and the interval
    # would exclude the truth.  |q^T A q| rounds at about precision ||A q||, and the
    # basis and the products at sqrt(n) of that; 10x for a margin.
    precision = float(getattr(op, "precision", torch.finfo(op.dtype).eps))
    rounding = 10 * math.sqrt(size) * precision * sketch_size
    return t_sketch + mean, math.hypot(se, rounding)


def _orthonormalise_rows_(Y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the rows of Y (k, n), written over Y's leading rows and
    returned as a view (r <= k rows; a row left as rounding noise after two classical
    Gram-Schmidt passes, ``breakdown_tolerance`` of its norm, is dropped).

    In place, so the sketch's basis costs its k vectors and no QR workspace (a float64
    QR of a float32 sketch holds a float64 copy and a float64 Q: 4x the sketch)."""
    size = Y.shape[1]
    r = 0
    for j in range(Y.shape[0]):
        v = Y[j]
        norm0 = float(v.norm())
        for _ in range(2):
            if r:
                v -= Y[:r].T @ (Y[:r] @ v)
        norm = float(v.norm())
        if norm <= breakdown_tolerance(norm0, size, Y.dtype):  # also a zero row
            continue
        Y[r] = v / norm
        r += 1
    return Y[:r]


def _product(op: LinearOperator, X: torch.Tensor) -> torch.Tensor:
    """``op @ X``, refusing NaN or Inf."""
    out = op @ X
    if not all_finite(out):
        raise FloatingPointError("the operator returned NaN or Inf during trace estimation")
    return out


#: Rows per chunk of the float64 accumulation in :func:`_column_dots`.
_DOT_ROWS = 1 << 20


def _column_dots(X: torch.Tensor, Y: torch.Tensor) -> np.ndarray:
    """``x_i^T y_i`` for the columns of X, Y (n, b), accumulated in float64 over row
    chunks (no float64 copy of the whole block)."""
    total = torch.zeros(X.shape[1], dtype=torch.float64, device=X.device)
    for r0 in range(0, X.shape[0], _DOT_ROWS):
        x, y = X[r0 : r0 + _DOT_ROWS], Y[r0 : r0 + _DOT_ROWS]
        total += (x.to(torch.float64) * y.to(torch.float64)).sum(0)
    return total.cpu().numpy()
