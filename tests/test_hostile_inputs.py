"""Awkward models and inputs: what the user sees (issue 8's table, one test per row)."""

from __future__ import annotations

import pytest
import torch
from conftest import reference_hessian
from torch import nn

import spectra

F64 = torch.float64


class HFStyle(nn.Module):
    """Takes keyword tensors and returns a dict, like a Hugging Face model."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, input_ids, attention_mask):
        h = (self.emb(input_ids) * attention_mask.unsqueeze(-1)).sum(1)
        return {"logits": self.head(torch.tanh(h))}


def test_hugging_face_style_dict_batch_with_user_forward():
    model = HFStyle().double()
    batch = {"input_ids": torch.randint(0, 10, (6, 5)), "attention_mask": torch.ones(6, 5)}
    y = torch.randint(0, 2, (6,))

    def forward(m, inputs):
        return m(**inputs)["logits"]

    H = spectra.hessian_operator(model, nn.CrossEntropyLoss(), (batch, y), forward=forward,
                                 dtype=F64)
    dense = H.to_dense()

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, ids):
            return self.m(ids, torch.ones(ids.shape, dtype=F64))["logits"]

    ref = reference_hessian(Wrapped(), nn.CrossEntropyLoss(), batch["input_ids"], y)
    torch.testing.assert_close(dense, ref, rtol=1e-10, atol=1e-12)


def test_finite_difference_hvp_matches_exact_hvp():
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    X, y = torch.randn(20, 5, dtype=F64), torch.randint(0, 3, (20,))
    H = spectra.hessian_operator(model, nn.CrossEntropyLoss(), (X, y))
    Hfd = spectra.hessian_operator(model, nn.CrossEntropyLoss(), (X, y),
                                   backend="finite_difference")
    V = torch.randn(H.shape[0], 4, dtype=F64)
    V[:, 3] = 0
    exact, approx = H @ V, Hfd @ V
    err = (exact[:, :3] - approx[:, :3]).norm(dim=0) / exact[:, :3].norm(dim=0)
    assert float(err.max()) < 1e-8  # documented: ~eps^(2/3) ~ 1e-10 in float64
    assert torch.equal(approx[:, 3], torch.zeros_like(approx[:, 3]))


def test_finite_difference_is_only_for_the_hessian():
    model = nn.Linear(3, 2).double()
    data = (torch.randn(4, 3, dtype=F64), torch.randint(0, 2, (4,)))
    G = spectra.ggn_operator(model, nn.CrossEntropyLoss(), data, backend="finite_difference")
    with pytest.raises(NotImplementedError, match="Hessian"):
        G @ torch.randn(8, dtype=F64)


def test_non_finite_vector_is_reported():
    model = nn.Linear(3, 2).double()
    H = spectra.hessian_operator(model, nn.CrossEntropyLoss(),
                                 (torch.randn(4, 3, dtype=F64), torch.randint(0, 2, (4,))))
    v = torch.randn(8, dtype=F64)
    v[2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        H @ v
    assert H.matvecs == 0


def test_one_shot_generator_of_batches_is_materialised():
    model = nn.Linear(3, 2).double()
    X, y = torch.randn(9, 3, dtype=F64), torch.randint(0, 2, (9,))
    gen = ((X[i:i + 4], y[i:i + 4]) for i in range(0, 9, 4))
    H = spectra.hessian_operator(model, nn.CrossEntropyLoss(), gen)
    v = torch.randn(8, dtype=F64)
    torch.testing.assert_close(H @ v, H @ v)  # second pass sees the same data
    assert H.num_samples == 9


def test_resampling_loader_is_refused():
    class Growing:
        def __init__(self):
            self.calls = 0

        def __iter__(self):
            self.calls += 1
            n = 4 + self.calls
            yield torch.randn(n, 3, dtype=F64), torch.randint(0, 2, (n,))

    model = nn.Linear(3, 2).double()
    with pytest.raises(RuntimeError, match="same data on every pass"):
        spectra.hessian_operator(model, nn.CrossEntropyLoss(), Growing())
