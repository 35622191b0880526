"""Checkpoint primitives and the row-checkpointed matrix of the dense builders.

The primitives every resumable computation shares: :class:`CheckpointError`, the
check that a checkpoint path can be written before any work, atomic file writes and
the comparison of operator fingerprints
(:meth:`~spectra.linear_operator.LinearOperator.fingerprint`).  The states of the
iterative algorithms (Lanczos, SLQ) are saved by :mod:`spectra.resumable`.

A :class:`MatrixCheckpoint` is a folder.  ``state.json`` is replaced atomically (temp
file, fsync, rename), so it always describes work that is on disk; anything written
after it is ignored on resume.  The operator's fingerprint (kind, size, dtype, and
for a curvature operator the sample count, loss at the point and a hash of the
weights) is stored with it, and a checkpoint whose fingerprint differs, or whose
files are damaged, is refused with an error, never silently reused.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "StaleCheckpointError",
    "check_writable",
    "atomic_write_bytes",
    "atomic_write_json",
    "fingerprint_differences",
    "MatrixCheckpoint",
]


class CheckpointError(ValueError):
    """A checkpoint cannot be used for this computation: it belongs to another one, is
    damaged, or its path cannot be written."""


class StaleCheckpointError(CheckpointError):
    """A checkpoint of the same problem whose finished part this code computes
    differently (see :func:`spectra.exact.dense_matrix`): delete it to start over."""


def check_writable(path: Path) -> None:
    """Raise :class:`CheckpointError` unless a file can be created at ``path``, now.

    Run before the first product of a checkpointed computation, so that a typo in
    the path costs nothing rather than the whole run.  The parent folder must exist
    (it is not created: a missing folder is more often a mistake than a wish) and
    accept a new file, which is tested by creating and removing an empty one, the
    only test that also holds for root, read-only mounts and ACLs.
    """
    parent = path.parent
    why = None
    if path.is_dir():
        why = "it is a folder"
    elif not parent.exists():
        why = f"the folder {parent} does not exist; create it first"
    elif not parent.is_dir():
        why = f"{parent} is a file, not a folder"
    else:
        try:
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".probe")
            os.close(fd)
            os.unlink(tmp)
        except OSError as exc:
            why = f"no file can be created in {parent} ({exc.strerror or exc})"
    if why is not None:
        raise CheckpointError(
            f"checkpoint {path} cannot be written: {why}. Pass a path in a writable, "
            "existing folder (or checkpoint=None)"
        )


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half.

    Missing folders are created; a file where a folder of the path should be is refused
    with ``NotADirectoryError`` naming it, before anything is written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (path.parent, *path.parent.parents) if p.is_file()), None)
        raise NotADirectoryError(
            f"cannot write {path}: {blocker or path.parent} is a file, not a folder"
        ) from None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); give it the mode open() would
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def fingerprint_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: checkpoint has a, this run has b"`` for every field in which two operator
    fingerprints (:meth:`~spectra.linear_operator.LinearOperator.fingerprint`) differ.

    Fields are compared exactly, except ``loss``, which is equal to 1e-9 relative: it is
    summed in data order, which a shuffling loader may change.
    """
    diffs = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key), current.get(key)
        if key == "loss" and isinstance(a, float) and isinstance(b, float):
            if math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12):
                continue
        if a != b:
            diffs.append(f"{key}: checkpoint has {a!r}, this run has {b!r}")
    return diffs


class MatrixCheckpoint:
    """An (n, n) matrix on disk (``matrix.bin``, memory-mapped) filled row block by row block.

    ``state.json`` records how many leading rows are complete; :meth:`commit`
    flushes the mapped rows to disk *before* replacing the state, so a crash at
    any point leaves a consistent checkpoint.
    """

    def __init__(
        self, folder: str | os.PathLike, fingerprint: dict[str, Any], n: int, dtype: torch.dtype
    ) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.n = n
        self.np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        self.matrix_path = self.folder / "matrix.bin"
        self.state_path = self.folder / "state.json"
        self.state: dict[str, Any] = {"fingerprint": fingerprint, "rows_done": 0}
        if self.folder.exists() and not self.folder.is_dir():
            raise CheckpointError(
                f"checkpoint={self.folder} is a file; the checkpoint is a folder: pass a new "
                "folder's path (or that of an earlier run's checkpoint folder)"
            )
        if self.state_path.exists():
            self._load_existing()
        else:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CheckpointError(
                    f"cannot create the checkpoint folder {self.folder}: "
                    f"{exc.strerror or exc} (is a part of the path a file?)"
                ) from None
            size = n * n * self.np_dtype.itemsize
            with open(self.matrix_path, "wb") as fh:
                fh.truncate(size)
            atomic_write_json(self.state_path, self.state)

    def _load_existing(self) -> None:
        try:
            state = json.loads(self.state_path.read_text())
            rows = int(state["rows_done"])
            stored_fp = state["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"checkpoint {self.folder} is damaged ({exc}); delete it to start over"
            ) from None
        diffs = fingerprint_differences(stored_fp, self.fingerprint)
        if diffs:
            raise CheckpointError(
                f"checkpoint {self.folder} belongs to another computation ("
                + "; ".join(diffs)
                + "); use another checkpoint path or delete it"
            )
        expected = self.n * self.n * self.np_dtype.itemsize
        actual = self.matrix_path.stat().st_size if self.matrix_path.exists() else -1
        if actual != expected or not 0 <= rows <= self.n:
            raise CheckpointError(
                f"checkpoint {self.folder} is damaged (matrix file {actual} bytes, expected "
                f"{expected}; rows_done={rows}); delete it to start over"
            )
        self.state = state

    @property
    def rows_done(self) -> int:
        """How many leading rows of the matrix are complete on disk."""
        return int(self.state["rows_done"])

    def open(self, mode: str = "r+") -> np.memmap:
        """The matrix as a memory map: ``"r+"`` to fill it, ``"c"`` for private (copy-on-write)."""
        return np.memmap(self.matrix_path, dtype=self.np_dtype, mode=mode, shape=(self.n, self.n))

    def commit(self, matrix: np.memmap, **updates: Any) -> None:
        """Flush written rows, then record progress (``rows_done=...`` and any other fields)."""
        matrix.flush()
        self.state.update(updates)
        atomic_write_json(self.state_path, self.state)

    def save_array(self, name: str, array: np.ndarray) -> None:
        """Store a result array next to the matrix (atomically) and note it in the state."""
        buf = _npy_bytes(array)
        atomic_write_bytes(self.folder / f"{name}.npy", buf)
        self.state[f"has_{name}"] = True
        atomic_write_json(self.state_path, self.state)

    def load_array(self, name: str) -> np.ndarray | None:
        """The result array stored as ``name`` (:meth:`save_array`), or None if there is none."""
        if not self.state.get(f"has_{name}"):
            return None
        try:
            return np.load(self.folder / f"{name}.npy", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"checkpoint {self.folder}: {name}.npy is damaged ({exc}); delete it to start over"
            ) from None


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    bio = io.BytesIO()
    np.save(bio, array, allow_pickle=False)
    return bio.getvalue()
