"""Every optimizer publishes the closure calls one step makes (gradient_evaluations_per_step),
and the number it publishes is the number of calls it makes."""

from __future__ import annotations

import pytest
import torch

from entropy_opt import SAM, SGLD, EntropyAdam, EntropySGD
from figures.loop import calls_per_step


def _problem(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    X, Y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    return model, X, Y


def measured_calls(opt, model, X, Y, steps: int = 3) -> list[int]:
    """Closure calls of each of ``steps`` steps, counted by the closure itself."""
    count = [0]

    def closure():
        count[0] += 1
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X), Y)
        loss.backward()
        return loss

    per_step = []
    for _ in range(steps):
        before = count[0]
        opt.step(closure)
        per_step.append(count[0] - before)
    return per_step


CASES = [
    ("entropy-sgd default L", lambda p: EntropySGD(p), 20),
    ("entropy-sgd default L, discard", lambda p: EntropySGD(p, discard_first_grad=True), 21),
    ("entropy-sgd L=5", lambda p: EntropySGD(p, L=5), 5),
    ("entropy-sgd L=5, discard", lambda p: EntropySGD(p, L=5, discard_first_grad=True), 6),
    ("entropy-sgd authors' code", lambda p: EntropySGD.authors_code(p, L=3), 4),
    ("entropy-adam default L", lambda p: EntropyAdam(p), 5),
    ("entropy-adam L=2, discard", lambda p: EntropyAdam(p, L=2, discard_first_grad=True), 3),
    ("sam", lambda p: SAM(p, torch.optim.SGD, lr=0.1, rho=0.05), 2),
    ("sam, adam base, rho=0", lambda p: SAM(p, torch.optim.Adam, rho=0.0), 2),
    ("sgld", lambda p: SGLD(p, lr=0.01), 1),
]


@pytest.mark.parametrize("make, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_published_cost_is_the_measured_number_of_closure_calls(make, expected):
    model, X, Y = _problem()
    opt = make(model.parameters())
    assert opt.gradient_evaluations_per_step == expected
    assert measured_calls(opt, model, X, Y) == [expected] * 3
    assert calls_per_step(opt) == expected  # the training loop reads the same number


def test_cost_follows_a_param_group_change():
    model, X, Y = _problem()
    opt = EntropySGD(model.parameters(), L=4)
    assert measured_calls(opt, model, X, Y, steps=1) == [4]
    opt.param_groups[0]["L"] = 7
    assert opt.gradient_evaluations_per_step == 7
    assert measured_calls(opt, model, X, Y, steps=1) == [7]
    opt.param_groups[0]["discard_first_grad"] = True
    assert opt.gradient_evaluations_per_step == 8
    assert measured_calls(opt, model, X, Y, steps=1) == [8]


def test_groups_that_disagree_on_L_are_refused_by_the_cost_and_by_step():
    model, X, Y = _problem()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = EntropyAdam([{"params": first}, {"params": second}], L=3)
    assert opt.gradient_evaluations_per_step == 3  # groups that agree are fine
    opt.param_groups[1]["L"] = 5
    with pytest.raises(
        ValueError, match=r"share L and discard_first_grad.*\(3, False\), \(5, False\)"
    ):
        opt.gradient_evaluations_per_step  # noqa: B018
    with pytest.raises(ValueError, match="share L"):
        measured_calls(opt, model, X, Y, steps=1)
    opt.param_groups[1]["L"] = 3
    opt.param_groups[0]["L"] = opt.param_groups[1]["L"] = 0
    with pytest.raises(ValueError, match="L .* must be an int >= 1"):
        opt.gradient_evaluations_per_step  # noqa: B018


def test_optimizers_that_publish_nothing_count_one_call():
    model, _, _ = _problem()
    assert calls_per_step(torch.optim.SGD(model.parameters(), lr=0.1)) == 1
    assert calls_per_step(torch.optim.Adam(model.parameters())) == 1
