"""GGN and empirical Fisher operators against dense constructions."""

from __future__ import annotations

import pytest
import torch
from conftest import flat_params
from torch import nn
from torch.func import functional_call, jacrev

import spectra

F64 = torch.float64


def problem():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X, y = torch.randn(23, 4, dtype=F64), torch.randint(0, 3, (23,))
    return model, nn.CrossEntropyLoss(), X, y


def uneven(X, y):
    return [(X[:5], y[:5]), (X[5:6], y[5:6]), (X[6:], y[6:])]


def call(model, names, shapes, t, X):
    sizes = [s.numel() for s in shapes]
    params = {n: p.view(s) for n, p, s in zip(names, torch.split(t, sizes), shapes, strict=True)}
    return functional_call(model, params, (X,))


@pytest.mark.parametrize("backend", ["func", "autograd"])
def test_ggn_equals_dense_jacobian_construction(backend):
    model, loss, X, y = problem()
    names, shapes, theta = flat_params(model)
    J = jacrev(lambda t: call(model, names, shapes, t, X))(theta)  # (N, C, n)
    z = model(X).detach()
    Hz = torch.func.hessian(lambda z: loss(z, y))(z)  # (N, C, N, C)
    expected = torch.einsum("iap,iajb,jbq->pq", J, Hz, J)
    G = spectra.ggn_operator(model, loss, uneven(X, y), backend=backend).to_dense()
    torch.testing.assert_close(G, expected, rtol=1e-12, atol=1e-14)
    assert torch.linalg.eigvalsh(G).min() > -1e-12  # PSD for a convex loss


def test_ggn_equals_hessian_for_linear_model():
    X, y = torch.randn(20, 5, dtype=F64), torch.randn(20, 2, dtype=F64)
    model = nn.Linear(5, 2).double()
    G = spectra.ggn_operator(model, nn.MSELoss(), (X, y)).to_dense()
    H = spectra.exact_hessian(model, nn.MSELoss(), (X, y), dtype=F64)
    torch.testing.assert_close(G, H, rtol=1e-12, atol=1e-14)


def test_empirical_fisher_equals_mean_outer_product():
    model, loss, X, y = problem()
    names, shapes, theta = flat_params(model)
    g = torch.stack(
        [
            torch.func.grad(
                lambda t, i=i: loss(call(model, names, shapes, t, X[i : i + 1]), y[i : i + 1])
            )(theta)
            for i in range(len(X))
        ]
    )
    expected = g.T @ g / len(X)
    F = spectra.empirical_fisher_operator(model, loss, uneven(X, y))
    torch.testing.assert_close(F.to_dense(), expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(F.diagonal(), expected.diagonal(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "factory", [spectra.ggn_operator, spectra.empirical_fisher_operator, spectra.hessian_operator]
)
def test_per_layer_operator_is_principal_block(factory):
    model, loss, X, y = problem()
    full = factory(model, loss, (X, y)).to_dense()
    last = factory(model, loss, (X, y), params=["2.*"]).to_dense()
    torch.testing.assert_close(last, full[30:, 30:], rtol=1e-12, atol=1e-14)
