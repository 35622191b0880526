"""spectra.dense_eigensolver: every backend against known spectra, in place, refusals first.

References are independent of the code under test: the spectrum d a matrix Q diag(d) Q^T
was built from (Q: a random orthogonal matrix) and numpy.linalg.eigvalsh in float64.
"""

from __future__ import annotations

import ctypes
import dataclasses
import glob
import os

import numpy as np
import pytest
import torch

from spectra import _lapack
from spectra import dense_eigensolver as de

IN_PLACE = ("mkl", "openblas-2stage", "scipy")


def known_spectrum(n: int, seed: int = 0) -> np.ndarray:
    """Ascending: a third exact zeros, a tight cluster at 1, negatives, a long positive tail."""
    rng = np.random.default_rng(seed)
    k = n // 3
    d = np.concatenate(
        [
            np.zeros(k),
            1.0 + 1e-9 * rng.standard_normal(k // 2),
            -0.5 * rng.random(n // 6),
            rng.exponential(2.0, n - k - k // 2 - n // 6 - 1),
            [40.0],
        ]
    )
    return np.sort(d)


def with_spectrum(d: np.ndarray, seed: int = 1) -> np.ndarray:
    """Q diag(d) Q^T in float64, exactly symmetric (Q from the QR of a Gaussian matrix)."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((d.size, d.size)))
    q *= np.sign(np.diag(r))
    a = (q * d) @ q.T
    return (a + a.T) / 2


def solve(a: np.ndarray, dtype: torch.dtype, backend: str) -> np.ndarray:
    return de.eigvalsh_inplace(torch.tensor(a, dtype=dtype), backend=backend)


def require(backend: str, dtype: torch.dtype = torch.float64) -> None:
    if backend not in de.available_backends(dtype):
        pytest.skip(f"{backend} is not available in this process")


@pytest.mark.parametrize("backend", de.BACKENDS + ("auto",))
@pytest.mark.parametrize("n", [1, 2, 250, 1000])
def test_float64_recovers_the_known_spectrum(backend, n):
    if backend != "auto":
        require(backend)
    d = known_spectrum(n) if n > 2 else np.array([-1.0, 3.0])[:n]
    a = with_spectrum(d)
    w = solve(a, torch.float64, backend)
    assert w.dtype == np.float64 and w.shape == (n,)
    assert np.all(np.diff(w) >= 0)
    norm = np.abs(d).max()
    np.testing.assert_allclose(w, d, rtol=0, atol=1e-12 * norm * max(1, n) ** 0.5)
    np.testing.assert_allclose(w, np.linalg.eigvalsh(a), rtol=0, atol=1e-12 * norm * n**0.5)


@pytest.mark.parametrize("backend", de.BACKENDS + ("auto",))
def test_float32_within_1e5_of_the_float64_reference(backend):
    if backend != "auto":
        require(backend, torch.float32)
    n = 1000
    a = with_spectrum(known_spectrum(n, seed=2), seed=3)
    reference = np.linalg.eigvalsh(a)
    w = solve(a, torch.float32, backend)
    err = np.abs(w - reference).max() / np.abs(reference).max()
    assert err <= 1e-5
    # ... and not by accident: float32 carries round-off the float64 solve does not
    assert err > 1e-9


def test_backends_agree_on_a_random_symmetric_matrix():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(600, 600, generator=g, dtype=torch.float64)
    a = a + a.T
    reference = np.linalg.eigvalsh(a.numpy())
    scale = np.abs(reference).max()
    for backend in de.available_backends(torch.float32):
        for dtype, tol in ((torch.float64, 1e-13), (torch.float32, 1e-5)):
            w = de.eigvalsh_inplace(a.to(dtype, copy=True), backend=backend)
            assert np.abs(w - reference).max() <= tol * scale, (backend, dtype)


def test_fast_backends_are_found_where_their_libraries_are():
    """A library that is there but not bound would be a silent, slow fallback."""
    present = de.available_backends(torch.float32)
    if torch.backends.mkl.is_available():
        assert "mkl" in present
    import scipy

    wheel_libs = os.path.join(os.path.dirname(os.path.dirname(scipy.__file__)), "scipy.libs")
    if glob.glob(os.path.join(wheel_libs, "lib*openblas*")):
        assert "openblas-2stage" in present
    assert de.choose_backend(1000, torch.float32) == next(b for b in de.PREFERENCE if b in present)


# ---------------------------------------------------------------------------- in place


@pytest.mark.parametrize("backend", IN_PLACE)
def test_in_place_backends_overwrite_the_input_and_copy_nothing(backend):
    require(backend)
    a = with_spectrum(known_spectrum(200))
    work = torch.tensor(a)
    w = de.eigvalsh_inplace(work, backend=backend)
    assert not np.array_equal(work.numpy(), a)  # LAPACK worked in the tensor's own memory
    np.testing.assert_allclose(w, np.linalg.eigvalsh(a), rtol=0, atol=1e-12 * 40)


def test_torch_backend_leaves_the_input_alone():
    a = with_spectrum(known_spectrum(200))
    work = torch.tensor(a)
    de.eigvalsh_inplace(work, backend="torch")
    assert np.array_equal(work.numpy(), a)


@pytest.mark.parametrize("backend", de.BACKENDS)
def test_only_the_upper_triangle_is_read(backend):
    """Every backend reads the same triangle (LAPACK's uplo='L' of the column-major view)."""
    require(backend)
    a = with_spectrum(known_spectrum(150))
    junk = a.copy()
    junk[np.tril_indices(150, -1)] = 1e3
    np.testing.assert_allclose(
        solve(junk, torch.float64, backend), np.linalg.eigvalsh(a), rtol=0, atol=1e-11 * 40
    )


@pytest.mark.parametrize("backend", IN_PLACE)
def test_memory_mapped_matrix_is_solved_in_its_file(tmp_path, backend):
    require(backend, torch.float32)
    a = with_spectrum(known_spectrum(300)).astype(np.float32)
    path = tmp_path / "matrix.f32"
    a.tofile(path)
    reference = np.linalg.eigvalsh(a.astype(np.float64))
    # copy-on-write, as spectra.exact solves a checkpointed matrix: the file stays intact
    private = np.memmap(path, dtype=np.float32, mode="c", shape=a.shape)
    w = de.eigvalsh_inplace(torch.from_numpy(private), backend=backend)
    assert np.abs(w - reference).max() <= 1e-5 * 40
    assert np.array_equal(np.fromfile(path, dtype=np.float32).reshape(a.shape), a)
    # read-write: LAPACK works in the mapped file itself
    shared = np.memmap(path, dtype=np.float32, mode="r+", shape=a.shape)
    w = de.eigvalsh_inplace(torch.from_numpy(shared), backend=backend)
    shared.flush()
    assert np.abs(w - reference).max() <= 1e-5 * 40
    assert not np.array_equal(np.fromfile(path, dtype=np.float32).reshape(a.shape), a)


def test_other_dtypes_and_layouts_are_copied_not_misread():
    a = with_spectrum(known_spectrum(120))
    reference = np.linalg.eigvalsh(a)
    wide = torch.zeros(120, 240, dtype=torch.float64)
    wide[:, ::2] = torch.tensor(a)
    strided = wide[:, ::2]  # not contiguous: solved on a contiguous copy
    np.testing.assert_allclose(de.eigvalsh_inplace(strided), reference, rtol=0, atol=1e-11 * 40)
    assert torch.equal(wide[:, ::2], torch.tensor(a))
    half = torch.tensor(a, dtype=torch.bfloat16)  # solved in float64
    exact_half = np.linalg.eigvalsh(half.double().numpy())
    np.testing.assert_allclose(de.eigvalsh_inplace(half), exact_half, rtol=0, atol=1e-11 * 40)
    assert de.eigvalsh_inplace(torch.zeros(0, 0)).shape == (0,)


# ---------------------------------------------------------------------------- refusals


def test_refusals_come_before_any_work(monkeypatch):
    with pytest.raises(ValueError, match="square"):
        de.eigvalsh_inplace(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="square"):
        de.eigvalsh_inplace(torch.zeros(3))
    for bad in (float("nan"), float("inf")):
        a = torch.eye(300)
        a[200, 7] = bad
        before = a.clone()
        with pytest.raises(ValueError, match=r"non-finite entry .* at \[200, 7\]"):
            de.eigvalsh_inplace(a)
        assert np.array_equal(a.numpy(), before.numpy(), equal_nan=True)  # untouched
    with pytest.raises(ValueError, match="unknown backend"):
        de.eigvalsh_inplace(torch.eye(3), backend="magma")


def test_workspace_that_does_not_fit_is_refused_before_work(monkeypatch):
    a = torch.tensor(with_spectrum(known_spectrum(200)))
    before = a.clone()
    monkeypatch.setattr(de, "_free_bytes", lambda device: 1000)
    for backend in ("auto",) + de.available_backends(torch.float64):
        with pytest.raises(MemoryError, match="MiB"):
            de.eigvalsh_inplace(a, backend=backend)
        assert torch.equal(a, before)


def test_copy_only_where_two_matrices_fit(monkeypatch):
    n = 2000  # large enough for O(100 n) to be small against n^2
    item = 8
    in_place = {b: de._workspace_bytes(b, n, torch.float64) for b in IN_PLACE}
    assert all(need < n * n * item / 4 for need in in_place.values())  # O(n), not O(n^2)
    assert de._workspace_bytes("torch", n, torch.float64) >= n * n * item
    # with too little memory for a copy, a strided input (which needs one) is refused ...
    monkeypatch.setattr(de, "_free_bytes", lambda device: n * n * item // 2)
    strided = torch.zeros(n, 2 * n, dtype=torch.float64)[:, ::2]
    with pytest.raises(MemoryError):
        de.eigvalsh_inplace(strided)
    # without the in-place MKL, torch's copying eigvalsh (the same MKL) stands in for it,
    # but only where the copy fits
    monkeypatch.setattr(de, "mkl_driver", lambda: None)
    assert de.choose_backend(n, torch.float64, free_bytes=n * n * item // 2) == "openblas-2stage"
    assert de.choose_backend(n, torch.float64, free_bytes=2 * n * n * item) == (
        "torch" if torch.backends.mkl.is_available() else "openblas-2stage"
    )


# ---------------------------------------------------------------------------- fallbacks


def test_a_missing_symbol_makes_no_driver():
    mkl = _lapack.mkl_driver()
    if mkl is None:
        pytest.skip("no MKL in this torch")
    library = glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.*"))[0]
    assert (
        _lapack.load_driver(
            "mkl", library, "{x}syevd_3stage_", ctypes.c_int64, _lapack._mkl_threads
        )
        is None
    )
    assert (
        _lapack.load_driver(
            "mkl", library, "{x}syevd_64_", ctypes.c_int64, lambda lib: lib.no_such_thread_control
        )
        is None
    )
    assert (
        _lapack.load_driver(
            "mkl", "/nonexistent/libnothing.so", "{x}syevd_", ctypes.c_int32, _lapack._mkl_threads
        )
        is None
    )


def test_without_the_fast_libraries_auto_is_the_scipy_path(monkeypatch):
    a = with_spectrum(known_spectrum(300)).astype(np.float32)
    expected = solve(a, torch.float32, "scipy")
    monkeypatch.setattr(de, "mkl_driver", lambda: None)
    monkeypatch.setattr(de, "openblas_two_stage_driver", lambda: None)
    assert de.available_backends(torch.float32) == ("torch", "scipy")
    no_copy = 300 * 300 * 4 // 2  # room for scipy's O(n) workspace, not for a copy
    assert de.choose_backend(300, torch.float32, free_bytes=no_copy) == "scipy"
    monkeypatch.setattr(de, "_free_bytes", lambda device: no_copy)
    got = solve(a, torch.float32, "auto")
    # the same computation; not compared bit for bit, since multi-threaded OpenBLAS
    # splits its work by the load of the moment (measured: different last bits on a
    # busy machine, identical with OPENBLAS_NUM_THREADS=1)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    with pytest.raises(ValueError, match="not available"):
        solve(a, torch.float32, "mkl")
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: False)
    assert de.choose_backend(300, torch.float32, free_bytes=10**12) == "scipy"


def test_a_library_with_one_precision_serves_only_that_one(monkeypatch):
    mkl = _lapack.mkl_driver()
    if mkl is None:
        pytest.skip("no MKL in this torch")
    single = dataclasses.replace(
        mkl, routines={np.dtype(np.float32): mkl.routines[np.dtype(np.float32)]}
    )
    monkeypatch.setattr(de, "mkl_driver", lambda: single)
    assert "mkl" in de.available_backends(torch.float32)
    assert "mkl" not in de.available_backends(torch.float64)
    assert de.choose_backend(100, torch.float64) != "mkl"
    a = with_spectrum(known_spectrum(100))
    np.testing.assert_allclose(
        solve(a, torch.float64, "auto"), np.linalg.eigvalsh(a), rtol=0, atol=1e-12 * 40
    )


# ---------------------------------------------------------------------------- threads


@pytest.mark.parametrize("backend", IN_PLACE)
def test_the_solver_runs_on_torchs_thread_count_and_restores_the_librarys(monkeypatch, backend):
    require(backend)
    name = "openblas-2stage" if backend == "scipy" else backend
    driver = de._drivers().get(name)
    if driver is None:
        pytest.skip(f"{name} is not available")
    calls = []

    def recording(count: int) -> int:
        calls.append(count)
        return driver.swap_threads(count)

    spy = dataclasses.replace(driver, swap_threads=recording)
    factory = "mkl_driver" if name == "mkl" else "openblas_two_stage_driver"
    monkeypatch.setattr(de, factory, lambda: spy)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # (torch sets MKL's thread-local count too)
        before = driver.swap_threads(2)
        driver.swap_threads(before)
        a = with_spectrum(known_spectrum(200))
        np.testing.assert_allclose(
            solve(a, torch.float64, backend), np.linalg.eigvalsh(a), rtol=0, atol=1e-12 * 40
        )
        assert driver.swap_threads(before) == before  # the library's setting is as it was
    finally:
        torch.set_num_threads(threads)
    assert calls[0] == 2 and calls[-1] == before  # set for the call, then put back


# ---------------------------------------------------------------------------- workspace


def test_workspace_is_lapacks_own_query_and_small():
    for dtype, item in ((torch.float32, 4), (torch.float64, 8)):
        for n in (1000, 50_890):
            need = de.eigensolver_workspace_bytes(n, dtype, torch.device("cpu"))
            backend = de.choose_backend(n, dtype, free_bytes=10**15)
            assert need == de._workspace_bytes(backend, n, dtype)
            assert 2 * n * item < need < 2000 * n * item  # O(n): 2n + 1 at least, ~200n at most
        assert de.eigensolver_workspace_bytes(10, dtype, torch.device("meta")) == (
            100 * item + 80 * item
        )  # a copy off the CPU


# ---------------------------------------------------------------------------- no convergence


class _NotConverging:
    """An ``mkl`` driver that overwrites the matrix and reports no convergence, as MKL's
    float32 ``ssyevd`` does on some Hessians with large clusters of exact zeros."""

    def __init__(self, real: _lapack.LapackDriver) -> None:
        self.real, self.name, self.calls = real, "mkl", 0

    def supports(self, dtype: np.dtype) -> bool:
        return self.real.supports(dtype)

    def workspace_bytes(self, n: int, dtype: np.dtype) -> int:
        return self.real.workspace_bytes(n, dtype)

    def eigvalsh(self, a: np.ndarray, threads: int) -> np.ndarray:
        self.calls += 1
        a[...] = 7.0  # what is left of the matrix is not the matrix
        raise _lapack.LapackConvergenceError("did not converge: choose another backend")


@pytest.fixture
def not_converging(monkeypatch):
    real = _lapack.mkl_driver()
    if real is None:
        pytest.skip("no MKL in this torch")
    fake = _NotConverging(real)
    monkeypatch.setattr(de, "mkl_driver", lambda: fake)
    return fake


def test_auto_recovers_from_mkl_not_converging_on_a_spare_copy(not_converging):
    a = with_spectrum(known_spectrum(150))
    assert de.choose_backend(150, torch.float64) == "mkl"
    w = solve(a, torch.float64, "auto")
    assert not_converging.calls == 1
    np.testing.assert_allclose(w, np.linalg.eigvalsh(a), rtol=0, atol=1e-12 * 40)


def test_auto_skips_mkl_where_no_spare_copy_fits(not_converging, monkeypatch):
    n = 150
    a = with_spectrum(known_spectrum(n))
    # room for any workspace but not for a second matrix
    monkeypatch.setattr(de, "_free_bytes", lambda device: n * n * 8 // 2)
    w = solve(a, torch.float64, "auto")
    assert not_converging.calls == 0
    np.testing.assert_allclose(w, np.linalg.eigvalsh(a), rtol=0, atol=1e-12 * 40)


def test_an_explicit_backend_that_does_not_converge_says_so(not_converging):
    with pytest.raises(_lapack.LapackConvergenceError, match="another backend"):
        de.eigvalsh_inplace(torch.eye(20, dtype=torch.float64) * 0 + 1, backend="mkl")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matrix_is_solved_on_the_device():
    a = with_spectrum(known_spectrum(300))
    w = de.eigvalsh_inplace(torch.tensor(a, device="cuda"))
    np.testing.assert_allclose(w, np.linalg.eigvalsh(a), rtol=0, atol=1e-10 * 40)
    with pytest.raises(ValueError, match="runs on the CPU"):
        de.eigvalsh_inplace(torch.tensor(a, device="cuda"), backend="mkl")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_paper_pipeline_smoke_figure_on_cuda(tmp_path):
    from figures import catalog
    from figures.request import FigureRequest

    stats = catalog.run("fig1", FigureRequest("smoke", tmp_path, device="cuda", progress=False))
    assert 0.0 <= stats["mean"]["fraction_near_zero"] <= 1.0 and stats["n_params"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_exact_spectrum_on_cuda_matches_the_cpu_build():
    """The same conv net, loss and data: the spectrum built and solved on the GPU equals
    the CPU's to float64 round-off (both build paths, vectorised and double backward)."""
    import spectra

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(3 * 6 * 6, 4),
    ).double()
    x, y = torch.randn(12, 1, 8, 8, dtype=torch.float64), torch.randint(0, 4, (12,))
    loss = torch.nn.CrossEntropyLoss()
    cpu = spectra.exact_spectrum(net, loss, [(x, y)], dtype=torch.float64).eigenvalues
    scale = float(np.abs(cpu).max())
    for backend in ("func", "autograd"):
        gpu = spectra.exact_spectrum(
            net.cuda(), loss, [(x, y)], dtype=torch.float64, backend=backend
        ).eigenvalues
        net.cpu()
        np.testing.assert_allclose(gpu, cpu, rtol=0, atol=1e-10 * scale)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_checkpointed_preset_on_cuda_builds_in_memory_and_caches_the_spectrum(
    tmp_path, monkeypatch
):
    """The paper presets ask for the row checkpoint, a host file: on a GPU the build
    runs in device memory instead, and the cache still keeps weights and spectrum."""
    from figures import catalog, presets
    from figures.request import FigureRequest

    real_get = presets.get
    monkeypatch.setattr(
        presets,
        "get",
        lambda preset, figure: (
            dataclasses.replace(real_get(preset, figure), checkpoint=True)
            if figure == "fig1"
            else real_get(preset, figure)
        ),
    )
    request = FigureRequest("smoke", tmp_path, device="cuda", progress=False)
    first = catalog.run("fig1", request)
    second = catalog.run("fig1", request)
    assert all(r["spectrum_cached"] for r in second["runs"])
    assert second["mean"]["fraction_near_zero"] == first["mean"]["fraction_near_zero"]
    assert not list(tmp_path.glob("cache/checkpoints/*"))


def test_nan_from_a_successful_mkl_call_is_a_failure_and_auto_falls_back(monkeypatch):
    """MKL's float32 ssyevd on an AMD EPYC returned info 0 and two NaN eigenvalues for a
    finite smoke-preset Fig 1 Hessian: that must raise, and under "auto" the robust
    backend must give the spectrum."""
    if _lapack.mkl_driver() is None:
        pytest.skip("no MKL in this torch")
    real_call = _lapack.LapackDriver._call

    def nan_from_mkl(self, n, a, w, lwork, work, liwork, iwork):
        out = real_call(self, n, a, w, lwork, work, liwork, iwork)
        if self.name == "mkl" and lwork > 0:  # not the workspace query
            w[:2] = np.nan
        return out

    monkeypatch.setattr(_lapack.LapackDriver, "_call", nan_from_mkl)
    d = known_spectrum(300)
    a = with_spectrum(d)
    with pytest.raises(_lapack.LapackConvergenceError, match="non-finite"):
        de.eigvalsh_inplace(torch.tensor(a), backend="mkl")
    assert de.choose_backend(300, torch.float64) == "mkl"
    got = de.eigvalsh_inplace(torch.tensor(a))
    np.testing.assert_allclose(got, d, rtol=0, atol=1e-10 * np.abs(d).max())


def test_wrong_finite_eigenvalues_fail_the_trace_and_frobenius_check(monkeypatch):
    """A solver that reports success with wrong values is caught by the invariants every
    spectrum must reproduce (trace, Frobenius norm), before anyone sees the numbers."""
    d = known_spectrum(300)
    a = with_spectrum(d)
    real_run = de._run

    def one_value_off(arr, backend):  # finite, plausible, wrong by 1% of the top
        w = real_run(arr, backend).copy()
        w[len(w) // 2] += 0.01 * np.abs(w).max()
        return w

    monkeypatch.setattr(de, "_run", one_value_off)
    with pytest.raises(_lapack.LapackConvergenceError, match="invariants"):
        de.eigvalsh_inplace(torch.tensor(a), backend="scipy")
    monkeypatch.setattr(de, "_run", real_run)
    for dtype in (torch.float32, torch.float64):  # the exact answers pass, also at float32
        for backend in de.available_backends(dtype):
            got = de.eigvalsh_inplace(torch.tensor(a, dtype=dtype), backend=backend)
            assert np.abs(got - d).max() < 1e-4 * np.abs(d).max()
