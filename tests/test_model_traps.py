"""Model features on which the operators used to go silently wrong or mutate the model (an
outside probe found them), each now computed right or refused with what to do.

References: dense float64 Hessians of the loss written out in plain tensor operations.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import reference_hessian
from torch import nn
from wrong_backwards import ScaledProduct

import spectra

F64 = torch.float64


def dense(op) -> torch.Tensor:
    return op @ torch.eye(op.shape[0], dtype=op.dtype)


class SharedHead(nn.Module):
    """One module reachable under two names (``self.head2 = self.head``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(5, 5), nn.Linear(5, 3)
        self.head2 = self.head

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.head(h) + 0.5 * self.head2(h)


@pytest.mark.parametrize("backend", ["func", "autograd"])
def test_a_module_under_two_names_is_not_mutated_and_its_curvature_is_right(backend):
    """functional_call(tie_weights=True) swapped the module's slot twice and restored it
    wrongly: the model kept the operator's tensors instead of its Parameters."""
    torch.manual_seed(0)
    model = SharedHead().double().eval()
    X, y = torch.randn(7, 5, dtype=F64), torch.randint(0, 3, (7,))
    before = {name: p for name, p in model.named_parameters()}
    values = {name: p.detach().clone() for name, p in before.items()}

    theta = torch.cat([values[k].reshape(-1) for k in before])  # body.w, body.b, head.w, head.b

    def written_out(t):  # head and head2 are one module: 1.5 x its output
        h = torch.tanh(F.linear(X, t[:25].view(5, 5), t[25:30]))
        return F.cross_entropy(1.5 * F.linear(h, t[30:45].view(3, 5), t[45:48]), y)

    want = torch.autograd.functional.hessian(written_out, theta)
    for _ in range(2):  # a second operator on the same model sees the same model
        op = spectra.hessian_operator(model, nn.CrossEntropyLoss(), (X, y), backend=backend)
        assert op.shape == (48, 48)
        torch.testing.assert_close(dense(op), want, rtol=0, atol=1e-13)
    after = dict(model.named_parameters())
    assert all(after[k] is before[k] for k in before) and model.head2 is model.head
    assert all(torch.equal(after[k].detach(), values[k]) for k in before)


def test_tied_parameters_across_modules_keep_their_tie():
    """GPT-2's lm_head.weight is transformer.wte.weight: both slots get theta's tensor."""
    torch.manual_seed(1)

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.out = nn.Embedding(6, 4), nn.Linear(4, 6, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, ids):
            return self.out(torch.tanh(self.emb(ids))).transpose(1, 2)

    model = Tied().double()
    ids = torch.randint(0, 6, (3, 5))
    op = spectra.hessian_operator(model, nn.CrossEntropyLoss(), (ids, ids))
    want = reference_hessian(model, nn.CrossEntropyLoss(), ids, ids)
    assert op.shape == (24, 24)
    torch.testing.assert_close(dense(op), want, rtol=0, atol=1e-13)
    assert model.out.weight is model.emb.weight


@pytest.mark.parametrize("cls", [nn.Embedding, nn.EmbeddingBag])
def test_embeddings_that_renormalise_in_place_are_refused_before_any_work(cls):
    """max_norm rescales rows of the weight inside the forward: the operator's own copy of
    theta moved, and every product failed on an in-place view error."""
    torch.manual_seed(2)
    model = nn.Sequential(cls(10, 4, max_norm=1.0), nn.Linear(4, 2)).double()
    ids = torch.randint(0, 10, (6, 3))
    weight = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"max_norm=1.0.*0.max_norm = None"):
        spectra.hessian_operator(model, nn.CrossEntropyLoss(), (ids, torch.randint(0, 2, (6,))))
    assert torch.equal(model[0].weight.detach(), weight)


def _weight_normed(seed: int = 3):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    nn.utils.parametrizations.weight_norm(model[0])
    return model


@pytest.mark.parametrize("backend", ["auto", "autograd"])
def test_an_asymmetric_double_backward_is_refused_naming_finite_differences(backend):
    """torch's fused weight_norm kernel has a wrong double backward (the Hessian came back
    41% asymmetric, its trace 13% off, 'exact'): the one product that runs is checked for
    symmetry on first use."""
    model = _weight_normed()
    X, y = torch.randn(9, 4, dtype=F64), torch.randint(0, 3, (9,))
    op = spectra.hessian_operator(model, nn.CrossEntropyLoss(), (X, y), backend=backend)
    with pytest.raises(RuntimeError, match="not symmetric.*finite_difference"):
        op @ torch.randn(op.shape[0], dtype=F64)
    with pytest.raises(RuntimeError, match="not symmetric"):
        spectra.trace(spectra.hessian_operator(model, nn.CrossEntropyLoss(), (X, y)), seed=0)


def test_weight_norm_by_finite_differences_equals_the_written_out_hessian():
    model = _weight_normed()
    X, y = torch.randn(9, 4, dtype=F64), torch.randint(0, 3, (9,))
    names = [n for n, _ in model.named_parameters()]
    assert names == [
        "0.bias",
        "0.parametrizations.weight.original0",
        "0.parametrizations.weight.original1",
        "2.weight",
        "2.bias",
    ]
    sizes = [p.numel() for p in model.parameters()]
    shapes = [p.shape for p in model.parameters()]

    def loss(t):
        b0, g, v, w2, b2 = (p.view(s) for p, s in zip(torch.split(t, sizes), shapes, strict=True))
        w0 = g * v / v.norm(dim=1, keepdim=True)
        return F.cross_entropy(F.linear(torch.tanh(F.linear(X, w0, b0)), w2, b2), y)

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    want = torch.autograd.functional.hessian(loss, theta)
    op = spectra.hessian_operator(model, nn.CrossEntropyLoss(), (X, y), backend="finite_difference")
    torch.testing.assert_close(dense(op), want, rtol=0, atol=1e-7 * float(want.abs().max()))


def test_float32_round_off_near_an_interpolating_minimum_warns_and_sets_the_precision():
    """The symmetry check must not refuse a correct float32 model whose products are
    merely inexact (7e-3 asymmetric near a 1e-6 loss; 4e-11 in float64)."""
    torch.manual_seed(0)
    layers = [nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    X, y = torch.randn(128, 32), torch.randint(0, 10, (128,))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(200):
        opt.zero_grad()
        loss = F.cross_entropy(model(X), y)
        loss.backward()
        opt.step()
    assert float(loss) < 1e-4
    op = spectra.hessian_operator(model, nn.CrossEntropyLoss(), (X, y), backend="autograd")
    with pytest.warns(UserWarning, match="asymmetric by .* precision is taken as that"):
        top = spectra.lanczos(op, 1, seed=0)
    assert 1e-3 < op.precision < 0.1 and top.eigenvalues.shape == (1,)
    twin = spectra.hessian_operator(
        model, nn.CrossEntropyLoss(), (X, y), backend="autograd", dtype=F64
    )
    assert twin.precision < 1e-9  # the same model in float64: symmetric to round-off


def test_a_frozen_or_unselected_renormalising_embedding_is_accepted():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Flatten(), nn.Linear(12, 2))
    model = model.double()
    ids, y = torch.randint(0, 10, (6, 3)), torch.randint(0, 2, (6,))
    op = spectra.hessian_operator(model, nn.CrossEntropyLoss(), (ids, y), params=["2.weight"])
    assert op.shape == (24, 24) and torch.isfinite(dense(op)).all()


def test_mapping_inputs_and_targets_are_one_batch_and_a_graph_behind_the_data_stays_out():
    torch.manual_seed(6)
    model = nn.Linear(4, 2).double()
    X = torch.randn(5, 4, dtype=F64)
    Y = torch.randn(5, 2, dtype=F64, requires_grad=True)  # e.g. a teacher's output

    class Keyed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x)

    def loss(out, t):
        return F.mse_loss(out, t["y"])

    op = spectra.hessian_operator(Keyed(), loss, ({"x": X}, {"y": Y}))
    M = dense(op)
    assert not M.requires_grad
    want = reference_hessian(model, nn.MSELoss(), X, Y.detach())
    torch.testing.assert_close(M, want, rtol=0, atol=1e-13)


class _Bilinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return ScaledProduct.apply(self.l1(x), self.l2(x)).sum(-1, keepdim=True)


@pytest.mark.parametrize("delta", [0.01, 0.5])
def test_asymmetry_is_refused_beyond_round_off_in_float64_and_beyond_0_03_in_float32(delta):
    """In float64 anything beyond round-off is a wrong derivative; in float32 products can
    be inexact to ~1e-2 near a minimum, so a small asymmetry warns (at the caller's line)
    and becomes the precision, a large one is refused."""
    torch.manual_seed(0)
    model, data = _Bilinear(), (torch.randn(32, 4), torch.randn(32, 1))
    ScaledProduct.delta = delta
    op64 = spectra.hessian_operator(model, nn.MSELoss(), data, backend="autograd", dtype=F64)
    with pytest.raises(RuntimeError, match="not symmetric"):
        op64 @ torch.ones(op64.shape[0], dtype=F64)
    op32 = spectra.hessian_operator(model, nn.MSELoss(), data, backend="autograd")
    if delta > 0.1:
        with pytest.raises(RuntimeError, match="not symmetric"):
            _ = op32.precision
    else:
        with pytest.warns(UserWarning, match="asymmetric by") as caught:
            assert 1e-3 < op32.precision < 0.03
        assert caught[0].filename == __file__


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_a_hinge_loss_at_its_kinks_has_zero_curvature_and_is_not_refused(dtype):
    """clamp's gradient has no graph and jumps where a support vector crosses the margin:
    piecewise linear, not a fused kernel (a nearby gradient differs, but not smoothly)."""
    torch.manual_seed(0)
    X, w = torch.randn(2000, 10), torch.randn(10)
    y = torch.sign(X @ w)
    margins = y * (X @ w)
    X[:20] = X[:20] / margins[:20, None] * (1 + 1e-5 * torch.randn(20, 1))  # on the margin
    model = nn.Linear(10, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w)

    def hinge(z, t):
        return torch.clamp(1 - t * z.squeeze(-1), min=0).mean()

    for build in (spectra.hessian_operator, spectra.ggn_operator):
        op = build(model, hinge, (X, y), dtype=dtype)
        assert torch.count_nonzero(dense(op)) == 0


class _Checkpointed(nn.Module):
    """A tanh layer run through torch.utils.checkpoint, on the raw inputs or after a
    first layer (so that, with its parameters selected, a segment input requires grad)."""

    def __init__(self, reentrant: bool, after_layer: bool) -> None:
        super().__init__()
        self.first, self.inner, self.head = nn.Linear(4, 4), nn.Linear(4, 6), nn.Linear(6, 3)
        self.reentrant, self.after_layer = reentrant, after_layer

    def forward(self, x):
        x = self.first(x) if self.after_layer else x
        h = torch.utils.checkpoint.checkpoint(
            lambda t: torch.tanh(self.inner(t)), x, use_reentrant=self.reentrant
        )
        return self.head(h)


@pytest.mark.parametrize("after_layer", [False, True])
@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("backend", ["auto", "autograd"])
def test_activation_checkpointing_is_refused_before_any_product(reentrant, after_layer, backend):
    """Reentrant: the segment's parameters got no gradient when no input required grad
    (product 100% off, no error); non-reentrant: gradients away from the point were those
    of the point (34% off at a perturbed theta). Refused when the operator is built."""
    torch.manual_seed(0)
    model = _Checkpointed(reentrant, after_layer).double()
    data = (torch.randn(10, 4, dtype=F64), torch.randint(0, 3, (10,)))
    for build in (
        spectra.hessian_operator,
        spectra.ggn_operator,
        spectra.empirical_fisher_operator,
    ):
        with pytest.raises(ValueError, match="activation checkpointing"):
            build(model, nn.CrossEntropyLoss(), data, backend=backend)


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    no_dropout = dict.fromkeys(("resid_pdrop", "embd_pdrop", "attn_pdrop"), 0.0)
    cfg = GPT2Config(
        vocab_size=20, n_positions=8, n_embd=8, n_layer=2, n_head=2,
        bos_token_id=0, eos_token_id=0, **no_dropout,
    )  # fmt: skip
    torch.manual_seed(3)
    return GPT2LMHeadModel(cfg).double()


@pytest.mark.parametrize("reentrant", [True, False])
def test_hugging_face_gradient_checkpointing_is_refused_in_train_mode_only(reentrant):
    """Hugging Face checkpoints its layers only in training: with the last block and the
    final norm selected, train mode gave a product 100% off and a gradient 99.6% off
    (reentrant, its default), or a metadata error (non-reentrant). Eval mode is unaffected
    and equals the model without checkpointing."""
    model = _tiny_gpt2()
    ids = torch.randint(0, 20, (3, 6), generator=torch.Generator().manual_seed(0))

    def forward(m, x):
        return m(input_ids=x).logits.transpose(1, 2)

    params = [k for k, _ in model.named_parameters() if k.startswith(("transformer.h.1.mlp",
                                                                       "transformer.ln_f"))]  # fmt: skip
    options = dict(params=params, forward=forward)
    plain = spectra.hessian_operator(model, nn.CrossEntropyLoss(), (ids, ids), **options)
    v = torch.randn(plain.shape[0], dtype=F64, generator=torch.Generator().manual_seed(1))
    want = plain @ v
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    with pytest.raises(ValueError, match="checkpointing_disable"):
        spectra.hessian_operator(
            model, nn.CrossEntropyLoss(), (ids, ids), train_mode=True, **options
        )
    evaluated = spectra.hessian_operator(model, nn.CrossEntropyLoss(), (ids, ids), **options)
    torch.testing.assert_close(evaluated @ v, want, rtol=1e-12, atol=1e-14)


def test_warnings_of_the_first_forward_still_reach_the_user():
    """The checkpointing check records warnings during the first forward pass; the
    model's own are passed on."""

    class Chatty(nn.Linear):
        def forward(self, x):
            warnings.warn("a model's own warning", UserWarning, stacklevel=1)
            return super().forward(x)

    model = Chatty(4, 3).double()
    data = (torch.randn(6, 4, dtype=F64), torch.randint(0, 3, (6,)))
    with pytest.warns(UserWarning, match="a model's own warning"):
        spectra.hessian_operator(model, nn.CrossEntropyLoss(), data)


def _embedding_classifier(sparse: bool, padding_idx: int | None, seed: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    emb = nn.Embedding(10, 3, padding_idx=padding_idx, sparse=sparse)
    return nn.Sequential(emb, nn.Flatten(), nn.Linear(12, 2)).double()


@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("backend", ["auto", "autograd"])
def test_sparse_embeddings_have_the_curvature_of_their_dense_twin(padding_idx, backend):
    """nn.Embedding(sparse=True) only stores its gradient sparsely, and every product failed
    ('reshape is not implemented for sparse tensors'): now the same numbers as dense."""
    ids = torch.randint(0, 10, (6, 4))
    ids[0, 0] = 0  # the padding row is read
    y = torch.randint(0, 2, (6,))
    data = [(ids[:3], y[:3]), (ids[3:], y[3:])]
    sparse, twin = (
        _embedding_classifier(True, padding_idx),
        _embedding_classifier(False, padding_idx),
    )
    H = dense(spectra.hessian_operator(sparse, nn.CrossEntropyLoss(), data, backend=backend))
    reference = reference_hessian(twin, nn.CrossEntropyLoss(), ids, y)
    assert reference.abs().max() > 0.05
    assert torch.allclose(H, reference, rtol=0, atol=1e-13)
    G = dense(spectra.ggn_operator(sparse, nn.CrossEntropyLoss(), data, backend=backend))
    G_twin = dense(spectra.ggn_operator(twin, nn.CrossEntropyLoss(), data, backend=backend))
    assert torch.allclose(G, G_twin, rtol=0, atol=1e-13)
    if padding_idx is not None:  # the padding row stays a constant: its rows are zero
        assert H[:3].abs().max() == 0 and G[:3].abs().max() == 0
    assert sparse[0].sparse  # the user's model is left as it was


def test_a_sparse_embedding_bag_by_finite_differences_equals_its_dense_twin():
    """PyTorch has no second derivative of embedding_bag; finite differences of gradients
    are the offered route, and a sparse bag must give the dense bag's numbers there too."""
    ops = []
    for sparse in (True, False):
        torch.manual_seed(5)
        model = nn.Sequential(nn.EmbeddingBag(10, 3, mode="mean", sparse=sparse), nn.Linear(3, 2))
        model = model.double()
        torch.manual_seed(6)
        data = (torch.randint(0, 10, (6, 4)), torch.randint(0, 2, (6,)))
        with pytest.raises(RuntimeError, match="no second derivative.*finite_difference"):
            dense(spectra.hessian_operator(model, nn.CrossEntropyLoss(), data))
        op = spectra.hessian_operator(
            model, nn.CrossEntropyLoss(), data, backend="finite_difference"
        )
        ops.append(dense(op))
    assert ops[0].abs().max() > 0.05
    assert torch.equal(ops[0], ops[1])


def _lm_batches(shapes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
    """Hugging Face style batches of 3 sequences: (length, trailing -100 labels of rows 1-2)."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for length, ignored in shapes:
        ids = torch.randint(1, 20, (3, length), generator=g)
        labels = ids.clone()
        if ignored:
            labels[1:, -ignored:] = -100
        batches.append({"input_ids": ids, "labels": labels})
    return batches


def _causal_lm_reference(model, params: list[str], batches) -> torch.Tensor:
    """The float64 Hessian of sum CE over every batch's shifted, non-ignored labels / their
    count: the one loss the batches make, written out without the model's own loss."""
    named = dict(model.named_parameters())
    theta0 = torch.cat([named[k].detach().reshape(-1) for k in params])

    def total(theta):
        chunks = theta.split([named[k].numel() for k in params])
        values = {k: c.view(named[k].shape) for k, c in zip(params, chunks, strict=True)}
        summed, count = 0.0, 0
        for b in batches:
            logits = torch.func.functional_call(model, values, (), {"input_ids": b["input_ids"]})
            labels = b["labels"][:, 1:]
            summed = summed + F.cross_entropy(
                logits.logits[:, :-1].flatten(0, 1), labels.flatten(), reduction="sum"
            )  # ignore_index=-100 is the default
            count += int((labels != -100).sum())
        return summed / count

    model.eval()
    return torch.autograd.functional.hessian(total, theta0)


@pytest.mark.parametrize(
    "shapes, refusal",
    [([(6, 0), (6, 4)], r'inputs\["labels"\] of batch 1 hold negative labels'),
     ([(6, 0), (3, 0)], r'inputs\["labels"\] of batch 1 has \[3\] elements per sample')],
)  # fmt: skip
def test_a_model_returning_its_own_mean_loss_is_refused_until_its_labels_are_counted(
    shapes, refusal
):
    """forward=lambda m, b: m(**b).loss with (batch, None) pairs: the batches were weighted
    by samples, 27% off (ignored labels in one batch) and 31% off (another length); the
    refusal's own fix is exact (to the float32 rounding of the model's own loss)."""
    model = _tiny_gpt2()
    params = [k for k, _ in model.named_parameters()
              if k.startswith(("transformer.ln_f", "transformer.h.1.ln_2"))]  # fmt: skip
    batches = _lm_batches(shapes)
    options = dict(params=params, forward=lambda m, b: m(**b).loss, reduction="mean")
    with pytest.raises(ValueError, match=refusal + r".*loss_terms=lambda loss, labels"):
        spectra.hessian_operator(
            model, lambda loss, _: loss, [(b, None) for b in batches], **options
        )
    H = spectra.hessian_operator(
        model,
        lambda loss, labels: loss,
        [(b, b["labels"]) for b in batches],
        loss_terms=lambda loss, labels: (labels[:, 1:] != -100).sum(),
        **options,
    )
    reference = _causal_lm_reference(model, params, batches)
    assert reference.norm() > 1e-3
    assert torch.linalg.norm(dense(H) - reference) < 1e-6 * reference.norm()


class _TiedLM(nn.Module):
    def __init__(self, tie: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 4, padding_idx=0)
        self.head = nn.Linear(4, 6, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x))).flatten(0, 1)


def test_a_padding_row_tied_to_the_output_layer_warns():
    """PyTorch trains a tied padding row through the head only; the operator does the
    same, which is not the loss's Hessian where the pad token is also a real input (a
    probe: OPT, 26% off in that row), so it says so; an untied one does not warn."""
    x, y = torch.randint(0, 6, (3, 5)), torch.randint(0, 6, (15,))
    with pytest.warns(UserWarning, match=r"emb has padding_idx=0.*head\.weight"):
        spectra.hessian_operator(_TiedLM(True).double(), nn.CrossEntropyLoss(), (x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spectra.hessian_operator(_TiedLM(False).double(), nn.CrossEntropyLoss(), (x, y))
        spectra.hessian_operator(
            nn.Embedding(5, 3, padding_idx=1).double(),
            lambda out, t: out.square().mean(),
            (torch.tensor([[0, 1, 2]]), None),
            reduction="mean",
        )
