"""What the operator averages over: counted loss terms, samples along batch_dim, fixed data.

Issue 12 items 3-5: every case here gave a split-dependent or silently wrong
operator before; the references are dense float64 Hessians of the loss over all
the data at once (tests/conftest.py), independent of the library's weighting.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import reference_hessian
from torch import nn

import spectra
from spectra.batches import batch_size

F64 = torch.float64


class TokenTagger(nn.Module):
    """Per-token classifier: (B, T) ids -> (B, C, T) logits (class dim 1, as CE wants)."""

    def __init__(self, vocab: int = 7, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids))).transpose(1, 2)


def tagged_tokens(B: int = 7, T: int = 5):
    torch.manual_seed(0)
    ids = torch.randint(0, 7, (B, T))
    y = torch.randint(0, 3, (B, T))
    lengths = torch.tensor([5, 1, 3, 5, 2, 4, 1])[:B]  # very uneven counts per sequence
    y[torch.arange(T)[None, :] >= lengths[:, None]] = -100
    return TokenTagger().double(), ids, y


def splits(ids, y, cuts=(1, 4)):
    bounds = [0, *cuts, len(ids)]
    return [(ids[a:b], y[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def dense(model, loss, data, **options):
    return spectra.hessian_operator(model, loss, data, dtype=F64, **options).to_dense()


@pytest.mark.parametrize(
    "loss",
    [
        nn.CrossEntropyLoss(),  # ignore_index=-100: the mean over counted tokens
        nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0], dtype=F64)),
        nn.CrossEntropyLoss(reduction="sum"),
    ],
    ids=["ignore_index", "class-weights", "sum"],
)
def test_masked_token_loss_is_the_loss_over_all_data_for_any_split(loss):
    model, ids, y = tagged_tokens()
    ref = reference_hessian(model, loss, ids, y)
    for data in ((ids, y), splits(ids, y), splits(ids, y, cuts=(2, 3, 6))):
        torch.testing.assert_close(dense(model, loss, data), ref, rtol=1e-10, atol=1e-12)


def test_sum_is_not_divided_and_a_plain_sum_function_is_detected():
    model, ids, y = tagged_tokens()
    as_module = dense(model, nn.CrossEntropyLoss(reduction="sum"), splits(ids, y))

    def summed(out, t):
        return F.cross_entropy(out, t, reduction="sum")

    H = spectra.hessian_operator(model, summed, splits(ids, y), dtype=F64)
    assert H.reduction.kind == "sum" and H.reduction.how == "detected"
    torch.testing.assert_close(H.to_dense(), as_module, rtol=1e-12, atol=1e-12)
    # the mean function is detected as a mean
    mean = spectra.hessian_operator(model, F.cross_entropy, (ids, y), dtype=F64)
    assert mean.reduction.kind == "mean"


def test_plain_function_with_ignored_labels_needs_loss_terms():
    model, ids, y = tagged_tokens()
    with pytest.raises(ValueError, match="loss_terms="):
        spectra.hessian_operator(model, F.cross_entropy, splits(ids, y), dtype=F64)
    H = spectra.hessian_operator(
        model,
        F.cross_entropy,
        splits(ids, y),
        dtype=F64,
        loss_terms=lambda out, t: (t != -100).sum(),
    )
    ref = reference_hessian(model, nn.CrossEntropyLoss(), ids, y)
    torch.testing.assert_close(H.to_dense(), ref, rtol=1e-10, atol=1e-12)


def test_reduction_option_is_checked():
    model, ids, y = tagged_tokens()
    with pytest.raises(ValueError, match="reduction='sum' was given"):
        spectra.hessian_operator(model, nn.CrossEntropyLoss(), (ids, y), reduction="sum")
    with pytest.raises(ValueError, match="reduction='none'"):
        spectra.hessian_operator(model, nn.CrossEntropyLoss(reduction="none"), (ids, y))
    with pytest.raises(ValueError, match="'mean' or 'sum'"):
        spectra.hessian_operator(model, F.cross_entropy, (ids, y), reduction="average")
    # a plain function that is neither (normalised by something else) is refused
    with pytest.raises(ValueError, match="neither a mean nor a sum"):
        spectra.hessian_operator(
            model,
            lambda o, t: F.cross_entropy(o, t, reduction="sum") / len(t) ** 0.5,
            (ids, y),
        )


def test_module_loss_whose_mean_is_not_the_counted_terms_is_refused():
    class Halved(nn.MSELoss):  # a mean over half the elements: the rule cannot know
        def forward(self, a, b):
            out = super().forward(a, b)
            return out * 2 if self.reduction == "mean" else out

    model = nn.Linear(3, 2).double()
    X, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    with pytest.raises(ValueError, match="loss_terms="):
        spectra.hessian_operator(model, Halved(), [(X[:2], y[:2]), (X[2:], y[2:])])


class TimeMajorLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, num_layers=2)  # batch_first=False
        self.head = nn.Linear(4, 2)

    def forward(self, x):  # (T, B, 3) -> (T, B, 2)
        return self.head(self.lstm(x)[0])


def seq_mse(out, y):
    return ((out - y) ** 2).mean()


def test_time_major_rnn_must_say_batch_dim_and_then_any_split_agrees():
    torch.manual_seed(0)
    model = TimeMajorLSTM().double()
    X, y = torch.randn(4, 6, 3, dtype=F64), torch.randn(4, 6, 2, dtype=F64)
    with pytest.raises(ValueError, match="batch_dim=1"):
        spectra.hessian_operator(model, seq_mse, (X, y))
    ref = reference_hessian(model, nn.MSELoss(), X, y)
    split = [(X[:, :1], y[:, :1]), (X[:, 1:], y[:, 1:])]  # 1 + 5 sequences
    for loss in (nn.MSELoss(), seq_mse):
        H = spectra.hessian_operator(model, loss, split, batch_dim=1)
        assert H.num_samples == 6
        torch.testing.assert_close(H.to_dense(), ref, rtol=1e-10, atol=1e-12)


def test_empirical_fisher_of_a_time_major_lstm_is_per_sequence():
    torch.manual_seed(0)
    model = TimeMajorLSTM().double()
    X, y = torch.randn(4, 5, 3, dtype=F64), torch.randn(4, 5, 2, dtype=F64)
    loss = nn.MSELoss()
    split = [(X[:, :2], y[:, :2]), (X[:, 2:], y[:, 2:])]
    Fop = spectra.empirical_fisher_operator(model, loss, split, batch_dim=1)
    params = list(model.parameters())
    rows = []
    for i in range(5):  # each sequence's summed loss; c = 1 / (number of elements)
        s = nn.MSELoss(reduction="sum")(model(X[:, i : i + 1]), y[:, i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(s, params)]))
    G = torch.stack(rows)
    ref = G.T @ G / y.numel()
    torch.testing.assert_close(Fop.to_dense(), ref, rtol=1e-10, atol=1e-12)


def test_what_a_sample_is():
    x, mask = torch.zeros(5, 3), torch.zeros(1, 3)  # a broadcast (1, ...) tensor
    assert batch_size((x, mask), torch.zeros(5)) == 5
    assert batch_size({"a": torch.zeros(4, 2, 7)}, torch.zeros(8), batch_dim=1) == 2
    assert batch_size(torch.zeros(5, 3), torch.zeros(15)) == 5  # flattened targets
    with pytest.raises(ValueError, match="count_samples="):
        batch_size((torch.zeros(5, 3), torch.zeros(4, 3)), None)
    model = nn.Linear(3, 1).double()
    X = torch.randn(6, 3, dtype=F64)
    H = spectra.hessian_operator(
        model,
        nn.MSELoss(),
        (X, torch.randn(6, 1, dtype=F64)),
        count_samples=lambda inputs, targets: 3,
    )
    assert H.num_samples == 3


def test_reshuffling_loader_is_refused_before_any_product():
    X, y = torch.randn(20, 3, dtype=F64), torch.randint(0, 2, (20,))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, y), batch_size=6, shuffle=True, drop_last=True
    )
    model = nn.Linear(3, 2).double()
    with pytest.raises(RuntimeError, match="shuffle=False"):
        spectra.hessian_operator(model, nn.CrossEntropyLoss(), loader)
    fixed = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=6)
    H = spectra.hessian_operator(model, nn.CrossEntropyLoss(), fixed)
    v = torch.randn(8, dtype=F64)
    torch.testing.assert_close(
        H @ v, reference_hessian(model, nn.CrossEntropyLoss(), X, y) @ v, rtol=1e-10, atol=1e-12
    )


def test_cast_copies_of_in_memory_data_are_kept_and_mutation_is_still_caught():
    X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))  # float32 data, float64 operator
    model = nn.Linear(3, 2).double()
    H = spectra.hessian_operator(model, nn.CrossEntropyLoss(), [(X[:5], y[:5]), (X[5:], y[5:])])
    first = [b.inputs for b in H.source]
    assert all(a is b.inputs for a, b in zip(first, H.source, strict=True))  # cast once
    assert first[0].dtype == F64
    v = torch.randn(8, dtype=F64)
    torch.testing.assert_close(
        H @ v,
        reference_hessian(model, nn.CrossEntropyLoss(), X.double(), y) @ v,
        rtol=1e-10,
        atol=1e-12,
    )
    X[0, 0] += 1.0  # the user's tensor changes in place: the kept copy would be stale
    with pytest.raises(RuntimeError, match="differs from the first pass"):
        H @ v
