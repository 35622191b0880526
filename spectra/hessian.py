"""The Hessian of the sample-averaged loss as a matrix-free operator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .batches import Batch
from .curvature import CurvatureOperator
from .parameters import ParamSelector

__all__ = ["HessianOperator", "hessian_operator"]


class HessianOperator(CurvatureOperator):
    """H = sum_b (m_b / N) grad^2 Lbar_b(theta); see :class:`CurvatureOperator` for arguments.

    ``H @ V`` runs forward-over-reverse (``jvp`` of ``grad``) per batch, vectorised
    over the k columns of V with ``vmap``: one forward and backward pass of the
    model carry k tangents at once.
    """

    def _batch_matmat(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        theta = self.theta
        grad_fn = torch.func.grad(lambda t: self.batch_loss(t, batch))

        def hvp(v: torch.Tensor) -> torch.Tensor:
            return torch.func.jvp(grad_fn, (theta,), (v,))[1]

        return self._vmap(hvp, V)

    def _batch_matmat_autograd(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        theta = self.theta.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.batch_loss(theta, batch), theta, create_graph=True)
            cols = [
                torch.autograd.grad(g, theta, V[:, j], retain_graph=j + 1 < V.shape[1])[0]
                for j in range(V.shape[1])
            ]
        return torch.stack(cols, dim=1).detach()

    def _batch_matmat_finite_difference(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        """Central differences of gradients; see :class:`CurvatureOperator` for the error."""
        theta = self.theta
        grad_fn = torch.func.grad(lambda t: self.batch_loss(t, batch))
        eps = torch.finfo(self.dtype).eps
        scale = eps ** (1 / 3) * (1.0 + float(theta.norm()))
        cols = []
        for j in range(V.shape[1]):
            v = V[:, j]
            norm = float(v.norm())
            if norm == 0.0:
                cols.append(torch.zeros_like(v))
                continue
            h = scale / norm
            cols.append((grad_fn(theta + h * v) - grad_fn(theta - h * v)) / (2 * h))
        return torch.stack(cols, dim=1)


def hessian_operator(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    data: Any,
    *,
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
    **options: Any,
) -> HessianOperator:
    """The Hessian of ``loss_fn`` averaged over the samples of ``data``, at ``model``'s weights.

    Returns a symmetric :class:`~spectra.linear_operator.LinearOperator` of size n
    (the number of selected parameters): ``H @ v`` for (n,), ``H @ V`` for (n, k),
    ``H.to_scipy()`` for SciPy.  Every batch is weighted by its share of samples,
    so any split of the same data gives the same operator.  ``options`` are those
    of :class:`~spectra.curvature.CurvatureOperator` (``train_mode``, ``forward``,
    ``backend``, ``chunk_size``).  The data are passed over once here (to count
    samples and check the loss is finite) and once per product.
    """
    return HessianOperator(model, loss_fn, data, params=params, dtype=dtype, **options)
