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


class _PaddedTagger(nn.Module):
    """A tagger over packed sequences that pads its outputs back, as taggers do."""

    def __init__(self, total_length: int | None = None) -> None:
        super().__init__()
        self.total_length = total_length
        self.rnn, self.fc = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 3)

    def forward(self, packed):
        from torch.nn.utils.rnn import pad_packed_sequence

        out, _ = pad_packed_sequence(
            self.rnn(packed)[0], batch_first=True, total_length=self.total_length
        )
        return self.fc(out)


class _TokenCE(nn.CrossEntropyLoss):
    def forward(self, outputs, targets):
        return super().forward(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))


def test_empirical_fisher_refuses_outputs_padded_to_the_batch_and_is_exact_with_total_length():
    """pad_packed_sequence pads to the longest sequence of the batch, so a sample alone
    had shorter outputs than its targets: a raw size error in the loss.  Refused naming
    total_length=, with which the Fisher is (1/T) sum_i g_i g_i^T over T counted tokens."""
    from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence

    torch.manual_seed(0)
    x = torch.randn(3, 5, 3, dtype=F64)
    lengths = torch.tensor([5, 2, 4])
    y = torch.randint(0, 3, (3, 5))
    for i, n in enumerate(lengths):
        y[i, n:] = -100
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    padded = spectra.empirical_fisher_operator(_PaddedTagger().double(), _TokenCE(), (packed, y))
    with pytest.raises(
        ValueError,
        match=r"sample 1 of batch 0 alone.*\(1, 2, 3\), against \(3, 5, 3\).*total_length",
    ):
        padded @ torch.ones(padded.shape[0], dtype=F64)
    with pytest.raises(ValueError, match=r"sample 1 of batch 0 alone.*total_length"):
        spectra.empirical_fisher_diagonal(_PaddedTagger().double(), _TokenCE(), (packed, y))
    model = _PaddedTagger(total_length=5).double()
    params = list(model.parameters())
    grads = []
    for i in range(3):
        one = _TokenCE(reduction="sum")(model(pack_sequence([x[i, : lengths[i]]])), y[i : i + 1])
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(one, params)]))
    G = torch.stack(grads)
    want = G.T @ G / int(lengths.sum())
    op = spectra.empirical_fisher_operator(model, _TokenCE(), (packed, y))
    torch.testing.assert_close(op @ torch.eye(op.shape[0], dtype=F64), want, rtol=0, atol=1e-13)
    diag = spectra.empirical_fisher_diagonal(model, _TokenCE(), (packed, y))
    torch.testing.assert_close(
        torch.as_tensor(diag.values), torch.diagonal(want), rtol=0, atol=1e-13
    )


def test_empirical_fisher_refuses_attention_that_mixes_the_samples():
    """nn.TransformerEncoderLayer without batch_first=True, fed (batch, time, features),
    attends across the batch: a sample alone is another function, and the Fisher's
    per-sample split is refused; with batch_first=True it runs."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0)  # time-major
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(8 * 3, 2)).double()
    X, y = torch.randn(4, 3, 8, dtype=F64), torch.randint(0, 2, (4,))
    # batch_dim=0 answers the library's question about batch_first=False, wrongly
    fisher = spectra.empirical_fisher_operator(model, nn.CrossEntropyLoss(), (X, y), batch_dim=0)
    with pytest.raises(ValueError, match=r"away from those in the batch.*batch_first"):
        fisher @ torch.ones(fisher.shape[0], dtype=F64)
    right = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    model = nn.Sequential(right, nn.Flatten(), nn.Linear(8 * 3, 2)).double()
    fisher = spectra.empirical_fisher_operator(model, nn.CrossEntropyLoss(), (X, y))
    assert torch.isfinite(fisher @ torch.ones(fisher.shape[0], dtype=F64)).all()
