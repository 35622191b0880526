"""autograd's gradient against the loss's finite differences (spectra.gradient_check):
closed forms, kinks and rounding that must not count, and the operators' use of it."""

from __future__ import annotations

import warnings

import pytest
import torch
from model_cases import BUILDERS, get_case
from torch import nn

import spectra
from spectra.gradient_check import directional_check

F64 = torch.float64


def _sines(theta: torch.Tensor) -> float:
    return float(torch.sin(theta).sum())


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_the_true_gradient_agrees_and_a_wrong_one_does_not(dtype):
    """d/dt sum sin(theta) = cos(theta): agrees to the difference's error; 1.05x off in
    float64, 1.5x in float32 (whose floor is 10%: rounding alone), or one block of the
    gradient zeroed, is a mismatch."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(500, generator=g, dtype=F64).to(dtype)
    u = torch.randn(500, generator=g, dtype=F64).to(dtype)
    eps = torch.finfo(dtype).eps
    right = directional_check(_sines, theta, torch.cos(theta), u, eps)
    assert not right.disagrees
    assert right.mismatch < (1e-9 if dtype == F64 else 1e-3)
    assert abs(right.autograd - right.finite_difference) <= 10 * right.error + 1e-12
    factor = 1.05 if dtype == F64 else 1.5
    scaled = directional_check(_sines, theta, factor * torch.cos(theta), u, eps)
    assert scaled.disagrees
    assert abs(scaled.mismatch - (1 - 1 / factor)) < 1e-3  # |f g - g| / |f g|
    blocked = torch.cos(theta).clone()
    blocked[:100] = 0  # a segment's parameters without gradient
    assert directional_check(_sines, theta, blocked, u, eps).disagrees


def test_a_kink_inside_the_step_is_not_a_mismatch():
    """sum |theta| with one entry half a step from its kink: the differences at h and 2h
    both straddle it and are off (Richardson by 0.42 u_0 against autograd's u_0), and
    their disagreement (0.25 u_0) bounds that within the safety factor."""
    eps = torch.finfo(F64).eps
    theta = torch.tensor([0.0, 1.0, -2.0, 0.5], dtype=F64)
    u = torch.tensor([1.0, 0.3, -0.2, 0.1], dtype=F64)
    h = eps ** (1 / 3) * max(float(theta.norm()), 1.0)
    theta[0] = 0.5 * h * float(u[0] / u.norm())  # theta - h u crosses the kink
    check = directional_check(lambda t: float(t.abs().sum()), theta, torch.sign(theta), u, eps)
    gap = abs(check.autograd - check.finite_difference)
    assert gap > 0.3 * float(u[0] / u.norm())  # the difference really is off
    assert gap > check.error  # by more than one error bar...
    assert not check.disagrees  # ...but within the safety factor


class _ReadsData(nn.Module):
    """A forward that reads one weight through .data: its gradient misses that use."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.tanh(nn.functional.linear(x, self.a.weight.data, self.a.bias)))


def test_a_parameter_read_through_data_is_reported_on_the_double_backward_path():
    """backend='autograd' has no second path to disagree with and the product stays
    symmetric: before this check nothing was said."""
    torch.manual_seed(0)
    model = _ReadsData().double()
    data = (torch.randn(20, 4, dtype=F64), torch.randint(0, 3, (20,)))
    H = spectra.hessian_operator(model, nn.CrossEntropyLoss(), data, backend="autograd")
    with pytest.warns(UserWarning, match="not the loss's derivative") as caught:
        H @ torch.ones(H.shape[0], dtype=F64)
    assert caught[0].filename == __file__


def _trained_relu_net() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    X, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
    net = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(1500):  # to a loss ~1e-5: tiny gradients, float32 rounding dominant
        opt.zero_grad()
        nn.functional.cross_entropy(net(X), y).backward()
        opt.step()
    return net, (X, y)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_no_false_alarm_on_a_relu_net_at_an_interpolating_minimum(dtype):
    net, (X, y) = _trained_relu_net()
    net = net.to(dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not the loss's derivative")
        warnings.filterwarnings("ignore", message=".*differ by")  # float32 paths, legitimately
        for build in (spectra.hessian_operator, spectra.ggn_operator):
            op = build(net, nn.CrossEntropyLoss(), (X.to(dtype), y))
            op @ torch.ones(op.shape[0], dtype=dtype)


class _WithUnusedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used, self.unused = nn.Linear(3, 2), nn.Linear(3, 3)

    def forward(self, x):
        return self.used(x)


def test_parameters_the_loss_never_reaches_are_refused_alone_and_zero_beside_others():
    """Selecting only an unused layer failed deep in autograd ("element 0 of tensors does
    not require grad"); beside used ones its rows and columns are exactly zero."""
    torch.manual_seed(0)
    model = _WithUnusedLayer().double()
    data = (torch.randn(5, 3, dtype=F64), torch.randint(0, 2, (5,)))
    alone = spectra.hessian_operator(model, nn.CrossEntropyLoss(), data, params=["unused.weight"])
    with pytest.raises(ValueError, match="does not depend on any selected parameter"):
        alone @ torch.ones(alone.shape[0], dtype=F64)
    both = spectra.hessian_operator(
        model, nn.CrossEntropyLoss(), data, params=["used.weight", "unused.weight"]
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not the loss's derivative")
        M = both @ torch.eye(both.shape[0], dtype=F64)
    assert torch.all(M[6:] == 0) and torch.all(M[:, 6:] == 0)
    used = spectra.hessian_operator(model, nn.CrossEntropyLoss(), data, params=["used.weight"])
    torch.testing.assert_close(M[:6, :6], used @ torch.eye(6, dtype=F64), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_the_check_agrees_on_the_shared_real_model_cases(name):
    """Hugging Face GPT-2 / BERT / Llama / ViT, encoders and an LSTM in both layouts,
    padding rows: autograd's gradient and the loss's finite differences agree (the check
    stays silent), with an error bar small enough that a mismatch would show."""
    case = get_case(name)
    op = spectra.hessian_operator(case.model, case.loss_fn, case.batches, **case.options)
    first = next(op.batches())
    leaf = op.theta.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(op.batch_loss(leaf, first), leaf, materialize_grads=True)
    u = op._off_padding_rows(torch.randn(op.shape[0], dtype=op.dtype))
    with torch.no_grad():
        check = directional_check(
            lambda t: float(op.batch_loss(t, first)), op.theta, g, u, op.internal_eps
        )
    assert not check.disagrees
    # and silent with power: its error bar is far below a missing block's size (Llama's
    # RMSNorm computes in float32 inside the float64 model: a float32 bar)
    power = 1e-4 if op.internal_eps < 1e-10 else 1e-2
    assert check.error < power * abs(check.autograd)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not the loss's derivative")
        warnings.filterwarnings("ignore", message=".*torch.func cannot trace")
        op @ torch.ones(op.shape[0], dtype=op.dtype)
