"""Curvature of real models (Hugging Face GPT-2 / BERT / ViT / Llama, nn.TransformerEncoder,
time-major LSTMs, padded embeddings) against dense float64 references.

The references never touch ``spectra``: they are ``torch.autograd.functional`` derivatives
of the loss the user wrote, over the whole data (see tests/model_cases.py):

    L(theta) = sum_b S_b(theta) / T   (mean),   L(theta) = sum_b S_b(theta)   (sum),

S_b the batch's sum-reduced loss, T the total number of counted loss terms, with every
``nn.Embedding`` padding row held constant (a ``torch.where`` onto its current value, so
its rows and columns of every curvature matrix are zero).  They are computed under
``sdpa_kernel(SDPBackend.MATH)``, the only CPU SDPA backend with a double backward.
``torch.autograd.functional.hessian(..., vectorize=True)`` agrees with the row-by-row loop
(vectorize=False) to 2e-16 relative on every case here (checked when these tests were
written); vectorize only batches the backward passes, so the faster one is used.

Float32 floors (measured, float64 models): LlamaRMSNorm casts its input to float32 and
back (its rotary cos/sin are float32 too, but those are constants), so every second
derivative through a norm carries float32 rounding: the Llama reference Hessian is
asymmetric at 1.3e-7 (||H - H^T|| / ||H||; the float64 cases: 1-4e-16), and the operators
differ from the references by up to 1.3e-7 (dense Hessian), 2.0e-7 (H v), 2.5e-7 (GGN) of
the largest entry; compared at 2e-6.  HF's causal-LM ``.loss`` (ForCausalLMLoss) computes
``logits.float()``, so GPT-2's ``.loss`` idiom is a float32 cross-entropy: 9.8e-8 measured,
compared at 1e-6.  Every float64 case: <= 7.4e-16 measured, compared at 1e-9.
"""

from __future__ import annotations

import collections
import contextlib
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_cases import BUILDERS, Case, causal_lm_forward, get_case
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import spectra

F64 = torch.float64
CASES = list(BUILDERS)


# ---------------------------------------------------------------------------------------
# independent references
# ---------------------------------------------------------------------------------------
class _Call(nn.Module):
    """``forward(model, inputs)`` as a module, so torch.func.functional_call can swap weights."""

    def __init__(self, model: nn.Module, forward) -> None:
        super().__init__()
        self.m = model
        self.fn = forward

    def forward(self, inputs):
        return self.fn(self.m, inputs)


class Reference:
    """Dense float64 curvature of a case by torch.autograd.functional (cached per case)."""

    def __init__(self, case: Case) -> None:
        self.case = case
        named = [(n, p) for n, p in case.model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.theta = torch.cat([p.detach().reshape(-1) for _, p in named])
        self.n = self.theta.numel()
        self.frozen = padding_rows(case.model)
        self.call = _Call(case.model, case.forward)
        self._cache: dict[str, torch.Tensor] = {}

    def params(self, t: torch.Tensor) -> dict[str, torch.Tensor]:
        t = torch.where(self.frozen, self.theta, t)  # padding rows are constants
        pieces = torch.split(t, self.sizes)
        return {
            f"m.{n}": p.view(s) for n, p, s in zip(self.names, pieces, self.shapes, strict=True)
        }

    def outputs(self, t: torch.Tensor, inputs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.func.functional_call(self.call, self.params(t), (inputs,))

    def loss(self, t: torch.Tensor, batches=None) -> torch.Tensor:
        """L(theta): sum of per-batch sum-losses over the case's T."""
        batches = self.case.batches if batches is None else batches
        total = sum(self.case.sum_loss(self.outputs(t, x), y) for x, y in batches)
        return total / self.case.total_count

    def hessian(self) -> torch.Tensor:
        if "H" not in self._cache:
            with sdpa_kernel(SDPBackend.MATH):
                H = torch.autograd.functional.hessian(self.loss, self.theta, vectorize=True)
            self.asymmetry = float((H - H.T).norm() / H.norm())
            self._cache["H"] = (H + H.T) / 2
        return self._cache["H"]

    def ggn(self) -> torch.Tensor:
        """sum_b J_b^T (d^2 L / d z_b^2) J_b, J_b the Jacobian of batch b's outputs z_b."""
        if "G" not in self._cache:
            T = self.case.total_count
            G = torch.zeros(self.n, self.n, dtype=F64)
            with sdpa_kernel(SDPBackend.MATH):
                for x, y in self.case.batches:
                    J = torch.autograd.functional.jacobian(
                        lambda t, x=x: self.outputs(t, x), self.theta, vectorize=True
                    )
                    z = self.outputs(self.theta, x).detach()
                    Hz = torch.autograd.functional.hessian(
                        lambda z, y=y: self.case.sum_loss(z, y) / T, z, vectorize=True
                    )
                    J = J.reshape(z.numel(), self.n)
                    G += J.T @ Hz.reshape(z.numel(), z.numel()) @ J
            self._cache["G"] = (G + G.T) / 2
        return self._cache["G"]

    def fisher(self) -> torch.Tensor:
        """c sum_i g_i g_i^T over samples (one index along batch_dim), g_i the gradient of
        sample i's sum of counted loss terms; c = 1/T (mean) or 1 (sum)."""
        if "F" not in self._cache:
            dim = self.case.batch_dim
            grads = []
            with sdpa_kernel(SDPBackend.MATH):
                for x, y in self.case.batches:
                    for i in range(y.shape[dim]):
                        xi, yi = take(x, dim, i), take(y, dim, i)
                        t = self.theta.clone().requires_grad_(True)
                        loss = self.case.sum_loss(self.outputs(t, xi), yi)
                        (g,) = torch.autograd.grad(loss, t)
                        grads.append(g)
            Gs = torch.stack(grads)
            self._cache["F"] = Gs.T @ Gs / self.case.total_count
        return self._cache["F"]


def take(obj, dim: int, i: int):
    """Sample i (kept as a batch of one) of every tensor in obj, along dim."""
    if isinstance(obj, torch.Tensor):
        return obj.narrow(dim, i, 1)
    if isinstance(obj, dict):
        return {k: take(v, dim, i) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(take(v, dim, i) for v in obj)
    return obj


def padding_rows(model: nn.Module) -> torch.Tensor:
    """(n,) bool: the entries of every nn.Embedding's padding_idx row, in the flat layout."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    offsets, start = {}, 0
    for _, p in named:
        offsets[id(p)] = start
        start += p.numel()
    mask = torch.zeros(start, dtype=torch.bool)
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            w = module.weight
            row = module.padding_idx % w.shape[0]
            begin = offsets[id(w)] + row * w.shape[1]
            mask[begin : begin + w.shape[1]] = True
    return mask


_REFS: dict[str, Reference] = {}


def reference(case: Case) -> Reference:
    if case.name not in _REFS:
        _REFS[case.name] = Reference(case)
    return _REFS[case.name]


@pytest.fixture(params=CASES)
def case(request) -> Case:
    return get_case(request.param)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Entrywise |actual - expected| <= rtol * (max|expected| + |expected|)."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30))


def block(n: int, k: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=F64)


def hessian(case: Case, data=None, **extra) -> spectra.HessianOperator:
    data = case.batches if data is None else data
    return spectra.hessian_operator(
        case.model, case.loss_fn, data, dtype=F64, **{**case.options, **extra}
    )


def per_sample_batches(case: Case) -> list:
    x, y = case.one_batch
    return [
        (take(x, case.batch_dim, i), take(y, case.batch_dim, i))
        for i in range(y.shape[case.batch_dim])
    ]


# ---------------------------------------------------------------------------------------
# the references themselves
# ---------------------------------------------------------------------------------------
def test_reference_definitions_agree(case):
    """Two independent references: the sum-of-sum-losses-over-T definition on the uneven
    batches equals the user's own loss on all data as one batch (gradient and H V)."""
    ref = reference(case)
    H = ref.hessian()
    if case.name.startswith("bow"):
        assert float(ref.theta[ref.frozen].abs().max()) == 0.0  # nn.Embedding's zero pad row
    assert ref.frozen.any() == (case.name in ("bert", "llama", "bow_padding_idx", "bow_plain_sum"))
    x, y = case.one_batch
    t = ref.theta.clone().requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):
        loss = case.loss_fn(ref.outputs(t, x), y)
        (g,) = torch.autograd.grad(loss, t, create_graph=True)
        V = block(ref.n)
        HV = torch.stack(
            [torch.autograd.grad(g, t, V[:, j], retain_graph=True)[0] for j in range(V.shape[1])], 1
        )
        g_split = torch.func.grad(ref.loss)(ref.theta)
    assert_matches(g.detach(), g_split, 1e-12)
    assert_matches(HV, H @ V, max(case.rtol, 1e-12) if case.name != "llama" else 1e-6)
    assert ref.asymmetry < (1e-6 if case.name == "llama" else 1e-14)


SDPA_CASES = ("gpt2", "bert", "vit", "llama", "encoder_batch_first", "encoder_time_major")


def test_attention_cases_run_through_sdpa(case, monkeypatch):
    """The attention models really call F.scaled_dot_product_attention (HF's default
    ``sdpa`` implementation, nn.MultiheadAttention's fused path), so the tests above
    exercise its double backward."""
    if getattr(case.model, "config", None) is not None:
        assert case.model.config._attn_implementation == "sdpa"
    calls = []
    original = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    x, y = case.batches[0]
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        case.forward(case.model, x)
    assert bool(calls) == (case.name in SDPA_CASES)


# ---------------------------------------------------------------------------------------
# Hessian
# ---------------------------------------------------------------------------------------
def test_hessian_block_product(case):
    H_ref = reference(case).hessian()
    V = block(H_ref.shape[0])
    assert_matches(hessian(case) @ V, H_ref @ V, case.rtol)


def test_float32_operator_agrees_with_float64(case):
    """The same operator computed in float32 (the default for a float32 model): within
    float32 round-off of the float64 reference, on both product paths."""
    H_ref = reference(case).hessian()
    V = block(H_ref.shape[0])
    H32 = spectra.hessian_operator(
        case.model, case.loss_fn, case.batches, dtype=torch.float32, **case.options
    )
    want = H_ref @ V
    scale = float(want.abs().max())
    for got in (H32 @ V.float(), torch.stack([H32 @ V[:, j].float() for j in range(3)], 1)):
        assert float((got.double() - want).abs().max()) <= 2e-4 * scale
    assert H32.precision >= torch.finfo(torch.float32).eps


def test_hessian_single_vector_product(case):
    H_ref = reference(case).hessian()
    v = block(H_ref.shape[0], 1, seed=2)[:, 0]
    H = hessian(case)
    assert_matches(H @ v, H_ref @ v, case.rtol)
    assert_matches(H @ v, H_ref @ v, case.rtol)  # again: a cached graph gives the same


def test_hessian_to_dense(case):
    ref = reference(case)
    dense = hessian(case).to_dense()
    assert_matches(dense, ref.hessian(), case.rtol)
    if ref.frozen.any():  # padding rows and columns are zero, not just small
        tiny = 1e-13 * float(ref.hessian().abs().max())
        assert float(dense[ref.frozen].abs().max()) <= tiny
        assert float(dense[:, ref.frozen].abs().max()) <= tiny


def test_exact_hessian_and_exact_spectrum(case):
    H_ref = reference(case).hessian()
    H = spectra.exact_hessian(case.model, case.loss_fn, case.batches, dtype=F64, **case.options)
    assert_matches(H, H_ref, case.rtol)
    s = spectra.exact_spectrum(case.model, case.loss_fn, case.batches, dtype=F64, **case.options)
    expected = torch.linalg.eigvalsh(H_ref).numpy()
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(s.eigenvalues, expected, rtol=0, atol=case.rtol * scale)
    assert s.n_params == H_ref.shape[0]


def test_hessian_is_independent_of_the_batch_split(case):
    """All data in one batch, the uneven list, and one sample per batch: same operator."""
    H_ref = reference(case).hessian()
    one = hessian(case, [case.one_batch])
    assert_matches(one.to_dense(), H_ref, case.rtol)
    V = block(H_ref.shape[0])
    assert_matches(hessian(case) @ V, one @ V, case.rtol)
    assert_matches(hessian(case, per_sample_batches(case)) @ V, H_ref @ V, case.rtol)


# ---------------------------------------------------------------------------------------
# GGN and empirical Fisher
# ---------------------------------------------------------------------------------------
def test_ggn_matches_jacobian_construction(case):
    G_ref = reference(case).ggn()
    G = spectra.ggn_operator(case.model, case.loss_fn, case.batches, dtype=F64, **case.options)
    assert_matches(G.to_dense(), G_ref, case.rtol)
    V = block(G_ref.shape[0])
    GV = G @ V
    for j in range(V.shape[1]):  # single vectors (the Lanczos path) agree with the block
        assert_matches(G @ V[:, j], GV[:, j], case.rtol)


def test_empirical_fisher_matches_per_sample_loop(case):
    F_ref = reference(case).fisher()
    Fop = spectra.empirical_fisher_operator(
        case.model, case.loss_fn, case.batches, dtype=F64, **case.options
    )
    assert_matches(Fop.to_dense(), F_ref, case.rtol)
    v = block(F_ref.shape[0], 1, seed=3)[:, 0]
    assert_matches(Fop @ v, F_ref @ v, case.rtol)


# ---------------------------------------------------------------------------------------
# matrix-free algorithms on the real operators
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["LA", "SA"])
def test_lanczos_extreme_eigenvalues(case, which):
    H_ref = reference(case).hessian()
    ev = torch.linalg.eigvalsh(H_ref)
    expected = ev.flip(0)[:3] if which == "LA" else ev[:3]
    res = spectra.lanczos(hessian(case), k=3, which=which)
    assert res.all_converged
    slack = case.rtol * float(ev.abs().max())  # the operator's own rounding
    err = (res.eigenvalues - expected).abs()
    assert bool((err <= res.residuals + slack).all()), (res, expected)


def test_spectral_density_moments(case):
    """SLQ's first two moments are Hutchinson estimates of tr(H)/n and tr(H^2)/n with the
    same probes (a Gauss rule of >= 2 nodes integrates x and x^2 exactly), so they lie within
    a few standard deviations of the true values: for Rademacher probes
    Var(z^T A z) = 2 (||A||_F^2 - sum_i A_ii^2)."""
    H_ref = reference(case).hessian()
    n = H_ref.shape[0]
    probes = 4
    s = spectra.spectral_density(hessian(case), num_probes=probes, num_steps=20)
    assert s.n_params == n
    assert math.isclose(float(s.weights.sum()), 1.0, abs_tol=1e-12)
    ev = torch.linalg.eigvalsh(H_ref).numpy()
    span = ev[-1] - ev[0]
    margin = 1e-8 * span + case.rtol * np.abs(ev).max()
    assert s.eigenvalues.min() >= ev[0] - margin  # Ritz values lie in the spectrum's hull
    assert s.eigenvalues.max() <= ev[-1] + margin
    for power, A in ((1, H_ref), (2, H_ref @ H_ref)):
        moment = float((s.weights * s.eigenvalues**power).sum())
        exact = float(A.trace()) / n
        sd = math.sqrt(2 * (float((A * A).sum()) - float((A.diagonal() ** 2).sum())) / probes) / n
        assert abs(moment - exact) <= 5 * sd + 1e-9 * abs(exact), (power, moment, exact, sd)
    assert s.trace() == pytest.approx(n * float((s.weights * s.eigenvalues).sum()))


def test_trace_estimate(case):
    H_ref = reference(case).hessian()
    est = spectra.trace(hessian(case))
    exact = float(H_ref.trace())
    assert abs(est.estimate - exact) <= 4 * est.stderr + 1e-9 * float(H_ref.abs().sum())


# ---------------------------------------------------------------------------------------
# SDPA: computed on CPU by default, the user's backend choice left as it was
# ---------------------------------------------------------------------------------------
def _sdpa_flags() -> tuple[bool, ...]:
    b = torch.backends.cuda
    return (
        b.flash_sdp_enabled(),
        b.mem_efficient_sdp_enabled(),
        b.math_sdp_enabled(),
        b.cudnn_sdp_enabled(),
    )


def _plain_sdpa_double_backward() -> None:
    q = torch.randn(1, 2, 3, 4, dtype=F64, requires_grad=True)
    out = F.scaled_dot_product_attention(q, q, q)
    (g,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    g.sum().backward()


@pytest.mark.parametrize("backend", [None, SDPBackend.FLASH_ATTENTION])
def test_sdpa_backend_choice_is_restored(backend):
    """Products work under the user's SDPA setting (default, or flash only) and leave it as
    it was: the flags are unchanged and the user's own SDPA call still runs the CPU flash
    kernel, whose double backward PyTorch does not implement."""
    case = get_case("gpt2")
    ref = reference(case)
    H_ref, G_ref = ref.hessian(), ref.ggn()
    V = block(ref.n, 2)
    outside = _sdpa_flags()
    with contextlib.ExitStack() as stack:
        if backend is not None:
            stack.enter_context(sdpa_kernel(backend))
        before = _sdpa_flags()
        H = hessian(case)
        assert_matches(H @ V[:, 0], H_ref @ V[:, 0], case.rtol)
        assert _sdpa_flags() == before
        assert_matches(H @ V, H_ref @ V, case.rtol)
        G = spectra.ggn_operator(case.model, case.loss_fn, case.batches, dtype=F64, **case.options)
        assert_matches(G @ V[:, 0], G_ref @ V[:, 0], case.rtol)
        assert _sdpa_flags() == before
        with pytest.raises(RuntimeError, match="not implemented"):
            _plain_sdpa_double_backward()
    assert _sdpa_flags() == outside


# ---------------------------------------------------------------------------------------
# the HF ``.loss`` idiom, (inputs, None) data, Mapping inputs
# ---------------------------------------------------------------------------------------
def _hf_loss_forward(m, b):
    return m(**b).loss


def _hf_loss(loss, targets):
    assert targets is None  # (inputs, None): the loss function gets None
    return loss


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_hf_loss_idiom_hessian(name):
    """``forward=lambda m, b: m(**b).loss`` with ``(inputs, None)``: the Hessian of HF's
    loss on that batch.  GPT-2's loss casts the logits with ``.float()`` (a float32 CE, 9.8e-8
    measured), so it is compared at 1e-6; BERT's stays float64."""
    case = get_case(name)
    ref = reference(case)
    x, y = case.batches[0]
    if name == "gpt2":
        batch = {**x, "labels": case.extra["raw_batches"][0]["labels"]}
        rtol = 1e-6
    else:
        batch = {**x, "labels": y}
        rtol = case.rtol
    T0 = float(case.count(y))
    with sdpa_kernel(SDPBackend.MATH):
        H_ref = torch.autograd.functional.hessian(
            lambda t: ref.loss(t, [(x, y)]) * case.total_count / T0, ref.theta, vectorize=True
        )
    H = spectra.hessian_operator(
        case.model, _hf_loss, (batch, None), dtype=F64, forward=_hf_loss_forward
    )
    V = block(ref.n)
    assert_matches(H @ V, H_ref @ V, rtol)
    assert_matches(H @ V[:, 0], H_ref @ V[:, 0], rtol)
    assert_matches(H.to_dense(), (H_ref + H_ref.T) / 2, rtol)


def test_hf_loss_idiom_ggn_is_refused_clearly():
    """The GGN needs the outputs (logits); a forward returning the loss is refused, saying so."""
    case = get_case("gpt2")
    x, _ = case.batches[0]
    batch = {**x, "labels": case.extra["raw_batches"][0]["labels"]}
    with pytest.raises(
        (TypeError, ValueError), match=r"(?is)(output|logit).*loss|loss.*(output|logit)"
    ):
        G = spectra.ggn_operator(
            case.model, _hf_loss, (batch, None), dtype=F64, forward=_hf_loss_forward
        )
        G @ torch.ones(G.shape[0], dtype=F64)


@pytest.mark.parametrize("mapping", ["BatchEncoding", "UserDict"])
def test_mapping_inputs_are_passed_as_keywords(mapping):
    """A non-dict Mapping (HF BatchEncoding, collections.UserDict) is moved/cast like a dict
    and passed as keyword arguments by the default forward (no forward= here)."""
    from transformers import BatchEncoding

    wrap = BatchEncoding if mapping == "BatchEncoding" else collections.UserDict
    for name in ("bert", "vit"):
        case = get_case(name)
        H_ref = reference(case).hessian()
        data = []
        for x, y in case.batches:  # ViT's pixels arrive as float32 and must be cast
            x = {k: v.float() if v.is_floating_point() else v for k, v in x.items()}
            data.append((wrap(x), y))

        def loss_fn(out, y):
            return F.cross_entropy(out.logits, y)

        # reduction= is given: a ModelOutput cannot be duplicated to detect a plain
        # function's reduction, and this test is about the inputs
        H = spectra.hessian_operator(case.model, loss_fn, data, dtype=F64, reduction="mean")
        V = block(H_ref.shape[0])
        # the ViT case's pixels are float32-representable, so the float64 cast is exact
        assert_matches(H @ V, H_ref @ V, case.rtol)


# ---------------------------------------------------------------------------------------
# plain-callable losses: reduction= and loss_terms=
# ---------------------------------------------------------------------------------------
def test_plain_callable_losses_on_a_causal_lm():
    case = get_case("gpt2")
    H_ref = reference(case).hessian()
    T = case.total_count
    V = block(H_ref.shape[0])
    expected_mean, expected_sum = H_ref @ V, T * (H_ref @ V)

    def op(loss_fn, **extra):
        return spectra.hessian_operator(
            case.model, loss_fn, case.batches, dtype=F64, forward=causal_lm_forward, **extra
        )

    def plain_mean(out, y):
        return F.cross_entropy(out, y)

    def plain_sum(out, y):
        return F.cross_entropy(out, y, reduction="sum")

    def terms(out, y):
        return (y != -100).sum()

    assert_matches(op(plain_mean, loss_terms=terms) @ V, expected_mean, case.rtol)
    assert_matches(op(plain_mean, reduction="mean", loss_terms=terms) @ V, expected_mean, case.rtol)
    assert_matches(op(nn.CrossEntropyLoss(reduction="sum")) @ V, expected_sum, case.rtol)
    assert_matches(op(plain_sum, reduction="sum") @ V, expected_sum, case.rtol)
    assert_matches(op(plain_sum) @ V, expected_sum, case.rtol)  # detected as a sum


# ---------------------------------------------------------------------------------------
# batch_first=False modules need an explicit batch_dim
# ---------------------------------------------------------------------------------------
class _MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2)  # batch_first=False
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.head(h).permute(0, 2, 1)


class _LSTM(nn.Module):
    def __init__(self, batch_major: bool = False) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 5)  # batch_first=False
        self.head = nn.Linear(5, 3)
        self.batch_major = batch_major

    def forward(self, x):
        if self.batch_major:  # (B, T, F) data, transposed for the time-major LSTM
            h, _ = self.lstm(x.transpose(0, 1))
            return self.head(h).permute(1, 2, 0)  # (B, C, T)
        h, _ = self.lstm(x)
        return self.head(h).permute(0, 2, 1)  # (T, C, B)


class _EncoderLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0)  # batch_first=False
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.layer(x)).permute(0, 2, 1)


@pytest.mark.parametrize(
    "factory",
    [
        spectra.hessian_operator,
        spectra.ggn_operator,
        spectra.empirical_fisher_operator,
        spectra.exact_hessian,
    ],
)
@pytest.mark.parametrize("module", [_LSTM, _MHA, _EncoderLayer])
def test_batch_first_false_without_batch_dim_is_refused(module, factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = module().to(F64).eval()
    x = torch.randn(5, 3, 4, dtype=F64)  # (T, B, F)
    y = torch.randint(0, 3, (5, 3))
    with pytest.raises(ValueError, match="batch_dim"):
        op = factory(model, nn.CrossEntropyLoss(), [(x, y), (x[:, :2], y[:, :2])], dtype=F64)
        op @ torch.ones(op.shape[0], dtype=F64)


def test_explicit_batch_dim_zero_accepts_a_batch_first_false_module():
    """A time-major LSTM fed batch-major data (the forward transposes) with batch_dim=0."""
    model = _LSTM(batch_major=True).to(F64).eval()
    gen = torch.Generator().manual_seed(4)
    x, y = (
        torch.randn(5, 4, 4, generator=gen, dtype=F64),
        torch.randint(0, 3, (5, 4), generator=gen),
    )
    y[0, 3:] = -100
    data = [(x[:3], y[:3]), (x[3:], y[3:])]
    loss = nn.CrossEntropyLoss()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(t):
        params = {
            n: p.view(s)
            for n, p, s in zip(
                names, torch.split(t, [s.numel() for s in shapes]), shapes, strict=True
            )
        }
        return loss(torch.func.functional_call(model, params, (x,)), y)

    H_ref = torch.autograd.functional.hessian(f, theta)
    H = spectra.hessian_operator(model, loss, data, dtype=F64, batch_dim=0)
    assert_matches(H.to_dense(), (H_ref + H_ref.T) / 2, 1e-9)
    Fop = spectra.empirical_fisher_operator(model, loss, data, dtype=F64, batch_dim=0)
    g = []
    for i in range(5):
        t = theta.clone().requires_grad_(True)
        params = {
            n: p.view(s)
            for n, p, s in zip(
                names, torch.split(t, [s.numel() for s in shapes]), shapes, strict=True
            )
        }
        out = torch.func.functional_call(model, params, (x[i : i + 1],))
        g.append(torch.autograd.grad(F.cross_entropy(out, y[i : i + 1], reduction="sum"), t)[0])
    Gs = torch.stack(g)
    assert_matches(Fop.to_dense(), Gs.T @ Gs / float((y != -100).sum()), 1e-9)
