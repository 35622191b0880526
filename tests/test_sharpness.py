"""Adaptive sharpness (spectra.sharpness): closed forms, invariance, cost, bad input.

References are independent of the code under test: the quadratic's Hessian is written
down (2 X^T X / N for a least-squares model), its eigenvalues come from a dense
``torch.linalg.eigvalsh``, the box maximum from enumerating the vertices, and the
first-order terms from a gradient computed here with ``torch.autograd``.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import warnings

import pytest
import torch
from conftest import relu_mlp, rescaled_twin
from torch import nn

import spectra
from spectra.sharpness import SharpnessEstimate, adaptive_sharpness

F64 = torch.float64


def _least_squares(X: torch.Tensor, y: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """A bias-free linear model at the least-squares minimiser of mean (Xw - y)^2, and
    the scaled Hessian M = T A T with A = 2 X^T X / N (exact: the loss is quadratic)."""
    w = torch.linalg.lstsq(X, y).solution  # (d, 1)
    model = nn.Linear(X.shape[1], 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w.T)
    T = torch.diag(w.abs().flatten())
    A = 2 * X.T @ X / X.shape[0]
    return model, T @ A @ T


@pytest.fixture(scope="module")
def quadratic() -> tuple[spectra.HessianOperator, torch.Tensor]:
    """Well-separated top eigenvalue of T A T (ratio ~0.46), so 20 steps converge."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 6, generator=g, dtype=F64) * torch.tensor(
        [3.0, 1, 1, 1, 0.5, 0.5], dtype=F64
    )
    y = X @ torch.randn(6, 1, generator=g, dtype=F64) + 0.1 * torch.randn(
        50, 1, generator=g, dtype=F64
    )
    model, M = _least_squares(X, y)
    return spectra.hessian_operator(model, nn.MSELoss(), (X, y)), M


@pytest.fixture(scope="module")
def mlp_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 5, generator=g, dtype=F64), torch.randint(0, 3, (64,), generator=g)


def _counting(op: spectra.HessianOperator) -> dict[str, int]:
    """Count the operator's loss-and-gradient and loss-only evaluations (instance wrappers)."""
    counts = {"gradient": 0, "loss": 0}
    grad_fn, loss_fn = op.loss_and_gradient, op.loss_at

    def loss_and_gradient(theta=None):
        counts["gradient"] += 1
        return grad_fn(theta)

    def loss_at(theta):
        counts["loss"] += 1
        return loss_fn(theta)

    op.loss_and_gradient = loss_and_gradient
    op.loss_at = loss_at
    return counts


# --- (a) closed forms ----------------------------------------------------------------------


@pytest.mark.parametrize("rho", [0.05, 0.3])
def test_worst_case_l2_on_a_quadratic_is_half_rho2_lambda_max(quadratic, rho):
    op, M = quadratic
    closed = 0.5 * rho**2 * float(torch.linalg.eigvalsh(M)[-1])
    # At this minimum the gradient is rounding noise, so the first ascent direction
    # depends on the machine's BLAS. Over 200 such starts (the point moved by 1e-13,
    # seeded) 20 steps left a relative error of at most 5.1e-5 (median 1e-8) and 60
    # steps at most 2.7e-14: the tolerances below are the worst start's, with margin.
    r = adaptive_sharpness(op, rho)  # the defaults: 20 steps
    assert r.value <= closed * (1 + 1e-12)  # a feasible point's value: a lower bound
    assert r.value == pytest.approx(closed, rel=2e-4)
    assert r.radius == pytest.approx(rho, rel=1e-12)  # a convex maximum is on the sphere
    long = adaptive_sharpness(op, rho, steps=60)
    assert long.value == pytest.approx(closed, rel=1e-11)
    assert not long.improving
    assert long.value >= r.value  # monotone in the number of steps


def test_unfinished_ascent_is_flagged(quadratic):
    op, M = quadratic
    closed = 0.5 * 0.1**2 * float(torch.linalg.eigvalsh(M)[-1])
    short = adaptive_sharpness(op, 0.1, steps=3)
    assert short.improving and short.value < closed * (1 - 1e-3)


def test_worst_case_linf_on_a_quadratic_is_the_best_vertex():
    """A convex quadratic's maximum over the box sits at a vertex; with a dominant
    rank-one curvature the sign ascent reaches the best of the 2^6 vertices."""
    g = torch.Generator().manual_seed(3)
    c = torch.tensor([1.0, -0.7, 0.4, 1.3, -0.2, 0.9], dtype=F64)
    X = 2.0 * torch.randn(40, 1, generator=g, dtype=F64) * c + 0.3 * torch.randn(
        40, 6, generator=g, dtype=F64
    )
    y = X @ torch.randn(6, 1, generator=g, dtype=F64) + 0.1 * torch.randn(
        40, 1, generator=g, dtype=F64
    )
    model, M = _least_squares(X, y)
    op = spectra.hessian_operator(model, nn.MSELoss(), (X, y))
    rho = 0.2
    vertices = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=6)), dtype=F64)
    closed = 0.5 * rho**2 * float(((vertices @ M) * vertices).sum(1).max())
    r = adaptive_sharpness(op, rho, p=math.inf)
    assert r.value == pytest.approx(closed, rel=1e-10)
    assert r.radius == pytest.approx(rho, rel=1e-12) and r.p == math.inf


@pytest.mark.parametrize("p", [2, math.inf])
def test_average_case_on_a_quadratic_is_half_rho2_trace(quadratic, p):
    """E[1/2 delta^T A delta] with delta = rho T z: z ~ N(0, I) gives 1/2 rho^2 tr(M);
    z uniform on [-1, 1]^n (E z_i^2 = 1/3) gives 1/6 rho^2 tr(M)."""
    op, M = quadratic
    rho = 0.1
    closed = 0.5 * rho**2 * float(torch.trace(M)) * (1.0 if p == 2 else 1.0 / 3.0)
    r = adaptive_sharpness(op, rho, kind="average", p=p, num_samples=400, seed=5)
    assert abs(r.value - closed) <= 4 * r.stderr
    assert 0 < r.stderr < 0.1 * closed
    if p == 2:  # Var(z^T M z) = 2 tr(M^2), over 200 antithetic pairs
        expected_se = 0.5 * rho**2 * math.sqrt(2 * float(torch.trace(M @ M)) / 200)
        assert r.stderr == pytest.approx(expected_se, rel=0.35)


def test_average_case_standard_error_covers_the_truth(quadratic):
    op, M = quadratic
    rho = 0.1
    closed = 0.5 * rho**2 * float(torch.trace(M))
    hits = sum(
        abs(
            (r := adaptive_sharpness(op, rho, kind="average", num_samples=40, seed=s)).value
            - closed
        )
        <= 2 * r.stderr
        for s in range(60)
    )
    assert hits >= 50, hits  # ~95% expected for 2 standard errors


def test_float32_sharpness_at_the_loss_rounding_warns_and_widens():
    """In float32 at small rho the loss rises by a few roundings of L: the worst case
    returned a rounding step (1.5e-8) above the true maximum (1.3e-10), and the average's
    error bar left the rounding out (z = 2.7).  Now each estimate records the rounding,
    the average's stderr includes it, and an unresolved value warns."""
    from spectra.linear_operator import PrecisionWarning

    g = torch.Generator().manual_seed(3)
    X = torch.randn(200, 20, generator=g, dtype=F64)
    y = X @ torch.randn(20, 5, generator=g, dtype=F64) + torch.randn(200, 5, generator=g, dtype=F64)
    w = torch.linalg.lstsq(X, y).solution
    model = nn.Linear(20, 5, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w.T)
    T = torch.diag(w.T.abs().flatten())  # parameters in weight order: (out, in) row-major
    A = torch.kron(torch.eye(5, dtype=F64), 2 * X.T @ X / y.numel())  # mean over N x 5
    M = T @ A @ T
    model32 = copy.deepcopy(model).float()
    op32 = spectra.hessian_operator(model32, nn.MSELoss(), (X.float(), y.float()))
    for rho in (1e-5, 1e-4):
        truth = 0.5 * rho**2 * float(torch.trace(M))
        with pytest.warns(PrecisionWarning, match="rounding of the loss"):
            avg = adaptive_sharpness(op32, rho, kind="average", seed=0)
        assert avg.rounding == pytest.approx(2 * 2.0**-23 * op32.loss, rel=0.01)
        assert abs(avg.value - truth) <= 3 * avg.stderr
        with pytest.warns(PrecisionWarning):
            worst = adaptive_sharpness(op32, rho, seed=0, steps=5)
        assert worst.rounding > 0
    op64 = spectra.hessian_operator(model, nn.MSELoss(), (X, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # resolved in float64: no warning
        avg = adaptive_sharpness(op64, 1e-4, kind="average", seed=0)
    truth = 0.5 * 1e-8 * float(torch.trace(M))
    assert abs(avg.value - truth) <= 4 * avg.stderr and avg.rounding < 1e-15


@pytest.mark.parametrize("p", [2, math.inf])
def test_small_rho_is_first_order(mlp_data, p):
    """At a non-critical point, S_max(rho) = rho ||T g||_q + O(rho^2) with q the dual norm
    (q = 2 for p = 2, q = 1 for p = inf): the linearised maximum, gradient by autograd."""
    X, y = mlp_data
    model = relu_mlp()
    loss = nn.CrossEntropyLoss()(model(X), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    weights = torch.cat([w.detach().flatten() for w in model.parameters()])
    Tg = weights.abs() * torch.cat([g.flatten() for g in grads])
    dual = float(Tg.norm()) if p == 2 else float(Tg.abs().sum())
    rho = 1e-6
    op = spectra.hessian_operator(model, nn.CrossEntropyLoss(), (X, y))
    r = adaptive_sharpness(op, rho, p=p, steps=3)
    assert r.value == pytest.approx(rho * dual, rel=1e-4)
    assert r.loss == pytest.approx(loss.item(), rel=1e-14)


# --- (b) invariance under the ReLU rescaling -------------------------------------------------


@pytest.mark.parametrize("a", [5.0, 10.0])
def test_rescaled_twin_has_the_same_adaptive_sharpness(mlp_data, a):
    X, y = mlp_data
    model = relu_mlp()
    twin = rescaled_twin(model, a)
    torch.testing.assert_close(twin(X), model(X), rtol=1e-12, atol=1e-12)
    loss = nn.CrossEntropyLoss()
    op = spectra.hessian_operator(model, loss, (X, y))
    op_twin = spectra.hessian_operator(twin, loss, (X, y))
    for kw in (
        {"kind": "worst", "p": 2, "rho": 0.2},
        {"kind": "worst", "p": math.inf, "rho": 0.05},
        {"kind": "average", "num_samples": 20, "rho": 1.0},
    ):
        r, r_twin = adaptive_sharpness(op, **kw), adaptive_sharpness(op_twin, **kw)
        assert r.value > 1e-4 and r.gradient_evals == r_twin.gradient_evals
        assert r_twin.value == pytest.approx(r.value, rel=1e-6), kw
    top = spectra.lanczos(op, k=1).eigenvalues[0].item()
    top_twin = spectra.lanczos(op_twin, k=1).eigenvalues[0].item()
    ratio = max(top, top_twin) / min(top, top_twin)
    assert ratio > 2, (top, top_twin)


def test_eta_breaks_the_invariance(mlp_data):
    """eta > 0 adds a perturbation that does not rescale with the weights."""
    X, y = mlp_data
    model, loss = relu_mlp(), nn.CrossEntropyLoss()
    op = spectra.hessian_operator(model, loss, (X, y))
    op_twin = spectra.hessian_operator(rescaled_twin(model, 10.0), loss, (X, y))
    r = adaptive_sharpness(op, 0.05, eta=0.01, steps=5)
    r_twin = adaptive_sharpness(op_twin, 0.05, eta=0.01, steps=5)
    assert abs(r_twin.value / r.value - 1) > 1e-3
    assert r.eta == 0.01


# --- (c) cost, and the result record -------------------------------------------------------


def test_default_worst_case_costs_at_most_20_gradient_evaluations(mlp_data):
    X, y = mlp_data
    op = spectra.hessian_operator(relu_mlp(), nn.CrossEntropyLoss(), (X, y))
    counts = _counting(op)
    r = adaptive_sharpness(op, 0.05)
    assert counts["gradient"] == r.gradient_evals <= 20
    assert counts["loss"] == r.loss_evals == 1
    assert op.matvecs == 0  # no curvature products

    counts["gradient"] = counts["loss"] = 0
    avg = adaptive_sharpness(op, 0.05, kind="average", num_samples=10)
    assert counts == {"gradient": 0, "loss": 11} and avg.loss_evals == 11


def test_result_is_frozen_deterministic_and_describes_itself(quadratic):
    op, _ = quadratic
    a = adaptive_sharpness(op, 0.1, kind="average", num_samples=8, seed=3)
    b = adaptive_sharpness(op, 0.1, kind="average", num_samples=8, seed=3)
    c = adaptive_sharpness(op, 0.1, kind="average", num_samples=8, seed=4)
    assert isinstance(a, SharpnessEstimate) and a == b and a.value != c.value
    assert (a.kind, a.rho, a.p, a.num_samples, a.seed, a.radius) == (
        "average",
        0.1,
        2.0,
        8,
        3,
        None,
    )
    assert "Monte Carlo" in a.method and "+-" in repr(a)
    w = adaptive_sharpness(op, 0.1, steps=4)
    assert (w.steps, w.gradient_evals, w.loss_evals, w.stderr, w.num_samples) == (4, 4, 1, 0.0, 0)
    assert "ascent" in w.method and w.loss == pytest.approx(op.loss, rel=1e-12)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.value = 0.0


def test_zero_weights_are_not_perturbed_with_eta_zero():
    """eta = 0: a zero weight has T_ii = 0 and never moves, so the closed form is that of
    T A T with a zero row and column; eta > 0 lets it move (a larger maximum here)."""
    g = torch.Generator().manual_seed(2)
    X = torch.randn(30, 3, generator=g, dtype=F64)
    w = torch.tensor([[1.0], [-1.0], [0.0]], dtype=F64)
    y = X @ w  # L(w) = 0 and the gradient is 0: w is the minimiser
    model = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w.T)
    op = spectra.hessian_operator(model, nn.MSELoss(), (X, y))
    A = 2 * X.T @ X / X.shape[0]
    rho = 0.1
    for eta in (0.0, 0.5):
        T = torch.diag(w.abs().flatten() + eta)
        closed = 0.5 * rho**2 * float(torch.linalg.eigvalsh(T @ A @ T)[-1])
        r = adaptive_sharpness(op, rho, eta=eta, steps=40)
        assert r.value == pytest.approx(closed, rel=1e-9), eta


# --- (d) bad input, refused before any evaluation --------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rho": 0.0}, "rho must be > 0"),
        ({"rho": -0.1}, "rho must be > 0"),
        ({"rho": float("nan")}, "rho must be a finite number"),
        ({"rho": 0.1, "p": 1}, "p must be 2 or math.inf"),
        ({"rho": 0.1, "p": 3.0}, "p must be 2 or math.inf"),
        ({"rho": 0.1, "steps": 0}, "steps must be an integer >= 1"),
        ({"rho": 0.1, "steps": 2.5}, "steps must be an integer"),
        ({"rho": 0.1, "kind": "max"}, "kind must be one of"),
        ({"rho": 0.1, "eta": -1e-3}, "eta must be >= 0"),
        ({"rho": 0.1, "kind": "average", "num_samples": 3}, "num_samples must be an integer >= 4"),
        ({"rho": 0.1, "kind": "average", "num_samples": 7}, "must be even"),
        ({"rho": 0.1, "seed": None}, "seed must be an integer"),
    ],
)
def test_bad_input_is_refused_before_any_work(mlp_data, kwargs, match):
    op = spectra.hessian_operator(relu_mlp(), nn.CrossEntropyLoss(), mlp_data)
    counts = _counting(op)
    rho = kwargs.pop("rho")
    with pytest.raises(ValueError, match=match):
        adaptive_sharpness(op, rho, **kwargs)
    assert counts == {"gradient": 0, "loss": 0} and op.matvecs == 0


def test_not_an_operator_and_all_zero_weights_are_refused():
    with pytest.raises(TypeError, match="CurvatureOperator"):
        adaptive_sharpness(torch.eye(3, dtype=F64), 0.1)
    model = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
    X, y = torch.randn(8, 3, dtype=F64), torch.randn(8, 1, dtype=F64)
    op = spectra.hessian_operator(model, nn.MSELoss(), (X, y))
    counts = _counting(op)
    with pytest.raises(ValueError, match="pass eta > 0"):
        adaptive_sharpness(op, 0.1)
    assert counts == {"gradient": 0, "loss": 0}
    assert adaptive_sharpness(op, 0.1, eta=0.5, steps=2).value > 0
