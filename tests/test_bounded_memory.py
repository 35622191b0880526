"""Bounded memory: SLQ in blocks of probes, cheaper reorthogonalisation, Lanczos' budget.

Every algorithm's own vectors are sized to a ``memory_budget`` (default half the free
memory), refused with a MemoryError that names the numbers before any product, and
every result records wall time, the process's peak memory and its own basis bytes.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance
from synthetic import Stop, stopping_at
from torch import nn

import spectra
from benchmarks.training import trained_tanh_mlp
from spectra._resources import peak_memory_bytes
from spectra.checkpoint import CheckpointError
from spectra.density import spectral_density
from spectra.lanczos import lanczos
from spectra.linear_operator import CallableOperator
from spectra.resumable import KrylovCheckpoint

N = 400
F64 = torch.float64


def spiked(n: int = N, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    """Eight spikes above a bulk in [0, 1] (needs restarts at small ncv)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    lam = torch.cat(
        [torch.linspace(0.0, 1.0, n - 8, dtype=F64), 1.0 + 0.1 * torch.arange(1, 9, dtype=F64)]
    )
    A = (Q * lam) @ Q.T
    return (0.5 * (A + A.T)).to(dtype)


def columnwise(A: torch.Tensor, calls: list | None = None) -> CallableOperator:
    """A @ V one column at a time, so a block product has the bits of single ones."""

    def f(V: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(V.shape[1])
        return torch.stack([A @ V[:, i] for i in range(V.shape[1])], dim=1)

    return CallableOperator(f, A.shape[0], dtype=A.dtype)


def w1(a: spectra.Spectrum, b: spectra.Spectrum) -> float:
    return wasserstein_distance(a.eigenvalues, b.eigenvalues, a.weights, b.weights)


# --- SLQ: memory independent of the number of probes -------------------------------


def test_slq_basis_bytes_do_not_grow_with_probes():
    A = spiked()
    steps, per_probe = 30, 30 * N * 8  # one probe's full basis: num_steps x n float64
    budget = int(1.5 * (per_probe + 2 * N * 8))  # room for one probe (+ its temporaries)
    for probes in (1, 3, 8):
        s = spectral_density(A, num_probes=probes, num_steps=steps, memory_budget=budget)
        assert s.info["block_size"] == 1 and s.info["reorthogonalization"] == "full"
        assert s.info["basis_bytes"] == per_probe
        assert s.info["matvecs"] == probes * steps + 2
        assert s.info["memory_budget"] == budget
    # all at once (the earlier layout) holds every probe's basis
    s = spectral_density(A, num_probes=8, num_steps=steps)
    assert s.info["block_size"] == 8 and s.info["basis_bytes"] == 8 * per_probe


def test_probes_in_sequence_equal_probes_together():
    A = spiked()
    together = spectral_density(A, num_probes=6, num_steps=40, seed=4)
    assert together.info["block_size"] == 6
    for block in (1, 4):  # 4: blocks of 4 and 2
        seq = spectral_density(A, num_probes=6, num_steps=40, seed=4, block_size=block)
        assert seq.info["block_size"] == block
        # same probes and recurrences; only the block product's rounding differs
        assert w1(seq, together) <= 1e-12
        assert seq.info["steps_per_probe"] == together.info["steps_per_probe"]
        np.testing.assert_allclose(
            np.sort(seq.eigenvalues), np.sort(together.eigenvalues), rtol=0, atol=1e-12
        )
    # with products that do not depend on the block width, the compact schemes are
    # bit-identical in sequence and together
    for scheme in ("float32", "float16", "local"):
        runs = [
            spectral_density(
                columnwise(A),
                num_probes=5,
                num_steps=30,
                seed=2,
                reorthogonalization=scheme,
                block_size=b,
            )
            for b in (5, 1, 2)
        ]
        for r in runs[1:]:
            assert np.array_equal(r.eigenvalues, runs[0].eigenvalues)
            assert np.array_equal(r.weights, runs[0].weights)


def test_block_size_sets_the_block_matvecs():
    calls: list[int] = []
    spectral_density(
        columnwise(spiked(), calls), num_probes=5, num_steps=10, block_size=2, check_symmetry=False
    )
    assert calls == [2] * 10 + [2] * 10 + [1] * 10


# --- the cheaper schemes: accuracy against the exact spectrum -----------------------


@pytest.fixture(scope="module")
def mlp() -> tuple[spectra.LinearOperator, np.ndarray]:
    """A trained 1,333-parameter MLP's float32 Hessian and its exact spectrum."""
    model, X, y = trained_tanh_mlp((12, 32, 24, 5), samples=256, steps=150)
    H = spectra.hessian_operator(model, nn.CrossEntropyLoss(), (X, y), dtype=torch.float32)
    D = H.to_dense().double()
    return H, np.linalg.eigvalsh((0.5 * (D + D.T)).numpy())


def test_cheaper_schemes_against_exact(mlp):
    """Stated bounds (W1 / spectral range, 8 probes x 50 steps, float32): a float16 or
    bfloat16 copy of the basis is within 1e-5 of full reorthogonalisation on the same
    probes (measured 1e-7 to 1e-6: four orders below the probe noise), so it matches the
    exact spectrum as well as full does; "local" (no stored basis) differs from full by
    up to the probe noise (measured 2e-4 to 7e-4) and stays within 2e-3 of exact."""
    H, lam = mlp
    span = lam.max() - lam.min()
    runs = {
        s: spectral_density(H, num_probes=8, num_steps=50, seed=1, reorthogonalization=s)
        for s in ("full", "float16", "bfloat16", "local")
    }
    exact = {
        s: wasserstein_distance(r.eigenvalues, lam, u_weights=r.weights) / span
        for s, r in runs.items()
    }
    assert exact["full"] <= 2e-3
    for s in ("float16", "bfloat16"):
        assert w1(runs[s], runs["full"]) / span <= 1e-5, s
        assert exact[s] <= exact["full"] + 1e-5, s
        # the outlier is resolved as with full reorthogonalisation
        assert abs(runs[s].eigenvalues.max() - lam.max()) <= 1e-5 * lam.max()
    assert exact["local"] <= 2e-3
    # memory per probe: full 50 n, float16 48 n halves + 2 n, local 2 n (float32 numbers)
    n = H.shape[0]
    assert runs["full"].info["basis_bytes"] == 8 * 50 * n * 4
    assert runs["float16"].info["basis_bytes"] == 8 * (48 * n * 2 + 2 * n * 4)
    assert runs["local"].info["basis_bytes"] == 8 * 2 * n * 4
    assert {r.info["reorthogonalization"] for r in runs.values()} == set(runs)


def test_auto_falls_back_to_cheaper_schemes(mlp):
    H, _ = mlp
    n, steps = H.shape[0], 50
    full = (steps + 2) * n * 4  # one probe's basis + 2 temporaries, float32
    half = 48 * n * 2 + 4 * n * 4
    local = 4 * n * 4
    picks = {}
    for budget in (full, full - 1, half, half - 1, local):
        s = spectral_density(H, num_probes=3, num_steps=steps, memory_budget=budget)
        picks[budget] = (s.info["reorthogonalization"], s.info["block_size"])
    # the best scheme one probe fits; after a fallback the probes run one at a time
    assert picks == {
        full: ("full", 1),
        full - 1: ("float16", 1),
        half: ("float16", 1),
        half - 1: ("local", 1),
        local: ("local", 1),
    }
    # a fixed scheme takes as many probes as fit
    s = spectral_density(
        H, num_probes=3, num_steps=steps, memory_budget=half - 1, reorthogonalization="local"
    )
    assert s.info["block_size"] == 3
    # a float64 operator's half-width copy is float32
    s = spectral_density(spiked(), num_probes=2, num_steps=40, memory_budget=40 * N * 8)
    assert s.info["reorthogonalization"] == "float32"
    with pytest.raises(ValueError, match="not narrower"):
        spectral_density(H, reorthogonalization="float32")


# --- refusals before any product ----------------------------------------------------


def counting(A: torch.Tensor) -> CallableOperator:
    return CallableOperator(lambda V: A @ V, A.shape[0], dtype=A.dtype)


def _names(err: pytest.ExceptionInfo, *parts: str) -> None:
    """The error names the operator (n = 400 float64, 3,200 bytes per vector) and ``parts``."""
    text = str(err.value)
    for part in ("n = 400", "torch.float64", "3,200 bytes per vector", *parts):
        assert part in text, (part, text)


def test_slq_memory_error_names_the_numbers_before_any_product(tmp_path):
    op = counting(spiked())
    with pytest.raises(MemoryError) as err:
        spectral_density(
            op,
            num_probes=4,
            num_steps=50,
            reorthogonalization="full",
            memory_budget=10**5,
            checkpoint=tmp_path / "slq.ckpt",
        )
    _names(err, "52 vector", "100,000 bytes", "num_steps = 50")
    with pytest.raises(MemoryError, match="'local'"):  # below even the local scheme
        spectral_density(op, num_steps=50, memory_budget=4 * 3200 - 1)
    assert op.matvecs == 0 and not (tmp_path / "slq.ckpt").exists()


def test_lanczos_memory_error_names_the_numbers_before_any_product(tmp_path):
    op = counting(spiked())
    per = N * 8
    with pytest.raises(MemoryError) as err:  # k + 3 basis + 1 + 2 temporaries + k vectors
        lanczos(
            op,
            k=5,
            memory_budget=(5 + 3 + 1 + 2 + 5) * per - 1,
            dense=False,
            checkpoint=tmp_path / "l.ckpt",
        )
    _names(err, "16 vectors", "ncv = 8", "free on cpu")
    with pytest.raises(MemoryError, match="ncv = 30"):  # a given ncv is not shrunk
        lanczos(op, k=5, ncv=30, memory_budget=20 * per, dense=False)
    assert op.matvecs == 0 and not (tmp_path / "l.ckpt").exists()


def test_lanczos_budget_picks_a_smaller_ncv_and_converges():
    A = spiked()
    ref = np.linalg.eigvalsh(A.numpy())[::-1][:5]
    per = N * 8
    full = lanczos(A, k=5, tol=1e-10, dense=False)
    assert full.ncv == 20 and full.basis_bytes == 21 * per
    small = lanczos(A, k=5, tol=1e-10, dense=False, memory_budget=(12 + 1 + 2 + 5) * per)
    assert small.ncv == 12 and small.basis_bytes == 13 * per
    assert small.all_converged and small.restarts > full.restarts
    np.testing.assert_allclose(small.eigenvalues.numpy(), ref, rtol=0, atol=1e-9)
    assert np.all(np.abs(small.eigenvalues.numpy() - ref) <= small.residuals.numpy())
    # without eigenvectors the k vectors are not needed: a larger basis fits
    novec = lanczos(
        A,
        k=5,
        tol=1e-10,
        dense=False,
        return_eigenvectors=False,
        memory_budget=(12 + 1 + 2 + 5) * per,
    )
    assert novec.ncv == 17 and novec.eigenvectors is None
    # the smallest basis k + 3 still converges
    least = lanczos(
        A, k=5, tol=1e-10, dense=False, memory_budget=(8 + 1 + 2 + 5) * per, max_matvecs=3000
    )
    assert least.ncv == 8 and least.all_converged
    np.testing.assert_allclose(least.eigenvalues.numpy(), ref, rtol=0, atol=1e-9)


# --- checkpoints with blocks --------------------------------------------------------


@pytest.mark.parametrize("scheme", ["full", "float16", "local"])
def test_blocked_slq_resumes_bit_identically(tmp_path, scheme):
    A = spiked(250, seed=1)
    kw = dict(num_probes=5, num_steps=30, seed=3, block_size=2, reorthogonalization=scheme)
    ref = spectral_density(A, **kw)
    for stop_at in (5, 33, 61, 70):  # inside the first, second and third block
        path = tmp_path / f"{scheme}{stop_at}.ckpt"
        with pytest.raises(Stop):
            spectral_density(
                stopping_at(A, stop_at), n=250, checkpoint=path, checkpoint_every=0, **kw
            )
        r = spectral_density(lambda V: A @ V, n=250, checkpoint=path, **kw)
        assert np.array_equal(r.eigenvalues, ref.eigenvalues), stop_at
        assert np.array_equal(r.weights, ref.weights)
        assert r.info["matvecs"] == ref.info["matvecs"]
        assert r.info["seconds"] > 0


def test_resume_keeps_the_block_size_chosen_from_memory(tmp_path):
    A = spiked()
    path = tmp_path / "slq.ckpt"
    small = spectral_density(
        A, num_probes=4, num_steps=30, checkpoint=path, memory_budget=33 * N * 8
    )
    assert small.info["block_size"] == 1
    # more memory now: the finished run is still read back, with its block size
    again = spectral_density(A, num_probes=4, num_steps=30, checkpoint=path)
    assert again.info["block_size"] == 1 and np.array_equal(again.weights, small.weights)
    # a fixed block size that differs is another computation
    with pytest.raises(CheckpointError, match="block_size"):
        spectral_density(A, num_probes=4, num_steps=30, checkpoint=path, block_size=2)


def test_format_1_slq_checkpoint_is_refused_clearly(tmp_path):
    A = spiked()
    op = spectra.as_linear_operator(A)
    args = {"num_probes": 2, "num_steps": 10, "seed": 0, "check_symmetry": True}
    old = KrylovCheckpoint(tmp_path / "slq.ckpt", "slq", op, args, 0.0)  # format 1
    old.save(
        {
            "Q": np.zeros((2, 1, N)),
            "alphas": np.zeros((2, 10)),
            "betas": np.zeros((2, 10)),
            "lengths": np.zeros(2, dtype=np.int64),
            "anorm": np.zeros(2),
            "active": np.arange(2),
            "scalars": np.array([0, 0, 2]),
        }
    )
    with pytest.raises(CheckpointError, match="format 1.*format 2"):
        spectral_density(A, num_probes=2, num_steps=10, checkpoint=tmp_path / "slq.ckpt")


# --- time, peak memory and progress -------------------------------------------------


def test_results_record_seconds_and_peak_memory():
    A = spiked()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    total = 1 << 62
    with open("/proc/meminfo") as fh:
        total = int(fh.readline().split()[1]) * 1024
    t0 = time.perf_counter()
    r = lanczos(A, k=3, dense=False)
    s = spectral_density(A, num_probes=3, num_steps=20)
    t = spectra.trace(A, num_matvecs=30)
    d = lanczos(A, k=3, dense=True)
    wall = time.perf_counter() - t0
    for seconds, peak in (
        (r.seconds, r.peak_memory_bytes),
        (t.seconds, t.peak_memory_bytes),
        (s.info["seconds"], s.info["peak_memory_bytes"]),
        (d.seconds, d.peak_memory_bytes),
    ):
        assert 0 < seconds <= wall
        assert rss <= peak <= total  # the process's high-water mark: never decreases
    assert peak_memory_bytes("cpu") >= s.info["peak_memory_bytes"]
    assert r.basis_bytes == (r.ncv + 1) * N * 8 and d.basis_bytes == N * N * 8
    assert "ru_maxrss" in s.info["peak_memory_source"]
    assert s.info["basis_bytes"] == 3 * 20 * N * 8
    assert "seconds=" in repr(r) and "seconds=" in repr(t)
    assert t == spectra.trace(A, num_matvecs=30)  # timing takes no part in equality


def test_progress_bars_count_matvecs_with_totals(capsys):
    A = spiked()
    spectral_density(A, num_probes=3, num_steps=20, block_size=2, progress=True)
    err = capsys.readouterr().err
    assert "slq(3 probes, 2 at a time)" in err and "/60" in err and "matvec" in err
    spectra.trace(A, num_matvecs=30, progress=True)
    assert "/30" in capsys.readouterr().err
    lanczos(A, k=2, dense=False, max_matvecs=500, progress=True)
    assert "/500" in capsys.readouterr().err


def test_checkpoint_save_and_restore_stream(tmp_path):
    """A state of 128 MB is written and read back without a copy of it in memory: the peak
    of numpy's allocations (what tracemalloc sees) is about two 16 MiB chunks."""
    import tracemalloc

    from spectra.resumable import load_into

    op = spectra.as_linear_operator(spiked())
    ck = KrylovCheckpoint(tmp_path / "big.ckpt", "slq", op, {"x": 1}, 0.0, version=2)
    big = torch.arange(16 * 2**20, dtype=F64).reshape(4, 2**22)
    view = big[:, : 2**22 - 8]  # non-contiguous, like a basis prefix
    tracemalloc.start()
    ck.save({"Q": view.numpy(), "small": np.arange(3)})
    _, peak_save = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    saved = ck.load()
    out = torch.zeros(4, 2**22 - 8, dtype=F64)
    load_into(saved, "Q", [out[p] for p in range(4)], tuple(out.shape))
    _, peak_load = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak_save < 40 * 2**20 and peak_load < 40 * 2**20, (peak_save, peak_load)
    assert torch.equal(out, view) and saved["small"].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="expected"):
        load_into(saved, "Q", [out], (3, 2**22 - 8))


_FREED_HEAP_SCRIPT = r"""
import json, torch
from spectra._resources import _malloc_trim, available_memory_bytes

def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096

torch.empty(4 << 20).fill_(1.0)  # a freed 16 MiB block lifts glibc's mmap threshold
blocks = [torch.ones(1 << 18) for _ in range(512)]  # 512 x 1 MiB from the heap
kept, freed = blocks[::2], blocks[1::2]  # every other one survives, so none is at the top
del blocks
before = rss()
freed.clear()
after_free = rss()
available_memory_bytes()  # must hand the freed pages back before it reads MemAvailable
ran = _malloc_trim() is not None
print(json.dumps({"before": before, "after_free": after_free, "after_trim": rss(), "ran": ran}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc heap (Linux)")
def test_freed_heap_memory_is_returned_before_free_memory_is_read():
    """Memory freed by earlier products but kept by glibc counts as free: without the
    trim, 256 MiB of freed 1 MiB tensors between live ones stay resident (they made a 124M Lanczos refuse)."""
    out = subprocess.run(
        [sys.executable, "-c", _FREED_HEAP_SCRIPT], capture_output=True, text=True, check=True
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if not r["ran"]:
        pytest.skip("no glibc malloc_trim in this process")
    mib = 1 << 20
    assert r["before"] - r["after_free"] < 64 * mib  # free() alone keeps the pages
    assert r["after_free"] - r["after_trim"] > 192 * mib  # the trim hands them back


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_free_memory_counts_the_allocators_cache():
    from spectra._resources import available_memory_bytes

    x = torch.empty(64 << 20, device="cuda")  # 256 MiB, then back to the cache
    del x
    cached = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    assert cached >= 256 << 20
    assert available_memory_bytes("cuda") >= torch.cuda.mem_get_info()[0] + cached - (1 << 20)
