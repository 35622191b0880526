"""Thick-restart Lanczos against exact spectra (dense matrices, known eigenvalues)."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from synthetic import with_eigenvalues as _sym

from spectra.lanczos import ConvergenceWarning, LanczosResult, lanczos

EPS = torch.finfo(torch.float64).eps


def _separated(n: int = 400) -> np.ndarray:
    """Five spikes at each end, a uniform bulk in between."""
    bulk = np.linspace(-1.0, 1.0, n - 10)
    return np.concatenate([-np.arange(6.0, 11.0), bulk, np.arange(6.0, 11.0)])


def _nn_like(n: int = 1000, seed: int = 0) -> np.ndarray:
    """Bulk near zero, small negatives, a few outliers up to 40 (a trained net's shape)."""
    rng = np.random.default_rng(seed)
    bulk = np.abs(rng.normal(0, 0.05, n - 15)) - 0.01
    return np.concatenate([bulk, np.geomspace(0.5, 40.0, 15)])


@pytest.fixture(scope="module")
def separated() -> tuple[torch.Tensor, np.ndarray]:
    lam = _separated()
    return _sym(lam), np.sort(lam)


def _check_bounds(A: torch.Tensor, r: LanczosResult, exact: np.ndarray) -> None:
    """True residuals and eigenvalue errors are within the reported residuals."""
    A64 = A.to(torch.float64)
    Y = r.eigenvectors.to(torch.float64)
    th = r.eigenvalues
    scale = float(torch.linalg.matrix_norm(A64, 2))
    slack = 10 * math.sqrt(A.shape[0]) * EPS * scale  # rounding of this check's own matvec
    true = torch.linalg.vector_norm(A64 @ Y - Y * th, dim=0)
    assert torch.all(true <= r.residuals * (1 + 1e-6) + slack), (true, r.residuals)
    nearest = np.abs(exact[None, :] - th.numpy()[:, None]).min(axis=1)
    assert np.all(nearest <= r.residuals.numpy() + slack)


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_extremes_match_eigvalsh(separated, which):
    A, exact = separated
    r = lanczos(A, 5, which=which, seed=1)
    assert r.method == "krylov" and r.all_converged
    want = exact[::-1][:5] if which == "LA" else exact[:5]
    np.testing.assert_allclose(r.eigenvalues.numpy(), want, rtol=1e-8)
    _check_bounds(A, r, exact)


def test_which_aliases_and_order(separated):
    A, exact = separated
    lm = lanczos(A, 4, which="magnitude")
    assert lm.which == "LM"
    np.testing.assert_allclose(np.abs(lm.eigenvalues.numpy()), [10, 10, 9, 9], rtol=1e-8)
    be = lanczos(A, 5, which="both")
    assert be.which == "BE"
    np.testing.assert_allclose(be.eigenvalues.numpy(), [-10, -9, 8, 9, 10], rtol=1e-8)
    assert lanczos(A, 2, which="smallest").which == "SA"
    assert lanczos(A, 2, which="largest").which == "LA"
    with pytest.raises(ValueError, match="which"):
        lanczos(A, 2, which="XX")


def test_nn_like_top5_cheap_and_bounded():
    lam = _nn_like()
    A = _sym(lam, seed=3)
    r = lanczos(A, 5)
    exact = np.sort(lam)
    np.testing.assert_allclose(r.eigenvalues.numpy(), exact[::-1][:5], rtol=1e-8)
    assert r.matvecs <= 40  # full reorthogonalisation: ~25 steps for well-separated outliers
    _check_bounds(A, r, exact)


def test_repeated_top_eigenvalue_found_via_breakdown():
    lam = np.concatenate([[10.0] * 3, [5.0] * 3, np.ones(294)])
    A = _sym(lam, seed=2)
    r = lanczos(A, 3, dense=False)
    np.testing.assert_allclose(r.eigenvalues.numpy(), [10, 10, 10], rtol=1e-10)
    assert r.all_converged
    Y = r.eigenvectors
    np.testing.assert_allclose((Y.T @ Y).numpy(), np.eye(3), atol=1e-10)


def test_breakdown_returns_exact_answer():
    lam = np.repeat([0.0, 1.0, 2.0, 3.0], 100)
    A = torch.diag(torch.as_tensor(lam))
    r = lanczos(A, 2, dense=False)
    np.testing.assert_allclose(r.eigenvalues.numpy(), [3, 3], atol=1e-12)
    assert r.all_converged and r.matvecs < 20


@pytest.mark.parametrize("dense", [False, True])
def test_zero_matrix(dense):
    A = torch.zeros(300, 300, dtype=torch.float64)
    r = lanczos(A, 3, which="SA", dense=dense)
    assert torch.all(r.eigenvalues == 0) and r.all_converged
    assert torch.all(r.residuals == 0)


def test_one_by_one_and_k_equals_n():
    r = lanczos(torch.tensor([[3.0]], dtype=torch.float64), 1)
    assert r.eigenvalues.tolist() == [3.0] and r.all_converged and r.method == "dense"
    lam = np.array([4.0, -1.0, 2.0, 0.5])
    r = lanczos(_sym(lam), 4, which="SA")
    np.testing.assert_allclose(r.eigenvalues.numpy(), np.sort(lam), rtol=1e-12)
    with pytest.raises(ValueError, match="k=5"):
        lanczos(_sym(lam), 5)


def test_dense_path_small_n():
    lam = np.linspace(-3, 7, 60)
    A = _sym(lam)
    r = lanczos(A, 3)
    assert r.method == "dense" and r.matvecs == 60 + 2
    np.testing.assert_allclose(r.eigenvalues.numpy(), [7, lam[-2], lam[-3]], rtol=1e-12)
    _check_bounds(A, r, lam)


def test_operator_kinds(separated):
    A, exact = separated
    n = A.shape[0]
    calls = []

    def fn(V: torch.Tensor) -> torch.Tensor:
        calls.append(V.shape)
        return A @ V

    r1 = lanczos(fn, 3, n=n)
    sp = scipy.sparse.linalg.aslinearoperator(A.numpy())
    r2 = lanczos(sp, 3)
    r3 = lanczos(A.numpy(), 3)
    for r in (r1, r2, r3):
        np.testing.assert_allclose(r.eigenvalues.numpy(), [10, 9, 8], rtol=1e-8)
    assert len(calls) == r1.matvecs - 1  # the symmetry probe is one (n, 2) block


def test_float32_operator(separated):
    A, exact = separated
    r = lanczos(A.to(torch.float32), 3, tol=1e-4)
    assert r.eigenvectors.dtype == torch.float32 and r.eigenvalues.dtype == torch.float64
    assert r.all_converged
    np.testing.assert_allclose(r.eigenvalues.numpy(), [10, 9, 8], rtol=1e-5)


def test_deterministic_given_seed(separated):
    A, _ = separated
    a, b = lanczos(A, 3, seed=7), lanczos(A, 3, seed=7)
    assert torch.equal(a.eigenvalues, b.eigenvalues) and torch.equal(a.eigenvectors, b.eigenvectors)
    assert a.matvecs == b.matvecs


def test_budget_exhausted_warns_not_raises(separated):
    A, _ = separated
    with pytest.warns(ConvergenceWarning, match="converged"):
        r = lanczos(A, 5, which="SA", max_matvecs=10, ncv=12)
    assert not r.all_converged and r.matvecs <= 10 and r.eigenvalues.shape == (5,)


def test_result_frozen_and_repr(separated):
    A, _ = separated
    r = lanczos(A, 2, return_eigenvectors=False)
    assert r.eigenvectors is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.matvecs = 0
    text = repr(r)
    assert "LanczosResult" in text and "converged=2/2" in text


# --- bad input ---------------------------------------------------------------------


def test_non_symmetric_raises():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(300, 300, generator=g, dtype=torch.float64)
    with pytest.raises(ValueError, match="not symmetric"):
        lanczos(A, 2)


@pytest.mark.parametrize("tol", [0.0, -1e-6, float("nan")])
def test_bad_tol(separated, tol):
    with pytest.raises(ValueError, match="tol"):
        lanczos(separated[0], 2, tol=tol)


@pytest.mark.parametrize("k", [0, -1, 2.5])
def test_bad_k(separated, k):
    with pytest.raises(ValueError, match="k"):
        lanczos(separated[0], k)


def test_nan_matvec_names_iteration(separated):
    A, _ = separated
    count = [0]

    def fn(V: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        W = A @ V
        return W * float("nan") if count[0] > 5 else W

    with pytest.raises(FloatingPointError, match="iteration 5"):
        lanczos(fn, 3, n=A.shape[0], check_symmetry=False)


def test_bad_start_vector(separated):
    A, _ = separated
    n = A.shape[0]
    with pytest.raises(TypeError, match="dtype"):
        lanczos(A, 2, v0=torch.ones(n, dtype=torch.float32))
    with pytest.raises(ValueError, match="device"):
        lanczos(A, 2, v0=torch.ones(n, dtype=torch.float64, device="meta"))
    with pytest.raises(ValueError, match="shape"):
        lanczos(A, 2, v0=torch.ones(n + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="nonzero"):
        lanczos(A, 2, v0=torch.zeros(n, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = lanczos(A, 2, v0=torch.ones(n, dtype=torch.float64))
    np.testing.assert_allclose(r.eigenvalues.numpy(), [10, 9], rtol=1e-8)


@pytest.mark.parametrize("budget", [14, 15, 16, 23])
def test_unconverged_residuals_still_bound_error(separated, budget):
    """Stopping at, just after, and between restarts: the error bars stay honest."""
    A, exact = separated
    with pytest.warns(ConvergenceWarning):
        r = lanczos(A, 5, which="SA", max_matvecs=budget, ncv=12, seed=3)
    assert r.matvecs <= budget and r.eigenvalues.shape == (5,)
    _check_bounds(A, r, exact)
