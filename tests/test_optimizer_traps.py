"""Inputs on which the optimizers used to go silently wrong (an outside probe found them),
each now computed right or refused with what to do.

References: torch.optim.SGD's default (foreach) path, and the update in float64.
"""

from __future__ import annotations

import pytest
import torch

from entropy_opt import SAM, SGLD, EntropyAdam, EntropySGD
from entropy_opt._common import FUSED_CHECK_LENGTHS, fused_ok

#: Entropy-SGD reduced to its outer rule (Algorithm 1 with L = 1, alpha = 1, gamma = 0, no
#: noise and an SGLD step of 1 is plain SGD).
REDUCTION = dict(L=1, alpha=1.0, gamma=0.0, noise=0.0, sgld_lr=1.0, scoping="constant")


def _three_steps(make, dtype: torch.dtype, n: int = 64) -> torch.Tensor:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(n).to(dtype))
    target = torch.randn(n)
    opt = make([p])

    def closure():
        opt.zero_grad()
        loss = ((p.float() - target) ** 2).sum() / 2
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    return p.detach().float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_momentum_in_reduced_precision_matches_torch_sgd(dtype):
    """torch 2.13's CPU _fused_sgd_ is wrong for bfloat16/float16 from ~16 elements on;
    the fused-kernel check (3 elements only) used to let it through: off by ~2 here."""
    ref = _three_steps(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True), dtype)
    got = _three_steps(lambda ps: EntropySGD(ps, lr=0.1, momentum=0.9, **REDUCTION), dtype)
    assert (got - ref).abs().max() <= 4 * torch.finfo(dtype).eps * ref.abs().max()


def _kernel_right_at(n: int, dtype: torch.dtype) -> bool:
    """torch._fused_sgd_'s momentum buffer 0.9 b + g on n numbers, against float64."""
    P, G, B = (torch.rand(n, dtype=torch.float64).add(0.5).to(dtype) for _ in range(3))
    want = 0.9 * B.double() + G.double()
    torch._fused_sgd_(
        [P],
        [G],
        [B],
        weight_decay=0.0,
        momentum=0.9,
        lr=0.1,
        dampening=0.0,
        nesterov=False,
        maximize=False,
        is_first_step=False,
    )
    tol = 16 * torch.finfo(dtype).eps  # fused_ok's
    return bool(torch.allclose(B.double(), want, rtol=tol, atol=tol))


@pytest.mark.skipif(not hasattr(torch, "_fused_sgd_"), reason="no torch._fused_sgd_")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_fused_check_agrees_with_the_kernel_at_every_length(dtype):
    torch.manual_seed(1)
    try:
        right = all(_kernel_right_at(n, dtype) for n in (*FUSED_CHECK_LENGTHS, 64, 4099))
    except (RuntimeError, NotImplementedError):
        right = False
    # used exactly where it is right (torch 2.13's CPU kernel: float32 yes, bf16/fp16 no)
    assert fused_ok("sgd", torch.device("cpu"), dtype) == right


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: EntropySGD(ps, lr=0.1),
        lambda ps: EntropyAdam(ps, lr=0.1),
        lambda ps: SGLD(ps, lr=0.1),
    ],
    ids=["entropy-sgd", "entropy-adam", "sgld"],
)
def test_complex_parameters_are_refused_at_construction_and_in_added_groups(make):
    """Their noise had half the variance per real part, Entropy-Adam's moment g^2, not |g|^2."""
    z = torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))
    with pytest.raises(ValueError, match="complex parameters.*view_as_complex"):
        make([z])
    opt = make([torch.nn.Parameter(torch.randn(4))])
    with pytest.raises(ValueError, match="complex parameters"):
        opt.add_param_group({"params": [z]})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="complex parameters"):  # named_parameters() pairs
        make([("w", torch.nn.Parameter(torch.randn(3))), ("z", z)])


@pytest.mark.parametrize(
    "make, key, value",
    [
        (lambda g: EntropySGD(g, lr=0.1), "maximize", True),
        (lambda g: EntropySGD(g, lr=0.1, momentum=0.9), "dampening", 0.1),
        (lambda g: EntropyAdam(g, lr=0.1), "amsgrad", True),
        (lambda g: SGLD(g, lr=0.1), "momentum", 0.9),
        (lambda g: EntropyAdam(g, lr=0.1), "decoupled_weight_decay", True),
        (lambda g: EntropySGD(g, lr=0.1), "betas", (0.5, 0.5)),
    ],
)
def test_torch_options_these_optimizers_lack_are_refused_in_a_group(make, key, value):
    """torch ignores unknown group entries: a group copied from a torch config with
    maximize=True would quietly minimise."""
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=f"does not implement {key}="):
        make([{"params": [p], key: value}])
    neutral = {"maximize": False, "dampening": 0.0, "amsgrad": False, "momentum": 0.0}
    if key in neutral:  # the neutral value means what it says
        make([{"params": [p], key: neutral[key]}])
    make([{"params": [p], "initial_lr": 0.1, "name": "encoder"}])  # others pass, as in torch


@pytest.mark.parametrize(
    "base, key, value",
    [
        (torch.optim.Adam, "momentum", 0.9),
        (torch.optim.SGD, "amsgrad", True),
        (torch.optim.SGD, "betas", (0.5, 0.5)),
    ],
)
def test_sam_refuses_torch_options_its_base_optimizer_ignores(base, key, value):
    """SAM over Adam with a group holding momentum=0.9 trained without momentum."""
    p, q = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))
    with pytest.raises(ValueError, match=f"SAM does not implement {key}="):
        SAM([{"params": [p], key: value}], base, lr=0.1)
    opt = SAM([p], base, lr=0.1)
    with pytest.raises(ValueError, match=f"SAM does not implement {key}="):
        opt.add_param_group({"params": [q], key: value})
    assert len(opt.param_groups) == len(opt.base_optimizer.param_groups) == 1
    opt.add_param_group({"params": [q], "lr": 0.01})
    assert (
        opt.param_groups[1]["rho"] == 0.05 and opt.param_groups is opt.base_optimizer.param_groups
    )


def test_sam_state_is_its_base_optimizers():
    """Tools read ``optimizer.state`` (moving it to a device, DCP): SAM's was empty."""
    p = torch.nn.Parameter(torch.randn(3))
    opt = SAM([p], torch.optim.SGD, lr=0.1, momentum=0.9)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert opt.state is opt.base_optimizer.state and "momentum_buffer" in opt.state[p]
    opt.load_state_dict(opt.state_dict())
    assert opt.state is opt.base_optimizer.state and "momentum_buffer" in opt.state[p]


def test_an_optimizer_that_cannot_move_steps_without_a_closure_as_a_no_op():
    """torch.distributed.checkpoint's loader steps a fresh optimizer once with zero
    gradients, lr 0 and no closure to create its state; the closure optimizers create
    it without moving anything, and any other step without a closure is still refused."""
    for make in (
        lambda ps: EntropySGD(ps, lr=0.1),
        lambda ps: EntropyAdam(ps, lr=0.1),
        lambda ps: SAM(ps, torch.optim.SGD, lr=0.1),
    ):
        p = torch.nn.Parameter(torch.randn(3))
        opt = make([p])
        with pytest.raises(ValueError, match="needs a closure"):
            opt.step()
        p.grad = torch.zeros_like(p)
        with pytest.raises(ValueError, match="needs a closure"):
            opt.step()  # lr is not 0
        before = p.detach().clone()
        for g in opt.param_groups:
            g["lr"] = 0.0
        assert opt.step() is None and torch.equal(p, before)
        p.grad = torch.ones_like(p)
        with pytest.raises(ValueError, match="needs a closure"):
            opt.step()  # a gradient that is not zero


def test_sam_returns_to_exactly_the_weights_it_left():
    """x was restored as (x + e) - e, which rounds: with lr = 0 weights drifted by ulps."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(1000))
    x0 = p.detach().clone()
    target = torch.randn(1000)
    opt = SAM([p], torch.optim.SGD, rho=0.05, lr=0.0)

    def closure():
        opt.zero_grad()
        loss = ((p - target) ** 2).sum()
        loss.backward()
        return loss

    for _ in range(100):
        opt.step(closure)
    assert torch.equal(p.detach(), x0)


@pytest.mark.parametrize("flat", [False, True])
def test_entropy_sgd_keeps_stepping_after_the_model_is_cast(flat):
    """x, mu and the SGLD momentum are scratch: after ``model.double()`` they are remade
    in the new dtype (the step died on a float/double mismatch inside torch)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = EntropySGD(model.parameters(), lr=0.1, L=2, sgld_momentum=0.9, flat=flat)
    x = torch.randn(8, 4)

    def closure():
        opt.zero_grad()
        loss = model(x.to(model.weight.dtype)).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    model.double()
    before = model.weight.detach().clone()
    opt.step(closure)
    assert model.weight.dtype == torch.float64 and not torch.equal(model.weight, before)
    assert not torch.equal(model.weight, model.weight.float().double())  # a float64 step


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sam_ascends_when_the_gradient_norm_overflows_float16(dtype):
    """In float16 the global gradient norm (~70,711 here) overflowed to inf, the scale
    1 / inf was 0, and every step silently became a plain base step."""
    params = [torch.nn.Parameter(torch.zeros(10_000, dtype=dtype)) for _ in range(2)]
    opt = SAM(params, torch.optim.SGD, rho=0.05, lr=0.0)
    seen = []

    def closure():
        opt.zero_grad()
        seen.append(torch.cat([p.detach().double() for p in params]))
        for p in params:
            p.grad = torch.full_like(p, 500.0)
        return torch.zeros(())

    opt.step(closure)
    moved = float((seen[1] - seen[0]).norm())
    assert moved == pytest.approx(0.05, rel=0.02)  # the perturbation's radius: rho


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: EntropySGD(ps, lr=1.0, L=3, noise=1e-3),
        lambda ps: EntropyAdam(ps, lr=1e-3, L=3, noise=1e-3),
        lambda ps: SGLD(ps, lr=0.1, noise=1e-3),
    ],
)
def test_a_frozen_parameter_holding_a_zeroed_grad_is_not_moved(make):
    """requires_grad=False with a .grad left by zero_grad(set_to_none=False): the noisy
    inner loops moved it (7.7e-3 in 5 Entropy-SGD steps); torch.optim.SGD holds it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = make(model.parameters())
    X, y = torch.randn(16, 4), torch.randn(16, 1)

    def closure():
        opt.zero_grad(set_to_none=False)
        loss = ((model(X) - y) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    trained = model[2].weight.detach().clone()
    for _ in range(3):
        opt.step(closure)
    torch.testing.assert_close(model[0].weight.detach(), frozen, rtol=0, atol=0)
    assert not torch.equal(model[2].weight.detach(), trained)


def test_constructor_mistakes_are_named():
    """An optimizer instance as SAM's base ('SGD' object is not callable), LBFGS (its step
    needs a closure SAM cannot give) and a torch option passed to the constructor (an
    error naming the internal base class) each get a message saying what to do."""
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(TypeError, match="class.*keyword arguments"):
        SAM(p, torch.optim.SGD(p, lr=0.1))
    with pytest.raises(TypeError, match="LBFGS"):
        SAM(p, torch.optim.LBFGS)
    with pytest.raises(TypeError, match=r"EntropySGD got unexpected.*maximize.*does not implement"):
        EntropySGD(p, maximize=True)
    with pytest.raises(TypeError, match=r"EntropyAdam got unexpected.*amsgrad"):
        EntropyAdam(p, amsgrad=True)
