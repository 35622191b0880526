"""The Hessian of the sample-averaged loss as a matrix-free operator."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .batches import Batch
from .curvature import (
    CurvatureOperator,
    gradient_with_graph,
    jvp_with_targets,
)

__all__ = ["HessianOperator", "hessian_operator"]


class HessianOperator(CurvatureOperator):
    """The Hessian of ``loss_fn`` over the samples of ``data``, at ``model``'s weights.

    H = sum_b (m_b / N) grad^2 Lbar_b(theta): a symmetric
    :class:`~spectra.linear_operator.LinearOperator` of size n (the number of
    selected parameters): ``H @ v`` for (n,), ``H @ V`` for (n, k), ``H.to_scipy()``
    for SciPy.  Every batch is weighted by its share of samples, so any split of the
    same data gives the same operator.  Arguments: see :class:`CurvatureOperator`
    (``model, loss_fn, data, params=, dtype=, train_mode=, forward=, backend=,
    chunk_size=``, ...).  The data are passed over once at construction (to count
    samples and check the loss is finite) and once per product.  Also spelt
    :data:`hessian_operator`.

    ``H @ V`` for a block runs forward-over-reverse (``jvp`` of ``grad``) per batch,
    vectorised over the k columns of V with ``vmap``: one forward and backward
    pass of the model carry k tangents at once.  A single vector (what Lanczos
    asks for) goes through double backward instead, which is cheaper for one
    column; with ``cache_graph`` the gradient's graph is built once and each
    product is then one backward pass through it (as PyHessian does).

    Args:
        cache_graph: keep each batch's gradient graph between single-vector
            products.  Default: when the data are one batch (the graph holds that
            batch's activations; with many batches that would hold the whole data
            set's).  A stochastic train-mode forward is refused when the operator
            is built, so a cached graph is never a stale random draw.
        Other arguments: see :class:`CurvatureOperator`.
    """

    def __init__(self, *args: Any, cache_graph: bool | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if cache_graph is None:
            cache_graph = self.source.num_batches == 1
        self.cache_graph = bool(cache_graph)
        self._graphs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _batch_product(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        if self.backend == "auto" and V.shape[1] == 1:
            return self._batch_matmat_autograd(batch, V)
        return super()._batch_product(batch, V)

    def _gradient_graph(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(theta leaf, gradient with its graph) for ``batch``, cached if allowed."""
        if batch.index in self._graphs:
            return self._graphs[batch.index]
        theta = self.theta.detach().requires_grad_(True)
        with torch.enable_grad():
            g = gradient_with_graph(self.batch_loss(theta, batch), theta)
        if self.cache_graph:
            self._graphs[batch.index] = (theta, g)
        return theta, g

    def _batch_matmat(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        theta = self.theta
        grad_fn = torch.func.grad(
            lambda t, targets: self.batch_loss(t, dataclasses.replace(batch, targets=targets))
        )

        def hvp(v: torch.Tensor) -> torch.Tensor:
            return jvp_with_targets(grad_fn, theta, v, batch.targets)

        return self._vmap(hvp, V)

    def _batch_matmat_autograd(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        theta, g = self._gradient_graph(batch)
        k = V.shape[1]
        cols = []
        with torch.enable_grad():
            for j in range(k):
                (col,) = torch.autograd.grad(
                    g, theta, V[:, j], retain_graph=self.cache_graph or j + 1 < k, allow_unused=True
                )
                if col is None:  # g has no graph in theta: linear, piecewise linear, or fused
                    col = self._zero_curvature_if_graphless(
                        batch, lambda t: self.batch_loss(t, batch), theta, g, "the parameters"
                    )
                cols.append(col)
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


#: The function-style name of :class:`HessianOperator`:
#: ``hessian_operator(model, loss_fn, data, params=..., dtype=..., **options)``.
hessian_operator = HessianOperator
