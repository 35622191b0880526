"""The plotting API: figures are made with the paper's layout, from any kind of spectrum."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

import spectra


def fake(seed: int, n: int = 5000) -> spectra.Spectrum:
    rng = np.random.default_rng(seed)
    bulk = rng.normal(0, 2e-5, int(n * 0.94))
    pos = rng.exponential(2.0, n - bulk.size - 20)
    neg = -rng.exponential(0.1, 20)
    return spectra.Spectrum.from_eigenvalues(np.concatenate([bulk, pos, neg]), name=f"run {seed}")


def test_spectrum_plot_has_center_and_two_insets(tmp_path):
    runs = [fake(1), fake(2)]
    fig = spectra.plot.spectrum(runs, near_zero_tol=1e-4, title="test")
    assert isinstance(fig, Figure)
    center, neg, pos = fig.axes
    assert center.get_yscale() == "log" and neg.get_yscale() == "log"
    assert "negative" in neg.get_title() and "positive" in pos.get_title()
    # the near-zero peak is clipped and its fraction annotated
    texts = [t.get_text() for t in center.texts]
    assert any("peak clipped" in t and "%" in t for t in texts)
    labels = [t.get_text() for t in center.get_legend().get_texts()]
    assert labels[0].startswith("run 1") and len(labels) == 2
    # the tails cover the whole range of eigenvalues
    lo, hi = pos.get_xlim()
    assert hi >= max(r.eigenvalues[-1] for r in runs) * 0.99
    fig.savefig(tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 10_000


def test_signed_panels_and_density_accept_quadrature_and_diagonal():
    diag = spectra.Spectrum.from_diagonal(np.r_[np.zeros(100), [-1e-3, 2e-2, 5e-1]])
    quad = spectra.Spectrum.from_quadrature([-0.1, 0.0, 3.0], [0.1, 0.8, 0.1], n_params=1000)
    fig = spectra.plot.signed_panels([diag], near_zero_tol=1e-5)
    assert len(fig.axes) == 2 and fig.axes[0].get_xscale() == "log"
    assert any("97.1%" in t.get_text() for t in fig.axes[0].texts)
    fig2 = spectra.plot.density([quad, spectra.Spectrum.from_eigenvalues([0.0, 1.0])])
    assert len(fig2.axes[0].lines) == 2


def test_plot_rejects_bad_input():
    with pytest.raises(TypeError, match="Spectrum"):
        spectra.plot.spectrum([])
    with pytest.raises(ValueError, match="labels"):
        spectra.plot.spectrum([fake(1)], labels=["a", "b"])


def test_density_axis_follows_the_density_not_its_floor_and_bad_tolerances_are_refused():
    """Gaps in the density (floored at 1e-300 for the log axis) made autoscaling run the
    y axis up to ~1e15 with a peak of 0.32."""
    s = spectra.Spectrum.from_eigenvalues(np.array([0.0, 1.0, 100.0]))
    lo, hi = spectra.plot.density(s).axes[0].get_ylim()
    peak = s.density(np.linspace(-5.0, 105.0, 2000)).max()
    assert peak <= hi <= 2.5 * peak and 1e-9 * peak <= lo <= 1e-6 * peak
    for tol in (0.0, -1e-4, float("nan")):
        with pytest.raises(ValueError, match="near_zero_tol must be a finite number > 0"):
            spectra.plot.signed_panels(s, near_zero_tol=tol)
