"""HVPs and exact Hessians against independent references and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from conftest import reference_hessian
from torch import nn

import spectra

F64 = torch.float64


class LastStep(nn.Module):
    """LSTM over a sequence, prediction from the last hidden state."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


def tanh_mlp():
    return (
        nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double(),
        torch.randn(17, 5, dtype=F64),
        torch.randint(0, 3, (17,)),
    )


def conv_net():
    m = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)
    ).double()
    return m, torch.randn(9, 1, 8, 8, dtype=F64), torch.randint(0, 3, (9,))


def lstm_net():
    return LastStep().double(), torch.randn(6, 5, 3, dtype=F64), torch.randint(0, 2, (6,))


def bn_net():
    m = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    m.train()
    for _ in range(3):  # give BatchNorm non-trivial running statistics
        m(torch.randn(32, 4, dtype=F64) * 2 + 1)
    m.eval()
    return m, torch.randn(11, 4, dtype=F64), torch.randint(0, 3, (11,))


NETS = {"tanh_mlp": tanh_mlp, "conv": conv_net, "lstm": lstm_net, "batchnorm_eval": bn_net}


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("backend", ["auto", "autograd"])
def test_hvp_and_exact_hessian_match_autograd_reference(name, backend):
    model, X, y = NETS[name]()
    loss = nn.CrossEntropyLoss()
    ref = reference_hessian(model, loss, X, y)
    H = spectra.hessian_operator(model, loss, (X, y), backend=backend)
    scale = ref.abs().max()
    V = torch.randn(H.shape[0], 4, dtype=F64)
    assert torch.allclose(H @ V, ref @ V, rtol=0, atol=1e-10 * scale * V.abs().sum(0).max())
    v = V[:, 0]
    assert torch.allclose(H @ v, ref @ v, rtol=0, atol=1e-10 * scale * v.abs().sum())
    dense = spectra.exact_hessian(model, loss, (X, y), dtype=F64, chunk_size=5, backend=backend)
    assert float((dense - ref).abs().max() / scale) < 1e-10


def test_operator_does_not_change_model_or_its_mode():
    model, X, y = bn_net()
    model.train()
    model[1].eval()  # a mixed-mode model must come back exactly as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    H = spectra.hessian_operator(model, nn.CrossEntropyLoss(), (X, y))
    H @ torch.randn(H.shape[0], dtype=F64)
    assert model.training and not model[1].training and model[0].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_least_squares_closed_form():
    N, d = 40, 6
    X = torch.randn(N, d, dtype=F64)
    y = torch.randn(N, 1, dtype=F64)
    model = nn.Linear(d, 1, bias=False).double()
    H = spectra.exact_hessian(model, nn.MSELoss(), (X, y), dtype=F64)
    torch.testing.assert_close(H, 2 * X.T @ X / N, rtol=1e-12, atol=1e-12)


def test_logistic_regression_closed_form():
    N, d = 50, 4
    X = torch.randn(N, d, dtype=F64)
    y = (torch.rand(N) < 0.5).to(F64)
    model = nn.Linear(d, 1, bias=False).double()

    def loss(out, t):
        return nn.functional.binary_cross_entropy_with_logits(out.squeeze(1), t)

    p = torch.sigmoid(X @ model.weight.detach().T).squeeze(1)
    expected = X.T @ torch.diag(p * (1 - p)) @ X / N
    H = spectra.exact_hessian(model, loss, (X, y), dtype=F64)
    torch.testing.assert_close(H, expected, rtol=1e-12, atol=1e-14)


def test_batch_split_invariance():
    model, X, y = tanh_mlp()
    loss = nn.CrossEntropyLoss()
    cuts = [0, 1, 4, 5, 9, 13, 16, 17]  # 7 uneven batches, one of a single sample
    uneven = [(X[a:b], y[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=5)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=F64)
    one = spectra.hessian_operator(model, loss, (X, y)) @ v
    for data in (uneven, loader, iter(uneven)):
        other = spectra.hessian_operator(model, loss, data) @ v
        assert float((other - one).abs().max()) <= 1e-12 * float(one.abs().max())


def test_sum_reduction_stays_a_sum():
    """curvlinops' convention: a sum over all data is N times the mean over all data."""
    model, X, y = tanh_mlp()
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=F64)
    mean = spectra.hessian_operator(model, nn.CrossEntropyLoss(), (X, y)) @ v
    summed = (
        spectra.hessian_operator(
            model, nn.CrossEntropyLoss(reduction="sum"), [(X[:5], y[:5]), (X[5:], y[5:])]
        )
        @ v
    )
    torch.testing.assert_close(summed, len(y) * mean, rtol=1e-12, atol=1e-12)
    ref = reference_hessian(model, nn.CrossEntropyLoss(reduction="sum"), X, y)
    torch.testing.assert_close(summed, ref @ v, rtol=1e-12, atol=1e-12)


def test_parameter_subset_is_principal_block():
    model, X, y = tanh_mlp()
    loss = nn.CrossEntropyLoss()
    full = spectra.exact_hessian(model, loss, (X, y), dtype=F64)
    # layout: 0.weight (30), 0.bias (6), 2.weight (18), 2.bias (3)
    sub = spectra.exact_hessian(model, loss, (X, y), dtype=F64, params=["2.weight", "0.bias"])
    idx = torch.cat([torch.arange(30, 36), torch.arange(36, 54)])
    torch.testing.assert_close(sub, full[idx][:, idx], rtol=1e-12, atol=1e-14)
    by_pred = spectra.exact_hessian(
        model, loss, (X, y), dtype=F64, params=lambda name, p: name.startswith("2.")
    )
    torch.testing.assert_close(by_pred, full[36:, 36:], rtol=1e-12, atol=1e-14)


def test_tied_and_frozen_parameters_count_once():
    emb = nn.Linear(4, 4, bias=False)
    model = nn.Sequential(emb, nn.Tanh(), emb, nn.Linear(4, 2)).double()
    model[3].bias.requires_grad_(False)
    H = spectra.hessian_operator(
        model, nn.CrossEntropyLoss(), (torch.randn(5, 4, dtype=F64), torch.randint(0, 2, (5,)))
    )
    assert H.shape == (16 + 8, 16 + 8)


def test_dict_and_tuple_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2)
            self.b = nn.Linear(2, 2)

        def forward(self, x, z):
            return self.a(x) + self.b(z)

    model = Two().double()
    x, z, y = torch.randn(8, 3, dtype=F64), torch.randn(8, 2, dtype=F64), torch.randint(0, 2, (8,))
    loss = nn.CrossEntropyLoss()
    v = torch.randn(14, dtype=F64)
    by_tuple = spectra.hessian_operator(model, loss, ((x, z), y)) @ v
    by_dict = spectra.hessian_operator(model, loss, ({"x": x, "z": z}, y)) @ v
    torch.testing.assert_close(by_tuple, by_dict, rtol=0, atol=0)


def test_to_scipy_eigsh_matches_dense():
    model, X, y = conv_net()
    H = spectra.hessian_operator(model, nn.CrossEntropyLoss(), (X, y))
    dense = reference_hessian(model, nn.CrossEntropyLoss(), X, y)
    top = np.sort(scipy.sparse.linalg.eigsh(H.to_scipy(), k=5, which="LA")[0])
    expected = torch.linalg.eigvalsh(dense)[-5:].numpy()
    np.testing.assert_allclose(top, expected, rtol=1e-9)
    assert H.matvecs > 0


def test_train_mode_with_dropout_is_refused():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2)).double()
    X, y = torch.randn(10, 4, dtype=F64), torch.randint(0, 2, (10,))
    with pytest.raises(RuntimeError, match="stochastic"):  # before any product
        spectra.hessian_operator(model, nn.CrossEntropyLoss(), (X, y), train_mode=True)
    # eval mode (the default) switches dropout off and gives the dropout-free Hessian
    Hev = spectra.exact_hessian(model, nn.CrossEntropyLoss(), (X, y), dtype=F64)
    ref = reference_hessian(model.eval(), nn.CrossEntropyLoss(), X, y)
    torch.testing.assert_close(Hev, ref, rtol=1e-10, atol=1e-12)


def test_batchnorm_train_mode_uses_batch_statistics():
    model, X, y = bn_net()
    model.train()
    ref = reference_hessian(model, nn.CrossEntropyLoss(), X, y)  # train mode: batch stats
    model.eval()
    H = spectra.exact_hessian(model, nn.CrossEntropyLoss(), (X, y), dtype=F64, train_mode=True)
    torch.testing.assert_close(H, ref, rtol=1e-9, atol=1e-11)
    assert not model.training


def test_float32_default_dtype_and_float64_override():
    model = nn.Linear(3, 2)
    X, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    assert spectra.hessian_operator(model, nn.CrossEntropyLoss(), (X, y)).dtype == torch.float32
    H = spectra.hessian_operator(model, nn.CrossEntropyLoss(), (X, y), dtype=F64)
    assert H.dtype == F64 and model.weight.dtype == torch.float32


def test_half_precision_model_computes_in_float32_with_warning():
    model = nn.Linear(3, 2).to(torch.bfloat16)
    X, y = torch.randn(4, 3, dtype=torch.bfloat16), torch.randint(0, 2, (4,))
    with pytest.warns(UserWarning, match="float32"):
        H = spectra.hessian_operator(model, nn.CrossEntropyLoss(), (X, y))
    assert H.dtype == torch.float32


def test_gradient_matches_autograd():
    model, X, y = tanh_mlp()
    H = spectra.hessian_operator(model, nn.CrossEntropyLoss(), [(X[:3], y[:3]), (X[3:], y[3:])])
    loss = nn.CrossEntropyLoss()(model(X), y)
    ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    torch.testing.assert_close(H.gradient(), ref, rtol=1e-12, atol=1e-14)
    assert H.loss == pytest.approx(float(loss), rel=1e-12)


def test_single_vector_path_and_graph_cache_agree_with_block_path():
    model, X, y = conv_net()
    loss = nn.CrossEntropyLoss()
    cached = spectra.hessian_operator(model, loss, (X, y))
    assert cached.cache_graph  # one batch, eval mode
    uncached = spectra.hessian_operator(model, loss, [(X[:4], y[:4]), (X[4:], y[4:])])
    assert not uncached.cache_graph  # several batches: would hold every batch's graph
    block = spectra.hessian_operator(model, loss, (X, y), backend="func")
    V = torch.randn(cached.shape[0], 3, dtype=F64)
    expected = block @ V
    for j in range(3):
        for op in (cached, uncached):
            torch.testing.assert_close(op @ V[:, j], expected[:, j], rtol=1e-11, atol=1e-13)
    assert len(cached._graphs) == 1
    # a deterministic train-mode forward may cache too (a stochastic one is refused when
    # the operator is built); this net has no BatchNorm, so train mode changes nothing
    train = spectra.hessian_operator(model, loss, (X, y), train_mode=True)
    assert train.cache_graph
    torch.testing.assert_close(train @ V[:, 0], expected[:, 0], rtol=1e-11, atol=1e-13)
