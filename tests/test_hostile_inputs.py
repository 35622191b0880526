"""Awkward models and inputs: what the user sees (issue 8's table, one test per row)."""

from __future__ import annotations

import math
import warnings

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

    H = spectra.hessian_operator(
        model, nn.CrossEntropyLoss(), (batch, y), forward=forward, dtype=F64
    )
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
    Hfd = spectra.hessian_operator(
        model, nn.CrossEntropyLoss(), (X, y), backend="finite_difference"
    )
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
    H = spectra.hessian_operator(
        model, nn.CrossEntropyLoss(), (torch.randn(4, 3, dtype=F64), torch.randint(0, 2, (4,)))
    )
    v = torch.randn(8, dtype=F64)
    v[2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        H @ v
    assert H.matvecs == 0


def test_one_shot_generator_of_batches_is_materialised():
    model = nn.Linear(3, 2).double()
    X, y = torch.randn(9, 3, dtype=F64), torch.randint(0, 2, (9,))
    gen = ((X[i : i + 4], y[i : i + 4]) for i in range(0, 9, 4))
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


# --- issue 12: one operator, one answer; inputs as users pass them ---------------------


class ScaledEmbedding(nn.Embedding):
    """A subclass with its own forward, as Gemma's scaled word embedding."""

    def forward(self, ids):
        return super().forward(ids) * 1.7


class PaddedBag(nn.Module):
    def __init__(self, embedding=nn.Embedding) -> None:
        super().__init__()
        self.emb = embedding(6, 3, padding_idx=0)
        self.head = nn.Linear(3, 2)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)).mean(1))


def _padding_reference(model, loss, ids, y):
    """Dense Hessian with the padding row held fixed (it is never trained), zero-padded."""
    pad = model.emb.padding_idx
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    keep = torch.ones(params["emb.weight"].shape[0], dtype=torch.bool)
    keep[pad] = False
    free = [params["emb.weight"][keep].detach()] + [params[n].detach() for n in names[1:]]
    sizes = [t.numel() for t in free]

    def f(flat):
        parts = [p.view(t.shape) for p, t in zip(torch.split(flat, sizes), free, strict=True)]
        w = torch.empty_like(params["emb.weight"])
        w[keep], w[pad] = parts[0], params["emb.weight"][pad].detach()
        named = {"emb.weight": w, **dict(zip(names[1:], parts[1:], strict=True))}
        return loss(torch.func.functional_call(model, named, (ids,)), y)

    small = torch.autograd.functional.hessian(f, torch.cat([t.reshape(-1) for t in free]))
    index = torch.cat(
        [
            torch.arange(params["emb.weight"].numel()).view(keep.shape[0], -1)[keep].reshape(-1),
            torch.arange(params["emb.weight"].numel(), sum(p.numel() for p in model.parameters())),
        ]
    )
    full = torch.zeros(index.numel() + 3, index.numel() + 3, dtype=F64)
    full[index[:, None], index[None, :]] = small
    return full


@pytest.mark.parametrize("embedding", [nn.Embedding, ScaledEmbedding])
def test_padding_idx_every_path_agrees_with_the_held_fixed_reference(embedding):
    torch.manual_seed(0)
    model = PaddedBag(embedding).double()
    ids = torch.tensor([[0, 1, 2], [0, 0, 3], [4, 5, 0], [2, 2, 1]])
    y = torch.tensor([0, 1, 1, 0])
    loss = nn.CrossEntropyLoss()
    ref = _padding_reference(model, loss, ids, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback: the vectorised path itself is right
        H = spectra.hessian_operator(model, loss, [(ids[:1], y[:1]), (ids[1:], y[1:])])
        H @ torch.randn(H.shape[0], 2, dtype=F64)
    n = H.shape[0]
    eye = torch.eye(n, dtype=F64)
    torch.testing.assert_close(H @ eye, ref, rtol=1e-10, atol=1e-12)  # vmap block
    cols = torch.stack([H @ eye[:, j] for j in range(n)], 1)  # double backward
    torch.testing.assert_close(cols, ref, rtol=1e-10, atol=1e-12)
    exact, asym = spectra.exact.dense_matrix(
        spectra.hessian_operator(model, loss, (ids, y), dtype=F64)
    )
    assert asym < 1e-14
    torch.testing.assert_close(exact, ref, rtol=1e-10, atol=1e-12)
    G = spectra.ggn_operator(model, loss, (ids, y))
    torch.testing.assert_close(
        G @ eye[:, :4], torch.stack([G @ eye[:, j] for j in range(4)], 1), rtol=1e-10, atol=1e-13
    )


class _WrongBackwardCube(torch.autograd.Function):
    """x**3 whose backward is 1.5x the derivative: first-order paths disagree with the jvp."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 4.5 * x**2

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * t


class _Odd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(_WrongBackwardCube.apply(self.a(x)))


def test_vectorised_and_double_backward_disagreement_is_caught():
    torch.manual_seed(0)
    model = _Odd().double()
    data = (torch.randn(5, 3, dtype=F64), torch.randint(0, 2, (5,)))
    loss = nn.CrossEntropyLoss()
    V = torch.randn(26, 3, dtype=F64)
    H = spectra.hessian_operator(model, loss, data, backend="func")
    with pytest.raises(RuntimeError, match="backend='autograd'"):
        H @ V
    auto = spectra.hessian_operator(model, loss, data)
    with pytest.warns(UserWarning, match="double backward for every product"):
        got = auto @ V
    want = spectra.hessian_operator(model, loss, data, backend="autograd") @ V
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert auto.precision > 1e-2  # the measured disagreement is recorded


def test_exact_build_refuses_a_non_symmetric_matrix():
    from spectra.exact import dense_matrix

    A = torch.randn(6, 6, dtype=F64)
    with pytest.raises(ValueError, match="not symmetric"):
        dense_matrix(spectra.as_linear_operator(A))
    S = A + A.T
    M, asym = dense_matrix(spectra.as_linear_operator(S))
    assert asym == 0.0 and torch.equal(M, S)


def test_mapping_inputs_none_targets_numpy_pairs_and_compiled_models():
    from collections import UserDict

    import numpy as np

    torch.manual_seed(0)
    model = HFStyle().double()
    ids, mask = torch.randint(0, 10, (6, 5)), torch.ones(6, 5, dtype=torch.float32)
    y = torch.randint(0, 2, (6,))
    loss = nn.CrossEntropyLoss()

    def logits(m, b):
        return m(**b)["logits"]

    ref = spectra.hessian_operator(
        model, loss, ({"input_ids": ids, "attention_mask": mask}, y), forward=logits, dtype=F64
    ).to_dense()
    # a Mapping that is not a dict: moved, cast (float32 mask -> float64) and passed as **kwargs
    user = UserDict(input_ids=ids, attention_mask=mask)
    got = spectra.hessian_operator(model, loss, (user, y), forward=logits, dtype=F64)
    torch.testing.assert_close(got.to_dense(), ref, rtol=1e-12, atol=1e-14)

    # the `.loss` idiom: the forward returns the loss, the data are (inputs, None)
    def with_loss(m, b):
        out = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        return loss(out["logits"], b["labels"])

    batch = {"input_ids": ids, "attention_mask": mask, "labels": y}
    H = spectra.hessian_operator(model, lambda value, _: value, (batch, None), forward=with_loss)
    torch.testing.assert_close(H.to_dense(), ref, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="logits"):
        spectra.ggn_operator(model, lambda value, _: value, (batch, None), forward=with_loss) @ (
            torch.randn(H.shape[0], dtype=F64)
        )
    # a pair of NumPy arrays is one batch, not two
    lin = nn.Linear(3, 2).double()
    Xn, yn = np.random.default_rng(0).normal(size=(7, 3)), np.arange(7) % 2
    Hn = spectra.hessian_operator(lin, loss, (Xn, yn))
    assert Hn.num_samples == 7 and Hn.source.num_batches == 1
    torch.testing.assert_close(
        Hn.to_dense(),
        reference_hessian(lin, loss, torch.as_tensor(Xn), torch.as_tensor(yn)),
        rtol=1e-12,
        atol=1e-14,
    )
    # a torch.compile wrapper is unwrapped (never compiled: products run eagerly)
    Hc = spectra.hessian_operator(torch.compile(lin), loss, (Xn, yn))
    assert Hc.view.names == ("weight", "bias")
    torch.testing.assert_close(Hc.to_dense(), Hn.to_dense(), rtol=0, atol=0)
    # dtype by name, as results record it (Spectrum.dtype); a non-float dtype is refused
    assert spectra.hessian_operator(lin, loss, (Xn, yn), dtype="float32").dtype == torch.float32
    with pytest.raises(ValueError, match="torch.float64"):
        spectra.hessian_operator(lin, loss, (Xn, yn), dtype="int64")


def test_all_finite_agrees_with_the_elementwise_test():
    """The one-pass check: a finite sum proves every element finite, and a sum that
    overflows from finite elements must not be read as a NaN or an infinity."""
    from spectra._checks import all_finite

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 3, generator=g)
    cases = [x, x.double(), torch.empty(0), torch.arange(5), x[:, 0].to(torch.complex64)]
    for bad in (math.nan, math.inf, -math.inf):
        y = x.clone()
        y[517, 1] = bad
        cases.append(y)
    cases.append(torch.full((4,), 6e4, dtype=torch.float16))  # sum overflows float16
    cases.append(torch.tensor([3e38, 3e38, -1.0]))  # and float32
    pair = torch.tensor([math.inf, -math.inf])  # inf - inf: the sum is NaN
    cases.append(pair)
    for c in cases:
        assert all_finite(c) == bool(torch.isfinite(c).all()), c
