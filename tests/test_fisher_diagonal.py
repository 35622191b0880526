"""Fisher diagonals: from Adam's moments, from per-sample gradients, and the Hessian diagonal.

References are closed forms (linear and logistic regression), the exact expectation
of v_hat - m_hat^2 for independent gradient streams (derived in
spectra/fisher_diagonal.py), and dense Hessians from tests/conftest.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import reference_hessian
from torch import nn

from spectra import (
    CurvatureDiagonal,
    Spectrum,
    adam_noise_factor,
    empirical_fisher_diagonal,
    empirical_fisher_operator,
    fisher_diagonal_from_adam,
    hessian_diagonal,
)

F64 = torch.float64


# --- helpers ---------------------------------------------------------------------------


def uneven_batches(X: torch.Tensor, y: torch.Tensor, cuts=(7, 20)) -> list:
    edges = [0, *cuts, X.shape[0]]
    return [(X[a:b], y[a:b]) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def moment_weights(beta: float, t: int) -> torch.Tensor:
    """Adam's bias-corrected weights on g_1..g_t (they sum to 1)."""
    k = torch.arange(1, t + 1, dtype=F64)
    return (1 - beta) * beta ** (t - k) / (1 - beta**t)


def expected_estimate(means: torch.Tensor, s2: float, betas=(0.9, 0.999)) -> float:
    """E[v_hat - m_hat^2] for independent g_k with means ``means`` (t,) and variance s2."""
    w, u = moment_weights(betas[0], len(means)), moment_weights(betas[1], len(means))
    return float(s2 * (1 - (w * w).sum()) + (u * means**2).sum() - (w * means).sum() ** 2)


def run_stream(opt_cls, mean_at, s: torch.Tensor, steps: int, seed: int = 1, **kw):
    """Step ``opt_cls`` on a parameter whose gradient at step k is mean_at(k) + s * N(0, 1)."""
    p = nn.Parameter(torch.zeros(s.shape, dtype=F64))
    opt = opt_cls([p], lr=1e-3, **kw)
    gen = torch.Generator().manual_seed(seed)
    for k in range(1, steps + 1):
        p.grad = mean_at(k) + s * torch.randn(s.shape, generator=gen, dtype=F64)
        opt.step()
    return p, opt


def mean_and_se(x: torch.Tensor) -> tuple[float, float]:
    return float(x.mean()), float(x.std() / math.sqrt(x.numel()))


# --- empirical Fisher diagonal: closed forms ----------------------------------------------


def test_linear_regression_closed_form():
    torch.manual_seed(0)
    N, d = 29, 5
    X, y = torch.randn(N, d, dtype=F64), torch.randn(N, 1, dtype=F64)
    model = nn.Linear(d, 1).to(F64)
    r = (model(X) - y).detach()  # (N, 1)
    G = torch.cat([2 * r * X, 2 * r], dim=1)  # per-sample gradients of (w.x + b - y)^2
    data = uneven_batches(X, y)
    diag = empirical_fisher_diagonal(model, nn.MSELoss(), data)
    assert isinstance(diag, CurvatureDiagonal) and diag.method == "per_sample"
    assert diag.names == ("weight", "bias") and diag.info == {"centered": False}
    assert diag.source == "EmpiricalFisherOperator" and diag.stderr is None
    torch.testing.assert_close(diag.values, (G * G).mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        diag.per_parameter["bias"], (G[:, -1:] ** 2).mean(0), rtol=1e-12, atol=1e-12
    )
    # read like the (n,) tensor this function returned before it returned the result type
    assert diag.numel() == d + 1
    assert np.array_equal(diag.detach().cpu().numpy(), diag.values.numpy())
    with pytest.raises(ValueError, match="shapes hold 6 entries, values 5"):
        CurvatureDiagonal(diag.values[:5], "per_sample", names=diag.names, shapes=diag.shapes)
    centered = empirical_fisher_diagonal(model, nn.MSELoss(), data, centered=True)
    torch.testing.assert_close(centered.values, G.var(0, unbiased=False), rtol=1e-12, atol=1e-12)
    # the same as the operator's own diagonal (a thin wrapper, same weighting); a sum
    # stays a sum: sum_i g_i^2
    op = empirical_fisher_operator(model, nn.MSELoss(reduction="sum"), (X, y))
    torch.testing.assert_close(op.diagonal(), N * diag.values, rtol=1e-12, atol=1e-12)
    summed = empirical_fisher_diagonal(model, nn.MSELoss(reduction="sum"), data, centered=True)
    torch.testing.assert_close(summed.values, N * G.var(0, unbiased=False), rtol=1e-12, atol=1e-10)


def test_logistic_regression_closed_form():
    torch.manual_seed(0)
    N, d = 31, 4
    X = torch.randn(N, d, dtype=F64)
    y = (torch.rand(N, 1, dtype=F64) < 0.5).to(F64)
    model = nn.Linear(d, 1).to(F64)
    p = torch.sigmoid(model(X)).detach()
    G = torch.cat([(p - y) * X, p - y], dim=1)
    diag = empirical_fisher_diagonal(model, nn.BCEWithLogitsLoss(), uneven_batches(X, y))
    torch.testing.assert_close(diag.values, (G * G).mean(0), rtol=1e-12, atol=1e-12)
    bias_only = empirical_fisher_diagonal(model, nn.BCEWithLogitsLoss(), (X, y), params="bias")
    assert bias_only.names == ("bias",)
    torch.testing.assert_close(bias_only.values, (G[:, -1:] ** 2).mean(0), rtol=1e-12, atol=1e-12)


# --- Hessian diagonal --------------------------------------------------------------------


def small_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)


def test_hessian_diagonal_exact_and_hutchinson():
    torch.manual_seed(0)
    model = small_net()
    X, y = torch.randn(23, 4, dtype=F64), torch.randint(0, 3, (23,))
    loss = nn.CrossEntropyLoss()
    ref = reference_hessian(model, loss, X, y).diagonal()
    exact = hessian_diagonal(model, loss, uneven_batches(X, y), block_size=7)
    assert exact.method == "exact" and exact.stderr is None and exact.matvecs == ref.numel()
    assert exact.source == "HessianOperator" and exact.names == (
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
    )
    torch.testing.assert_close(exact.values, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        exact.per_parameter["2.weight"], ref[30:48].view(3, 6), rtol=1e-12, atol=1e-12
    )
    est = hessian_diagonal(model, loss, (X, y), method="hutchinson", num_samples=400, seed=3)
    assert est.stderr is not None and bool((est.stderr > 0).all())
    assert est.matvecs == est.num_samples == 400
    z = (est.values - ref) / est.stderr
    assert float(z.abs().max()) < 4.0
    # an operator or a dense matrix works too
    H = reference_hessian(model, loss, X, y)
    dense = hessian_diagonal(H)
    assert torch.equal(dense.values, H.diagonal()) and dense.names == ()
    with pytest.raises(ValueError, match="no parameter layout"):
        _ = dense.per_parameter
    spec = exact.to_spectrum(name="diag H")
    assert spec.kind == "diagonal" and spec.info["estimator"] == "exact"
    assert spec.info["matvecs"] == ref.numel() and spec.info["source"] == "HessianOperator"
    assert np.array_equal(spec.eigenvalues, np.sort(exact.numpy()))


def test_hessian_diagonal_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        hessian_diagonal(torch.eye(3, dtype=F64), method="lanczos")
    with pytest.raises(ValueError, match="num_samples"):
        hessian_diagonal(torch.eye(3, dtype=F64), method="hutchinson", num_samples=1)
    with pytest.raises(TypeError, match="loss_fn and data"):
        hessian_diagonal(small_net())
    with pytest.raises(ValueError, match="block_size"):
        hessian_diagonal(torch.eye(3, dtype=F64), block_size=0)
    with pytest.raises(TypeError, match="operator options"):
        hessian_diagonal(torch.eye(3, dtype=F64), dtype=F64)


# --- Adam's moments: bias corrections and convergence ----------------------------------------


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_estimate_converges_to_derived_expectation(opt_cls):
    d, steps, late = 3000, 2000, 600
    gen = torch.Generator().manual_seed(0)
    mu = 0.5 * torch.randn(2 * d, generator=gen, dtype=F64)
    s = 0.5 + 1.5 * torch.rand(2 * d, generator=gen, dtype=F64)
    a = nn.Parameter(torch.zeros(d, dtype=F64))
    b = nn.Parameter(torch.zeros(d, dtype=F64))
    opt = opt_cls([a, b], lr=1e-3)
    for k in range(1, steps + 1):
        g = mu + s * torch.randn(2 * d, generator=gen, dtype=F64)
        a.grad = g[:d]
        b.grad = g[d:] if k > late else None  # b starts later: its own step count
        opt.step()
    fd = fisher_diagonal_from_adam(opt)
    assert fd.steps == (steps, steps - late)
    assert fd.source == opt_cls.__name__
    parts = fd.per_parameter
    for name, idx, t in (
        ("group0.param0", slice(0, d), steps),
        ("group0.param1", slice(d, None), steps - late),
    ):
        m, se = mean_and_se(parts[name] / s[idx] ** 2)
        assert abs(m - adam_noise_factor(0.9, t)) < 4 * se, (m, se, t)
    unbiased = fisher_diagonal_from_adam(opt, unbiased=True)
    m, se = mean_and_se(unbiased.values / s**2)
    assert abs(m - 1.0) < 4 * se
    # asymptotically 2 b1 / (1 + b1): 0.947 at the default beta1
    assert adam_noise_factor(0.9, 10**6) == pytest.approx(1.8 / 1.9, rel=1e-12)


def test_bias_corrections_at_small_step_counts():
    """At t = 3 a missing or wrong bias correction would be off by ~1/(1-0.999^3) ~ 300x."""
    d, mu, s2 = 40000, 1.0, 4.0
    means = torch.full((3,), mu, dtype=F64)
    _, opt = run_stream(torch.optim.Adam, lambda k: mu, torch.full((d,), s2**0.5, dtype=F64), 3)
    fd = fisher_diagonal_from_adam(opt)
    m, se = mean_and_se(fd.values)
    assert abs(m - expected_estimate(means, s2)) < 4 * se
    assert expected_estimate(means, s2) == pytest.approx(s2 * adam_noise_factor(0.9, 3))
    # hand-computed bias-corrected moments
    st = opt.state[opt.param_groups[0]["params"][0]]
    manual = st["exp_avg_sq"] / (1 - 0.999**3) - (st["exp_avg"] / (1 - 0.9**3)) ** 2
    torch.testing.assert_close(fd.values, manual, rtol=0, atol=1e-12)


def test_adam_estimate_over_minibatches_matches_per_sample_variance():
    """At a minimum (mean gradient 0) with lr = 0 and batches drawn with replacement, the
    stream is stationary and B * (unbiased Adam estimate) -> the centered per-sample diagonal.
    Minibatch gradients are set from the closed form g_i = (p_i - y_i) [x_i, 1]."""
    torch.manual_seed(0)
    N, d, B = 40, 6, 8
    X = torch.randn(N, d, dtype=F64)
    y = (torch.rand(N, 1, dtype=F64) < 0.5).to(F64)
    model = nn.Linear(d, 1).to(F64)
    loss = nn.BCEWithLogitsLoss()
    lbfgs = torch.optim.LBFGS(
        model.parameters(), max_iter=200, tolerance_grad=1e-12, line_search_fn="strong_wolfe"
    )

    def closure():
        lbfgs.zero_grad()
        out = loss(model(X), y)
        out.backward()
        return out

    lbfgs.step(closure)
    r = (torch.sigmoid(model(X)) - y).detach()
    G = torch.cat([r * X, r], dim=1)  # (N, d + 1)
    assert float(G.mean(0).abs().max()) < 1e-5  # at the minimum (per-sample sd ~0.3)
    opt = torch.optim.Adam(model.parameters(), lr=0.0, betas=(0.99, 0.9999))
    gen = torch.Generator().manual_seed(2)
    for _ in range(6000):
        g = G[torch.randint(0, N, (B,), generator=gen)].mean(0)
        model.weight.grad, model.bias.grad = g[:d].view(1, d), g[d:]
        opt.step()
    fd = fisher_diagonal_from_adam(opt, model=model, unbiased=True)
    assert fd.names == ("weight", "bias")
    direct = empirical_fisher_diagonal(model, loss, (X, y), centered=True)
    assert direct.names == fd.names and direct.info == {"centered": True}
    torch.testing.assert_close(direct.values, G.var(0, unbiased=False), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(B * fd.values, direct.values, rtol=0.15, atol=0)


# --- negative entries: only where the documentation says ---------------------------------------


def test_stationary_zero_mean_never_negative():
    s = torch.ones(4000, dtype=F64)
    _, opt = run_stream(torch.optim.Adam, lambda k: 0.0, s, 2000)
    assert fisher_diagonal_from_adam(opt).n_negative == 0


def test_stationary_high_snr_negative_fraction_as_documented():
    """|mu| = 4 s: negative with probability ~ Phi(-(2 b1/(1+b1)) s / (2 |mu| rho))."""
    b1, b2, r = 0.9, 0.999, 4.0
    s = torch.ones(4000, dtype=F64)
    _, opt = run_stream(torch.optim.Adam, lambda k: r, s, 2000)
    fd = fisher_diagonal_from_adam(opt)
    rho = math.sqrt(
        (1 - b2) / (1 + b2) + (1 - b1) / (1 + b1) - 2 * (1 - b1) * (1 - b2) / (1 - b1 * b2)
    )
    predicted = 0.5 * math.erfc((2 * b1 / (1 + b1)) / (2 * r * rho) / math.sqrt(2))
    assert abs(fd.n_negative / fd.n - predicted) < 0.03
    assert fd.n_negative_rounding == 0  # these are fluctuations, far above rounding


@pytest.mark.parametrize("direction", ["grows", "shrinks"])
def test_drifting_mean_matches_drift_term(direction):
    """A mean that switches on 500 steps before the read makes the estimate negative
    (recent m^2 exceeds the long-run average of g^2); one that switches off inflates it."""
    steps, switch, level, d = 2000, 1500, 3.0, 3000
    on = (
        (lambda k: level * (k > switch))
        if direction == "grows"
        else (lambda k: level * (k <= switch))
    )
    means = torch.tensor([float(on(k)) for k in range(1, steps + 1)], dtype=F64)
    _, opt = run_stream(torch.optim.Adam, on, torch.ones(d, dtype=F64), steps)
    fd = fisher_diagonal_from_adam(opt)
    expected = expected_estimate(means, 1.0)
    m, se = mean_and_se(fd.values)
    assert abs(m - expected) < 4 * se
    if direction == "grows":
        assert expected < -3 and fd.n_negative / fd.n > 0.98
    else:
        assert expected > 1 and fd.n_negative == 0


def test_first_step_is_rounding_only():
    p = nn.Parameter(torch.zeros(5000))  # float32 moments
    opt = torch.optim.Adam([p])
    p.grad = torch.randn(5000) * 10.0 ** torch.randint(-3, 3, (5000,))
    opt.step()
    fd = fisher_diagonal_from_adam(opt)
    assert fd.n_negative == fd.n_negative_rounding
    assert float(fd.values.abs().max()) <= 4 * torch.finfo(torch.float32).eps * float(
        p.grad.pow(2).max()
    )
    with pytest.raises(ValueError, match="at least 2 steps"):
        fisher_diagonal_from_adam(opt, unbiased=True)


# --- layout, selection, plotting ---------------------------------------------------------------


def trained(model: nn.Module, opt_cls=torch.optim.Adam, steps: int = 3, **kw):
    opt = opt_cls(model.parameters(), **kw)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(16, 4, dtype=F64)).pow(2).mean().backward()
        opt.step()
    return opt


def test_layout_names_subset_and_spectrum():
    model = small_net()
    # optimizer order differs from model order: entries follow the model with model=
    groups = [
        {"params": [model[2].bias, model[2].weight]},
        {"params": [model[0].weight, model[0].bias], "betas": (0.5, 0.99)},
    ]
    opt = torch.optim.Adam(groups)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(16, 4, dtype=F64)).pow(2).mean().backward()
        opt.step()
    before = {k: {n: v.clone() for n, v in st.items()} for k, st in opt.state.items()}
    fd = fisher_diagonal_from_adam(opt, model=model)
    for k, st in opt.state.items():  # reading never touches the optimizer's state
        for n, v in st.items():
            assert torch.equal(v, before[k][n])
    assert torch.equal(fisher_diagonal_from_adam(opt, model=model).values, fd.values)
    assert isinstance(fd, CurvatureDiagonal) and fd.method == "adam_moments"
    assert fd.source == "Adam" and fd.stderr is None and fd.matvecs == 0
    assert fd.names == tuple(n for n, _ in model.named_parameters())
    assert fd.n == sum(p.numel() for p in model.parameters())
    assert fd.betas[0] == (0.5, 0.99) and fd.betas[-1] == (0.9, 0.999)
    for name, p in model.named_parameters():
        assert fd.per_parameter[name].shape == p.shape
    unlabeled = fisher_diagonal_from_adam(opt)
    assert unlabeled.names[0] == "group0.param0"
    torch.testing.assert_close(unlabeled.per_parameter["group0.param0"], fd.per_parameter["2.bias"])
    sub = fisher_diagonal_from_adam(opt, ["0.bias", model[2].weight], model=model)
    assert sub.names == ("0.bias", "2.weight")
    torch.testing.assert_close(sub.per_parameter["0.bias"], fd.per_parameter["0.bias"])
    spec = fd.to_spectrum(name="adam")
    assert isinstance(spec, Spectrum) and spec.kind == "diagonal" and spec.n_params == fd.n
    assert spec.info["n_negative"] == fd.n_negative
    assert spec.info["estimator"] == "adam_moments" and spec.info["steps"] == [2]


def test_signed_panels_plot_a_fisher_diagonal():
    from spectra import plot

    p = nn.Parameter(torch.zeros(200, dtype=F64))
    _, opt = run_stream(torch.optim.Adam, lambda k: 3.0 * (k > 40), torch.ones(200, dtype=F64), 60)
    fd = fisher_diagonal_from_adam(opt)
    assert fd.n_negative > 0
    fig = plot.signed_panels(fd.to_spectrum(name="drift"), near_zero_tol=1e-5)
    assert len(fig.axes) == 2
    del p


def test_entropy_adam_state_contract():
    import entropy_opt

    model = small_net()
    opt = entropy_opt.EntropyAdam(model.parameters(), lr=1e-3, L=2)
    X = torch.randn(16, 4, dtype=F64)

    def closure():
        opt.zero_grad()
        loss = model(X).pow(2).mean()
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    fd = fisher_diagonal_from_adam(opt, model=model)
    assert fd.source == "EntropyAdam" and set(fd.steps) == {2}
    assert fd.betas[0] == tuple(opt.param_groups[0]["betas"])


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_is_refused(momentum):
    model = small_net()
    opt = trained(model, torch.optim.SGD, lr=0.1, momentum=momentum)
    with pytest.raises(TypeError, match="keeps no Adam moments.*exp_avg"):
        fisher_diagonal_from_adam(opt)


def test_optimizer_with_betas_but_other_state_is_refused():
    model = small_net()
    opt = trained(model, torch.optim.Adamax)  # betas, but exp_inf instead of exp_avg_sq
    with pytest.raises(TypeError, match="exp_avg_sq"):
        fisher_diagonal_from_adam(opt)


def test_fresh_adam_is_refused():
    opt = torch.optim.Adam(small_net().parameters())
    with pytest.raises(RuntimeError, match="no step"):
        fisher_diagonal_from_adam(opt)


def test_foreign_params_are_refused():
    model, other = small_net(), small_net()
    opt = trained(model)
    with pytest.raises(ValueError, match="does not hold"):
        fisher_diagonal_from_adam(opt, [model[0].weight, other[0].weight])
    with pytest.raises(ValueError, match="does not hold.*model="):
        fisher_diagonal_from_adam(opt, ["0.weight"])
    with pytest.raises(ValueError, match="does not hold"):
        fisher_diagonal_from_adam(opt, ["9.weight"], model=model)


def test_never_stepped_params_are_skipped_or_refused():
    model = small_net()
    opt = torch.optim.Adam(model.parameters())
    opt.zero_grad()
    model(torch.randn(8, 4, dtype=F64)).pow(2).mean().backward()
    model[0].bias.grad = None  # this one is never stepped
    opt.step()
    fd = fisher_diagonal_from_adam(opt, model=model)
    assert fd.skipped == ("0.bias",) and "0.bias" not in fd.names
    with pytest.raises(RuntimeError, match="0.bias"):
        fisher_diagonal_from_adam(opt, [model[0].weight, model[0].bias], model=model)


def test_hutchinson_standard_error_survives_a_large_diagonal():
    """The per-entry variance was sum(s^2) - n mean^2, which cancels when the diagonal
    (1e8) dwarfs the off-diagonal entries (1e-2): 50 of 80 entries reported stderr 0
    with errors of ~4e-3.  Per entry the samples are d + sum_j A_ij z_i z_j, so the
    true standard error is sqrt(sum_{j != i} A_ij^2 / num_samples)."""
    g = torch.Generator().manual_seed(0)
    n, samples = 80, 100
    off = 1e-2 * torch.randn(n, n, generator=g, dtype=F64)
    A = (off + off.T) / 2
    A.fill_diagonal_(1e8)
    est = hessian_diagonal(A, method="hutchinson", num_samples=samples, seed=0)
    true = ((A - torch.diag(torch.diag(A))) ** 2).sum(dim=1).div(samples).sqrt()
    assert bool((est.stderr > 0).all())
    torch.testing.assert_close(est.stderr.median(), true.median(), rtol=0.25, atol=0)
    assert float(((est.values - 1e8).abs() <= 4 * est.stderr).float().mean()) > 0.95
