"""spectra.flatness and spectra.compare_minima: measures against dense references,
exact vs matrix-free agreement, persistence, and the table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.stats
import torch
from conftest import reference_hessian, relu_mlp, rescaled_twin
from torch import nn

import spectra
from spectra.flatness_report import FlatnessFileError, FlatnessReport
from spectra.flatness_table import split_data

F64 = torch.float64


def mlp(seed: int = 0) -> nn.Module:
    return relu_mlp((6, 12, 3), seed)


def dataset(m: int = 60):
    g = torch.Generator().manual_seed(1)
    return torch.randn(m, 6, generator=g, dtype=F64), torch.randint(0, 3, (m,), generator=g)


def test_exact_measures_match_the_dense_reference():
    model, (X, y) = mlp(), dataset()
    loss = nn.CrossEntropyLoss()
    report = spectra.flatness(model, loss, (X, y), rhos=(), near_zero_tols=(1e-3,), gammas=(0.1,))
    ev = np.linalg.eigvalsh(reference_hessian(model, loss, X, y).numpy())
    assert report.info["method"] == "exact" and report.info["n_params"] == ev.size
    assert report["top_eigenvalue"] == pytest.approx(ev[-1], rel=1e-10)
    assert report["lambda_min"] == pytest.approx(ev[0], rel=1e-8, abs=1e-12)
    assert report["trace"] == pytest.approx(ev.sum(), rel=1e-10)
    assert report["negative_mass"] == pytest.approx(-ev[ev < 0].sum(), rel=1e-8, abs=1e-14)
    assert report["near_zero_fraction@0.001"] == pytest.approx(np.mean(np.abs(ev) <= 1e-3))
    f = float(loss(model(X), y))
    kept = ev[ev > -0.1]
    assert report["local_entropy@0.1"] == pytest.approx(
        -f - 0.5 * np.log1p(kept / 0.1).sum(), rel=1e-10
    )
    assert report["loss"] == pytest.approx(f, rel=1e-12)
    np.testing.assert_allclose(
        report.measure("top_eigenvalue").details["top_k"], ev[::-1][:5], rtol=1e-10
    )


def test_matrix_free_agrees_with_exact_within_its_error_bars():
    model, (X, y) = mlp(), dataset()
    loss = nn.CrossEntropyLoss()
    common = dict(rhos=(), near_zero_tols=(1e-3,), gammas=(1.0,), progress=False)
    exact = spectra.flatness(model, loss, (X, y), **common)
    free = spectra.flatness(
        model, loss, (X, y), method="matrix-free", slq_probes=8, slq_steps=40, **common
    )
    assert free.info["method"] == "matrix-free"
    for key in ("top_eigenvalue", "lambda_min"):
        m = free.measure(key)
        assert m.method == "lanczos"
        assert abs(m.value - exact[key]) <= m.error_bound + 1e-8 * abs(exact[key])
    tr = free.measure("trace")
    assert tr.method == "hutch++" and abs(tr.value - exact["trace"]) <= 4 * tr.stderr + 1e-9
    # SLQ's measures are unbiased over probes (given enough steps): within their errors
    for key in ("local_entropy@1", "near_zero_fraction@0.001", "negative_mass"):
        m = free.measure(key)
        assert m.method == "slq" and m.stderr is not None and m.details["probes"] == 8
        assert abs(m.value - exact[key]) <= 4 * m.stderr + 1e-3 * abs(exact[key]), key
        lo, hi = m.interval(0.997)  # Student's t, 7 degrees of freedom: 4.53 stderr
        if m.bracket is None:
            assert hi - lo == pytest.approx(2 * scipy.stats.t.ppf(0.9985, 7) * m.stderr)
        else:  # the per-probe Gauss-rule bounds, widened by their own errors
            assert lo <= m.bracket[0] <= m.value <= m.bracket[1] <= hi
        assert lo - 1e-3 * abs(exact[key]) <= exact[key] <= hi + 1e-3 * abs(exact[key]), key
    lo, hi = tr.interval(0.997)  # Hutch++'s residual probes
    assert tr.details["samples"] == 99 - 2 * 33 and lo <= exact["trace"] <= hi
    m = free.measure("top_eigenvalue")
    assert m.interval() == (m.value - m.error_bound, m.value + m.error_bound)


def test_a_near_zero_fraction_below_slq_resolution_gets_an_interval_that_holds_the_truth(
    tmp_path,
):
    """Probe-to-probe errors alone said 0 +- 0 at tol 1e-4 (truth 0.076) and 0.186 +- 0.0045
    at 1e-3 (truth 0.103, 18 errors away): every probe's rule puts no node that close."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 40), nn.Tanh(), nn.Linear(40, 5)).double()
    X, y = torch.randn(60, 8, dtype=torch.float64), torch.randint(0, 5, (60,))
    loss = nn.CrossEntropyLoss()
    lam = spectra.exact_spectrum(model, loss, (X, y), dtype=torch.float64).eigenvalues
    free = spectra.flatness(model, loss, (X, y), method="matrix-free", rhos=(), progress=False)
    for tol in (1e-4, 1e-3, 1e-2):
        truth = float((np.abs(lam) <= tol).mean())
        m = free.measure(f"near_zero_fraction@{tol:g}")
        lo, hi = m.interval(0.95)
        assert 0.0 <= lo <= truth <= hi <= 1.0, (tol, lo, truth, hi)
        assert f"in [{lo:.2g}, {hi:.2g}]" in free.summary()
    m = free.measure("near_zero_fraction@0.001")
    assert abs(m.value - 0.103) > 4 * m.stderr  # why the bracket is needed
    back = FlatnessReport.load(free.save(tmp_path / "r")).measure("near_zero_fraction@0.001")
    assert back.bracket == m.bracket and back.interval() == m.interval()
    assert m.details["reorthogonalization"] == "full"
    single = spectra.flatness(
        model, loss, (X, y), method="matrix-free", rhos=(), slq_probes=1, progress=False
    )
    assert "near_zero_fraction@0.001" in single.summary()
    one = single.measure("near_zero_fraction@0.001")
    with pytest.raises(ValueError, match="slq_probes >= 2"):  # one probe's bracket is its own
        one.interval()
    assert one.uncertainty is None


def test_report_is_a_mapping_saves_atomically_and_loads(tmp_path):
    model, data = mlp(), dataset()
    report = spectra.flatness(model, nn.CrossEntropyLoss(), data, rhos=(), name="run")
    assert set(report) >= {"loss", "top_eigenvalue", "trace", "lambda_min"}
    assert dict(report)["trace"] == report["trace"]
    with pytest.raises(KeyError, match="it has: loss"):
        report["sharpest"]
    assert "top_eigenvalue" in report.summary()
    path = report.save(tmp_path / "r")
    assert path.name == "r.json" and not list(tmp_path.glob("*.tmp*"))
    back = FlatnessReport.load(path)
    assert dict(back) == dict(report) and back.name == "run"
    assert back.measure("top_eigenvalue") == report.measure("top_eigenvalue")
    np.testing.assert_array_equal(back.spectrum.eigenvalues, report.spectrum.eigenvalues)
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something else"}))
    for bad in ("bad.json", "other.json"):
        with pytest.raises(FlatnessFileError, match="not a readable flatness report"):
            FlatnessReport.load(tmp_path / bad)


def test_bad_arguments_are_refused_before_any_work():
    model, data = mlp(), dataset()
    loss = nn.CrossEntropyLoss()
    for kwargs, match in [
        ({"method": "fast"}, "method"),
        ({"gammas": (0.0,)}, "gammas"),
        ({"rhos": (-1,)}, "rhos"),
        ({"sharpness": ("best",)}, "sharpness"),
        ({"top_k": 0}, "top_k"),
        ({"feature_layer": "nope"}, "0.weight"),
    ]:
        with pytest.raises(ValueError, match=match):
            spectra.flatness(model, loss, data, **kwargs)


def test_compare_minima_table_from_models_and_state_dicts(tmp_path):
    data = dataset(60)
    a, b = mlp(0), mlp(1)
    table = spectra.compare_minima(
        {"a": a, "b": b.state_dict()},
        nn.CrossEntropyLoss(),
        data,
        factory=lambda: mlp(5),
        subsets=3,
        rhos=(),
    )
    direct = spectra.flatness(b, nn.CrossEntropyLoss(), data, rhos=())
    assert table.value("b", "top_eigenvalue") == pytest.approx(direct["top_eigenvalue"])
    # the spread over disjoint subsets: the std of the measure on each third of the data
    thirds = [
        spectra.flatness(a, nn.CrossEntropyLoss(), part, rhos=())["trace"]
        for part in split_data(data, 3)
    ]
    assert table.spread("a", "trace") == pytest.approx(np.std(thirds, ddof=1), rel=1e-10)
    md = table.to_markdown(["top_eigenvalue", "trace"])
    assert md.count("\n| ") == 2 and "+/-" in md and "3 disjoint data subsets" in md
    n = sum(p.numel() for p in a.parameters())
    assert f"n = {n:,}, 60 samples" in table.provenance() and table.provenance() in md
    csv_text = table.to_csv(tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_text() == csv_text and csv_text.startswith("name,")
    fig = table.plot(["top_eigenvalue", "trace"])
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 3
    with pytest.raises(ValueError, match="factory="):
        spectra.compare_minima({"b": b.state_dict()}, nn.CrossEntropyLoss(), data)


def test_split_data_is_disjoint_and_complete():
    X, y = dataset(10)
    parts = split_data(({"x": X, "scale": torch.ones(1, 6)}, y), 3)
    assert [len(p[1]) for p in parts] == [3, 4, 3]
    torch.testing.assert_close(torch.cat([p[0]["x"] for p in parts]), X)
    assert all(p[0]["scale"].shape == (1, 6) for p in parts)
    assert [len(p) for p in split_data([(X, y)] * 5, 2)] == [3, 2]
    with pytest.raises(ValueError, match="subsets"):
        split_data((X, y), 1)


def test_split_data_cuts_numpy_and_list_pairs_by_samples_and_refuses_packed_sequences():
    """A NumPy pair was not cut (every "subset" was all the data: a spread of 0), a list
    pair was dealt out as two batches, a PackedSequence crashed inside namedtuple."""
    X, y = dataset(40)
    tensors = [(len(a), len(b)) for a, b in split_data((X, y), 4)]
    assert tensors == [(10, 10)] * 4
    for data in ((X.numpy(), y.numpy()), [X, y], [X.numpy(), y]):
        parts = split_data(data, 4)
        assert [(len(a), len(b)) for a, b in parts] == tensors
        np.testing.assert_array_equal(np.concatenate([np.asarray(a) for a, _ in parts]), X)
    spreads = [
        spectra.compare_minima({"a": mlp(0)}, nn.CrossEntropyLoss(), d, subsets=4, rhos=()).spread(
            "a", "trace"
        )
        for d in ((X, y), (X.numpy(), y.numpy()))
    ]
    assert spreads[0] > 0 and spreads[1] == pytest.approx(spreads[0], rel=1e-12)
    packed = torch.nn.utils.rnn.pack_sequence([torch.randn(3, 2), torch.randn(2, 2)])
    with pytest.raises(ValueError, match="PackedSequence.*list of at least"):
        split_data((packed, torch.tensor([0, 1])), 2)


def test_invariant_measures_survive_rescaling_while_the_spectrum_moves():
    model, (X, y) = mlp(), dataset()
    twin = rescaled_twin(model, 10.0)
    torch.testing.assert_close(twin(X), model(X), rtol=1e-12, atol=1e-12)
    table = spectra.compare_minima(
        {"original": model, "rescaled": twin},
        nn.CrossEntropyLoss(),
        (X, y),
        rhos=(0.05,),
        feature_layer="2.weight",
    )
    a, b = table.reports["original"], table.reports["rescaled"]
    for key in ("adaptive_sharpness@0.05", "average_sharpness@0.05", "relative_flatness", "loss"):
        assert b[key] == pytest.approx(a[key], rel=1e-9), key
    assert b["top_eigenvalue"] > 2 * a["top_eigenvalue"]  # sharp "by the Hessian"
    assert a.measure("average_sharpness@0.05").stderr > 0
    assert a.measure("adaptive_sharpness@0.05").details["lower_bound"]
    assert a.info["seconds"]["sharpness"] > 0 and "relative_flatness" in a.info["seconds"]


def test_monte_carlo_measures_carry_their_draw_count_for_a_t_interval():
    """Average sharpness from 4 antithetic evaluations rests on 2 draws: its interval
    is t with 1 degree of freedom (12.7 standard errors at 95%), not the normal 1.96,
    which covered 73% here; relative flatness records its Hutchinson probes likewise."""
    from spectra.flatness_report import _measure_from
    from spectra.trace import confidence_interval

    torch.manual_seed(0)
    X = torch.randn(32, 6, dtype=torch.float64)
    model = nn.Linear(6, 2, bias=False).double()
    op = spectra.hessian_operator(model, nn.MSELoss(), (X, torch.randn(32, 2, dtype=torch.float64)))
    e = spectra.adaptive_sharpness(op, 0.05, kind="average", num_samples=4, seed=0)
    assert e.samples == 2
    m = _measure_from(e)
    lo, hi = m.interval(0.95)
    assert (lo, hi) == pytest.approx(confidence_interval(e.value, e.stderr, 2, 0.95))
    assert hi - lo == pytest.approx(2 * scipy.stats.t.ppf(0.975, 1) * e.stderr)
    r = spectra.relative_flatness(op, "weight", num_matvecs=9, seed=0, method="hutch++")
    assert r.samples == 9 - 2 * (9 // 3) and _measure_from(r).details["samples"] == r.samples


def test_matrix_free_trace_within_budget_is_labelled_exact():
    """n <= trace_matvecs: the trace is computed exactly with n products; the measure
    said "hutch++" with matvecs 99."""
    torch.manual_seed(0)
    X, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 2, (16,))
    model = nn.Linear(5, 2).double()
    report = spectra.flatness(
        model, nn.CrossEntropyLoss(), (X, y), method="matrix-free", rhos=(), progress=False
    )
    tr = report.measure("trace")
    assert tr.method == "exact" and tr.details["matvecs"] == 12 and tr.stderr == 0.0
    assert tr.value == pytest.approx(
        float(torch.trace(reference_hessian(model, nn.CrossEntropyLoss(), X, y))), rel=1e-10
    )


def test_a_gauss_rule_prefix_is_the_shorter_lanczos_run():
    """The k-node rule recovered from an m-node rule equals SLQ run for k steps from
    the same probe (the leading block of the same Jacobi matrix)."""
    from spectra.density import gauss_rule_prefix

    rng = np.random.default_rng(0)
    lam = np.r_[rng.normal(0, 0.02, 150), np.linspace(1, 10, 10)]
    Q, _ = np.linalg.qr(rng.standard_normal((160, 160)))
    A = torch.tensor(Q @ np.diag(lam) @ Q.T)
    long = spectra.spectral_density(A, num_probes=1, num_steps=40, seed=3, progress=False)
    short = spectra.spectral_density(A, num_probes=1, num_steps=30, seed=3, progress=False)
    nodes, weights = gauss_rule_prefix(long.eigenvalues, long.weights, 30)
    np.testing.assert_allclose(nodes, short.eigenvalues, rtol=0, atol=1e-9)
    np.testing.assert_allclose(weights, short.weights, rtol=0, atol=1e-9)


def test_slq_local_entropy_error_bar_holds_its_quadrature_bias():
    """log(1 + lambda / gamma) is steep at small gamma, and the Gauss rules overestimate
    its sum there: at gamma = 0.01 the default 80-step estimate was biased by -5.4 nats,
    ~10x its probe-to-probe error (a probe: 89% coverage at a nominal 95%, 61% at 30
    steps).  The rule's half-length prefix gives a quadrature error, in the error bar."""
    from spectra.flatness_report import _spectrum_measures

    rng = np.random.default_rng(0)
    n = 400
    lam = np.r_[rng.normal(0, 0.02, n - 80), np.zeros(70), np.linspace(1, 10, 10)]
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = torch.tensor(Q @ np.diag(lam) @ Q.T)
    gammas = (1e-3, 1e-2)
    truth = {g: -0.5 * np.log1p(lam[lam > -g] / g).sum() for g in gammas}
    values, errors, covered = {g: [] for g in gammas}, {g: [] for g in gammas}, 0
    for rep in range(24):
        per = [
            spectra.spectral_density(
                A,
                num_probes=1,
                num_steps=80,
                seed=10 * rep + i,
                check_symmetry=False,
                progress=False,
            )
            for i in range(10)
        ]
        joined = spectra.Spectrum.from_quadrature(
            np.concatenate([s.eigenvalues for s in per]),
            np.concatenate([s.weights for s in per]) / 10,
            n,
            info={"num_steps": 80},
        )
        measures = {}
        _spectrum_measures(joined, per, measures, (), gammas, 0.0)
        for g in gammas:
            m = measures[f"local_entropy@{g:g}"]
            values[g].append(m.value)
            errors[g].append(m.details["quadrature_error"])
            lo, hi = m.interval(0.95)
            covered += lo <= truth[g] <= hi
    for g in gammas:
        bias = abs(np.mean(values[g]) - truth[g])
        assert bias > 1.0  # the effect is there at these settings
        # of the bias's size (the bias itself is known to ~1.6 nats from 24 runs)
        assert np.mean(errors[g]) >= 0.5 * bias, (g, bias, np.mean(errors[g]))
    assert covered >= 0.9 * 2 * 24, covered


def test_local_entropy_away_from_a_critical_point_warns_with_the_gradient():
    """The Laplace local entropy is the formula at a minimum; at gradient norm 0.37 it
    was 0.33 nats low at gamma = 0.01 with no warning and no gradient in the report."""
    model, (X, y) = mlp(), dataset()  # random weights: far from a minimum
    loss = nn.CrossEntropyLoss()
    with pytest.warns(RuntimeWarning, match="gradient norm at this point"):
        report = spectra.flatness(model, loss, (X, y), rhos=(), gammas=(0.01, 1.0))
    g = torch.func.grad(lambda t: loss(torch.func.functional_call(model, t, (X,)), y))(
        dict(model.named_parameters())
    )
    norm = float(torch.cat([v.flatten() for v in g.values()]).norm())
    assert report.info["gradient_norm"] == pytest.approx(norm, rel=1e-10)
    scale = report.measure("local_entropy@0.01").details["gradient_term_scale"]
    assert scale == pytest.approx(0.5 * norm**2 / 0.01, rel=1e-10)


def test_data_subsets_of_a_summed_loss_are_refused():
    """With reduction='sum' each of k subsets has 1/k of the curvature, and the table's
    +/- was the spread of those (a probe: 242.3 +/- 1.5 over subsets near 62)."""
    data = dataset(60)
    with pytest.raises(ValueError, match="sums over samples"):
        spectra.compare_minima(
            {"a": mlp(0)}, nn.CrossEntropyLoss(reduction="sum"), data, subsets=3, rhos=()
        )

    def summed(out, target):
        return nn.functional.cross_entropy(out, target, reduction="sum")

    with pytest.raises(ValueError, match="sums over samples"):  # found on the data
        spectra.compare_minima({"a": mlp(0)}, summed, data, subsets=3, rhos=())
