"""Stochastic Lanczos quadrature against exact spectra."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance
from synthetic import with_eigenvalues as _sym

from spectra.density import spectral_density
from spectra.spectrum import Spectrum, default_sigma


@pytest.fixture(scope="module")
def nn_like() -> tuple[torch.Tensor, np.ndarray]:
    """A network-like spectrum: bulk near zero, small negatives, outliers up to 40.

    n = 2000: with 10 probes the W1 error is dominated by the probe noise in the
    outliers' weights, ~ sqrt(2 / num_probes) / n x sum |outliers|; at n = 1000
    it sits at the 1e-3 x range bound (seeds give 0.45-1.8e-3), at n = 2000 at
    0.2-0.5e-3, and a network with 1e4+ parameters is further below.
    """
    rng = np.random.default_rng(0)
    n = 2000
    lam = np.concatenate([np.abs(rng.normal(0, 0.05, n - 15)) - 0.01, np.geomspace(0.5, 40, 15)])
    return _sym(lam, seed=1), lam


def test_wasserstein_and_normalisation(nn_like):
    A, lam = nn_like
    s = spectral_density(A, num_probes=10, num_steps=100, seed=0)
    assert isinstance(s, Spectrum) and s.kind == "quadrature" and s.n_params == 2000
    span = lam.max() - lam.min()
    w1 = wasserstein_distance(s.eigenvalues, lam, u_weights=s.weights)
    assert w1 <= 1e-3 * span, w1 / span
    grid = np.linspace(lam.min() - 2, lam.max() + 2, 40001)
    assert abs(np.trapezoid(s.density(grid), grid) - 1) < 1e-6
    assert abs(s.weights.sum() - 1) < 1e-12
    # outliers are resolved to many digits; the trace is a 10-probe Hutchinson
    # estimate, within 3 of its standard deviations sqrt(2 / 10) ||A||_F
    assert abs(s.eigenvalues.max() - 40) < 1e-8
    assert abs(s.trace() - lam.sum()) < 3 * np.sqrt(2 / 10) * np.linalg.norm(lam)


def test_info_and_sigma_rule(nn_like):
    A, _ = nn_like
    s = spectral_density(A, num_probes=3, num_steps=20, seed=5)
    info = s.info
    assert info["num_probes"] == 3 and info["num_steps"] == 20 and info["seed"] == 5
    assert info["matvecs"] == 3 * 20 + 2
    assert info["sigma"] == default_sigma(s.eigenvalues) and "200" in info["sigma_rule"]
    assert s.density_sigma() == info["sigma"]
    assert s.eigenvalues.size == 60
    counts, _ = s.histogram(bins=20)
    assert abs(counts.sum() - 2000) < 1e-6
    assert s.summary()["kind"] == "quadrature"


def test_deterministic_given_seed(nn_like):
    A, _ = nn_like
    a = spectral_density(A, num_probes=2, num_steps=15, seed=3)
    b = spectral_density(A, num_probes=2, num_steps=15, seed=3)
    c = spectral_density(A, num_probes=2, num_steps=15, seed=4)
    assert np.array_equal(a.eigenvalues, b.eigenvalues) and np.array_equal(a.weights, b.weights)
    assert not np.array_equal(a.weights, c.weights)


def test_block_matvec_one_call_per_step(nn_like):
    A, _ = nn_like
    shapes = []

    def fn(V: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(V.shape))
        return A @ V

    spectral_density(fn, n=2000, num_probes=4, num_steps=10, check_symmetry=False)
    assert shapes == [(2000, 4)] * 10


def test_early_breakdown_is_exact():
    lam = np.repeat([-1.0, 0.0, 2.0, 5.0], 75)
    A = _sym(lam, seed=2)
    s = spectral_density(A, num_probes=4, num_steps=50)
    assert max(s.info["steps_per_probe"]) <= 4
    assert s.info["matvecs"] == 2 + 4 * 4
    assert s.eigenvalues.size == 16
    np.testing.assert_allclose(np.unique(np.round(s.eigenvalues, 8)), [-1, 0, 2, 5], atol=1e-8)
    # Rademacher probe weights estimate the 1/4 mass of each value
    for value in (-1.0, 0.0, 2.0, 5.0):
        mass = s.weights[np.abs(s.eigenvalues - value) < 1e-6].sum()
        assert abs(mass - 0.25) < 0.1


def test_fraction_near_zero_from_quadrature():
    """Low-rank PSD matrix: 3/4 of the eigenvalues are exactly zero."""
    rng = np.random.default_rng(1)
    lam = np.concatenate([np.zeros(300), rng.uniform(1, 10, 100)])
    A = _sym(lam, seed=3)
    s = spectral_density(A, num_probes=10, num_steps=150)
    assert abs(s.fraction_near_zero(1e-8) - 0.75) < 0.03
    assert s.weights[s.eigenvalues < -1e-8].sum() < 1e-12


def test_zero_matrix_and_one_by_one():
    s = spectral_density(torch.zeros(50, 50, dtype=torch.float64), num_probes=3)
    assert np.all(s.eigenvalues == 0) and s.fraction_near_zero(0.0) == 1.0
    assert s.info["steps_per_probe"] == [1, 1, 1]
    s1 = spectral_density(torch.tensor([[2.5]], dtype=torch.float64))
    np.testing.assert_allclose(s1.eigenvalues, 2.5)
    assert s1.info["steps_per_probe"] == [1] * 10


def test_float32_operator(nn_like):
    A, lam = nn_like
    s = spectral_density(A.to(torch.float32), num_probes=4, num_steps=40)
    assert s.dtype == "float32"
    assert abs(s.eigenvalues.max() - 40) < 1e-3


# --- bad input ---------------------------------------------------------------------


def test_memory_guard_names_bytes(nn_like):
    """A fixed scheme whose one probe does not fit is refused; "auto" (the default) would
    fall back to a cheaper one instead (tests/test_bounded_memory.py)."""
    A, _ = nn_like
    with pytest.raises(MemoryError, match="GiB.*num_steps"):
        spectral_density(
            A, num_probes=10, num_steps=100, max_basis_bytes=10**6, reorthogonalization="full"
        )


def test_non_symmetric_raises():
    A = torch.randn(100, 100, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(ValueError, match="not symmetric"):
        spectral_density(A)


def test_nan_names_iteration(nn_like):
    A, _ = nn_like
    count = [0]

    def fn(V: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        return A @ V * (float("nan") if count[0] > 3 else 1.0)

    with pytest.raises(FloatingPointError, match="iteration 3"):
        spectral_density(fn, n=2000, num_probes=2, num_steps=10, check_symmetry=False)


@pytest.mark.parametrize("kw", [{"num_probes": 0}, {"num_steps": 0}, {"num_steps": 2.5}])
def test_bad_counts(nn_like, kw):
    with pytest.raises(ValueError):
        spectral_density(nn_like[0], **kw)


@pytest.mark.parametrize(
    "values, sigma",
    [([0.0, 0.0, 1e-310], 1e-3), ([1e-300, 3e-300, 5e-300], 2e-302), ([0.0, 0.0], 1e-3)],
)
def test_density_of_a_vanishing_range_is_finite_and_normalised(values, sigma):
    """A range whose 1/200 is subnormal would make the density's peak overflow to inf."""
    s = Spectrum.from_eigenvalues(np.array(values))
    assert s.density_sigma() == pytest.approx(sigma, rel=1e-12)
    grid = np.linspace(-8 * sigma, 8 * sigma + max(values), 4001)
    rho = s.density(grid)
    assert np.isfinite(rho).all()
    assert np.trapezoid(rho, grid) == pytest.approx(1.0, abs=1e-6)


def _lanczos_rule(A: np.ndarray, v: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """m steps of Lanczos with full reorthogonalisation (twice): Ritz values, weights."""
    Q = np.zeros((len(v), m))
    alpha, beta = np.zeros(m), np.zeros(m)
    q = v / np.linalg.norm(v)
    for j in range(m):
        Q[:, j] = q
        w = A @ q
        alpha[j] = q @ w
        for _ in range(2):
            w -= Q[:, : j + 1] @ (Q[:, : j + 1].T @ w)
        beta[j] = np.linalg.norm(w)
        q = w / beta[j]
    T = np.diag(alpha) + np.diag(beta[:-1], 1) + np.diag(beta[:-1], -1)
    theta, U = np.linalg.eigh(T)
    return theta, U[0] ** 2


def test_gauss_mass_bounds_hold_for_every_interval_and_probe():
    """Chebyshev-Markov-Stieltjes: each probe's exact spectral mass in [lo, hi] lies within
    the bounds read off its m-point rule (nodes inside, +- the neighbours / outermost)."""
    from spectra.density import gauss_mass_bounds

    rng = np.random.default_rng(0)
    n, widths = 200, []
    for _ in range(40):
        lam = np.concatenate(
            [rng.normal(0, 1e-3, 100), rng.exponential(1, 90), -rng.exponential(0.1, 10)]
        )
        Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
        v = rng.choice([-1.0, 1.0], n)
        mass = (Q.T @ v) ** 2 / n  # the probe's weight on each eigenvalue
        theta, w = _lanczos_rule((Q * lam) @ Q.T, v, int(rng.integers(4, 50)))
        intervals = [tuple(sorted(rng.uniform(-0.5, 2, 2))) for _ in range(10)]
        intervals += [(-t, t) for t in (1e-4, 1e-3, 1e-2, 1e-1)]
        for lo, hi in intervals:
            truth = mass[(lam >= lo) & (lam <= hi)].sum()
            lower, upper = gauss_mass_bounds(theta, w, lo, hi)
            assert lower - 1e-12 <= truth <= upper + 1e-12
            assert lower <= w[(theta >= lo) & (theta <= hi)].sum() <= upper
            widths.append(upper - lower)
    assert 0 < np.mean(widths) < 0.5  # informative, not the trivial [0, 1]
    # no node inside: at most the two neighbours' weight; three inside: the middle one's
    theta = np.array([-1.0, 0.0, 2.0])
    assert gauss_mass_bounds(theta, np.full(3, 1 / 3), 0.5, 1.5) == (0.0, pytest.approx(2 / 3))
    assert gauss_mass_bounds(theta, np.full(3, 1 / 3), -1, 2) == (pytest.approx(1 / 3), 1.0)
    with pytest.raises(ValueError, match="lo <= hi"):
        gauss_mass_bounds(theta, np.full(3, 1 / 3), 1.0, 0.0)


def test_float32_normalised_weights_are_accepted_and_made_exact_and_bad_metadata_refused():
    w = np.random.default_rng(0).random(1000).astype(np.float32)
    w = w / w.sum()  # normalised in float32: the float64 sum is 1 +- ~1e-8
    s = Spectrum.from_quadrature(np.arange(1000.0), w, n_params=5000)
    assert abs(s.weights.sum() - 1.0) < 1e-12
    with pytest.raises(ValueError, match="within 1e-6.*divide them by their sum"):
        Spectrum.from_quadrature(np.arange(3.0), np.array([0.5, 0.5, 0.1]), n_params=3)
    with pytest.raises(TypeError, match="info must be a dict"):
        Spectrum.from_eigenvalues(np.arange(3.0), info=[1])
    with pytest.raises(TypeError, match="loss must be a number"):
        Spectrum.from_eigenvalues(np.arange(3.0), loss="abc")
