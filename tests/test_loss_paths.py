"""Regression losses and losses linear in the outputs: the vectorised (torch.func) path
computes them, agrees with double backward, and both equal dense float64 references.

Before, ``nn.MSELoss`` failed inside forward-mode AD ("ZeroTensors are immutable": its
backward's forward-mode formula writes into the tangent PyTorch gives a target without one),
so every MSE model fell back, with a warning, to the slower double-backward path; a loss
whose gradient does not depend on the parameters crashed the double-backward path.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import flat_params, reference_hessian
from torch import nn
from wrong_backwards import FusedCrossEntropy

import spectra

F64 = torch.float64


def model_and_data(seed: int = 0):
    """A tanh MLP on 3-D inputs (6 sequences x 5 steps x 8 features), 4 outputs per step."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 4)).double().eval()
    X = torch.randn(6, 5, 8, dtype=F64)
    Y = torch.randn(6, 5, 4, dtype=F64)
    return model, X, Y


LOSSES = {
    "mse": (nn.MSELoss(), lambda y: y),
    "mse-sum": (nn.MSELoss(reduction="sum"), lambda y: y),
    "smooth-l1": (nn.SmoothL1Loss(beta=0.5), lambda y: y),
    "l1": (nn.L1Loss(), lambda y: y),
    "bce-logits": (nn.BCEWithLogitsLoss(), torch.sigmoid),
    "kl-div": (nn.KLDivLoss(reduction="batchmean"), lambda y: y.softmax(-1)),
}


def reference_ggn(model: nn.Module, loss_fn, X, Y) -> torch.Tensor:
    """J^T (d^2 loss / d outputs^2) J over all data, by torch.autograd.functional."""
    names, shapes, theta = flat_params(model)
    sizes = [s.numel() for s in shapes]

    def outputs(t: torch.Tensor) -> torch.Tensor:
        params = {
            n: p.view(s) for n, p, s in zip(names, torch.split(t, sizes), shapes, strict=True)
        }
        return torch.func.functional_call(model, params, (X,))

    z = outputs(theta)
    J = torch.autograd.functional.jacobian(outputs, theta).reshape(z.numel(), -1)
    H_out = torch.autograd.functional.hessian(
        lambda flat: loss_fn(flat.reshape(z.shape), Y), z.detach().reshape(-1)
    )
    return J.T @ H_out @ J


def dense(op) -> torch.Tensor:
    return op @ torch.eye(op.shape[0], dtype=op.dtype)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_both_paths_equal_the_dense_references_and_auto_does_not_fall_back(name):
    loss_fn, make_target = LOSSES[name]
    model, X, Y = model_and_data()
    Y = make_target(Y)
    references = {
        spectra.hessian_operator: reference_hessian(model, loss_fn, X, Y),
        spectra.ggn_operator: reference_ggn(model, loss_fn, X, Y),
    }
    for build, ref in references.items():
        scale = max(float(ref.abs().max()), 1.0)
        for backend in ("func", "autograd"):
            M = dense(build(model, loss_fn, (X, Y), backend=backend))
            assert torch.allclose(M, ref, rtol=0, atol=1e-12 * scale), (build, backend)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="torch.func cannot trace")
            op = build(model, loss_fn, (X, Y))
            assert torch.allclose(dense(op), ref, rtol=0, atol=1e-12 * scale)
        assert op.backend == "auto"


def test_targets_in_a_mapping_keep_their_labels_and_their_float_parts():
    model, X, Y = model_and_data(1)
    mask = torch.rand(6, 5) > 0.3

    def masked_mse(out, t):
        return ((out - t["y"]).pow(2).sum(-1) * t["mask"]).sum() / t["mask"].sum()

    targets = {"y": Y, "mask": mask}
    ref = reference_hessian(model, masked_mse, X, targets)
    for backend in ("func", "autograd"):
        op = spectra.hessian_operator(
            model, masked_mse, (X, targets), backend=backend, loss_terms=lambda o, t: t["mask"]
        )
        assert torch.allclose(dense(op), ref, rtol=0, atol=1e-12), backend


def test_a_loss_linear_in_the_parameters_has_zero_curvature_on_every_path():
    torch.manual_seed(2)
    model = nn.Linear(8, 4).double()
    X = torch.randn(10, 8, dtype=F64)
    P = torch.randn(10, 4, dtype=F64).softmax(-1)
    loss_fn = nn.KLDivLoss(reduction="batchmean")  # linear in its (log-probability) input
    for build in (spectra.hessian_operator, spectra.ggn_operator):
        for backend in ("func", "autograd"):
            M = dense(build(model, loss_fn, (X, P), backend=backend))
            assert M.shape == (36, 36) and torch.count_nonzero(M) == 0, (build, backend)


def test_a_loss_without_forward_mode_falls_back_to_double_backward_and_agrees():
    """Huber's backward has no forward-mode formula in PyTorch: 'auto' says so and
    computes the product by double backward."""
    model, X, Y = model_and_data(3)
    loss_fn = nn.HuberLoss(delta=0.5)
    ref = reference_hessian(model, loss_fn, X, Y)
    with pytest.warns(UserWarning, match="torch.func cannot trace"):
        M = dense(spectra.hessian_operator(model, loss_fn, (X, Y)))
    assert torch.allclose(M, ref, rtol=0, atol=1e-12)


class _DetachedCrossEntropy(torch.autograd.Function):
    """The same backward computed outside autograd, without the once_differentiable mark."""

    @staticmethod
    def forward(ctx, logits, labels):
        ctx.save_for_backward(logits, labels)
        return torch.nn.functional.cross_entropy(logits, labels)

    @staticmethod
    def backward(ctx, grad):
        logits, labels = ctx.saved_tensors
        p = logits.detach().softmax(-1)
        p[torch.arange(len(labels)), labels] -= 1
        return grad * p / len(labels), None


@pytest.mark.parametrize("fn", [FusedCrossEntropy, _DetachedCrossEntropy])
@pytest.mark.parametrize("build", [spectra.hessian_operator, spectra.ggn_operator])
def test_a_loss_whose_backward_cannot_be_differentiated_is_refused_not_zeroed(fn, build):
    """Its gradient has no graph in the outputs, as a linear loss's has not: the GGN came
    back all zeros (true max entry 0.25), the Hessian without its J^T H_z J term."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X, y = torch.randn(8, 4, dtype=F64), torch.randint(0, 3, (8,))
    for backend in ("auto", "autograd"):
        op = build(model, fn.apply, (X, y), backend=backend)
        with pytest.raises(RuntimeError, match="finite_difference"):
            op @ torch.randn(op.shape[0], dtype=F64)


def test_a_transformer_regressor_with_mse_agrees_on_both_paths_without_falling_back():
    """The zero-tangent targets on a model the change was not written for: an
    nn.TransformerEncoderLayer with a linear head, MSE on per-token targets."""
    torch.manual_seed(7)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer, nn.Linear(8, 2)).double().eval()
    X, Y = torch.randn(4, 5, 8, dtype=F64), torch.randn(4, 5, 2, dtype=F64)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=F64)
    for build in (spectra.hessian_operator, spectra.ggn_operator):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="torch.func cannot trace")
            fast = build(model, nn.MSELoss(), (X, Y))
            out = fast @ V
        slow = build(model, nn.MSELoss(), (X, Y), backend="autograd") @ V
        assert fast.backend == "auto"
        torch.testing.assert_close(out, slow, rtol=1e-10, atol=1e-12)
