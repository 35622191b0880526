"""Exact spectra, the Spectrum result type, the in-place eigensolver and the memory guard."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import reference_hessian
from torch import nn

import spectra
from spectra import exact
from spectra.dense_eigensolver import eigvalsh_inplace

F64 = torch.float64


def small_problem():
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    X, y = torch.randn(30, 6, dtype=F64), torch.randint(0, 4, (30,))
    return model, nn.CrossEntropyLoss(), X, y


def test_exact_spectrum_matches_eigvalsh_of_reference():
    model, loss, X, y = small_problem()
    s = spectra.exact_spectrum(
        model, loss, [(X[:11], y[:11]), (X[11:], y[11:])], dtype=F64, name="mlp"
    )
    ref = torch.linalg.eigvalsh(reference_hessian(model, loss, X, y)).numpy()
    np.testing.assert_allclose(s.eigenvalues, ref, rtol=0, atol=1e-12 * abs(ref).max())
    assert s.n_params == 92 and s.n_samples == 30 and s.dtype == "float64"
    assert s.loss == pytest.approx(float(loss(model(X), y).detach()), rel=1e-12)
    assert s.info["asymmetry"] < 1e-13
    assert s.trace() == pytest.approx(ref.sum(), rel=1e-10)
    np.testing.assert_array_equal(s.top(3), s.eigenvalues[::-1][:3])
    np.testing.assert_array_equal(s.bottom(2), s.eigenvalues[:2])
    np.testing.assert_allclose(s.top(3), ref[::-1][:3], rtol=1e-12)
    # eigenvalues within round-off of zero may take either sign
    assert np.mean(ref < -1e-12) <= s.fraction_negative() <= np.mean(ref < 1e-12)
    assert s.fraction_near_zero(1e-3) == pytest.approx(np.mean(np.abs(ref) <= 1e-3))


def test_asymmetry_is_reported_and_removed():
    model, loss, X, y = small_problem()
    op = spectra.hessian_operator(model, loss, (X, y), dtype=torch.float32)
    H, asym = exact.dense_matrix(op)
    assert torch.equal(H, H.T)
    assert 0 < asym < 1e-5  # float32 round-off, not zero, not large


def test_exact_hessian_always_returns_a_tensor():
    model, loss, X, y = small_problem()
    H = spectra.exact_hessian(model, loss, (X, y), dtype=torch.float32)
    assembled = exact.dense_matrix(
        spectra.hessian_operator(model, loss, (X, y), dtype=torch.float32)
    )
    assert isinstance(H, torch.Tensor) and isinstance(assembled, exact.AssembledMatrix)
    assert torch.equal(H, assembled.matrix)
    with pytest.raises(TypeError, match="return_asymmetry"):  # the former flag is gone
        spectra.exact_hessian(model, loss, (X, y), return_asymmetry=True)


def test_inplace_eigensolver_uses_the_input_memory():
    A = torch.randn(300, 300, dtype=F64)
    A = A + A.T
    expected = torch.linalg.eigvalsh(A).numpy()
    work = A.clone()
    w = eigvalsh_inplace(work)
    np.testing.assert_allclose(w, expected, rtol=0, atol=1e-10)
    # LAPACK overwrote the tensor's own storage: no copy was made
    assert not torch.equal(work, A)


def test_spectrum_save_load_roundtrip_is_exact(tmp_path):
    model, loss, X, y = small_problem()
    s = spectra.exact_spectrum(model, loss, (X, y), dtype=F64, name="run 1")
    path = s.save(tmp_path / "sub" / "spec.npz")
    back = spectra.Spectrum.load(path)
    assert np.array_equal(back.eigenvalues, s.eigenvalues)
    assert back.eigenvalues.tobytes() == s.eigenvalues.tobytes()
    for attr in (
        "n_params",
        "kind",
        "n_samples",
        "dtype",
        "loss",
        "name",
        "created",
        "versions",
        "info",
    ):
        assert getattr(back, attr) == getattr(s, attr), attr
    assert [p.name for p in path.parent.iterdir()] == ["spec.npz"]  # no temp file left


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    s = spectra.Spectrum.from_eigenvalues([1.0, 2.0])
    target = tmp_path / "spec.npz"
    s.save(target)
    original = target.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        spectra.Spectrum.from_eigenvalues([3.0]).save(target)
    assert target.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["spec.npz"]


def test_load_refuses_foreign_file(tmp_path):
    p = tmp_path / "x.npz"
    np.savez(p, a=np.zeros(3))
    with pytest.raises(ValueError, match="not a spectrum file"):
        spectra.Spectrum.load(p)


def test_spectrum_summary_and_repr():
    s = spectra.Spectrum.from_eigenvalues([-0.5, 0.0, 1e-5, 2.0, 40.0], name="toy")
    d = s.summary(near_zero_tol=1e-4)
    json.dumps(d)
    assert d["top"] == 40.0 and d["bottom"] == -0.5
    assert d["fraction_near_zero"] == pytest.approx(0.4)
    assert d["negative_mass"] == pytest.approx(0.5)
    assert d["trace"] == pytest.approx(41.50001)
    assert "toy" in repr(s) and "n_params=5" in repr(s)


def test_quadrature_weights_and_density_integrate_to_one():
    s = spectra.Spectrum.from_quadrature([0.0, 1.0, 3.0], [0.5, 0.3, 0.2], n_params=1000)
    assert s.trace() == pytest.approx(1000 * (0.3 + 0.6))
    counts, _ = s.histogram(bins=3, range=(-0.5, 3.5))
    assert counts.sum() == pytest.approx(1000)
    x = np.linspace(-5, 8, 20001)
    assert np.trapezoid(s.density(x, sigma=0.1), x) == pytest.approx(1.0, abs=1e-6)


def test_memory_guard_refuses_before_allocating(monkeypatch):
    model, loss, X, y = small_problem()
    monkeypatch.setattr(exact, "available_memory_bytes", lambda device="cpu": 1000)
    with pytest.raises(MemoryError) as info:
        spectra.exact_spectrum(model, loss, (X, y), dtype=F64)
    msg = str(info.value)
    assert "n = 92" in msg and "1,000 bytes" in msg and "lanczos" in msg
    assert "dtype=torch.float32" in msg  # float64 was asked for: float32 would halve it
    with pytest.raises(MemoryError, match="spectral_density") as info:
        spectra.exact_hessian(model, loss, (X, y), dtype=torch.float32)
    assert "float32" not in str(info.value).split("bytes)")[-1]  # already float32


def test_exact_dtype_follows_a_float64_model():
    """A float64 model was solved in float32 by default (a probe: 18% error on the top
    eigenvalue of a net at an interpolating minimum, near-zero fractions off by 0.13);
    the exact path now follows the model's dtype, as every operator does."""
    model, loss, X, y = small_problem()
    s = spectra.exact_spectrum(model, loss, (X, y))
    ref = torch.linalg.eigvalsh(reference_hessian(model, loss, X, y)).numpy()
    assert s.dtype == "float64"
    np.testing.assert_allclose(s.eigenvalues, ref, rtol=0, atol=1e-12 * abs(ref).max())
    assert spectra.exact_hessian(model, loss, (X, y)).dtype == F64
    f32 = spectra.exact_spectrum(model.float(), loss, (X.float(), y))
    assert f32.dtype == "float32"
    np.testing.assert_allclose(f32.eigenvalues, ref, rtol=0, atol=1e-5 * abs(ref).max())


def test_available_memory_is_positive_and_bounded():
    free = exact.available_memory_bytes()
    assert 0 < free < 1 << 50


def test_spectrum_refuses_complex_values_and_matrices():
    """Complex eigenvalues lost their imaginary parts (+-i became [0, 0]) with only
    NumPy's ComplexWarning, and a matrix was flattened into 'eigenvalues'."""
    with pytest.raises(TypeError, match="complex.*eigvalsh"):
        spectra.Spectrum.from_eigenvalues(np.linalg.eigvals(np.array([[0.0, -1.0], [1.0, 0.0]])))
    with pytest.raises(TypeError, match="complex"):
        spectra.Spectrum.from_eigenvalues(torch.tensor([1 + 1j, 2 + 0j]))
    with pytest.raises(ValueError, match=r"shape \(2, 2\).*eigvalsh"):
        spectra.Spectrum.from_eigenvalues(np.eye(2))
    with pytest.raises(ValueError, match="vector"):
        spectra.Spectrum.from_diagonal(np.ones((3, 1)))
    s = spectra.Spectrum.from_eigenvalues(torch.tensor([2.0, -1.0], dtype=F64))
    np.testing.assert_array_equal(s.eigenvalues, [-1.0, 2.0])


def test_a_file_without_provenance_does_not_get_this_session_s(tmp_path):
    """Loading a file whose metadata lacks created/versions stamped it with the current
    time and library versions, as if they were the file's own."""
    import io

    from spectra.spectrum import SpectrumFileError

    def write(path, meta):
        buf = io.BytesIO()
        values = {"eigenvalues": np.array([0.0, 1.0]), "weights": np.full(2, 0.5)}
        np.savez(buf, **values, meta=np.array(json.dumps(meta)))
        path.write_bytes(buf.getvalue())
        return path

    s = spectra.Spectrum.load(write(tmp_path / "old.npz", {"n_params": 2, "kind": "exact"}))
    assert s.created.startswith("unknown") and "unknown" in s.versions
    write(tmp_path / "new.npz", {"n_params": 2, "kind": "exact", "written_by_a_newer_one": 1})
    with pytest.raises(SpectrumFileError, match="newer version"):
        spectra.Spectrum.load(tmp_path / "new.npz")
    fresh = spectra.Spectrum.from_eigenvalues([1.0, 2.0])
    assert not fresh.created.startswith("unknown")
    assert spectra.Spectrum.load(fresh.save(tmp_path / "x")).created == fresh.created
    assert fresh.save(tmp_path / "upper.NPZ").name == "upper.NPZ"
    with pytest.raises(IsADirectoryError, match="folder"):
        fresh.save(tmp_path)
