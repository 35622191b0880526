"""The diagonal of a curvature operator: exactly (identity columns) or by Hutchinson.

A cross-check for the Fisher diagonals of :mod:`spectra.fisher_diagonal`: on a
small network the Hessian's diagonal is affordable exactly; on a large one
Hutchinson's estimator ``diag(H) = E[z * (H z)]`` (Rademacher z, Bekas, Kokiopoulou
& Saad 2007) costs one Hessian-vector product per probe and comes with a
per-entry standard error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._krylov import random_block
from .hessian import hessian_operator
from .linear_operator import LinearOperator, as_linear_operator
from .parameters import ParamSelector
from .spectrum import Spectrum

__all__ = ["DiagonalEstimate", "hessian_diagonal", "operator_diagonal"]

_METHODS = ("exact", "hutchinson")


@dataclass(frozen=True, eq=False)
class DiagonalEstimate:
    """A curvature diagonal with per-entry standard errors.

    Attributes:
        values: (n,) diagonal entries, in the operator's dtype and device.
        stderr: (n,) standard errors (sample std over probes / sqrt(probes)) for
            Hutchinson; None when exact.
        method: ``"exact"`` or ``"hutchinson"``.
        matvecs: operator-vector products spent (n for exact).
        num_samples: probes (Hutchinson) or None.
    """

    values: torch.Tensor
    stderr: torch.Tensor | None
    method: str
    matvecs: int
    num_samples: int | None = None

    def to_spectrum(self, name: str | None = None, **metadata: Any) -> Spectrum:
        """The entries as a ``kind="diagonal"`` :class:`~spectra.spectrum.Spectrum`."""
        info = {"estimator": f"hessian_diagonal/{self.method}", "matvecs": self.matvecs,
                **metadata.pop("info", {})}
        metadata.setdefault("dtype", str(self.values.dtype).replace("torch.", ""))
        return Spectrum.from_diagonal(self.values.detach().cpu().numpy(), name=name,
                                      info=info, **metadata)


def operator_diagonal(
    op: Any,
    *,
    method: str = "exact",
    num_samples: int = 100,
    seed: int = 0,
    block_size: int = 32,
    n: int | None = None,
) -> DiagonalEstimate:
    """diag(op) for any operator :func:`~spectra.as_linear_operator` accepts.

    Args:
        method: ``"exact"``: ``op @ E`` for blocks E of ``block_size`` identity
            columns, keeping each block's diagonal (n products, memory n x
            block_size).  ``"hutchinson"``: ``mean_j z_j * (op z_j)`` over
            ``num_samples`` Rademacher probes; entry i has variance
            ``sum_{k != i} A_ik^2`` per probe, so the standard error is the
            sample std over sqrt(num_samples).
        num_samples: Hutchinson probes (>= 2, for a standard error).
        seed: seeds the probes (drawn on the CPU in float64, so device-independent).
        block_size: columns (identity or probes) per operator product.
        n: size, when ``op`` is a plain callable.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    op = as_linear_operator(op, n=n)
    if method == "exact":
        return _exact(op, block_size)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"hutchinson needs num_samples >= 2, got {num_samples!r}")
    return _hutchinson(op, num_samples, seed, block_size)


def _exact(op: LinearOperator, block_size: int) -> DiagonalEstimate:
    size = op.shape[0]
    diag = torch.empty(size, dtype=op.dtype, device=op.device)
    for start in range(0, size, block_size):
        stop = min(size, start + block_size)
        cols = torch.arange(stop - start, device=op.device)
        E = torch.zeros((size, stop - start), dtype=op.dtype, device=op.device)
        E[start + cols, cols] = 1
        diag[start:stop] = (op @ E)[start + cols, cols]
    return DiagonalEstimate(diag, None, "exact", size)


def _hutchinson(op: LinearOperator, probes: int, seed: int, block_size: int) -> DiagonalEstimate:
    size = op.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    total = torch.zeros(size, dtype=torch.float64, device=op.device)
    total_sq = torch.zeros_like(total)
    for b0 in range(0, probes, block_size):
        Z = random_block(size, min(block_size, probes - b0), gen, op.dtype, op.device,
                         kind="rademacher")
        S = (Z * (op @ Z)).to(torch.float64)
        if not bool(torch.isfinite(S).all()):
            raise FloatingPointError("the operator returned NaN or Inf during diagonal estimation")
        total += S.sum(dim=1)
        total_sq += (S * S).sum(dim=1)
    mean = total / probes
    var = (total_sq - probes * mean * mean).clamp_min(0.0) / (probes - 1)
    stderr = (var / probes).sqrt()
    return DiagonalEstimate(mean.to(op.dtype), stderr.to(op.dtype), "hutchinson", probes, probes)


def hessian_diagonal(
    model: nn.Module | LinearOperator,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    data: Any = None,
    *,
    method: str = "exact",
    num_samples: int = 100,
    seed: int = 0,
    block_size: int = 32,
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
    **options: Any,
) -> DiagonalEstimate:
    """diag(H) of the sample-averaged loss, exactly or by Hutchinson's estimator.

    ``hessian_diagonal(model, loss_fn, data, ...)`` builds
    :func:`spectra.hessian_operator` (same data weighting m_b / N, ``params``,
    ``dtype`` and ``options``); ``hessian_diagonal(op, ...)`` takes any built
    operator (a GGN or Fisher operator too).  ``method="exact"`` costs n
    Hessian-vector products (small networks); ``"hutchinson"`` costs
    ``num_samples`` and returns per-entry standard errors.  Entries are in the
    operator's parameter layout (:class:`~spectra.ParameterView`).
    """
    if isinstance(model, nn.Module):
        if loss_fn is None or data is None:
            raise TypeError("hessian_diagonal(model, loss_fn, data): loss_fn and data are required")
        op: Any = hessian_operator(model, loss_fn, data, params=params, dtype=dtype, **options)
    else:
        if loss_fn is not None or data is not None or params is not None or options:
            raise TypeError("with an operator, pass no loss_fn, data, params or operator options")
        op = model
    return operator_diagonal(op, method=method, num_samples=num_samples, seed=seed,
                             block_size=block_size)
