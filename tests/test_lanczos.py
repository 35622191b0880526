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
    # full reorthogonalisation: ~25 steps for well-separated outliers, then the
    # verification cycle (ncv - k = 15) and the measured residuals (k = 5)
    assert r.matvecs <= 60
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
    assert r.all_converged and r.matvecs < 40  # 4-step blocks, a verification cycle


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
    # the symmetry probe is one (n, 2) block, the measured residuals one (n, 3) block
    assert len(calls) == r1.matvecs - 1 - 2


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
        r = lanczos(A, 5, which="SA", max_matvecs=15, ncv=12)
    assert not r.all_converged and r.matvecs <= 15 and r.eigenvalues.shape == (5,)


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


def test_no_default_tolerance_for_an_operator_inexact_by_percents(separated):
    """An operator whose declared precision is ~1e-2 (two product paths that disagreed
    that much: a float32 net at an interpolating minimum gave 0.12) got a default tol
    of 10x that, above 1, so every pair was "converged" (a probe: an eigenvalue 12% off
    flagged converged).  The default is refused; an explicit tol below 1 is honoured."""
    from spectra.linear_operator import DenseOperator

    A, exact = separated
    op = DenseOperator(A)
    op.precision = 0.05
    with pytest.raises(ValueError, match="accurate to only.*explicit tol"):
        lanczos(op, 2)
    r = lanczos(op, 2, tol=0.5)
    assert np.all(np.abs(r.eigenvalues.numpy() - exact[::-1][:2]) <= r.residuals.numpy())
    op.precision = 1e-4  # a default of ~1e-3 is still meaningful: no refusal
    assert bool(lanczos(op, 2).converged.all())


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


@pytest.mark.parametrize("budget", [19, 20, 21, 28])  # 5 of each measure the residuals
def test_unconverged_residuals_still_bound_error(separated, budget):
    """Stopping at, just after, and between restarts: the error bars stay honest."""
    A, exact = separated
    with pytest.warns(ConvergenceWarning):
        r = lanczos(A, 5, which="SA", max_matvecs=budget, ncv=12, seed=3)
    assert r.matvecs <= budget and r.eigenvalues.shape == (5,)
    _check_bounds(A, r, exact)


# --- found by an outside probe ------------------------------------------------------
def _with_spectrum(lam: np.ndarray, rng: np.random.Generator, dtype=torch.float64):
    q, _ = np.linalg.qr(rng.standard_normal((lam.size, lam.size)))
    A = torch.tensor((q * lam) @ q.T, dtype=dtype)
    return 0.5 * (A + A.T)


def test_repeated_top_eigenvalues_are_all_found():
    """A single Krylov space holds one direction per eigenspace: before, [10, 9] came back
    'converged' for a double 10 (and 5 of a 6-fold cluster).  The verification restart
    from a random vector finds the copies."""
    rng = np.random.default_rng(1)
    n = 600
    A = _with_spectrum(np.r_[10.0, 10.0, 9.0, 9.0, rng.uniform(-1, 1, n - 4)], rng)
    r = lanczos(A, 2, which="LA")
    np.testing.assert_allclose(r.eigenvalues.numpy(), [10, 10], atol=1e-6)
    assert r.all_converged
    A = _with_spectrum(np.r_[10 + 1e-9 * np.arange(6), rng.normal(0, 1, n - 6)], rng)
    r = lanczos(A, 6)
    np.testing.assert_allclose(r.eigenvalues.numpy(), [10] * 6, atol=1e-6)


def test_a_null_space_is_found_for_smallest_eigenvalues_and_flags_are_measured():
    """Least squares with more parameters than samples: 100 zero eigenvalues.  Before, SA
    returned [0, 0, 0.126, 0.133, 0.136] all 'converged'."""
    X = torch.tensor(np.random.default_rng(17).standard_normal((200, 300)))
    H = (2.0 / 200) * (X.T @ X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        r = lanczos(H, 5, which="SA", dense=False)
    assert np.abs(r.eigenvalues.numpy()).max() < 1e-12
    # every reported residual is the measured ||A y - theta y|| (plus the floor)
    Y = r.eigenvectors
    measured = torch.linalg.vector_norm(H @ Y - Y * r.eigenvalues, dim=0)
    assert torch.all(r.residuals >= measured)


def test_float32_residuals_bound_the_errors_where_breakdowns_drop_couplings():
    """A float32 bulk near 1e-6 sits below the breakdown tolerance: dropped couplings made
    the estimated residuals 7-22x too small and flagged wrong values converged."""
    rng = np.random.default_rng(101)
    n = 700
    lam = np.r_[rng.normal(0, 1e-6, n - 10), 10 ** rng.uniform(-3, 2, 10)]
    A = _with_spectrum(lam, np.random.default_rng(1), dtype=torch.float32)
    exact = np.linalg.eigvalsh(A.double().numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        r = lanczos(A, 11, seed=1)
    V = r.eigenvectors.double()
    measured = torch.linalg.vector_norm(A.double() @ V - V * r.eigenvalues, dim=0)
    for theta, res, true in zip(r.eigenvalues.numpy(), r.residuals.numpy(), measured, strict=True):
        assert np.abs(exact - theta).min() <= res, (theta, res)
        assert float(true) <= res * (1 + 1e-3), (theta, res, float(true))


def test_low_rank_operators_stop_when_converged():
    """Rank 20 of 1,000: every vector past the range breaks down at once; the run used to
    spend the whole budget (1,000 matvecs) for an answer it had after ~22."""
    rng = np.random.default_rng(3)
    lam = np.zeros(1000)
    lam[:20] = rng.uniform(1, 10, 20)
    r = lanczos(_with_spectrum(lam, rng), 10)
    assert r.all_converged and r.matvecs < 100, r.matvecs
    np.testing.assert_allclose(r.eigenvalues.numpy(), np.sort(lam)[::-1][:10], rtol=1e-10)
    r = lanczos(3 * torch.eye(1000, dtype=torch.float64), 5)
    assert r.all_converged and r.matvecs < 50, r.matvecs


def test_the_krylov_path_refuses_a_basis_no_larger_than_k():
    A = torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="dense=True"):
        lanczos(A, 1, dense=False)
    assert float(lanczos(A, 1).eigenvalues[0]) == pytest.approx(3.0)


def test_a_callable_returning_numpy_or_float32_is_taken_and_cast():
    A = torch.diag(torch.arange(1.0, 301.0, dtype=torch.float64))
    r = lanczos(lambda v: (A @ v).numpy(), 2, n=300, dense=False)
    np.testing.assert_allclose(r.eigenvalues.numpy(), [300, 299], rtol=1e-10)
    with pytest.raises(TypeError, match="must be floats"):
        lanczos(lambda v: torch.ones_like(v, dtype=torch.int64), 2, n=300, dense=False)


def test_a_small_spare_basis_stops_once_its_values_verify():
    """ncv = k + 3 (what a tight memory_budget gives): the values drift between checks
    by more than their floor-level residual estimates, far less than the tolerance;
    comparing with the estimates alone re-verified until max_matvecs (4,958 of 5,000)."""
    rng = np.random.default_rng(0)
    lam = np.concatenate([rng.normal(0, 1, 990), np.linspace(5, 6, 10)])
    A = _sym(lam)
    r = lanczos(A, 50, which="LA", ncv=53, seed=0)
    assert r.all_converged and r.matvecs < 2000, r.matvecs
    np.testing.assert_allclose(r.eigenvalues.numpy(), np.sort(lam)[::-1][:50], rtol=1e-6)
    _check_bounds(A, r, np.sort(lam))


def test_an_explicit_budget_below_n_is_kept_on_a_small_operator(separated):
    """n = 400 <= 2 ncv picks the dense solve, n products: with max_matvecs=150 it took
    402 (and 152 of 20 at n = 150) without a word."""
    A, exact = separated
    r = lanczos(A, 5, which="LA", max_matvecs=150, ncv=200, seed=0)
    assert r.method == "krylov" and r.matvecs <= 150
    _check_bounds(A, r, exact)
    assert lanczos(A, 5, which="LA", ncv=250, seed=0).method == "dense"  # no budget given
    with pytest.raises(ValueError, match="max_matvecs=150"):
        lanczos(A, 5, which="LA", max_matvecs=150, dense=True, seed=0)
