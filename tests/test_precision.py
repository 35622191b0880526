"""Tolerances that follow the precision an operator actually has.

Lanczos's default tolerance is derived from the rounding floor of the residuals
(dtype, n, ncv and a declared ``precision``), so it converges in float32 as in
float64, and the eigenvalues it then reports are checked against dense float64
``eigvalsh`` of the same Hessian.  The symmetry probe accepts float32 rounding
inside a float64 operator and still refuses a genuinely non-symmetric one.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import spectra
from spectra.lanczos import DENSE_THRESHOLD, ConvergenceWarning
from spectra.linear_operator import CallableOperator, PrecisionWarning, check_symmetric

F64, F32 = torch.float64, torch.float32
EPS32 = torch.finfo(F32).eps


def _spectrum_matrix(lam: np.ndarray, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(lam.size, lam.size, generator=g, dtype=F64))
    A = (Q * torch.as_tensor(lam)) @ Q.T
    return 0.5 * (A + A.T)


def _random_sym(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, n, generator=g, dtype=F64)
    return 0.5 * (X + X.T)


# --- real networks: the default tolerance converges and the values are right ---------------


class _Encoder(nn.Module):
    """Linear embedding, one nn.TransformerEncoderLayer, mean pooling, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(8, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x)).mean(1))


def _mlp_case():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 4)
    ).double()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(128, 12, generator=g, dtype=F64)
    return model, X, torch.randint(0, 4, (128,), generator=g)


def _encoder_case():
    torch.manual_seed(0)
    model = _Encoder().double().eval()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(24, 5, 8, generator=g, dtype=F64)
    return model, X, torch.randint(0, 3, (24,), generator=g)


CASES = {"mlp": _mlp_case, "transformer_encoder": _encoder_case}


@pytest.fixture(scope="module", params=sorted(CASES))
def network(request):
    model, X, y = CASES[request.param]()
    loss = nn.CrossEntropyLoss()
    try:
        H64 = spectra.hessian_operator(model, loss, (X, y))
        dense = H64.to_dense()
    except RuntimeError as exc:  # e.g. an SDPA kernel without a double backward
        if "derivative" in str(exc):
            pytest.skip(f"Hessian products of {request.param} fail here: {exc}")
        raise
    exact = torch.linalg.eigvalsh(0.5 * (dense + dense.T)).numpy()
    return request.param, model, X, y, exact


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("which", ["LA", "SA"])
def test_default_tolerance_converges_and_is_right(network, dtype, which):
    name, model, X, y, exact = network
    model = copy.deepcopy(model).to(dtype)
    H = spectra.hessian_operator(model, nn.CrossEntropyLoss(), (X.to(dtype), y))
    assert H.shape[0] > DENSE_THRESHOLD  # the Krylov path
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither a ConvergenceWarning nor a PrecisionWarning
        r = spectra.lanczos(H, k=5, which=which)
    assert r.method == "krylov" and r.all_converged, (name, r)
    ref = exact[::-1][:5] if which == "LA" else exact[:5]
    err = np.abs(r.eigenvalues.numpy() - ref)
    hnorm = float(np.abs(exact).max())
    # the residuals bound the error against the float64 Hessian (eigvalsh's own error added)
    assert np.all(err <= r.residuals.numpy() + 10 * H.shape[0] * 2.2e-16 * hnorm), (err, r)
    # and a converged pair is right to its tolerance, relative to |lambda| or at the floor
    assert np.all(err <= r.tol * np.maximum(np.abs(ref), 1e-3 * hnorm)), (err / np.abs(ref), r)
    if dtype == F64:
        assert r.tol == 1e-6
    else:
        assert 1e-6 < r.tol < 1e-3  # follows float32's rounding, not float64's


def test_old_float64_default_in_float32_is_refused_before_any_product():
    """tol=1e-6 (the old default) is out of float32's reach: say so and what to do."""
    A = _spectrum_matrix(np.concatenate([np.linspace(-1, 1, 390), np.arange(6.0, 16.0)]))
    op = CallableOperator(lambda V: A.float() @ V, 400, dtype=F32)
    with pytest.raises(ValueError, match="cannot be reached") as err:
        spectra.lanczos(op, 3, tol=1e-6)
    assert op.matvecs == 0
    msg = str(err.value)
    assert "tol=None" in msg and "dtype=torch.float64" in msg


def test_tolerance_just_above_the_floor_is_accepted_and_reached():
    lam = np.concatenate([np.linspace(-1, 1, 390), np.arange(6.0, 16.0)])
    A = _spectrum_matrix(lam).float()
    n, ncv = 400, 20
    floor = (math.sqrt(n) + math.sqrt(ncv)) * EPS32  # the documented rule, no declared precision
    r = spectra.lanczos(A, 3, tol=2.05 * floor, ncv=ncv, max_matvecs=4000)
    assert r.all_converged and r.tol == pytest.approx(2.05 * floor)
    np.testing.assert_allclose(r.eigenvalues.numpy(), [15, 14, 13], rtol=2.05 * floor)
    with pytest.raises(ValueError, match="cannot be reached"):
        spectra.lanczos(A, 3, tol=1.95 * floor, ncv=ncv)


def test_near_zero_eigenvalues_converge_at_the_floor_in_float32():
    """A PSD operator with exact zeros: no relative tolerance is attainable for them, the
    absolute floor is, and the residual still bounds the (absolute) error."""
    lam = np.concatenate([np.zeros(10), np.linspace(0.5, 1.0, 380), np.arange(6.0, 16.0)])
    A = _spectrum_matrix(lam).float()
    r = spectra.lanczos(A, 3, which="SA", tol=1e-4)
    assert r.all_converged, r
    assert np.all(np.abs(r.eigenvalues.numpy()) <= r.residuals.numpy())


def test_declared_precision_raises_the_floor_and_the_default():
    A = _spectrum_matrix(np.concatenate([np.linspace(-1, 1, 390), np.arange(6.0, 16.0)]))
    plain = spectra.lanczos(CallableOperator(lambda V: A @ V, 400), 3)
    noisy = CallableOperator(lambda V: A @ V, 400, precision=1e-6)
    declared = spectra.lanczos(noisy, 3)
    assert plain.tol == 1e-6
    assert declared.tol == pytest.approx(10 * (1e-6 + math.sqrt(20) * 2.2e-16), rel=1e-3)
    assert float(declared.residuals.min()) >= 1e-6 * 14.9  # the floor is in every bar
    with pytest.raises(ValueError, match="precision=1.0e-06"):
        spectra.lanczos(noisy, 3, tol=1e-7)


def test_non_convergence_says_what_to_change():
    A = _spectrum_matrix(np.concatenate([np.linspace(-1, 1, 390), np.arange(6.0, 16.0)])).float()
    with pytest.warns(ConvergenceWarning) as rec:
        spectra.lanczos(A, 5, which="SA", max_matvecs=30, ncv=12)
    msg = str(rec[0].message)
    for what in ("max_matvecs", "ncv", "tol", "dtype=torch.float64"):
        assert what in msg, msg


# --- the symmetry probe --------------------------------------------------------------------


def _float32_inside(A: torch.Tensor, **kw) -> CallableOperator:
    """A float64 operator whose products round through float32, like LlamaRMSNorm's."""
    A32 = A.float()
    return CallableOperator(lambda V: (A32 @ V.float()).double(), A.shape[0], **kw)


def _asymmetric(A: torch.Tensor, size: float, seed: int = 5) -> torch.Tensor:
    """``A`` plus a random non-symmetric perturbation with ||E||_F = size ||A||_F."""
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(A.shape, generator=g, dtype=F64)
    return A + size * R * (A.norm() / R.norm())


def _frobenius_asymmetry(B: torch.Tensor) -> float:
    return float((B - B.T).norm() / B.norm())


@pytest.mark.parametrize("n", [300, 1500])
def test_float32_internals_of_a_float64_operator_are_accepted(n):
    A = _random_sym(n)
    op = _float32_inside(A)
    with pytest.warns(PrecisionWarning, match="float32"):
        asym = check_symmetric(op)
    # above float64's rounding level, at float32's (eps32 = 1.2e-7), far below a bug's
    assert 1e3 * 2.2e-16 < asym < 100 * EPS32
    with pytest.warns(PrecisionWarning):
        spectra.spectral_density(op, num_probes=2, num_steps=10)


@pytest.mark.parametrize("n", [300, 1500])
@pytest.mark.parametrize("size", [1e-2, 1e-1, 1.0])
def test_truly_non_symmetric_operator_is_refused(n, size):
    B = _asymmetric(_random_sym(n), size)
    assert _frobenius_asymmetry(B) >= 0.5 * size  # an independent measure of what is refused
    op = CallableOperator(lambda V: B @ V, n)
    with pytest.raises(ValueError, match="not symmetric") as err:
        spectra.lanczos(op, 2)
    msg = str(err.value)
    assert "check_symmetry=False" in msg and "precision" in msg
    assert op.matvecs == 2  # refused by the probe, before any Lanczos step


def test_declared_precision_sets_the_symmetry_tolerance():
    A = _random_sym(300)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # declared: no PrecisionWarning
        op = _float32_inside(A, precision=300**0.5 * EPS32)
        r = spectra.lanczos(op, 3)
    assert r.all_converged
    exact = np.linalg.eigvalsh(A.numpy())[::-1][:3]
    # error bars honest against the float64 matrix, although products round through float32
    assert np.all(np.abs(r.eigenvalues.numpy() - exact) <= r.residuals.numpy())
    # declaring float64 accuracy for float32 products is caught by the probe
    with pytest.raises(ValueError, match="not symmetric"):
        check_symmetric(_float32_inside(A, precision=2.2e-16))


def test_stored_float64_matrix_stays_strict():
    """A dense float64 matrix is exact: asymmetry of 1e-9 is real, not rounding."""
    B = _asymmetric(_random_sym(300), 1e-9)
    with pytest.raises(ValueError, match="not symmetric"):
        check_symmetric(spectra.as_linear_operator(B))


def test_probe_does_not_shrink_with_n():
    """The same relative asymmetry is measured alike at n = 300 and n = 3000 (the former
    measure divided by ||u|| ||v|| ~ n and let real asymmetry through at large n)."""
    got = []
    for n in (300, 3000):
        B = _asymmetric(_random_sym(n, seed=1), 1e-2)
        got.append(check_symmetric(CallableOperator(lambda V, B=B: B @ V, n), rtol=1.0))
    assert 0.1 < got[0] / got[1] < 10, got
    assert all(2e-4 < g < 5e-2 for g in got), got


def test_bad_precision_attribute_is_refused():
    with pytest.raises(ValueError, match="precision"):
        CallableOperator(lambda V: V, 5, precision=float("nan"))
    with pytest.raises(ValueError, match="precision"):
        CallableOperator(lambda V: V, 5, precision=2.0)
