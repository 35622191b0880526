"""The generalised Gauss-Newton matrix G = J^T (d^2 loss / d outputs^2) J."""

from __future__ import annotations

from typing import Any

import torch

from .batches import Batch
from .curvature import (
    CurvatureOperator,
    gradient_with_graph,
    jvp_with_targets,
)

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

        z, vjp_fn = torch.func.vjp(out_fn, theta)
        _check_outputs(z)
        z = z.detach()
        grad_z = torch.func.grad(self.loss_of_outputs)

        def ggn_v(v: torch.Tensor) -> torch.Tensor:
            jv = torch.func.jvp(out_fn, (theta,), (v,))[1]
            hjv = jvp_with_targets(grad_z, z, jv, batch.targets)
            return vjp_fn(hjv)[0]

        return self._vmap(ggn_v, V)

    def _batch_matmat_autograd(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        theta = self.theta.detach().requires_grad_(True)
        with torch.enable_grad():
            z = self.outputs(theta, batch.inputs)
            _check_outputs(z)
            u = torch.zeros_like(z, requires_grad=True)
            (jt_u,) = torch.autograd.grad(z, theta, u, create_graph=True)  # J^T u, linear in u
            zd = z.detach().requires_grad_(True)
            loss = self.loss_of_outputs(zd, batch.targets)
            gz = gradient_with_graph(loss, zd)
            cols = []
            for j in range(V.shape[1]):
                (jv,) = torch.autograd.grad(jt_u, u, V[:, j], retain_graph=True)
                (hjv,) = torch.autograd.grad(gz, zd, jv, retain_graph=True, allow_unused=True)
                if hjv is None:  # linear (KL of log-probabilities), piecewise, or fused
                    hjv = self._zero_curvature_if_graphless(
                        batch,
                        lambda o: self.loss_of_outputs(o, batch.targets),
                        zd,
                        gz,
                        "the outputs",
                    )
                (col,) = torch.autograd.grad(z, theta, hjv, retain_graph=True)
                cols.append(col)
        return torch.stack(cols, dim=1).detach()


def _check_outputs(z: Any) -> None:
    if not isinstance(z, torch.Tensor):
        raise TypeError(
            f"the GGN needs a model (or forward=) that returns one tensor, got "
            f"{type(z).__name__}; e.g. forward=lambda m, x: m(**x).logits"
        )
    if z.ndim == 0:
        raise ValueError(
            "the GGN needs the model's outputs before the loss (e.g. logits), but forward "
            "returns a scalar, which looks like a loss (the Hugging Face `.loss` idiom): "
            "return the logits from forward= and pass the loss as loss_fn, or use the "
            "Hessian, which accepts a forward that returns the loss"
        )


#: The function-style name of :class:`GGNOperator` (arguments as for
#: :data:`spectra.hessian_operator`).
ggn_operator = GGNOperator
