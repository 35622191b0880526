"""The generalised Gauss-Newton matrix G = J^T (d^2 loss / d outputs^2) J."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .batches import Batch, mean_loss
from .curvature import CurvatureOperator
from .parameters import ParamSelector

__all__ = ["GGNOperator", "ggn_operator"]


class GGNOperator(CurvatureOperator):
    """G = sum_b (m_b / N) J_b^T H_b J_b, with J_b the Jacobian of the batch's outputs
    and H_b the Hessian of its mean loss with respect to those outputs.

    Positive semi-definite for convex losses (cross-entropy, MSE); equal to the
    Hessian minus the term carrying the outputs' second derivatives.  The model
    must return one tensor.  Arguments as for :class:`CurvatureOperator`.
    """

    def _batch_matmat(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        theta = self.theta

        def out_fn(t: torch.Tensor) -> torch.Tensor:
            return self.outputs(t, batch.inputs)

        def loss_of_outputs(z: torch.Tensor) -> torch.Tensor:
            return mean_loss(self.loss_fn, z, batch.targets, batch.size, self.reduction)

        z, vjp_fn = torch.func.vjp(out_fn, theta)
        if not isinstance(z, torch.Tensor):
            raise TypeError("the GGN needs a model (or forward=) that returns one tensor")
        z = z.detach()
        grad_z = torch.func.grad(loss_of_outputs)

        def ggn_v(v: torch.Tensor) -> torch.Tensor:
            jv = torch.func.jvp(out_fn, (theta,), (v,))[1]
            hjv = torch.func.jvp(grad_z, (z,), (jv,))[1]
            return vjp_fn(hjv)[0]

        return self._vmap(ggn_v, V)

    def _batch_matmat_autograd(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        theta = self.theta.detach().requires_grad_(True)
        with torch.enable_grad():
            z = self.outputs(theta, batch.inputs)
            u = torch.zeros_like(z, requires_grad=True)
            (jt_u,) = torch.autograd.grad(z, theta, u, create_graph=True)  # J^T u, linear in u
            zd = z.detach().requires_grad_(True)
            loss = mean_loss(self.loss_fn, zd, batch.targets, batch.size, self.reduction)
            (gz,) = torch.autograd.grad(loss, zd, create_graph=True)
            cols = []
            for j in range(V.shape[1]):
                (jv,) = torch.autograd.grad(jt_u, u, V[:, j], retain_graph=True)
                (hjv,) = torch.autograd.grad(gz, zd, jv, retain_graph=True)
                (col,) = torch.autograd.grad(z, theta, hjv, retain_graph=True)
                cols.append(col)
        return torch.stack(cols, dim=1).detach()


def ggn_operator(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    data: Any,
    *,
    params: ParamSelector = None,
    dtype: torch.dtype | None = None,
    **options: Any,
) -> GGNOperator:
    """The generalised Gauss-Newton matrix of the sample-averaged loss (see :class:`GGNOperator`).

    Same arguments, data weighting and product API as :func:`spectra.hessian_operator`.
    """
    return GGNOperator(model, loss_fn, data, params=params, dtype=dtype, **options)
