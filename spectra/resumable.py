"""Resumable algorithm state: the one place Lanczos and SLQ save and restore themselves.

An algorithm touches persistence through a small interface only:

* the operator identifies itself (:meth:`~spectra.linear_operator.LinearOperator.fingerprint`:
  kind, size, dtype; a curvature operator adds its weights, data and loss) and this
  module adds a content probe (:func:`operator_probe`, one product) that tells two
  matrices of the same size apart;
* the algorithm's state turns itself into arrays and back (:class:`ResumableState`:
  ``to_arrays()`` / ``from_arrays(arrays)``), and :class:`RunTotals` carries the matvecs,
  wall time and peak memory across the sessions of a resumed run;
* :class:`KrylovCheckpoint` owns the file: one archive per run, replaced atomically,
  checked (digest, header, probe) before anything is restored, and any restore that
  fails is reported as damage (:class:`~spectra.checkpoint.CheckpointError`).

The file layout is unchanged since checkpoint format 1 (Lanczos) and 2 (SLQ in blocks):
files written by earlier versions load and resume.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ._krylov import random_block
from ._resources import peak_memory_bytes
from .checkpoint import CheckpointError, check_writable, fingerprint_differences
from .linear_operator import LinearOperator

__all__ = [
    "ResumableState",
    "RunTotals",
    "KrylovCheckpoint",
    "StoredArrays",
    "load_into",
    "operator_probe",
    "tensor_to_array",
]

_MAGIC = b"SPECTRA-KRYLOV-CHECKPOINT-1\n"
_PROBE_SEED = 20240917
#: Bytes read or written at a time when a state is streamed to or from its file.
_STREAM_CHUNK = 1 << 24


class ResumableState(Protocol):
    """What an algorithm's state offers :class:`KrylovCheckpoint`.

    ``to_arrays()`` gives the arrays that restore it (NumPy arrays or scalars; large
    ones may be views, which are streamed, never copied whole); ``from_arrays(arrays)``
    restores it in place from a checkpoint's arrays (a :class:`StoredArrays`: each
    read when asked for, large ones best with :func:`load_into`), raising ``KeyError``,
    ``ValueError``, ``TypeError`` or ``RuntimeError`` for arrays that are missing or
    do not fit (reported as a damaged checkpoint).
    """

    def to_arrays(self) -> dict[str, Any]:
        """The arrays that restore this state."""
        ...

    def from_arrays(self, arrays: StoredArrays) -> None:
        """Restore this state, in place, from a checkpoint's arrays."""
        ...


class RunTotals:
    """Matvecs, wall time and peak memory of one run, summed over its sessions.

    Counting starts at construction (``op.matvecs`` then is the run's zero) and at
    ``t0`` (a ``time.perf_counter()`` value); a resumed run adds what the earlier
    sessions recorded (:meth:`from_arrays`, :meth:`resume_matvecs`), so its totals
    are those of an uninterrupted run.
    """

    def __init__(self, op: LinearOperator, t0: float) -> None:
        self._op, self._t0 = op, float(t0)
        self._start = op.matvecs
        self._seconds_before, self._peak_before = 0.0, 0

    @property
    def matvecs(self) -> int:
        """Operator applications of the run so far, as in an uninterrupted run."""
        return self._op.matvecs - self._start

    @property
    def seconds(self) -> float:
        """Wall time of the run so far, summed over its sessions."""
        return self._seconds_before + time.perf_counter() - self._t0

    @property
    def peak_memory_bytes(self) -> int:
        """The largest memory high-water mark of the run's sessions (see
        :func:`~spectra._resources.peak_memory_bytes`)."""
        return max(self._peak_before, peak_memory_bytes(self._op.device))

    def result_fields(self) -> dict[str, Any]:
        """``matvecs``, ``seconds`` and ``peak_memory_bytes`` so far, as a result records them."""
        return {
            "matvecs": self.matvecs,
            "seconds": self.seconds,
            "peak_memory_bytes": self.peak_memory_bytes,
        }

    def resume_matvecs(self, used: int) -> None:
        """Count from a checkpoint that had used ``used`` matvecs."""
        self._start = self._op.matvecs - int(used)

    def to_arrays(self) -> dict[str, Any]:
        """``seconds`` and ``peak_memory_bytes`` so far."""
        return {
            "seconds": np.float64(self.seconds),
            "peak_memory_bytes": np.int64(self.peak_memory_bytes),
        }

    def from_arrays(self, arrays: StoredArrays) -> None:
        """The earlier sessions' time and peak (0 where a file of an early version has none)."""
        self._seconds_before = float(arrays["seconds"]) if "seconds" in arrays else 0.0
        if "peak_memory_bytes" in arrays:
            self._peak_before = int(arrays["peak_memory_bytes"])


def operator_probe(op: LinearOperator) -> np.ndarray:
    """Four numbers that tell matrices of the same size apart (costs 1 matvec).

    ``[||A p||, u_1.(A p), u_2.(A p), u_3.(A p)]`` for fixed pseudo-random p and
    u_i (drawn on the CPU in float64 from a fixed seed, then cast), accumulated
    in float64.  An operator's :meth:`~spectra.linear_operator.LinearOperator.fingerprint`
    identifies a curvature problem by its weights and data, but for a plain matrix
    or callable it only knows n and the dtype; this probe catches a different
    matrix of the same size.  Compared with a relative tolerance, since a
    product summed in another order (other thread count) differs in rounding.
    """
    gen = torch.Generator(device="cpu").manual_seed(_PROBE_SEED)
    size = op.shape[0]
    p = random_block(size, 1, gen, op.dtype, op.device)[:, 0]
    U = torch.randn((size, 3), generator=gen, dtype=torch.float64)
    w = (op @ p).to(torch.float64).cpu()
    return np.concatenate([[float(w.norm())], (U.T @ w).numpy()])


def _probe_matches(stored: np.ndarray, probe: np.ndarray, dtype: torch.dtype, n: int) -> bool:
    """Equal up to rounding: ``tol ||A p||`` for the norm, ``tol sqrt(n) ||A p||`` for the
    projections (||u_i|| ~ sqrt(n)), with ``tol = max(1e-8, 1e4 eps(dtype))``."""
    if stored.shape != probe.shape or not np.all(np.isfinite(stored)):
        return False
    tol = max(1e-8, 1e4 * torch.finfo(dtype).eps)
    scale = max(abs(float(probe[0])), abs(float(stored[0])))
    bound = tol * scale * np.concatenate([[1.0], np.full(probe.size - 1, math.sqrt(n))])
    return bool(np.all(np.abs(stored - probe) <= bound))


class KrylovCheckpoint:
    """One file holding the whole state of a Lanczos or SLQ run, replaced atomically.

    Layout: a magic line, the SHA-256 of the payload, and the payload, an
    ``np.savez`` archive (no pickles) with the iteration state and a JSON
    header: the algorithm (``kind``), its arguments, the operator's
    :meth:`~spectra.linear_operator.LinearOperator.fingerprint` and
    :func:`operator_probe`.  A file that fails the digest, cannot be parsed, or
    whose header differs from the current run raises
    :class:`~spectra.checkpoint.CheckpointError`.

    ``path`` is a file; when it names an existing folder the file is
    ``<folder>/<kind>.ckpt``.  ``version`` is the layout of the ``kind``'s state
    (1 for files without a ``format`` key); a file of another layout is refused.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        kind: str,
        op: LinearOperator,
        args: dict[str, Any],
        every: float,
        version: int = 1,
    ) -> None:
        self.path = self.file_for(path, kind, every)
        self.every = float(every)
        self.kind = kind
        self.dtype = op.dtype
        self.n = op.shape[0]
        self.version = int(version)
        self.header = {"kind": kind, "args": args, "fingerprint": op.fingerprint()}
        if self.version != 1:  # format 1 files have no "format" key
            self.header["format"] = self.version
        self.probe = operator_probe(op)
        self._last = time.monotonic()

    @staticmethod
    def file_for(path: str | os.PathLike, kind: str, every: float) -> Path:
        """The checkpoint file for ``path`` (``<path>/<kind>.ckpt`` for an existing folder),
        checked writable, and ``every`` checked; raises before any product is spent."""
        if not (isinstance(every, int | float) and every >= 0 and math.isfinite(every)):
            raise ValueError(f"checkpoint_every must be a finite number >= 0, got {every!r}")
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"checkpoint must be a path (str or os.PathLike), got {path!r}")
        path = Path(path)
        path = path / f"{kind}.ckpt" if path.is_dir() else path
        check_writable(path)
        return path

    @staticmethod
    def stored_args(path: str | os.PathLike, kind: str) -> dict[str, Any] | None:
        """The ``args`` of the ``kind`` checkpoint at ``path`` (a file or a folder), read
        without any product and without checking the digest, or None when there is none or
        it cannot be read (then the full :meth:`load` reports why).
        Algorithms that choose a size from the free memory use it to resume with the size
        the run started with."""
        try:
            p = Path(path)
            p = p / f"{kind}.ckpt" if p.is_dir() else p
            if not p.exists():
                return None
            with open(p, "rb") as fh:
                if fh.read(len(_MAGIC)) != _MAGIC:
                    return None
            header = json.loads(StoredArrays(p, len(_MAGIC) + 32)["__header__"].tobytes().decode())
        except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile):
            return None
        if not isinstance(header, dict) or header.get("kind") != kind:
            return None
        args = header.get("args")
        return args if isinstance(args, dict) else None

    def due(self) -> bool:
        """Whether ``every`` seconds have passed since the last save."""
        return time.monotonic() - self._last >= self.every

    def save_state(self, state: ResumableState, final: bool = False) -> None:
        """Save ``state`` when a save is :meth:`due`, or now when ``final``."""
        if final or self.due():
            self.save(state.to_arrays())

    def restore(self, state: ResumableState, arrays: StoredArrays) -> None:
        """Restore ``state`` from the arrays :meth:`load` returned; a state that cannot
        be restored from them is a damaged checkpoint (``CheckpointError``)."""
        try:
            state.from_arrays(arrays)
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise CheckpointError(
                f"checkpoint {self.path} is damaged ({exc}); delete it to start over"
            ) from None

    def save(self, arrays: dict[str, Any]) -> None:
        """Write the state, streamed: the archive goes straight to a temporary file (arrays
        in chunks of 16 MiB, so a non-contiguous view is never copied whole), its digest is
        computed by reading it back, and the file replaces the old one atomically.  Memory:
        O(chunk), not O(state): the state may be most of a memory budget."""
        header = dict(self.header, probe=self.probe.tolist())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"
        )
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)
            with os.fdopen(fd, "w+b") as fh:
                fh.write(_MAGIC + bytes(32))
                np.savez(
                    fh,
                    __header__=np.frombuffer(
                        json.dumps(header, sort_keys=True).encode(), dtype=np.uint8
                    ),
                    **{k: np.asarray(v) for k, v in arrays.items()},
                )
                fh.flush()
                fh.seek(len(_MAGIC) + 32)
                digest = _sha256_stream(fh)
                fh.seek(len(_MAGIC))
                fh.write(digest)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._last = time.monotonic()

    def load(self) -> StoredArrays | None:
        """The stored arrays (read on access), or None when there is no checkpoint yet.

        The digest is checked by streaming the file; arrays are then read one at a
        time when asked for (:class:`StoredArrays`), so a state of several GB is
        never held twice."""
        if not self.path.exists():
            return None
        where = f"checkpoint {self.path}"
        try:
            with open(self.path, "rb") as fh:
                if fh.read(len(_MAGIC)) != _MAGIC:
                    raise ValueError("not a spectra Krylov checkpoint (bad magic)")
                digest = fh.read(32)
                if _sha256_stream(fh) != digest:
                    raise ValueError("checksum mismatch: the file is truncated or corrupted")
            arrays = StoredArrays(self.path, len(_MAGIC) + 32)
            header = json.loads(arrays["__header__"].tobytes().decode())
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise CheckpointError(f"{where} is damaged ({exc}); delete it to start over") from None
        stored_version = header.get("format", 1)
        if header.get("kind") == self.kind and stored_version != self.version:
            raise CheckpointError(
                f"{where} is in checkpoint format {stored_version!r} of the {self.kind} "
                f"state; this version of spectra reads and writes format {self.version} "
                "(the state layout changed): delete it to start over"
            )
        diffs = []
        for key in ("kind", "args"):
            a, b = header.get(key), self.header[key]
            if a != b:
                diffs.append(f"{key}: checkpoint has {a!r}, this run has {b!r}")
        diffs += fingerprint_differences(
            header.get("fingerprint") or {}, self.header["fingerprint"]
        )
        stored = np.asarray(header.get("probe", []), dtype=np.float64)
        if not diffs and not _probe_matches(stored, self.probe, self.dtype, self.n):
            diffs.append(
                f"operator probe: checkpoint has {stored.tolist()}, this operator gives "
                f"{self.probe.tolist()} (another matrix of the same size?)"
            )
        if diffs:
            raise CheckpointError(
                f"{where} belongs to another computation ("
                + "; ".join(diffs)
                + "); use another checkpoint path or delete it"
            )
        return arrays


def _sha256_stream(fh: Any, chunk: int = _STREAM_CHUNK) -> bytes:
    """SHA-256 of the rest of ``fh``, read in chunks."""
    h = hashlib.sha256()
    while True:
        block = fh.read(chunk)
        if not block:
            return h.digest()
        h.update(block)


class StoredArrays:
    """The arrays of a checkpoint archive at ``offset`` in ``path``, read when asked for.

    ``saved[key]`` reads one array; :meth:`read_into` streams one into preallocated
    contiguous arrays (a basis straight into the tensors that hold it), so restoring
    never holds a large array twice.  Raises ``KeyError`` for a missing array and
    ``ValueError`` for one of another shape or dtype (callers report both as damage).
    """

    def __init__(self, path: Path, offset: int) -> None:
        self.path, self.offset = Path(path), int(offset)
        with self._open() as z:
            self.names = {name.removesuffix(".npy") for name in z.namelist()}

    def _open(self) -> Any:
        fh = open(self.path, "rb")
        fh.seek(self.offset)
        try:
            return _ClosingZip(fh)
        except BaseException:
            fh.close()
            raise

    def __contains__(self, key: object) -> bool:
        return key in self.names

    def keys(self) -> set[str]:
        """The names of the stored arrays (the header excluded)."""
        return set(self.names) - {"__header__"}

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.names:
            raise KeyError(key)
        with self._open() as z, z.open(key + ".npy") as member:
            return np.lib.format.read_array(member, allow_pickle=False)

    def read_into(self, key: str, outs: Sequence[np.ndarray], shape: tuple[int, ...]) -> None:
        """Stream array ``key``, which must have ``shape`` and the outs' dtype, into the
        C-contiguous ``outs`` in order (their sizes summing to the array's)."""
        if key not in self.names:
            raise KeyError(key)
        with self._open() as z, z.open(key + ".npy") as member:
            version = np.lib.format.read_magic(member)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            stored, fortran, dtype = read_header(member)
            want = outs[0].dtype if outs else None
            if tuple(stored) != tuple(shape) or fortran or (want is not None and dtype != want):
                raise ValueError(
                    f"array {key!r} is {tuple(stored)} {dtype}, expected {tuple(shape)} {want}"
                )
            if sum(o.size for o in outs) != math.prod(shape):
                raise ValueError(f"array {key!r} does not fill its destination")
            for out in outs:
                view = memoryview(out.reshape(-1).view(np.uint8))
                done = 0
                while done < view.nbytes:
                    got = member.readinto(view[done : done + _STREAM_CHUNK])
                    if not got:
                        raise ValueError(f"array {key!r} is truncated")
                    done += got


def tensor_to_array(t: torch.Tensor) -> np.ndarray:
    """``t`` as a NumPy array on the host; NumPy has no bfloat16, so such tensors
    travel as their int16 bit patterns (:func:`load_into` reads them back)."""
    t = t.detach().cpu()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _array_to_tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype == torch.bfloat16:
        if t.dtype != torch.int16:
            raise ValueError("a bfloat16 basis is stored as int16 bit patterns")
        return t.view(torch.bfloat16)
    if t.dtype != dtype:
        raise ValueError(f"stored basis has dtype {t.dtype}, expected {dtype}")
    return t


def load_into(
    saved: Any, key: str, tensors: Sequence[torch.Tensor], shape: tuple[int, ...]
) -> None:
    """Array ``key`` of a checkpoint (``shape``) into ``tensors``, which partition it in
    order (e.g. one basis per probe).  CPU tensors are filled in place from the file,
    with no temporary copy; others get the array through host memory."""
    direct = all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)
    if direct and isinstance(saved, StoredArrays):
        saved.read_into(key, [tensor_to_array(t) for t in tensors], shape)
        return
    dtype = tensors[0].dtype if tensors else torch.float64
    array = _array_to_tensor(saved[key], dtype)
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"array {key!r} is {tuple(array.shape)}, expected {tuple(shape)}")
    flat = array.reshape(-1)
    start = 0
    for t in tensors:
        t.copy_(flat[start : start + t.numel()].reshape(t.shape))
        start += t.numel()


class _ClosingZip(zipfile.ZipFile):
    """A ZipFile that also closes the file object it was opened on."""

    def __init__(self, fh: Any) -> None:
        self._owned = fh  # first: ZipFile.__del__ closes, even when __init__ raised
        super().__init__(fh)

    def close(self) -> None:
        """Close the archive and the file under it."""
        try:
            super().close()
        finally:
            self._owned.close()
