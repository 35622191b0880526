"""Resumable exact-Hessian builds: SIGKILL mid-way, resume, same result; bad checkpoints refused."""

from __future__ import annotations

import json
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
from torch import nn

import spectra
from spectra.checkpoint import CheckpointError, StaleCheckpointError
from spectra.linear_operator import LinearOperator

SCRIPT = textwrap.dedent("""
    import sys, torch
    from torch import nn
    import spectra
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(20, 40), nn.Tanh(), nn.Linear(40, 10)).double()
    X, y = torch.randn(200, 20, dtype=torch.float64), torch.randint(0, 10, (200,))
    s = spectra.exact_spectrum(model, nn.CrossEntropyLoss(), (X, y), dtype=torch.float64,
                               chunk_size=8, checkpoint=sys.argv[1])
    s.save(sys.argv[2])
""")


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 40), nn.Tanh(), nn.Linear(40, 10)).double()
    X, y = torch.randn(200, 20, dtype=torch.float64), torch.randint(0, 10, (200,))
    return model, nn.CrossEntropyLoss(), (X, y)


def test_sigkill_mid_build_then_resume_gives_same_spectrum(tmp_path, monkeypatch):
    # commit after every block so the kill lands between commits
    monkeypatch.setenv("PYTHONPATH", os.getcwd())
    script = tmp_path / "run.py"
    script.write_text(
        SCRIPT.replace(
            "checkpoint=sys.argv[1])", "checkpoint=sys.argv[1], checkpoint_every=0.0)"
        ).replace("spectra.exact_spectrum(", "spectra.exact_spectrum(")
    )
    ckpt = tmp_path / "ckpt"
    state = ckpt / "state.json"
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt), str(tmp_path / "a.npz")])
    deadline = time.time() + 120
    rows = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            rows = json.loads(state.read_text())["rows_done"]
        except (OSError, ValueError, KeyError):
            rows = 0
        if rows >= 200:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the build finished before it could be killed; make it larger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(state.read_text())["rows_done"]
    assert 0 < killed_at < 1250

    subprocess.run([sys.executable, str(script), str(ckpt), str(tmp_path / "a.npz")], check=True)
    resumed = spectra.Spectrum.load(tmp_path / "a.npz")

    model, loss, data = problem()
    fresh = spectra.exact_spectrum(model, loss, data, dtype=torch.float64, chunk_size=8)
    np.testing.assert_array_equal(resumed.eigenvalues, fresh.eigenvalues)
    # a third run reads the stored eigenvalues instead of rebuilding
    again = spectra.exact_spectrum(
        model, loss, data, dtype=torch.float64, chunk_size=8, checkpoint=ckpt
    )
    assert again.info["eigenvalues_from_checkpoint"]
    np.testing.assert_array_equal(again.eigenvalues, fresh.eigenvalues)


def test_checkpoint_of_another_problem_is_refused(tmp_path):
    model, loss, (X, y) = problem()
    ckpt = tmp_path / "ckpt"
    spectra.exact_hessian(model, loss, (X, y), dtype=torch.float64, checkpoint=ckpt)
    with pytest.raises(CheckpointError, match="num_samples"):
        spectra.exact_hessian(model, loss, (X[:100], y[:100]), dtype=torch.float64, checkpoint=ckpt)
    with pytest.raises(CheckpointError, match="dtype"):
        spectra.exact_hessian(model, loss, (X, y), dtype=torch.float32, checkpoint=ckpt)
    other = nn.Sequential(nn.Linear(20, 40), nn.Tanh(), nn.Linear(40, 10)).double()
    with pytest.raises(CheckpointError, match="weights_sha256"):
        spectra.exact_hessian(other, loss, (X, y), dtype=torch.float64, checkpoint=ckpt)


@pytest.mark.parametrize("damage", ["state", "matrix"])
def test_damaged_checkpoint_is_refused(tmp_path, damage):
    model, loss, data = problem()
    ckpt = tmp_path / "ckpt"
    spectra.exact_hessian(model, loss, data, dtype=torch.float64, checkpoint=ckpt)
    if damage == "state":
        (ckpt / "state.json").write_text("{ not json")
    else:
        with open(ckpt / "matrix.bin", "r+b") as fh:
            fh.truncate(100)
    with pytest.raises(CheckpointError, match="damaged"):
        spectra.exact_hessian(model, loss, data, dtype=torch.float64, checkpoint=ckpt)


def test_checkpointed_matrix_equals_in_memory_matrix(tmp_path):
    model, loss, data = problem()
    H1 = spectra.exact_hessian(model, loss, data, dtype=torch.float64)
    H2 = spectra.exact_hessian(model, loss, data, dtype=torch.float64, checkpoint=tmp_path / "c")
    assert torch.equal(H1, H2)
    assert Path(tmp_path / "c" / "matrix.bin").stat().st_size == 1250 * 1250 * 8


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    import os
    import stat

    from spectra.checkpoint import atomic_write_bytes

    umask = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "x.bin", b"data")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "x.bin").stat().st_mode) == 0o644


def test_operators_fingerprint_themselves():
    import hashlib

    model, loss, (X, y) = problem()
    H = spectra.hessian_operator(model, loss, (X, y), dtype=torch.float64)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).contiguous()
    names = "\n".join(name for name, _ in model.named_parameters())
    fingerprint = H.fingerprint()
    assert fingerprint.pop("loss") == pytest.approx(float(loss(model(X), y)), rel=1e-12)
    assert fingerprint == {
        "operator": "HessianOperator",
        "n": 1250,
        "dtype": "torch.float64",
        "weights_sha256": hashlib.sha256(theta.numpy().tobytes()).hexdigest(),
        "num_samples": 200,
        "params": hashlib.sha256(names.encode()).hexdigest()[:16],
    }
    A = spectra.as_linear_operator(torch.eye(5, dtype=torch.float64))
    assert A.fingerprint() == {"operator": "DenseOperator", "n": 5, "dtype": "torch.float64"}


def test_block_size_is_asked_of_the_operator():
    model, loss, (X, y) = problem()
    H = spectra.hessian_operator(model, loss, (X, y), dtype=torch.float64)
    # what the forward over the 200 samples saves for backward and depends on the
    # parameters: tanh's output (40 per sample; the second Linear saves the same storage)
    # and log_softmax's (10); the inputs and weights carry no tangent.  6 copies, 4 vectors
    per_column = 6 * 8 * 200 * (40 + 10) + 4 * 8 * 1250
    assert H.column_workspace_bytes() == per_column
    # the same function written without calling modules: forward hooks would see nothing,
    # the saved-tensor count sees the same activations
    functional = spectra.hessian_operator(
        model,
        loss,
        (X, y),
        dtype=torch.float64,
        forward=lambda m, x: nn.functional.linear(
            torch.tanh(nn.functional.linear(x, m[0].weight, m[0].bias)), m[2].weight, m[2].bias
        ),
    )
    assert functional.column_workspace_bytes() == per_column
    assert H.block_size(memory_budget_bytes=20 * per_column) == 20
    assert H.block_size(memory_budget_bytes=1) == 16  # at least 16 columns
    assert H.block_size() == min((1 << 30) // per_column, 2048, 1250)
    assert spectra.as_linear_operator(torch.eye(300)).block_size() == 256
    assert spectra.as_linear_operator(torch.eye(30)).block_size() == 30
    assert spectra.as_linear_operator(torch.eye(30)).column_workspace_bytes() == 0


class _Interrupted(Exception):
    pass


class _Dense(LinearOperator):
    """``A @ V``, raising after ``stop_after`` products (a killed build)."""

    def __init__(self, A: torch.Tensor, stop_after: int | None = None) -> None:
        super().__init__(A.shape[0], A.dtype, A.device)
        self.A, self.stop_after, self.calls = A, stop_after, 0

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.stop_after is not None and self.calls > self.stop_after:
            raise _Interrupted
        return self.A @ V


def test_resumed_build_rechecks_its_last_block_against_the_current_code(tmp_path):
    """Same fingerprint, other function: the finished rows are recomputed on resume and
    a difference beyond round-off is refused; the same function resumes bit for bit."""
    from spectra.exact import dense_matrix

    g = torch.Generator().manual_seed(0)
    B = torch.randn(60, 60, generator=g, dtype=torch.float64)
    A = B + B.T
    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Interrupted):  # 2 blocks of 8 rows committed, then killed
        dense_matrix(_Dense(A, stop_after=2), chunk_size=8, checkpoint=ckpt, checkpoint_every=0)
    assert json.loads((ckpt / "state.json").read_text())["rows_done"] == 16
    changed = A.clone()
    changed[10, 12] = changed[12, 10] = A[10, 12] + 1e-4 * float(A.abs().max())  # rows 10, 12
    with pytest.raises(StaleCheckpointError, match=r"rows 0\.\.15 times.*Delete the folder"):
        dense_matrix(_Dense(changed), chunk_size=8, checkpoint=ckpt)
    # a change in an earlier block than the last one committed is seen by the probe
    early = A.clone()
    early[2, 40] = early[40, 2] = A[2, 40] + 1e-4 * float(A.abs().max())
    with pytest.raises(StaleCheckpointError, match=r"rows 0\.\.15 times a probe"):
        dense_matrix(_Dense(early), chunk_size=8, checkpoint=ckpt)
    assert json.loads((ckpt / "state.json").read_text())["rows_done"] == 16  # left alone
    resumed = dense_matrix(_Dense(A), chunk_size=8, checkpoint=ckpt).matrix
    assert torch.equal(resumed, dense_matrix(_Dense(A), chunk_size=8).matrix)


def test_a_file_where_a_folder_belongs_is_refused_with_its_name(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    s = spectra.Spectrum.from_eigenvalues([1.0, 2.0])
    with pytest.raises(NotADirectoryError, match="afile is a file, not a folder"):
        s.save(blocker / "spectrum.npz")
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    data = (torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,)))
    for where in (blocker, blocker / "sub"):
        with pytest.raises(CheckpointError, match="afile"):
            spectra.exact_spectrum(model, nn.CrossEntropyLoss(), data, checkpoint=where)


def test_finished_checkpoint_is_rechecked_before_its_eigenvalues_are_reused(tmp_path):
    """Stored eigenvalues are returned only when the stored matrix still matches the
    current code: a float32 build (symmetrised, round-off asymmetry) is reused, a stored
    matrix that differs from what the code computes (a fixed bug) is refused."""
    model, loss, data = problem()
    model = model.float()
    data = (data[0].float(), data[1])
    ckpt = tmp_path / "ckpt"
    first = spectra.exact_spectrum(model, loss, data, chunk_size=8, checkpoint=ckpt)
    assert first.dtype == "float32" and first.info["asymmetry"] > 0  # round-off to allow for
    again = spectra.exact_spectrum(model, loss, data, chunk_size=8, checkpoint=ckpt)
    assert again.info["eigenvalues_from_checkpoint"]
    np.testing.assert_array_equal(again.eigenvalues, first.eigenvalues)

    n = first.n_params
    stored = np.memmap(ckpt / "matrix.bin", dtype=np.float32, mode="r+", shape=(n, n))
    bump = 0.1 * float(np.abs(stored).max())  # a wrong row: far above float32 round-off
    stored[3, :100] += bump  # in early rows only: the probe product sees it
    stored[:100, 3] += bump
    stored.flush()
    del stored
    with pytest.raises(StaleCheckpointError, match=r"rows 0\.\.1249 times a probe.*Delete"):
        spectra.exact_spectrum(model, loss, data, chunk_size=8, checkpoint=ckpt)


def test_build_seconds_add_up_over_the_sessions_a_checkpointed_build_spans(tmp_path, monkeypatch):
    """A build resumed in a later session reports its time over both sessions (the paper
    figures' builds span several), and reused eigenvalues report what they took."""
    from spectra import exact

    g = torch.Generator().manual_seed(0)
    B = torch.randn(60, 60, generator=g, dtype=torch.float64)
    A = B + B.T
    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Interrupted):
        exact.dense_matrix(
            _Dense(A, stop_after=2), chunk_size=8, checkpoint=ckpt, checkpoint_every=0
        )
    first = json.loads((ckpt / "state.json").read_text())["build_seconds"]
    assert first > 0
    monkeypatch.setattr(exact.time, "monotonic", lambda: 1000.0)  # the resumed session: 0 s
    exact.dense_matrix(_Dense(A), chunk_size=8, checkpoint=ckpt)
    assert json.loads((ckpt / "state.json").read_text())["build_seconds"] == first

    model, loss, data = problem()
    ckpt = tmp_path / "spectrum"
    built = spectra.exact_spectrum(model, loss, data, dtype=torch.float64, checkpoint=ckpt)
    state = json.loads((ckpt / "state.json").read_text())
    assert built.info["build_seconds"] == state["build_seconds"]
    assert built.info["solve_seconds"] == state["solve_seconds"] > 0
    again = spectra.exact_spectrum(model, loss, data, dtype=torch.float64, checkpoint=ckpt)
    assert again.info["eigenvalues_from_checkpoint"]
    assert (again.info["build_seconds"], again.info["solve_seconds"]) == (
        built.info["build_seconds"],
        built.info["solve_seconds"],
    )
