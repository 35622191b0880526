"""EntropySGD against closed forms, an independent per-parameter implementation and SGD."""

from __future__ import annotations

import math

import pytest
import torch
from reference_entropy import CONFIG, ReferenceEntropySGD

from entropy_opt import EntropySGD

torch.set_default_dtype(torch.float32)


def spd(n: int, seed: int, lo: float = 0.5, hi: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.linspace(lo, hi, n, dtype=torch.float64)) @ q.T


def quad_closure(opt, x, A, c):
    def closure():
        opt.zero_grad()
        d = x - c
        loss = 0.5 * d @ (A @ d)
        loss.backward()
        return loss

    return closure


def mlp_run(make_opt, steps=5, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    X, Y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    opt = make_opt(model.parameters())
    k = [0]

    def closure():
        opt.zero_grad()
        i = k[0] % 4
        k[0] += 1
        sl = slice(16 * i, 16 * i + 16)
        loss = torch.nn.functional.cross_entropy(model(X[sl]), Y[sl])
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(steps)]
    return torch.cat([p.detach().flatten() for p in model.parameters()]), opt, losses, k[0]


def test_matches_per_parameter_reference_paper_mode():
    cfg = dict(CONFIG, sgld_momentum=0.9, sgld_nesterov=True)
    a, opt, _, calls = mlp_run(lambda p: EntropySGD(p, **cfg))
    b, _, _, _ = mlp_run(lambda p: ReferenceEntropySGD(p, cfg))
    assert calls == 5 * 5  # L closures per step: the gradient at x is used, not discarded
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert opt.diagnostics["gamma"] == pytest.approx(0.03 * 1.05**4)


def test_authors_code_setting_matches_authors_style_reference():
    # without momentum the authors' setting reproduces their code exactly
    cfg = dict(CONFIG, momentum=0.0, nesterov=False)
    a, opt, _, calls = mlp_run(lambda p: EntropySGD.authors_code(p, **dict(cfg, alpha=0.25)))
    b, _, _, _ = mlp_run(lambda p: ReferenceEntropySGD(p, cfg, authors=True))
    assert calls == 5 * 6  # L + 1: the first gradient is thrown away
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert opt.diagnostics["gamma"] == 0.03  # the frozen scoping counter
    c, *_ = mlp_run(lambda p: EntropySGD(p, **cfg))
    assert (a - c).abs().max() > 1e-3  # and the paper's algorithm is a different one


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_foreach_and_loop_paths_agree(momentum):
    kw = dict(CONFIG, noise=1e-3, momentum=momentum, nesterov=False, sgld_momentum=momentum)
    a, *_ = mlp_run(lambda p: EntropySGD(p, **kw, foreach=True))
    b, *_ = mlp_run(lambda p: EntropySGD(p, **kw, foreach=False))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_reduces_to_sgd_with_one_uncoupled_noiseless_sample():
    # L=1, alpha=1, gamma=0, noise=0: mu = x - sgld_lr g(x), so x - mu = sgld_lr g(x).
    kw = dict(L=1, alpha=1.0, gamma=0.0, noise=0.0, sgld_lr=0.5, scoping="constant")
    a, *_ = mlp_run(lambda p: EntropySGD(p, lr=0.2, momentum=0.9, nesterov=True, **kw), 8)
    b, *_ = mlp_run(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), 8)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_determinism_with_seed():
    kw = dict(CONFIG, noise=1e-2)
    a, *_ = mlp_run(lambda p: EntropySGD(p, **kw), seed=3)
    b, *_ = mlp_run(lambda p: EntropySGD(p, **kw), seed=3)
    c, *_ = mlp_run(lambda p: EntropySGD(p, **kw), seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_convex_quadratic_same_minimiser_as_sgd():
    A, c = spd(5, 0), torch.linspace(-1, 1, 5, dtype=torch.float64)
    # remark after eq. 9: for convex f, local entropy has the same minimiser as f
    for make in (
        lambda p: torch.optim.SGD(p, lr=0.3),
        lambda p: EntropySGD(
            p, lr=1.0, L=10, sgld_lr=0.2, noise=1e-4, gamma=0.3, scoping="constant"
        ),
    ):
        torch.manual_seed(0)
        x = torch.nn.Parameter(torch.full((5,), 3.0, dtype=torch.float64))
        opt = make([x])
        closure = quad_closure(opt, x, A, c)
        for _ in range(300):
            opt.step(closure)
        torch.testing.assert_close(x.detach(), c, rtol=0, atol=1e-3)


@pytest.mark.parametrize("wd", [0.0, 0.4])
def test_local_entropy_gradient_matches_gibbs_mean(wd):
    # f = (x'-c)^T A (x'-c)/2 plus wd |x'|^2/2: the Gibbs measure (8) is Gaussian with mean
    # <x'> = (A + wd I + gamma I)^{-1} (A c + gamma x), whatever the temperature.
    n, gamma = 6, 0.5
    A, c = spd(n, 1), torch.linspace(-2, 2, n, dtype=torch.float64)
    x0 = torch.linspace(1, 3, n, dtype=torch.float64)
    x = torch.nn.Parameter(x0.clone())
    opt = EntropySGD(
        [x],
        lr=0.0,
        L=300,
        sgld_lr=0.1,
        noise=1e-4,
        gamma=gamma,
        scoping="constant",
        weight_decay=wd,
        scale_by_gamma=True,
    )
    torch.manual_seed(0)
    opt.step(quad_closure(opt, x, A, c))
    mean = torch.linalg.solve(A + (wd + gamma) * torch.eye(n, dtype=A.dtype), A @ c + gamma * x0)
    expected = gamma * (x0 - mean)
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=2e-4)
    assert torch.equal(x.detach(), x0)  # lr = 0: x restored after the inner loop
    assert opt.diagnostics["dist_x_mu"].item() == pytest.approx((x0 - mean).norm().item(), abs=1e-3)


def test_first_gradient_is_at_x_and_drives_the_angle_diagnostic():
    # L=1, alpha=1, noise=0: x - mu = sgld_lr grad f(x) exactly, so the angle is 0.
    A, c = spd(4, 2), torch.zeros(4, dtype=torch.float64)
    x0 = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    x = torch.nn.Parameter(x0.clone())
    opt = EntropySGD([x], lr=0.0, L=1, alpha=1.0, noise=0.0, sgld_lr=0.3, gamma=0.7)
    loss = opt.step(quad_closure(opt, x, A, c))
    d = opt.diagnostics
    assert loss.item() == pytest.approx(0.5 * (x0 @ A @ x0).item())
    assert d["dist_x_mu"].item() == pytest.approx(0.3 * (A @ x0).norm().item())
    assert d["cos_angle"].item() == pytest.approx(1.0)
    assert d["angle_deg"].item() == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize(
    "kw, expected_std",
    [
        (dict(), 0.75 * 1e-2 * math.sqrt(0.5)),
        (dict(alpha=0.25, noise_convention="authors"), 0.25 * 1e-2 * math.sqrt(2 * 0.5)),
    ],
)
def test_noise_scale_conventions(kw, expected_std):
    # zero loss, gamma = 0, L = 1: x - mu = -alpha sigma N(0, I)
    x = torch.nn.Parameter(torch.zeros(200_000))
    opt = EntropySGD([x], lr=0.0, L=1, sgld_lr=0.5, noise=1e-2, gamma=0.0, **kw)

    def closure():
        opt.zero_grad()
        loss = (0.0 * x).sum()
        loss.backward()
        return loss

    torch.manual_seed(0)
    opt.step(closure)
    assert x.grad.std().item() == pytest.approx(expected_std, rel=0.01)
    assert abs(x.grad.mean().item()) < 5 * expected_std / math.sqrt(x.numel())


def test_wide_minimum_preferred_over_sharp_deeper_one():
    # 1-D cartoon of Fig. 2: a wide shallow well at 0 (depth 1, width 1) and a sharp deeper
    # well at 2.5 (depth 1.3, width 0.1); 200 independent runs are the coordinates of x.
    def f(x):
        return (-torch.exp(-(x**2) / 2) - 1.3 * torch.exp(-((x - 2.5) ** 2) / 0.02)).sum()

    g = torch.Generator().manual_seed(0)
    x0 = 2.5 + 0.3 * (2 * torch.rand(200, generator=g) - 1)

    def run(make, steps):
        x = torch.nn.Parameter(x0.clone())
        opt = make([x])

        def closure():
            opt.zero_grad()
            loss = f(x)
            loss.backward()
            return loss

        for _ in range(steps):
            opt.step(closure)
        return x.detach()

    # SGD with a step that resolves the sharp well (curvature 130) stays in it.
    xs = run(lambda p: torch.optim.SGD(p, lr=0.005), 1000)
    assert ((xs - 2.5).abs() < 0.05).float().mean() == 1.0
    # Entropy-SGD with the paper's eta' = 0.1: the SGLD chain cannot settle in a well of
    # curvature > 2 / eta' under thermal noise, so mu, and x with it, drifts to the wide one.
    torch.manual_seed(1)
    xe = run(
        lambda p: EntropySGD(
            p, lr=0.5, L=20, sgld_lr=0.1, noise=0.3, gamma=0.3, scoping="constant"
        ),
        100,
    )
    assert (xe.abs() < 0.3).float().mean() >= 0.9


def test_param_groups_use_their_own_learning_rates():
    # identical sub-problems in two groups: the displacement ratio is the lr ratio
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(3))
    frozen = torch.nn.Parameter(torch.ones(3))
    opt = EntropySGD(
        [{"params": [a], "lr": 0.5}, {"params": [b]}, {"params": [frozen], "lr": 0}],
        lr=0.1,
        L=3,
        noise=0.0,
        gamma=0.1,
    )

    def closure():
        opt.zero_grad()
        loss = sum(((p - 2.0) ** 2).sum() for p in (a, b, frozen))
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close((a - 1).detach(), 5 * (b - 1).detach(), rtol=1e-6, atol=0)
    assert (a > 1).all() and torch.equal(frozen.detach(), torch.ones(3))


def test_lr_scheduler_drives_lr():
    # linear loss: the inner loop is translation invariant, so each step moves x by lr * G
    x = torch.nn.Parameter(torch.zeros(2))
    opt = EntropySGD([x], lr=1.0, L=4, noise=0.0, gamma=0.2, scoping="constant")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    w = torch.tensor([1.0, -2.0])

    def closure():
        opt.zero_grad()
        loss = w @ x
        loss.backward()
        return loss

    moves = []
    for _ in range(2):
        before = x.detach().clone()
        opt.step(closure)
        sched.step()
        moves.append(x.detach() - before)
    torch.testing.assert_close(moves[1], 0.1 * moves[0])


def test_parameters_without_grad_are_skipped():
    used, unused = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = EntropySGD([used, unused], L=2, noise=1e-3)

    def closure():
        opt.zero_grad()
        loss = (used**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert unused.grad is None and torch.equal(unused.detach(), torch.ones(2))
    assert unused not in opt.state and not torch.equal(used.detach(), torch.ones(2))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(lr=-1.0), "lr must be >= 0"),
        (dict(L=0), "L .* >= 1"),
        (dict(alpha=0.0), r"alpha must lie in \(0, 1\]"),
        (dict(alpha=1.5), r"alpha must lie in \(0, 1\]"),
        (dict(scoping="cosine"), "unknown scoping schedule 'cosine'"),
        (dict(nesterov=True), "nesterov=True requires momentum > 0"),
        (dict(noise=-1e-4), "noise must be >= 0"),
        (dict(noise_convention="x"), "noise_convention"),
    ],
)
def test_bad_arguments_raise_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        EntropySGD([torch.nn.Parameter(torch.ones(1))], **kw)


def test_missing_closure_and_sparse_gradients_raise():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = EntropySGD(emb.parameters())
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()

    def closure():
        opt.zero_grad()
        loss = emb(torch.tensor([1, 2])).sum()
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="sparse gradients"):
        opt.step(closure)


def test_bad_value_in_a_param_group_is_caught():
    p = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match="lr must be >= 0"):
        EntropySGD([{"params": [p], "lr": -0.1}])
    opt = EntropySGD([p])
    opt.param_groups[0]["L"] = 0  # edited after construction: caught at the next step
    with pytest.raises(ValueError, match="L .* >= 1"):
        opt.step(lambda: (p**2).sum())


def test_flat_buffers_give_identical_results():
    kw = dict(CONFIG, noise=1e-3, sgld_momentum=0.5, sgld_nesterov=True)
    a, opt, *_ = mlp_run(lambda p: EntropySGD(p, **kw, flat=True))
    b, *_ = mlp_run(lambda p: EntropySGD(p, **kw))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    p = next(iter(opt.param_groups[0]["params"]))
    assert p.grad.shape == p.shape and p.data.data_ptr() != opt._flat_cache[0]["xp"].data_ptr()


def test_flat_parameters_restored_when_closure_raises():
    x = torch.nn.Parameter(torch.ones(3))
    opt = EntropySGD([x], L=3, flat=True)
    calls = [0]
    storage = x.data.data_ptr()

    def closure():
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("data loader failed")
        opt.zero_grad()
        loss = (x**2).sum()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="data loader"):
        opt.step(closure)
    assert x.data.data_ptr() == storage and torch.equal(x.detach(), torch.ones(3))
