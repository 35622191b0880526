"""Hutchinson and Hutch++ trace estimates and their standard errors."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import reference_hessian, relu_mlp
from torch import nn

import spectra
from spectra._krylov import PackedSigns, rademacher_columns
from spectra.linear_operator import LinearOperator
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


@pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
@pytest.mark.parametrize("budget", [6, 12])
def test_t_interval_covers_at_small_budgets_where_three_standard_errors_do_not(
    matrix, method, budget
):
    """With 2-4 residual probes the standard error is itself noisy: 3 of them covered 80%
    (Hutch++, m = 6) of 200 trials; Student's t at 99.7% must cover about that share."""
    A, true = matrix
    covered = 0
    for seed in range(200):
        t = trace(A, method=method, num_matvecs=budget, seed=seed)
        assert t.samples == (budget - 2 * (budget // 3) if method == "hutch++" else budget)
        lo, hi = t.interval(0.997)
        covered += lo <= true <= hi
    assert covered >= 194, covered  # >= 97%
    exact = trace(A, num_matvecs=300)
    assert exact.interval() == (exact.estimate, exact.estimate) and exact.samples == 0


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


class _Widths(LinearOperator):
    """A dense operator that records the widths of the blocks it is applied to and
    claims ``workspace`` bytes of its own per column."""

    def __init__(self, A: torch.Tensor, workspace: int = 0) -> None:
        super().__init__(A.shape[0], A.dtype, A.device)
        self.A, self.workspace, self.widths = A, workspace, []

    def column_workspace_bytes(self) -> int:
        return self.workspace

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.widths.append(V.shape[1])
        return self.A @ V


@pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
def test_result_does_not_depend_on_the_block_size(matrix, method):
    A, _ = matrix
    ref = trace(A, method, 99, seed=4)
    for block in (1, 7):
        t = trace(A, method, 99, seed=4, block_size=block)
        assert t.estimate == pytest.approx(ref.estimate, rel=1e-12)
        assert t.stderr == pytest.approx(ref.stderr, rel=1e-10)


def test_default_block_follows_the_operator_workspace_and_the_budget(matrix):
    A, _ = matrix
    vector = A.shape[0] * 8
    small = _Widths(A)
    trace(small, "hutch++", 99, memory_budget=1 << 30)
    assert max(small.widths) == 33  # all of a third at once (<= 64)
    # each column claims 10 MB inside the operator: a 25 MB budget fits 33 basis
    # vectors, the first column's 3 vectors (its workspace is outside the budget) and 2
    # more columns of (3 vectors + 10 MB)
    heavy = _Widths(A, workspace=10_000_000)
    t = trace(heavy, "hutch++", 99, memory_budget=25_000_000)
    assert max(heavy.widths) == 3 and t.matvecs == 99
    assert t.estimate == pytest.approx(trace(A, "hutch++", 99).estimate, rel=1e-12)
    # single-column products: the vectors fit, a second column's workspace does not
    single = _Widths(A, workspace=10_000_000)
    trace(single, "hutch++", 99, memory_budget=(33 + 3) * vector)
    assert set(single.widths) == {1}
    starved = _Widths(A, workspace=10_000_000)
    with pytest.raises(MemoryError, match=r"33 basis vector\(s\) and 3 .*memory_budget"):
        trace(starved, "hutch++", 99, memory_budget=(33 + 3) * vector - 1)
    assert starved.widths == []  # refused before any product


def test_a_low_rank_sketch_gives_the_trace_exactly():
    """Rank 3 < m // 3: the basis keeps the 3 directions of the range (the other sketch
    columns are rounding noise and are dropped), so tr(Q^T A Q) is the trace and the
    deflated residual is zero."""
    g = torch.Generator().manual_seed(2)
    U = torch.randn(200, 3, generator=g, dtype=torch.float64)
    A = U @ torch.diag(torch.tensor([5.0, -2.0, 0.5], dtype=torch.float64)) @ U.T
    t = trace(A, "hutch++", 30, seed=1)
    assert t.estimate == pytest.approx(float(torch.trace(A)), rel=1e-10)
    assert t.stderr < 1e-10 * abs(t.estimate) and t.matvecs == 10 + 3 + 10


def test_packed_signs_are_the_rademacher_stream():
    for n, k in ((1, 1), (13, 3), (1_000_003, 2)):
        g = torch.Generator().manual_seed(3)
        ref = rademacher_columns(n, k, g, torch.float32, torch.device("cpu"))
        state = g.get_state()
        g = torch.Generator().manual_seed(3)
        signs = PackedSigns(n, k, g)
        assert torch.equal(g.get_state(), state)  # the generator moved on by n k draws
        assert torch.equal(signs.columns(0, k, torch.float32, torch.device("cpu")), ref)
        assert torch.equal(
            signs.columns(k - 1, k, torch.float64, torch.device("cpu")), ref[:, -1:].double()
        )


def test_hutchpp_is_the_textbook_estimator_on_a_network_hessian():
    """The same probes through the textbook formula (a Householder QR of the dense
    sketch, dense products, an autograd reference Hessian) give the same estimate and
    standard error; on a network's Hessian operator, whose block products (vmap) and
    single products (double backward) are different code paths."""
    F64, cpu = torch.float64, torch.device("cpu")
    model = relu_mlp((5, 16, 16, 3), seed=3)
    g = torch.Generator().manual_seed(4)
    X = torch.randn(40, 5, generator=g, dtype=F64)
    y = torch.randint(0, 3, (40,), generator=g)
    loss = nn.CrossEntropyLoss()
    A = reference_hessian(model, loss, X, y)
    n, m = A.shape[0], 30
    s = m // 3
    gen = torch.Generator().manual_seed(7)
    Q, _ = torch.linalg.qr(A @ rademacher_columns(n, s, gen, F64, cpu))
    G = rademacher_columns(n, m - 2 * s, gen, F64, cpu)
    G = G - Q @ (Q.T @ G)
    z = (G * (A @ G)).sum(0)
    expected = float(torch.trace(Q.T @ A @ Q)) + float(z.mean())
    se = float(z.std()) / math.sqrt(z.numel())
    H = spectra.hessian_operator(model, loss, (X, y), dtype=F64)
    for block in (None, 1):
        t = trace(H, "hutch++", m, seed=7, block_size=block)
        assert t.estimate == pytest.approx(expected, rel=1e-10)
        assert t.stderr == pytest.approx(se, rel=1e-8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hutchpp_interval_holds_the_truth_when_the_sketch_holds_the_whole_operator(dtype):
    """An exactly low-rank GGN (5 samples x 3 classes: rank 10 of 67): the residual probes
    see only rounding, and the interval used to shrink below the sketch's own rounding
    error (coverage 51% in float64, 29% in float32)."""
    torch.manual_seed(0)
    X, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    loss = nn.CrossEntropyLoss()
    G = spectra.ggn_operator(model, loss, (X, y), dtype=torch.float64)
    truth = float(torch.diagonal(G @ torch.eye(67, dtype=torch.float64)).sum())
    op = spectra.ggn_operator(model, loss, (X, y), dtype=dtype)
    for seed in range(20):
        est = spectra.trace(op, method="hutch++", num_matvecs=45, seed=seed, progress=False)
        lo, hi = est.interval(0.95)
        assert lo <= truth <= hi, (seed, est.estimate - truth, hi - lo)
        assert hi - lo < 1e-3 * truth  # honest, not vacuous
