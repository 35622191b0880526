"""Laplace local entropy against closed forms and quadrature; the flatness comparison
(figures.compare over spectra.compare_minima) and its per-optimizer budget."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import integrate

from figures.compare import CompareConfig, compare
from figures.harness import train
from spectra import FlatnessReport, Spectrum, laplace_local_entropy, laplace_table


def _log_integral_1d(f0: float, lam: float, gamma: float) -> float:
    """log int exp(-f(x') - gamma/2 x'^2) dx' for f = f0 + lam/2 x'^2, at x = x* = 0."""
    value, _ = integrate.quad(
        lambda t: math.exp(-f0 - 0.5 * (lam + gamma) * t * t),
        -np.inf,
        np.inf,
        epsabs=0,
        epsrel=1e-12,
    )
    return math.log(value)


@pytest.mark.parametrize("lam", [0.0, 0.3, 5.0, -0.05])
@pytest.mark.parametrize("gamma", [0.1, 1.0])
def test_laplace_equals_1d_quadrature(lam, gamma):
    le = laplace_local_entropy([lam], gamma, loss=0.7)
    assert le.excluded == 0
    assert le.total == pytest.approx(_log_integral_1d(0.7, lam, gamma), rel=1e-10, abs=1e-10)
    # closed form: -f + n/2 log(2 pi) - 1/2 sum log(lambda + gamma)
    closed = -0.7 + 0.5 * math.log(2 * math.pi) - 0.5 * math.log(lam + gamma)
    assert le.total == pytest.approx(closed, rel=1e-12)
    assert le.constant == pytest.approx(0.5 * math.log(2 * math.pi / gamma))


def test_laplace_equals_2d_quadrature_with_rotated_hessian():
    lam = np.array([2.0, 0.01])
    c, s = math.cos(0.6), math.sin(0.6)
    R = np.array([[c, -s], [s, c]])
    H = R @ np.diag(lam) @ R.T
    gamma, f0 = 0.5, 1.3
    A = H + gamma * np.eye(2)

    def integrand(y: float, x: float) -> float:
        v = np.array([x, y])
        return math.exp(-f0 - 0.5 * v @ A @ v)

    value, _ = integrate.dblquad(integrand, -12, 12, -12, 12, epsabs=1e-13, epsrel=1e-10)
    le = laplace_local_entropy(Spectrum.from_eigenvalues(lam, loss=f0), gamma)
    assert le.loss == f0  # taken from the spectrum
    assert le.total == pytest.approx(math.log(value), rel=1e-7)


def test_flat_is_higher_and_negative_curvature_is_excluded():
    flat = laplace_local_entropy([0.0, 0.0, 1e-6], 0.01)
    sharp = laplace_local_entropy([10.0, 10.0, 10.0], 0.01)
    assert flat.log_volume == pytest.approx(0, abs=1e-3) and sharp.log_volume < flat.log_volume
    le = laplace_local_entropy([-0.5, -0.01, 1.0], gamma=0.1)
    assert le.excluded == 1
    assert le.log_volume == pytest.approx(-0.5 * (math.log1p(-0.1) + math.log1p(10.0)))
    with pytest.raises(ValueError, match="gamma"):
        laplace_local_entropy([1.0], 0.0)


def test_quadrature_spectrum_weights_count_eigenvalues():
    # a quadrature measure with 2 nodes standing for n = 1000 eigenvalues
    s = Spectrum.from_quadrature([0.0, 4.0], [0.75, 0.25], n_params=1000, loss=0.0)
    le = laplace_local_entropy(s, 1.0)
    assert le.log_volume == pytest.approx(-0.5 * 250 * math.log(5.0))
    table = laplace_table(s, (0.1, 1.0))
    assert list(table) == [0.1, 1.0] and table[1.0] == le


def _synthetic_config(**fields) -> CompareConfig:
    """A comparison of hidden width 1 on synthetic images, in batches of 32."""
    return CompareConfig(hidden=1, batch_size=32, synthetic=True, **fields)


def test_compare_end_to_end_on_synthetic_data(tmp_path):
    cfg = _synthetic_config(
        train_size=192,
        test_size=64,
        effective_epochs=2,
        spectrum_samples=64,
        optimizers={
            "sgd": {"lr": 0.05},
            "adam": {"lr": 1e-3},
            "entropy-sgd": {"lr": 0.5, "L": 2},
            "sam": {"lr": 0.05, "rho": 0.05},
        },
    )
    res = compare(cfg, tmp_path, progress=False)
    assert res.data == "synthetic-images"
    assert [r["optimizer"] for r in res.rows] == [
        "(initialisation)",
        "sgd",
        "adam",
        "entropy-sgd",
        "sam",
    ]
    n = res.rows[0]["n_params"]
    assert n == 784 * 1 + 1 + 1 * 10 + 10
    # one initialisation: every run's first spectrum is the same "init"
    assert res.spectra["init"].n_params == n and len(res.spectra) == 5
    # the rows are the reports of spectra.compare_minima, not statistics recomputed here
    assert list(res.flatness.reports) == list(res.spectra)
    for r, (label, report) in zip(res.rows, res.flatness.reports.items(), strict=True):
        assert report.info["method"] == "exact" and report.spectrum is res.spectra[label]
        assert r["top_eigenvalue"] >= 0 and 0 <= r["near_zero_fraction@0.0001"] <= 1
        assert r["trace"] == pytest.approx(res.spectra[label].trace())
        assert r["top_eigenvalue"] == report["top_eigenvalue"] == res.spectra[label].top(1)[0]
        # the invariant measures: worst-case adaptive sharpness, last layer's relative flatness
        assert r["adaptive_sharpness@0.05"] == report["adaptive_sharpness@0.05"] >= 0
        assert report.measure("relative_flatness").details["layer"] == "3.weight"
    per_pass = 192 // 32
    for r, per_step in zip(res.rows[1:], [1, 1, 2, 2], strict=True):
        assert r["effective_epochs"] == 2 and r["gradient_evaluations_per_step"] == per_step
        assert r["steps"] == 2 // per_step * per_pass
    for path in res.paths.values():
        assert path.exists() and path.stat().st_size > 0
    assert "entropy-sgd" in res.table and "F@0.001" in res.table
    assert "adapt. sharpness@0.05" in res.table and "rel. flatness" in res.table
    # every report is saved next to its spectrum and loads back
    out = tmp_path / "compare" / cfg.model
    for label, report in res.flatness.reports.items():
        assert (out / f"spectrum-{label}.npz").exists()
        assert dict(FlatnessReport.load(out / f"flatness-{label}.json")) == dict(report)
    saved = json.loads(res.paths["results"].read_text())
    assert saved["rows"][1]["optimizer"] == "sgd" and set(saved["reports"]) == set(res.spectra)
    assert len(list((out / "runs").glob("*/log.json"))) == 4  # what the notebook plots


def test_leaving_L_out_gives_entropy_sgd_its_default_budget(tmp_path):
    """EntropySGD's default L is 20: the budget comes from the optimizer, not from the
    kwargs (a kwargs lookup with a default of 1 gave it 20x the gradient evaluations)."""
    opts = {"sgd": {"lr": 0.05}, "entropy-sgd": {"lr": 0.5}, "sam": {"lr": 0.05}}
    cfg = _synthetic_config(train_size=64, test_size=32, effective_epochs=20, optimizers=opts)
    assert cfg.gradient_evaluations_per_step("entropy-sgd") == 20
    epochs = {o: cfg.run_config(o, "synthetic-images").epochs for o in opts}
    assert epochs == {"sgd": 20, "entropy-sgd": 1, "sam": 10}  # 1/20 and 1/2 of the steps
    # and training for it spends exactly the budget: 20 gradient evaluations per step
    res = train(cfg.run_config("entropy-sgd", "synthetic-images"), tmp_path, progress=False)
    assert res.final["effective_epoch"] == 20 and res.final["steps"] == 64 // 32
    assert res.final["grad_evals"] == 20 * res.final["steps"]
    cfg.optimizers["entropy-sgd"]["discard_first_grad"] = True  # 21 per step
    with pytest.raises(ValueError, match="not a multiple of entropy-sgd's 21"):
        cfg.run_config("entropy-sgd", "synthetic-images")
    with pytest.raises(ValueError, match="not a multiple of entropy-sgd's 20"):
        CompareConfig(effective_epochs=10, optimizers={"entropy-sgd": {}}).run_config(
            "entropy-sgd", "mnist"
        )


def test_matrix_free_measure_agrees_with_exact():
    """The mnistfc path (spectra.flatness matrix-free: Lanczos top, SLQ density, Hutch++
    trace) on a net small enough to check against the exact spectrum."""
    import torch

    from figures.compare import measure
    from figures.models import mnistfc

    torch.manual_seed(0)
    model = mnistfc(hidden=2, dropout=0.0, batchnorm=False).eval()
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(64, 1, 28, 28, generator=g), torch.randint(10, (64,), generator=g))
    cfg = CompareConfig(
        model="mnistfc", hidden=2, lanczos_k=2, slq_probes=2, slq_steps=30, trace_matvecs=150
    )
    free = measure(model, data, cfg, "free")
    exact = measure(model, data, CompareConfig(model="small-mnistfc"), "exact")
    assert free.info["method"] == "matrix-free" and exact.info["method"] == "exact"
    assert free.spectrum.kind == "quadrature" and free.measure("top_eigenvalue").method == "lanczos"
    top = free.measure("top_eigenvalue")
    assert (
        abs(top.value - exact["top_eigenvalue"]) <= top.error_bound + 1e-6 * exact["top_eigenvalue"]
    )
    # Hutch++ with 150 products on a Hessian of low numerical rank (hidden width 2): within
    # 4 of its own standard errors plus the float32 products' rounding (it was rel=0.3)
    trace = free.measure("trace")
    assert trace.method == "hutch++" and trace.details["budget"] == 150
    assert 0 < trace.details["matvecs"] <= 150
    assert abs(trace.value - exact["trace"]) <= 4 * trace.stderr + 1e-6 * exact["trace"]
    assert free["loss"] == pytest.approx(exact["loss"], rel=1e-12)
    # the invariant measures do not depend on the spectrum method
    for key in ("adaptive_sharpness@0.05", "relative_flatness"):
        assert free[key] == pytest.approx(exact[key], rel=1e-9), key
