"""The diagonal of a curvature operator: exactly (identity columns) or by Hutchinson.

A cross-check for the Fisher diagonals of :mod:`spectra.fisher_diagonal`: on a
small network the Hessian's diagonal is affordable exactly; on a large one
Hutchinson's estimator ``diag(H) = E[z * (H z)]`` (Rademacher z, Bekas, Kokiopoulou
& Saad 2007) costs one Hessian-vector product per probe and comes with a
per-entry standard error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._checks import all_finite
from ._krylov import random_block
from ._precision import ieee_float32
from .diagonal import CurvatureDiagonal
from .hessian import hessian_operator
from .linear_operator import LinearOperator, as_linear_operator
from .parameters import ParameterView

__all__ = ["hessian_diagonal"]

_METHODS = ("exact", "hutchinson")


@ieee_float32()
def hessian_diagonal(
    model: nn.Module | LinearOperator | torch.Tensor,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    data: Any = None,
    *,
    method: str = "exact",
    num_samples: int = 100,
    seed: int = 0,
    block_size: int = 32,
    **options: Any,
) -> CurvatureDiagonal:
    """diag(H) of the sample-averaged loss, exactly or by Hutchinson's estimator.

    ``hessian_diagonal(model, loss_fn, data, ...)`` builds
    :func:`spectra.hessian_operator` (same data weighting m_b / N; ``options`` are its
    options: ``params``, ``dtype``, ``train_mode``, ...); ``hessian_diagonal(op, ...)``
    takes the diagonal of any operator :func:`~spectra.as_linear_operator` accepts (a
    GGN or Fisher operator, a matrix; wrap a plain callable with
    ``spectra.as_linear_operator(f, n=n)``).

    Args:
        method: ``"exact"``: ``op @ E`` for blocks E of ``block_size`` identity
            columns, keeping each block's diagonal (n products, memory n x
            block_size; small networks).  ``"hutchinson"``: ``mean_j z_j * (op z_j)``
            over ``num_samples`` Rademacher probes; entry i has variance
            ``sum_{k != i} A_ik^2`` per probe, so the standard error is the sample std
            over sqrt(num_samples).
        num_samples: Hutchinson probes (>= 2, for a standard error).
        seed: seeds the probes (drawn on the CPU in float64, so device-independent).
        block_size: columns (identity or probes) per operator product.

    Returns:
        :class:`~spectra.CurvatureDiagonal` with method ``"exact"`` or ``"hutchinson"``
        (per-entry ``stderr``), ``matvecs``, the operator's class as ``source``, values in
        its dtype and, for operators built from a model, its parameter layout
        (:class:`~spectra.ParameterView`).

    Raises:
        ValueError: an unknown ``method``, ``block_size < 1`` or ``num_samples < 2`` for
            Hutchinson, before any product.
        TypeError: a model without ``loss_fn`` and ``data``, or an operator with them or
            with operator options.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    hutchinson = method == "hutchinson"
    if hutchinson and (
        isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2
    ):
        raise ValueError(f"hutchinson needs num_samples >= 2, got {num_samples!r}")
    if isinstance(model, nn.Module):
        if loss_fn is None or data is None:
            raise TypeError("hessian_diagonal(model, loss_fn, data): loss_fn and data are required")
        op: Any = hessian_operator(model, loss_fn, data, **options)
    else:
        if loss_fn is not None or data is not None or options:
            raise TypeError("with an operator, pass no loss_fn, data, params or operator options")
        op = model
    source = type(op).__name__
    view = getattr(op, "view", None)  # the parameter layout of operators built from a model
    layout = isinstance(view, ParameterView)
    op = as_linear_operator(op)
    values, stderr = (
        _hutchinson(op, num_samples, seed, block_size)
        if hutchinson
        else (_exact(op, block_size), None)
    )
    return CurvatureDiagonal(
        values=values,
        method=method,
        source=source,
        names=view.names if layout else (),
        shapes=view.shapes if layout else (),
        stderr=stderr,
        matvecs=num_samples if hutchinson else op.shape[0],
        num_samples=num_samples if hutchinson else None,
    )


def _exact(op: LinearOperator, block_size: int) -> torch.Tensor:
    size = op.shape[0]
    diag = torch.empty(size, dtype=op.dtype, device=op.device)
    for start in range(0, size, block_size):
        stop = min(size, start + block_size)
        cols = torch.arange(stop - start, device=op.device)
        E = torch.zeros((size, stop - start), dtype=op.dtype, device=op.device)
        E[start + cols, cols] = 1
        diag[start:stop] = (op @ E)[start + cols, cols]
    return diag


def _hutchinson(
    op: LinearOperator, probes: int, seed: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, standard error) per entry of ``z * (op z)`` over Rademacher probes."""
    size = op.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    total = torch.zeros(size, dtype=torch.float64, device=op.device)
    total_sq = torch.zeros_like(total)
    # sums of the samples minus the first one (per entry): the variance of a large
    # diagonal with small off-diagonal entries would cancel to 0 in sum(S^2) - n mean^2
    shift: torch.Tensor | None = None
    for b0 in range(0, probes, block_size):
        Z = random_block(
            size, min(block_size, probes - b0), gen, op.dtype, op.device, kind="rademacher"
        )
        S = (Z * (op @ Z)).to(torch.float64)
        if not all_finite(S):
            raise FloatingPointError("the operator returned NaN or Inf during diagonal estimation")
        if shift is None:
            shift = S[:, 0].clone()
        D = S - shift[:, None]
        total += D.sum(dim=1)
        total_sq += (D * D).sum(dim=1)
    assert shift is not None  # probes >= 2
    mean = shift + total / probes
    var = (total_sq - total * total / probes).clamp_min(0.0) / (probes - 1)
    stderr = (var / probes).sqrt()
    return mean.to(op.dtype), stderr.to(op.dtype)
