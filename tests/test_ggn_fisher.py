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


# --- per-sample inputs the empirical Fisher used to mishandle ---------------------------------


def test_empirical_fisher_of_packed_sequences_is_the_sum_over_each_sequence_alone():
    """Its sequences are the samples (tree_map used to rebuild the PackedSequence from ints)."""
    from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence

    torch.manual_seed(0)

    class Last(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.fc = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)

        def forward(self, packed):
            _, (h, _) = self.rnn(packed)
            return self.fc(h[-1])

    model = Last().double()
    x = torch.randn(5, 6, 3, dtype=F64)
    lengths = torch.tensor([4, 6, 2, 5, 3])  # unsorted: the targets follow this order
    y = torch.randint(0, 2, (5,))
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    params = [p for p in model.parameters()]
    grads = []
    for i in range(5):
        loss = nn.functional.cross_entropy(model(pack_sequence([x[i, : lengths[i]]])), y[i : i + 1])
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    G = torch.stack(grads)
    want = G.T @ G / 5
    op = spectra.empirical_fisher_operator(model, nn.CrossEntropyLoss(), (packed, y))
    torch.testing.assert_close(op @ torch.eye(op.shape[0], dtype=F64), want, rtol=0, atol=1e-13)
    diag = spectra.empirical_fisher_diagonal(model, nn.CrossEntropyLoss(), (packed, y))
    torch.testing.assert_close(
        torch.as_tensor(diag.values), torch.diagonal(want), rtol=0, atol=1e-13
    )


@pytest.mark.parametrize("how", ["train_mode", "no_running_stats"])
def test_empirical_fisher_refuses_batchnorm_on_batch_statistics(how):
    """Each sample would be normalised by its own statistics: another function's gradients
    (23% off the per-sample gradients under the batch's statistics on a conv net)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4, track_running_stats=how != "no_running_stats")
    model = nn.Sequential(nn.Linear(3, 4), bn, nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(8, 3, dtype=F64), torch.randint(0, 2, (8,))
    with pytest.raises(ValueError, match="batch of one.*train_mode=False"):
        spectra.empirical_fisher_operator(
            model, nn.CrossEntropyLoss(), (X, y), train_mode=how == "train_mode"
        )
    if how == "train_mode":  # eval mode with running statistics is per-sample and accepted
        spectra.empirical_fisher_operator(model, nn.CrossEntropyLoss(), (X, y))
