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
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ._checks import check_int, check_seed
from ._krylov import random_block
from ._resources import peak_memory_bytes, progress_bar
from .linear_operator import LinearOperator, as_linear_operator

__all__ = ["trace", "TraceEstimate"]

_METHODS = ("hutch++", "hutchinson")


@dataclass(frozen=True)
class TraceEstimate:
    """A trace estimate with its standard error.

    Attributes:
        estimate: the estimated trace.
        stderr: standard error of ``estimate`` (0.0 when the estimate is exact:
            method "exact", or a Hutch++ sketch that spans the whole space).
        matvecs: operator applications used.
        method: "hutch++", "hutchinson", or "exact" (the budget reached n).
        seconds: wall time of the call.
        peak_memory_bytes: the process's memory high-water mark at the end (CPU:
            ``ru_maxrss``, the whole process's peak since it started; CUDA:
            ``torch.cuda.max_memory_allocated``).  Neither takes part in ``==``.
    """

    estimate: float
    stderr: float
    matvecs: int
    method: str
    seconds: float = field(default=math.nan, compare=False)
    peak_memory_bytes: int = field(default=0, compare=False)

    def __repr__(self) -> str:
        return (
            f"TraceEstimate({self.estimate:.6g} +- {self.stderr:.2g}, "
            f"method={self.method!r}, matvecs={self.matvecs}, seconds={self.seconds:.3g})"
        )


def trace(
    op: Any,
    method: str = "hutch++",
    num_matvecs: int = 99,
    seed: int = 0,
    *,
    n: int | None = None,
    block_size: int = 64,
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
        block_size: probes per block matvec (default 64; memory: ``block_size x
            n``).
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
    block_size = check_int("block_size", block_size)
    gen = torch.Generator(device="cpu").manual_seed(check_seed(seed))
    start = op.matvecs
    exact = budget >= size
    with progress_bar(min(budget, size), f"trace({method})", progress) as bar:
        if exact:
            est, se = _exact(op, block_size, bar), 0.0
        elif method == "hutchinson":
            est, se = _hutchinson(op, budget, gen, None, block_size, bar)
        else:
            est, se = _hutchpp(op, budget, gen, block_size, bar)
    return TraceEstimate(
        float(est),
        float(se),
        op.matvecs - start,
        "exact" if exact else method,
        seconds=time.perf_counter() - t0,
        peak_memory_bytes=peak_memory_bytes(op.device),
    )


def _exact(op: LinearOperator, block_size: int, bar: Any) -> float:
    """``sum_i e_i^T A e_i`` over the n unit vectors, in blocks, accumulated in float64."""
    size = op.shape[0]
    total = 0.0
    for c0 in range(0, size, block_size):
        c1 = min(size, c0 + block_size)
        cols = torch.arange(c0, c1, device=op.device)
        E = torch.zeros((size, c1 - c0), dtype=op.dtype, device=op.device)
        E[cols, cols - c0] = 1
        AE = _apply_blocks(op, E, block_size, bar)
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
    """Mean and standard error of ``g^T P A P g`` (P = I - basis basis^T, or I)."""
    size = op.shape[0]
    samples: list[np.ndarray] = []
    for b0 in range(0, probes, block_size):
        G = random_block(
            size, min(block_size, probes - b0), gen, op.dtype, op.device, kind="rademacher"
        )
        if basis is not None:
            G = G - basis @ (basis.T @ G)
        samples.append(_quadratic_forms(op, G))
        bar.update(G.shape[1])
    z = np.concatenate(samples)
    return float(z.mean()), float(z.std(ddof=1) / math.sqrt(z.size))


def _quadratic_forms(op: LinearOperator, G: torch.Tensor) -> np.ndarray:
    """``g_i^T A g_i`` for the columns of G, accumulated in float64."""
    AG = op @ G
    if not bool(torch.isfinite(AG).all()):
        raise FloatingPointError("the operator returned NaN or Inf during trace estimation")
    return (G.to(torch.float64) * AG.to(torch.float64)).sum(0).cpu().numpy()


def _hutchpp(
    op: LinearOperator, m: int, gen: torch.Generator, block_size: int, bar: Any
) -> tuple[float, float]:
    size = op.shape[0]
    s = m // 3
    S = random_block(size, s, gen, op.dtype, op.device, kind="rademacher")
    Y = _apply_blocks(op, S, block_size, bar)
    del S
    Q, _ = torch.linalg.qr(Y.to(torch.float64))
    Q = Q.to(op.dtype)
    AQ = _apply_blocks(op, Q, block_size, bar)
    t_sketch = float((Q.to(torch.float64) * AQ.to(torch.float64)).sum())
    del AQ, Y
    probes = m - 2 * s
    if Q.shape[1] >= size:
        return t_sketch, 0.0
    mean, se = _hutchinson(op, probes, gen, Q, block_size, bar)
    return t_sketch + mean, se


def _apply_blocks(op: LinearOperator, X: torch.Tensor, block_size: int, bar: Any) -> torch.Tensor:
    """``op @ X`` in column blocks of ``block_size``."""
    out = torch.empty_like(X)
    for c0 in range(0, X.shape[1], block_size):
        c1 = min(X.shape[1], c0 + block_size)
        out[:, c0:c1] = op @ X[:, c0:c1].contiguous()
        bar.update(c1 - c0)
    if not bool(torch.isfinite(out).all()):
        raise FloatingPointError("the operator returned NaN or Inf during trace estimation")
    return out
