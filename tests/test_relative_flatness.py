"""Relative flatness (spectra.relative_flatness) against a literal dense reference.

The reference follows Petzka et al. (2021), Def. 3 word for word: the dense float64
Hessian of the loss in the layer's weight W (d, m) by torch.autograd.functional.hessian
(shape (d, m, d, m)), and the double sum over rows s, s' of <w_s, w_s'> times the trace
of the (m, m) block H[s, :, s', :], written as loops.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import relu_mlp, rescaled_twin
from torch import nn

import spectra
from spectra.relative_flatness import RelativeFlatness, relative_flatness

F64 = torch.float64


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 5, generator=g, dtype=F64), torch.randint(0, 3, (64,), generator=g)


def reference_kappa(model: nn.Module, layer: str, X: torch.Tensor, y: torch.Tensor) -> float:
    params = {k: v.detach() for k, v in model.named_parameters()}
    W = params[layer]

    def loss(w: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, {**params, layer: w}, (X,))
        return nn.functional.cross_entropy(out, y)

    H = torch.autograd.functional.hessian(loss, W)  # (d, m, d, m)
    d, m = W.shape
    kappa = 0.0
    for s in range(d):
        for s2 in range(d):
            block_trace = sum(float(H[s, t, s2, t]) for t in range(m))
            kappa += float(W[s] @ W[s2]) * block_trace
    return kappa


@pytest.fixture(scope="module")
def references(data) -> dict[str, float]:
    X, y = data
    model = relu_mlp()
    return {
        name: reference_kappa(model, name, X, y) for name in ("0.weight", "2.weight", "4.weight")
    }


# --- (a) exact value ----------------------------------------------------------------------------


@pytest.mark.parametrize("layer", ["0.weight", "2.weight", "4.weight"])  # m<d, m=d, m>d
@pytest.mark.parametrize("params", ["layer", "all"])
def test_exact_matches_the_literal_double_sum(data, references, layer, params):
    X, y = data
    op = spectra.hessian_operator(
        relu_mlp(), nn.CrossEntropyLoss(), (X, y), params=layer if params == "layer" else None
    )
    r = relative_flatness(op, layer, method="exact")
    ref = references[layer]
    assert abs(ref) > 1e-3
    assert r.value == pytest.approx(ref, rel=1e-10)
    d, m = op.view.shapes[op.view.names.index(layer)]
    assert (r.method, r.stderr, r.shape, r.layer) == ("exact", 0.0, (d, m), layer)
    assert r.size == min(d, m) * m and r.matvecs == r.size == op.matvecs


def test_auto_is_exact_for_small_layers(data, references):
    X, y = data
    op = spectra.hessian_operator(relu_mlp(), nn.CrossEntropyLoss(), (X, y), params="4.weight")
    r = relative_flatness(op, "4.weight")  # size 3 * 16 = 48 <= 99
    assert r.method == "exact" and r.matvecs == 48
    assert r.value == pytest.approx(references["4.weight"], rel=1e-10)


# --- (b) Hutch++ --------------------------------------------------------------------------------


def test_hutchpp_is_within_a_few_standard_errors(data, references):
    X, y = data
    op = spectra.hessian_operator(relu_mlp(), nn.CrossEntropyLoss(), (X, y), params="2.weight")
    ref = references["2.weight"]
    results = [relative_flatness(op, "2.weight", num_matvecs=60, seed=s) for s in range(8)]
    for r in results:
        assert r.method == "hutch++" and r.matvecs == 60 and r.size == 256
        assert 0 < r.stderr < 0.5 * abs(ref)
    assert all(abs(r.value - ref) <= 4 * r.stderr for r in results)
    assert sum(abs(r.value - ref) <= 2 * r.stderr for r in results) >= 6
    auto = relative_flatness(op, "2.weight", method="auto", num_matvecs=60, seed=0)
    assert auto == results[0]  # auto is Hutch++ when the layer exceeds the budget


# --- (c) invariance -----------------------------------------------------------------------------


def test_invariant_under_relu_rescaling_while_the_top_eigenvalue_moves(data):
    X, y = data
    model = relu_mlp()
    twin = rescaled_twin(model, 10.0)
    torch.testing.assert_close(twin(X), model(X), rtol=1e-12, atol=1e-12)
    loss = nn.CrossEntropyLoss()
    op, op_twin = (spectra.hessian_operator(m, loss, (X, y)) for m in (model, twin))
    k, k_twin = (relative_flatness(o, "2.weight", method="exact").value for o in (op, op_twin))
    assert k_twin == pytest.approx(k, rel=1e-8)
    top, top_twin = (spectra.lanczos(o, k=1).eigenvalues[0].item() for o in (op, op_twin))
    assert max(top, top_twin) / min(top, top_twin) > 2, (top, top_twin)
    # The plain (non-relative) trace of the same block is not invariant:
    block = [spectra.hessian_operator(m, loss, (X, y), params="2.weight") for m in (model, twin)]
    plain = [spectra.trace(b, num_matvecs=256).estimate for b in block]
    assert plain[1] / plain[0] == pytest.approx(100.0, rel=1e-8)


# --- (d) bad input ------------------------------------------------------------------------------


def test_unknown_layer_lists_the_available_ones(data):
    op = spectra.hessian_operator(relu_mlp(), nn.CrossEntropyLoss(), data)
    with pytest.raises(ValueError, match=r"available: 0\.weight, 2\.weight, 4\.weight"):
        relative_flatness(op, "fc.weight")
    with pytest.raises(ValueError, match=r"2-D weight.*'2\.bias' has shape \(16,\)"):
        relative_flatness(op, "2.bias")
    assert op.matvecs == 0


def test_layer_held_fixed_is_explained(data):
    op = spectra.hessian_operator(relu_mlp(), nn.CrossEntropyLoss(), data, params="0.weight")
    with pytest.raises(ValueError, match="held fixed"):
        relative_flatness(op, "2.weight")


def test_convolution_kernel_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2)).double()
    X, y = torch.randn(4, 1, 4, 4, dtype=F64), torch.tensor([0, 1, 0, 1])
    op = spectra.hessian_operator(model, nn.CrossEntropyLoss(), (X, y))
    with pytest.raises(ValueError, match=r"convolution kernel.*available: 2\.weight"):
        relative_flatness(op, "0.weight")
    assert op.matvecs == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "lanczos"}, "method must be one of"),
        ({"num_matvecs": 3}, "num_matvecs must be an integer >= 4"),
        ({"num_matvecs": 10.5}, "num_matvecs must be an integer"),
        ({"seed": -1}, "seed must be an integer"),
    ],
)
def test_bad_arguments_are_refused_before_any_product(data, kwargs, match):
    op = spectra.hessian_operator(relu_mlp(), nn.CrossEntropyLoss(), data)
    with pytest.raises(ValueError, match=match):
        relative_flatness(op, "2.weight", **kwargs)
    assert op.matvecs == 0


def test_not_an_operator_is_refused_and_the_result_is_frozen(data):
    with pytest.raises(TypeError, match="CurvatureOperator"):
        relative_flatness(torch.eye(4, dtype=F64), "2.weight")
    op = spectra.hessian_operator(relu_mlp(), nn.CrossEntropyLoss(), data, params="4.weight")
    r = relative_flatness(op, "4.weight")
    assert isinstance(r, RelativeFlatness) and r.curvature == "HessianOperator"
    assert "4.weight 3x16" in repr(r)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.value = 0.0


# --- the layout of the stored weight --------------------------------------------------------


def test_gpt2_conv1d_weight_is_read_as_x_at_w_and_equals_the_same_layer_as_linear():
    """Hugging Face's Conv1D stores W as (d_in, d_out) and computes x @ W: the measure must
    pair the weights into each output unit, the columns (it read rows: 2.6x off)."""
    transformers = pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=8)
    model = GPT2LMHeadModel(config).double().eval()
    ids = torch.randint(0, 11, (4, 5))
    name = "transformer.h.0.mlp.c_fc.weight"

    def forward(m, batch):
        return m(**batch).logits.transpose(1, 2)

    params = {k: v.detach() for k, v in model.named_parameters()}
    W = params[name]  # (d_in, d_out) = (8, 32)

    def loss(w: torch.Tensor) -> torch.Tensor:
        logits = torch.func.functional_call(model, {**params, name: w}, (), {"input_ids": ids})
        return nn.functional.cross_entropy(logits.logits.transpose(1, 2), ids)

    H = torch.autograd.functional.hessian(loss, W)  # (t, s, t', s'): input t -> unit s
    m_in, d = W.shape
    want = 0.0
    for s in range(d):
        for s2 in range(d):
            want += float(W[:, s] @ W[:, s2]) * sum(float(H[t, s, t, s2]) for t in range(m_in))
    op = spectra.hessian_operator(
        model, nn.CrossEntropyLoss(), ({"input_ids": ids}, ids), forward=forward, params=[name]
    )
    assert op.weight_layout(name) == "in_out"
    got = relative_flatness(op, name, method="exact")
    assert got.value == pytest.approx(want, rel=1e-10)
    assert got.shape == (32, 8)
    # the explicit layout gives the same; the other layout is a different number
    assert relative_flatness(op, name, method="exact", layout="in_out").value == got.value
    wrong = relative_flatness(op, name, method="exact", layout="out_in").value
    assert abs(wrong - want) > 0.1 * abs(want)


def test_a_weight_of_an_unknown_module_needs_its_layout_named(data):
    class Scaled(nn.Module):  # y = x @ W: nothing in the model says so
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(5, 3, dtype=F64))

        def forward(self, x):
            return x @ self.weight

    X, y = data
    torch.manual_seed(3)
    model = nn.Sequential(Scaled())
    op = spectra.hessian_operator(model, nn.CrossEntropyLoss(), (X, y))
    with pytest.raises(ValueError, match="layout='in_out' if it computes x @ W"):
        relative_flatness(op, "0.weight")
    with pytest.raises(ValueError, match="layout="):
        spectra.flatness(model, nn.CrossEntropyLoss(), (X, y), feature_layer="0.weight")
    linear = nn.Linear(5, 3, bias=False).double()
    linear.weight.data.copy_(model[0].weight.data.T)
    twin = spectra.hessian_operator(linear, nn.CrossEntropyLoss(), (X, y))
    want = reference_kappa(linear, "weight", X, y)
    assert relative_flatness(twin, "weight", method="exact").value == pytest.approx(want, rel=1e-10)
    got = relative_flatness(op, "0.weight", method="exact", layout="in_out")
    assert got.value == pytest.approx(want, rel=1e-10)
