"""Resumable Lanczos and SLQ: SIGKILL mid-run, restart, bit-identical results; refusals."""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import Stop, stopping_at
from torch import nn

import spectra
from spectra.checkpoint import CheckpointError
from spectra.density import spectral_density
from spectra.lanczos import lanczos
from spectra.resumable import KrylovCheckpoint

ROOT = Path(__file__).resolve().parents[1]
N = 400

# The child process: a seeded dense matrix behind a callable that sleeps per product,
# so a SIGKILL lands mid-run.  It writes the result with np.save (exact bits).
CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np, torch
    torch.set_num_threads(1)
    from spectra.lanczos import lanczos
    from spectra.density import spectral_density
    from spectra.linear_operator import CallableOperator
    N = {n}
    {matrix_src}
    LANCZOS, SLQ = {lanczos!r}, {slq!r}
    algo, ckpt, out, delay = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    A = matrix()
    def f(V):
        time.sleep(delay)
        return A @ V
    op = CallableOperator(f, A.shape[0])
    if algo == "lanczos":
        r = lanczos(op, checkpoint=ckpt, checkpoint_every=0, **LANCZOS)
        arrays = dict(values=r.eigenvalues.numpy(), residuals=r.residuals.numpy(),
                      vectors=r.eigenvectors.numpy(), counts=np.array([r.matvecs, r.restarts]))
    else:
        s = spectral_density(op, checkpoint=ckpt, checkpoint_every=0, **SLQ)
        arrays = dict(values=s.eigenvalues, weights=s.weights,
                      counts=np.array([s.info["matvecs"], 0]))
    np.savez(out, performed=np.array(op.matvecs), **arrays)
    """
)

LANCZOS = dict(k=5, which="LA", tol=1e-10, ncv=14, seed=3)
SLQ = dict(num_probes=4, num_steps=60, seed=5)


def matrix(n: int = N, seed: int = 0) -> torch.Tensor:
    """Spikes above a bulk: Lanczos needs several restarts at ncv=14."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.cat(
        [
            torch.linspace(0.0, 1.0, n - 8, dtype=torch.float64),
            1.0 + 0.1 * torch.arange(1, 9, dtype=torch.float64),
        ]
    )
    A = (Q * lam) @ Q.T
    return 0.5 * (A + A.T)


def _child(algo: str, ckpt: Path, out: Path, delay: float) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    code = CHILD.format(matrix_src=inspect.getsource(matrix), lanczos=LANCZOS, slq=SLQ, n=N)
    return subprocess.Popen(
        [sys.executable, "-c", code, algo, str(ckpt), str(out), str(delay)],
        env=env,
        cwd=str(ROOT),
        stderr=subprocess.PIPE,
    )


def _kill_midway(algo: str, ckpt: Path, out: Path, delay: float) -> None:
    proc = _child(algo, ckpt, out, delay)
    t0 = time.monotonic()
    while not ckpt.exists():  # the first save lands after the first step
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() - t0 < 30, "no checkpoint appeared"
        time.sleep(0.01)
    time.sleep(8 * delay)  # a few more steps (and saves) in flight
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "the child finished before it was killed; slow it down"


def _resume(algo: str, ckpt: Path, out: Path) -> dict[str, np.ndarray]:
    proc = _child(algo, ckpt, out, 0.0)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    with np.load(out) as z:
        return dict(z)


def test_lanczos_killed_and_resumed_is_bit_identical(tmp_path):
    ckpt, out = tmp_path / "lanczos.ckpt", tmp_path / "out.npz"
    ref = lanczos(matrix(), **LANCZOS)
    assert ref.restarts >= 3 and ref.all_converged
    _kill_midway("lanczos", ckpt, out, delay=0.03)
    got = _resume("lanczos", ckpt, out)
    # it resumed: fewer products than the whole run (which also pays 1 probe product)
    assert 0 < int(got["performed"]) < ref.matvecs
    assert np.array_equal(got["values"], ref.eigenvalues.numpy())
    assert np.array_equal(got["residuals"], ref.residuals.numpy())
    assert np.array_equal(got["vectors"], ref.eigenvectors.numpy())
    assert got["counts"].tolist() == [ref.matvecs, ref.restarts]
    # a finished checkpoint answers at once (1 probe product) with the same result
    again = lanczos(lambda V: matrix() @ V, n=N, checkpoint=ckpt, **LANCZOS)
    assert torch.equal(again.eigenvalues, ref.eigenvalues) and again.matvecs == ref.matvecs


def test_slq_killed_and_resumed_is_bit_identical(tmp_path):
    ckpt, out = tmp_path / "slq.ckpt", tmp_path / "out.npz"
    ref = spectral_density(matrix(), **SLQ)
    _kill_midway("slq", ckpt, out, delay=0.04)
    got = _resume("slq", ckpt, out)
    assert 0 < int(got["performed"]) < ref.info["matvecs"]
    assert np.array_equal(got["values"], ref.eigenvalues)
    assert np.array_equal(got["weights"], ref.weights)
    assert int(got["counts"][0]) == ref.info["matvecs"]


def test_checkpoint_in_process_at_every_boundary_matches(tmp_path):
    """Interrupt (an exception in the operator) after every few products, then resume."""
    A = matrix(250, seed=1)
    ref = lanczos(A, **LANCZOS)
    ref_s = spectral_density(A, **SLQ)
    for stop_at in (3, 9, 17, 40):
        for algo in ("lanczos", "slq"):
            path = tmp_path / f"{algo}{stop_at}.ckpt"
            run = (
                (lambda g, p=path: lanczos(g, n=250, checkpoint=p, checkpoint_every=0, **LANCZOS))
                if algo == "lanczos"
                else (
                    lambda g, p=path: spectral_density(
                        g, n=250, checkpoint=p, checkpoint_every=0, **SLQ
                    )
                )
            )
            with pytest.raises(Stop):
                run(stopping_at(A, stop_at))
            r = run(lambda V: A @ V)
            if algo == "lanczos":
                assert torch.equal(r.eigenvalues, ref.eigenvalues)
                assert torch.equal(r.residuals, ref.residuals)
                assert (r.matvecs, r.restarts) == (ref.matvecs, ref.restarts)
            else:
                assert np.array_equal(r.eigenvalues, ref_s.eigenvalues)
                assert np.array_equal(r.weights, ref_s.weights)
                assert r.info["matvecs"] == ref_s.info["matvecs"]


@pytest.fixture
def saved(tmp_path) -> Path:
    path = tmp_path / "run.ckpt"
    lanczos(matrix(250), checkpoint=path, **LANCZOS)
    return path


def test_another_matrix_of_the_same_size_is_refused(saved):
    other = matrix(250, seed=7)
    with pytest.raises(CheckpointError, match="probe"):
        lanczos(other, checkpoint=saved, **LANCZOS)
    # a tiny perturbation is another matrix too
    with pytest.raises(CheckpointError, match="probe"):
        lanczos(matrix(250) * (1 + 1e-6), checkpoint=saved, **LANCZOS)


def test_other_arguments_dtype_size_or_algorithm_are_refused(saved, tmp_path):
    A = matrix(250)
    with pytest.raises(CheckpointError, match="'k'"):
        lanczos(A, checkpoint=saved, **dict(LANCZOS, k=4))
    with pytest.raises(CheckpointError, match="which"):
        lanczos(A, checkpoint=saved, **dict(LANCZOS, which="SA"))
    with pytest.raises(CheckpointError, match="seed"):
        lanczos(A, checkpoint=saved, **dict(LANCZOS, seed=4))
    with pytest.raises(CheckpointError, match="dtype"):
        lanczos(A.float(), checkpoint=saved, **dict(LANCZOS, tol=1e-4))
    with pytest.raises(CheckpointError, match="n: checkpoint has 250"):
        lanczos(matrix(260), checkpoint=saved, **LANCZOS)
    with pytest.raises(CheckpointError, match="kind"):
        spectral_density(A, checkpoint=saved, **SLQ)
    # a folder holds one file per algorithm
    lanczos(A, checkpoint=tmp_path, **LANCZOS)
    spectral_density(A, checkpoint=tmp_path, **SLQ)
    assert (tmp_path / "lanczos.ckpt").exists() and (tmp_path / "slq.ckpt").exists()
    with pytest.raises(CheckpointError, match="num_steps"):
        spectral_density(A, checkpoint=tmp_path, **dict(SLQ, num_steps=30))


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_damaged_checkpoints_are_refused(saved, damage):
    blob = saved.read_bytes()
    if damage == "truncate":
        saved.write_bytes(blob[: len(blob) // 2])
    elif damage == "flip":
        i = len(blob) - 1000
        saved.write_bytes(blob[:i] + bytes([blob[i] ^ 1]) + blob[i + 1 :])
    elif damage == "garbage":
        saved.write_bytes(b"PK\x03\x04 not a checkpoint")
    else:
        saved.write_bytes(b"")
    with pytest.raises(CheckpointError, match="damaged"):
        lanczos(matrix(250), checkpoint=saved, **LANCZOS)


def test_inconsistent_state_with_valid_digest_is_refused(tmp_path):
    """A well-formed file whose arrays do not fit the problem (e.g. written by a bug)."""
    A = matrix(250)
    op = spectra.as_linear_operator(A)
    args = {
        "k": 5,
        "which": "LA",
        "tol": 1e-10,
        "seed": 3,
        "ncv": 14,
        "max_matvecs": 1000,
        "check_symmetry": True,
        "v0_sha256": None,
    }
    ck = KrylovCheckpoint(tmp_path / "bad.ckpt", "lanczos", op, args, 0.0)
    ck.save(
        {
            "Q": np.zeros((3, 250)),
            "H": np.zeros((15, 15)),
            "scalars": np.array([7, 0, 0, 10, 0, 0]),
            "anorm": np.float64(1.0),
            "rng": torch.Generator().get_state().numpy(),
        }
    )
    with pytest.raises(CheckpointError, match="damaged"):
        lanczos(A, checkpoint=tmp_path / "bad.ckpt", **LANCZOS)


def test_curvature_operator_with_other_data_is_refused(tmp_path):
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    X = torch.randn(40, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    loss = nn.CrossEntropyLoss()
    H = spectra.hessian_operator(model, loss, (X, y))
    path = tmp_path / "h.ckpt"
    r = lanczos(H, k=3, tol=1e-8, dense=False, checkpoint=path)
    H30 = spectra.hessian_operator(model, loss, (X[:30], y[:30]))
    with pytest.raises(CheckpointError, match="num_samples"):
        lanczos(H30, k=3, tol=1e-8, dense=False, checkpoint=path)
    H32 = spectra.hessian_operator(model, loss, (X, y), dtype=torch.float32)
    with pytest.raises(CheckpointError, match="dtype"):  # (tol=1e-8 is out of float32's reach)
        lanczos(H32, k=3, tol=1e-4, dense=False, checkpoint=path)
    again = lanczos(
        spectra.hessian_operator(model, loss, (X, y)), k=3, tol=1e-8, dense=False, checkpoint=path
    )
    assert torch.equal(again.eigenvalues, r.eigenvalues)


def test_checkpoint_every_is_validated(tmp_path):
    with pytest.raises(ValueError, match="checkpoint_every"):
        lanczos(matrix(250), checkpoint=tmp_path / "x", checkpoint_every=-1, **LANCZOS)
