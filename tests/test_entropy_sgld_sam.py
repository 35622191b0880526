"""SGLD (App. C.1 baseline) and SAM against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from entropy_opt import SAM, SGLD


def test_sgld_step_size_schedule():
    # constant gradient w, no noise: x_T = x_0 - w sum_t lr / (1 + t)^b
    x = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    w = torch.tensor([1.0, -3.0], dtype=torch.float64)
    opt = SGLD([x], lr=0.2, b=0.55, noise=0.0)

    def closure():
        opt.zero_grad()
        loss = w @ x
        loss.backward()
        return loss

    for _ in range(7):
        opt.step(closure)
    total = sum(0.2 / (1 + t) ** 0.55 for t in range(7))
    torch.testing.assert_close(x.detach(), -total * w)


def test_sgld_noise_std_and_weight_decay():
    x = torch.nn.Parameter(torch.full((100_000,), 2.0))
    opt = SGLD([x], lr=0.5, noise=1e-2, weight_decay=0.1)
    x.grad = torch.zeros_like(x)
    torch.manual_seed(0)
    opt.step()
    d = x.detach() - 2.0
    assert d.mean().item() == pytest.approx(-0.5 * 0.1 * 2.0, abs=1e-4)
    assert d.std().item() == pytest.approx(1e-2 * math.sqrt(0.5), rel=0.01)


def test_sgld_errors():
    with pytest.raises(ValueError, match="lr must be >= 0"):
        SGLD([torch.nn.Parameter(torch.ones(1))], lr=-0.1)


def quad(opt, x, A, c, seen=None):
    def closure():
        opt.zero_grad()
        if seen is not None:
            seen.append(x.detach().clone())
        d = x - c
        loss = 0.5 * d @ (A @ d)
        loss.backward()
        return loss

    return closure


A = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
C = torch.tensor([1.0, -1.0], dtype=torch.float64)


def test_sam_gradient_taken_at_perturbed_point():
    x0 = torch.tensor([3.0, 2.0], dtype=torch.float64)
    x = torch.nn.Parameter(x0.clone())
    opt = SAM([x], torch.optim.SGD, rho=0.1, lr=0.2)
    seen: list[torch.Tensor] = []
    loss = opt.step(quad(opt, x, A, C, seen))
    g = A @ (x0 - C)
    e = 0.1 * g / g.norm()
    torch.testing.assert_close(seen[0], x0)
    torch.testing.assert_close(seen[1], x0 + e)
    torch.testing.assert_close(x.detach(), x0 - 0.2 * (A @ (x0 + e - C)))
    assert loss.item() == pytest.approx(0.5 * ((x0 - C) @ A @ (x0 - C)).item())


def test_sam_converges_to_quadratic_minimiser():
    x = torch.nn.Parameter(torch.tensor([3.0, 2.0], dtype=torch.float64))
    opt = SAM([x], torch.optim.SGD, rho=0.01, lr=0.2)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt.base_optimizer, gamma=0.99)
    closure = quad(opt, x, A, C)
    for _ in range(500):
        opt.step(closure)
        sched.step()
    # near c the step is ~ lr rho A g/|g|, so x settles within lr * rho * lambda_max of c
    torch.testing.assert_close(x.detach(), C, rtol=0, atol=1e-3)


def test_sam_needs_closure():
    opt = SAM([torch.nn.Parameter(torch.ones(1))], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()


def test_sam_with_maximize_perturbs_downhill():
    """Maximising f, the worst point of the ball is x - rho g / ||g|| (found by an outside
    probe: SAM perturbed uphill whatever the base optimizer's maximize= said)."""

    def f(x):
        return x[0] ** 3 / 3 + x[1]

    x = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    opt = SAM([x], torch.optim.SGD, rho=0.5, lr=0.1, maximize=True)

    def closure():
        opt.zero_grad()
        loss = f(x)
        loss.backward()
        return loss

    opt.step(closure)
    x0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    g0 = torch.tensor([1.0, 1.0], dtype=torch.float64)
    worst = x0 - 0.5 * g0 / g0.norm()  # the maximiser's adversary lowers f
    g_worst = torch.stack([worst[0] ** 2, torch.ones((), dtype=torch.float64)])
    torch.testing.assert_close(x.detach(), x0 + 0.1 * g_worst, rtol=1e-12, atol=1e-12)
