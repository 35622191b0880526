"""The empirical Fisher F = (1/N) sum_i g_i g_i^T from per-sample gradients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .batches import Batch, mean_loss
from .curvature import CurvatureOperator
from .parameters import ParamSelector

__all__ = ["EmpiricalFisherOperator", "empirical_fisher_operator"]


class EmpiricalFisherOperator(CurvatureOperator):
    """F = sum_b (m_b / N) mean_{i in b} g_i g_i^T, g_i the gradient of sample i's loss.

    Per-sample gradients come from ``vmap(grad)`` over the batch (each sample is
    run as a batch of one, so BatchNorm must be in eval mode, the default).  A
    product costs one per-sample-gradient pass; ``chunk_size`` also bounds how
    many samples' gradients are held at once (default: the whole batch, m x n).
    """

    def per_sample_gradients(self, batch: Batch) -> torch.Tensor:
        """(m, n) gradients of each sample's loss at the point."""

        def sample_loss(theta: torch.Tensor, x: Any, y: Any) -> torch.Tensor:
            x1 = torch.utils._pytree.tree_map(lambda t: t.unsqueeze(0), x)
            y1 = torch.utils._pytree.tree_map(lambda t: t.unsqueeze(0), y)
            return mean_loss(self.loss_fn, self.outputs(theta, x1), y1, 1, self.reduction)

        return torch.func.vmap(
            torch.func.grad(sample_loss), in_dims=(None, 0, 0), chunk_size=self.chunk_size
        )(self.theta, batch.inputs, batch.targets)

    def _batch_matmat(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        G = self.per_sample_gradients(batch)
        return G.T @ (G @ V) / batch.size

    def diagonal(self) -> torch.Tensor:
        """diag(F) as an (n,) tensor: sum_b (m_b / N) mean_i g_i^2, exact, one data pass."""
        diag = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        with self.evaluation_mode():
            for batch in self.source:
                G = self.per_sample_gradients(batch)
                diag.add_((G * G).mean(dim=0), alpha=batch.weight)
        return diag


def empirical_fisher_operator(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    data: Any,
    *,
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
    **options: Any,
) -> EmpiricalFisherOperator:
    """The empirical Fisher of the sample-averaged loss (see :class:`EmpiricalFisherOperator`).

    Same arguments, data weighting and product API as :func:`spectra.hessian_operator`.
    """
    return EmpiricalFisherOperator(model, loss_fn, data, params=params, dtype=dtype, **options)
