"""Hutchinson and Hutch++ trace estimates and their standard errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from spectra.trace import TraceEstimate, trace


def _sym(lam: np.ndarray, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = lam.size
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    A = (Q * torch.as_tensor(lam)) @ Q.T
    return 0.5 * (A + A.T)


@pytest.fixture(scope="module")
def matrix() -> tuple[torch.Tensor, float]:
    """Hessian-like: a few large outliers over a bulk with both signs."""
    rng = np.random.default_rng(0)
    lam = np.concatenate([rng.normal(0.05, 0.2, 290), np.geomspace(1, 50, 10)])
    return _sym(lam), float(lam.sum())


@pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
def test_coverage_of_three_standard_errors(matrix, method):
    A, true = matrix
    hits = 0
    for seed in range(100):
        t = trace(A, method=method, num_matvecs=99, seed=seed)
        hits += abs(t.estimate - true) <= 3 * t.stderr
    assert hits >= 95, hits


def test_hutchpp_beats_hutchinson_on_outliers(matrix):
    A, true = matrix
    pp = trace(A, "hutch++", 99, seed=0)
    h = trace(A, "hutchinson", 99, seed=0)
    assert pp.stderr < 0.2 * h.stderr
    assert abs(pp.estimate - true) < 5 * pp.stderr + 1e-9


def test_result_and_determinism(matrix):
    A, _ = matrix
    a, b = trace(A, seed=11), trace(A, seed=11)
    assert isinstance(a, TraceEstimate) and a == b
    assert a.matvecs == 99 and a.method == "hutch++"
    assert "+-" in repr(a)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.estimate = 0.0
    assert trace(A, "hutchinson", 10, seed=0).matvecs == 10


def test_exact_when_sketch_spans_space():
    lam = np.linspace(-2, 3, 20)
    t = trace(_sym(lam), num_matvecs=99)
    assert abs(t.estimate - lam.sum()) < 1e-10 and t.stderr == 0.0


def test_zero_and_identity_and_callable():
    z = trace(torch.zeros(200, 200, dtype=torch.float64), "hutchinson", 20)
    assert z.estimate == 0.0 and z.stderr == 0.0
    ident = trace(lambda V: V, n=300, method="hutchinson", num_matvecs=8)
    assert ident.estimate == pytest.approx(300.0) and ident.stderr == pytest.approx(0.0, abs=1e-9)
    one = trace(torch.tensor([[4.0]], dtype=torch.float64), num_matvecs=6)
    assert one.estimate == pytest.approx(4.0) and one.stderr == 0.0


def test_float32_operator(matrix):
    A, true = matrix
    t = trace(A.to(torch.float32), num_matvecs=60, seed=1)
    assert abs(t.estimate - true) <= 4 * t.stderr + 1e-3 * abs(true)


def test_bad_input(matrix):
    A, _ = matrix
    with pytest.raises(ValueError, match="method"):
        trace(A, method="xtrace")
    with pytest.raises(ValueError, match="num_matvecs >= 4"):
        trace(A, "hutch++", 3)
    with pytest.raises(ValueError, match="num_matvecs >= 2"):
        trace(A, "hutchinson", 1)

    def bad(V: torch.Tensor) -> torch.Tensor:
        return V * float("nan")

    with pytest.raises(FloatingPointError):
        trace(bad, n=10, method="hutchinson", num_matvecs=4)
