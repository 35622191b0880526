"""Scoping schedules: values against their formulas, and as seen by the optimizer."""

from __future__ import annotations

import math

import pytest
import torch

import entropy_opt.scoping as sc
from entropy_opt import EntropyAdam, EntropySGD


@pytest.mark.parametrize(
    "name, expected",
    [
        ("constant", [0.2, 0.2, 0.2]),
        ("exponential", [0.2, 0.2 * 1.1, 0.2 * 1.1**10]),
        ("linear", [0.2, 0.2 * 1.1, 0.2 * 2.0]),
        ("quadratic", [0.2, 0.2 * 1.21, 0.2 * 4.0]),
        ("bounded_exponential", [0.0, 0.2 * (1 - math.exp(-0.1)), 0.2 * (1 - math.exp(-1))]),
    ],
)
def test_schedule_values(name, expected):
    got = [sc.scoped_gamma(name, 0.2, 0.1, t) for t in (0, 1, 10)]
    assert got == pytest.approx(expected, rel=1e-12)


def test_unknown_schedule_name():
    with pytest.raises(ValueError, match="unknown scoping schedule 'cubic'.*constant"):
        sc.scoped_gamma("cubic", 1.0, 0.1, 0)


def run_gammas(opt, x, steps=5):
    def closure():
        opt.zero_grad()
        loss = (x**2).sum()
        loss.backward()
        return loss

    out = []
    for _ in range(steps):
        opt.step(closure)
        out.append(opt.diagnostics["gamma"])
    return out


def test_optimizer_follows_paper_exponential_schedule():
    x = torch.nn.Parameter(torch.ones(3))
    opt = EntropySGD([x], L=2, gamma=1e-4, scoping="exponential", scoping_rate=1e-3)
    assert run_gammas(opt, x) == pytest.approx([1e-4 * 1.001**t for t in range(5)], rel=1e-12)


def test_authors_frozen_counter_keeps_gamma0():
    x = torch.nn.Parameter(torch.ones(3))
    opt = EntropySGD.authors_code([x], L=2, gamma=1e-4, scoping_rate=1e-3)
    assert run_gammas(opt, x) == [1e-4] * 5


def test_editing_the_group_drives_gamma():
    x = torch.nn.Parameter(torch.ones(3))
    opt = EntropyAdam([x], L=2, gamma=0.01)
    assert run_gammas(opt, x, 1) == [0.01]
    opt.param_groups[0]["gamma"] = 0.05  # what a gamma schedule would do
    assert run_gammas(opt, x, 1) == [0.05]
    opt.param_groups[0]["scoping"] = "nope"
    with pytest.raises(ValueError, match="unknown scoping schedule"):
        run_gammas(opt, x, 1)


def test_a_scope_that_makes_the_inner_loop_diverge_is_refused_with_the_schedule():
    """sgld_lr x gamma at or above the update's stability limit makes x' - x grow on every
    inner step whatever f is; the scoped gamma reaches it silently unless checked."""
    from entropy_opt.base import inner_stability_limit

    assert inner_stability_limit(0.0, False) == 2.0
    assert inner_stability_limit(0.9, False) == pytest.approx(3.8)
    assert inner_stability_limit(0.9, True) == pytest.approx(3.8 / 2.8)
    # the limits are those of the scalar recursion (torch's momentum form)
    for m, nest in ((0.0, False), (0.5, False), (0.5, True), (0.9, True)):
        limit = inner_stability_limit(m, nest)
        for c, grows in ((0.98 * limit, False), (1.02 * limit, True)):
            x, buf = 1.0, 0.0
            for _ in range(3000):
                buf = m * buf + c * x
                x -= c * x + m * buf if nest else buf
            assert (abs(x) > 1.0) == grows, (m, nest, c)
    p = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="diverges at outer step 0.*Lower gamma or sgld_lr"):
        EntropySGD([p], gamma=21.0, sgld_lr=0.1, sgld_momentum=0.0, scoping="constant")
    opt = EntropySGD(
        [p],
        gamma=0.03,
        sgld_lr=0.1,
        sgld_momentum=0.0,
        scoping="exponential",
        scoping_rate=1.0,
        L=2,
    )

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    before = None
    with pytest.raises(ValueError, match="Scoping 'exponential' at rate 1 has raised gamma"):
        for _ in range(20):
            before = p.detach().clone()
            opt.step(closure)
    torch.testing.assert_close(p.detach(), before)  # the refused step changed nothing
