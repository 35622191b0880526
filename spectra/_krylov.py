"""The one Lanczos kernel shared by :func:`spectra.lanczos` and SLQ.

A single step of the symmetric Lanczos recurrence with *full*
reorthogonalisation, vectorised over a batch of independent Krylov bases (one
basis for eigenvalue problems, one per probe for stochastic Lanczos
quadrature).  The basis is stored row-major as ``Q`` of shape (b, m + 1, n):
row ``Q[p, j]`` is the j-th unit vector of basis p, so projections are GEMVs on
contiguous memory.  Orthogonalisation is classical Gram-Schmidt applied twice
("twice is enough", Giraud et al. 2005), which keeps the basis orthonormal to
working precision and makes the projected coefficients trustworthy.

Everything random is drawn on the CPU in float64 from a seeded
``torch.Generator`` and only then cast and moved, so a seed gives the same
vectors on every device.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ._checks import check_int
from .checkpoint import (
    CheckpointError,
    _same,
    check_writable,
    operator_fingerprint,
)
from .linear_operator import LinearOperator

__all__ = [
    "lanczos_step",
    "CompactBases",
    "rademacher_columns",
    "peak_memory_bytes",
    "default_memory_budget",
    "check_budget",
    "stored_args",
    "load_into",
    "StoredArrays",
    "random_block",
    "random_orthogonal",
    "progress_bar",
    "breakdown_tolerance",
    "KrylovCheckpoint",
    "checkpoint_file",
    "operator_probe",
]


def random_block(
    n: int,
    k: int,
    gen: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
    kind: str = "normal",
) -> torch.Tensor:
    """Random (n, k) block: ``"normal"`` or ``"rademacher"`` (+-1) entries.

    Drawn on the CPU from ``gen`` (normal: in float64) and then cast and moved, so
    results are identical across devices for a given seed.  Rademacher blocks are
    drawn in row chunks (:func:`rademacher_columns`), with the same values as one
    (n, k) draw and no (n, k) temporary.
    """
    if kind == "normal":
        X = torch.randn((n, k), generator=gen, dtype=torch.float64)
    elif kind == "rademacher":
        return rademacher_columns(n, k, gen, dtype, device)
    else:
        raise ValueError(f"unknown random kind {kind!r}")
    return X.to(dtype=dtype, device=device)


#: Random draws per chunk of :func:`rademacher_columns` (an int8 temporary of this size).
_RADEMACHER_CHUNK = 1 << 22


def rademacher_columns(
    n: int,
    k: int,
    gen: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
    cols: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Columns ``c0:c1`` of the (n, k) Rademacher block that ``gen`` gives.

    ``torch.randint`` on the CPU draws its elements one after another in row-major
    order, so drawing the (n, k) block in chunks of rows gives the same values and
    leaves ``gen`` in the same state as one draw; only the wanted columns are kept.
    This is how SLQ draws the start vectors of one block of probes without holding
    the others (each block redraws the stream from the seed: n k draws, cheap next to
    one product).  Temporaries: an int8 chunk of ``_RADEMACHER_CHUNK`` draws.
    """
    c0, c1 = (0, k) if cols is None else cols
    out = torch.empty((n, c1 - c0), dtype=dtype, device=device)
    rows = max(1, _RADEMACHER_CHUNK // max(k, 1))
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        R = torch.randint(0, 2, (r1 - r0, k), generator=gen, dtype=torch.int8)
        out[r0:r1] = (2 * R[:, c0:c1] - 1).to(dtype=dtype, device=device)
    return out


def random_orthogonal(
    basis: torch.Tensor, gen: torch.Generator, rtol: float = 1e-3
) -> torch.Tensor | None:
    """A random unit vector orthogonal to the rows of ``basis`` (j, n).

    Used after a Lanczos breakdown (an invariant subspace was found) to carry on
    in the orthogonal complement.  Returns None when the complement is empty to
    working precision (the basis already spans the space).
    """
    j, n = basis.shape
    if j >= n:
        return None
    v = random_block(n, 1, gen, basis.dtype, basis.device)[:, 0]
    norm0 = float(v.norm())
    for _ in range(2):
        v = v - basis.T @ (basis @ v)
    norm = float(v.norm())
    if norm <= rtol * norm0:
        return None
    return v / norm


def breakdown_tolerance(anorm: float, n: int, dtype: torch.dtype) -> float:
    """Below this ``beta`` the Krylov space is treated as invariant.

    After two Gram-Schmidt passes, the part of ``A q`` left over when the basis is
    invariant is rounding noise of size ~ sqrt(n) eps ||A||; a factor 10 margin
    keeps genuine (tiny but real) couplings from being dropped only when they
    are already below what the arithmetic can resolve.
    """
    eps = torch.finfo(dtype).eps
    return 10.0 * max(n, 1) ** 0.5 * eps * anorm


def lanczos_step(
    op: LinearOperator,
    Q: torch.Tensor,
    j: int,
    active: Sequence[int],
    iteration: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Expand the bases ``Q[p]`` (p in ``active``) from column j to column j + 1.

    Args:
        op: symmetric operator; applied once to the block of the ``len(active)``
            current vectors ``Q[active, j]`` (one block matvec).
        Q: (b, m + 1, n) basis storage in the operator's dtype and device; rows
            ``0..j`` of each active basis must be orthonormal.  Row ``j + 1`` is
            overwritten with the normalised new direction (left untouched when
            ``j + 1 == m + 1``); when the new direction is exactly zero it is set
            to zero and the caller must handle the breakdown.
        j: index of the vector to multiply.
        active: which bases to expand.
        iteration: reported in the error message when the operator returns a
            non-finite value.

    Returns:
        ``h`` (len(active), j + 1) float64: the projections ``Q[p, :j+1] @ A q_j``
        (the j-th column of the projected matrix; ``h[:, j]`` is alpha_j), and
        ``beta`` (len(active),) float64: the norm of the reorthogonalised
        remainder, i.e. the coupling to the next basis vector.
    """
    n = Q.shape[2]
    idx = list(active)
    if len(idx) == 1:
        W = (op @ Q[idx[0], j]).reshape(n, 1)
    else:
        W = op @ Q[idx, j].T
    if not bool(torch.isfinite(W).all()):
        raise FloatingPointError(
            f"the operator returned NaN or Inf at Lanczos iteration {iteration} "
            f"(basis vector {j}); check the model/loss for non-finite values"
        )
    W = W.T.contiguous()  # (b, n): each vector contiguous; orthogonalised in place below
    if W.untyped_storage().data_ptr() == Q.untyped_storage().data_ptr():
        W = W.clone()  # the operator returned a view of its input (e.g. the identity)
    if len(idx) == Q.shape[0]:
        # every basis active: one batched GEMV per pass instead of b small ones
        H = _reorthogonalize(Q[:, : j + 1], W)
    else:
        H = torch.cat([_reorthogonalize(Q[p, None, : j + 1], W[i, None]) for i, p in enumerate(idx)])
    hs = H.to(torch.float64).cpu().numpy()
    betas = torch.linalg.vector_norm(W, dim=1).to(torch.float64).cpu().numpy()
    if j + 1 < Q.shape[1]:
        for i, p in enumerate(idx):
            if betas[i] > 0:
                torch.div(W[i], float(betas[i]), out=Q[p, j + 1])
            else:
                Q[p, j + 1] = 0.0
    return hs, betas


def _reorthogonalize(basis: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Two passes of classical Gram-Schmidt of ``W`` (b, n) against ``basis`` (b, j, n).

    ``W`` is updated in place; returns the accumulated projections (b, j).  The
    correction is formed as the row product ``h^T basis`` so the basis is never
    transposed or copied: the temporaries are one (b, n) block.
    """
    h = torch.bmm(basis, W.unsqueeze(2)).squeeze(2)
    W.sub_(torch.bmm(h.unsqueeze(1), basis).squeeze(1))
    h2 = torch.bmm(basis, W.unsqueeze(2)).squeeze(2)
    W.sub_(torch.bmm(h2.unsqueeze(1), basis).squeeze(1))
    return h + h2


class CompactBases:
    """b independent Lanczos recurrences for SLQ that do not keep a full-precision basis.

    Each recurrence holds its last two vectors ``prev``, ``cur`` in the operator's
    dtype and runs the three-term recurrence on them, orthogonalising each new
    vector twice against both ("local" reorthogonalisation).  With ``store`` (a
    floating dtype narrower than the operator's) it also keeps copies of the older
    vectors in that dtype and orthogonalises the new vector against them with two
    classical Gram-Schmidt passes (products and sums in the operator's dtype, in
    column chunks so the up-cast temporary stays at about one vector):
    reorthogonalisation against a rounded basis, which leaves the true basis
    orthogonal to about the storage's rounding (see :func:`spectra.spectral_density`
    for the measured effect on the density).  float16 copies are stored scaled by
    sqrt(n), so the entries of a unit vector (~1/sqrt(n)) sit in float16's normal
    range whatever n is.

    Memory: ``2 n`` elements of the operator's dtype per recurrence plus
    ``(steps - 2) n`` of ``store`` (the two newest vectors are never stored twice).
    """

    def __init__(
        self,
        b: int,
        steps: int,
        n: int,
        dtype: torch.dtype,
        device: torch.device,
        store: torch.dtype | None,
    ) -> None:
        self.cur = torch.zeros((b, n), dtype=dtype, device=device)
        self.prev = torch.zeros((b, n), dtype=dtype, device=device)
        self.beta = np.zeros(b)  # beta_{j-1}: coupling of cur to prev
        self.store = store
        rows = max(steps - 2, 0) if store is not None else 0
        self.S = torch.zeros((b, rows, n), dtype=store, device=device) if store else None
        self.scale = math.sqrt(n) if store == torch.float16 else 1.0

    @staticmethod
    def bytes_per_recurrence(steps: int, n: int, dtype: torch.dtype,
                             store: torch.dtype | None) -> int:
        rows = max(steps - 2, 0) if store is not None else 0
        low = 0 if store is None else torch.empty((), dtype=store).element_size()
        return 2 * n * torch.empty((), dtype=dtype).element_size() + rows * n * low

    @property
    def nbytes(self) -> int:
        total = self.cur.nbytes + self.prev.nbytes
        return total + (0 if self.S is None else self.S.nbytes)

    def filled(self, j: int) -> int:
        """Stored rows at the start of step j (q_0 .. q_{j-2})."""
        return 0 if self.S is None else min(max(j - 1, 0), self.S.shape[1])

    def step(
        self, op: LinearOperator, j: int, active: Sequence[int], iteration: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Multiply ``cur`` (step j) of the ``active`` recurrences; returns (alpha, beta)
        float64 arrays of len(active) and advances ``prev``, ``cur`` and the store."""
        idx = list(active)
        n = self.cur.shape[1]
        if len(idx) == self.cur.shape[0]:
            X = self.cur
        else:
            X = self.cur[torch.as_tensor(idx, device=self.cur.device)]
        W = (op @ X[0]).reshape(1, n) if len(idx) == 1 else (op @ X.T).T.contiguous()
        if not bool(torch.isfinite(W).all()):
            raise FloatingPointError(
                f"the operator returned NaN or Inf at Lanczos iteration {iteration} "
                f"(basis vector {j}); check the model/loss for non-finite values"
            )
        if W.untyped_storage().data_ptr() == X.untyped_storage().data_ptr():
            W = W.clone()  # the operator returned a view of its input
        alphas = np.zeros(len(idx))
        betas = np.zeros(len(idx))
        for i, p in enumerate(idx):
            x, w, prev = X[i], W[i], self.prev[p]
            if j > 0:
                w.add_(prev, alpha=-float(self.beta[p]))
            alpha = float(torch.dot(x, w))
            w.add_(x, alpha=-alpha)
            c = float(torch.dot(x, w))  # second local pass
            w.add_(x, alpha=-c)
            alpha += c
            if j > 0:
                w.add_(prev, alpha=-float(torch.dot(prev, w)))
            rows = self.filled(j)
            if rows > 0:
                _reorthogonalize_stored(self.S[p, :rows], w, self.scale)
            beta = float(torch.linalg.vector_norm(w))
            alphas[i], betas[i] = alpha, beta
            # advance: q_{j-1} leaves the working pair (stored if a later step needs it)
            if self.S is not None and 0 < j and j - 1 < self.S.shape[1]:
                self.S[p, j - 1].copy_(prev if self.scale == 1.0 else prev * self.scale)
            prev.copy_(x)
            if beta > 0:
                torch.div(w, beta, out=self.cur[p])
            else:
                self.cur[p] = 0.0
            self.beta[p] = beta
        return alphas, betas

    def state(self, j: int) -> dict[str, np.ndarray]:
        """Arrays that restore the recurrences at the start of step j."""
        out = {"cur": self.cur.cpu().numpy(), "prev": self.prev.cpu().numpy(),
               "beta_prev": self.beta.copy()}
        if self.S is not None:
            out["stored"] = _to_numpy(self.S[:, : self.filled(j)])
        return out

    def restore(self, arrays: Any, j: int) -> None:
        b, n = self.cur.shape
        load_into(arrays, "cur", [self.cur], (b, n))
        load_into(arrays, "prev", [self.prev], (b, n))
        beta = np.array(arrays["beta_prev"], dtype=np.float64)
        if beta.shape != (b,):
            raise ValueError("beta_prev does not fit the block")
        self.beta = beta
        if self.S is not None:
            rows = self.filled(j)
            load_into(arrays, "stored", [self.S[p, :rows] for p in range(b)], (b, rows, n))


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """NumPy has no bfloat16: such tensors travel as their int16 bit patterns."""
    t = t.detach().cpu()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _from_numpy(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype == torch.bfloat16:
        if t.dtype != torch.int16:
            raise ValueError("a bfloat16 basis is stored as int16 bit patterns")
        return t.view(torch.bfloat16)
    if t.dtype != dtype:
        raise ValueError(f"stored basis has dtype {t.dtype}, expected {dtype}")
    return t


def _reorthogonalize_stored(S: torch.Tensor, w: torch.Tensor, scale: float) -> None:
    """Two classical Gram-Schmidt passes of ``w`` (n,) against the rows of the stored
    (narrow-dtype, ``scale`` x unit) basis ``S`` (r, n), in place.  Each sweep up-casts
    column chunks of S so the temporary stays at about one vector of w's dtype."""
    r, n = S.shape
    chunk = max(n // max(r, 1), 1 << 16)
    for _ in range(2):
        h = torch.zeros(r, dtype=w.dtype, device=w.device)
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            h += S[:, c0:c1].to(w.dtype) @ w[c0:c1]
        h /= scale * scale
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            w[c0:c1] -= h @ S[:, c0:c1].to(w.dtype)


# --- memory and time -----------------------------------------------------------------


def peak_memory_bytes(device: torch.device | str = "cpu") -> int:
    """The process's memory high-water mark, in bytes.

    CPU: ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the peak resident set size of
    the whole process since it started (it cannot be reset, so it bounds the run's
    own peak from above and includes everything the process held before).  CUDA:
    ``torch.cuda.max_memory_allocated(device)``, the peak of tensor memory since the
    last ``torch.cuda.reset_peak_memory_stats``.  0 where neither is available.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource
    except ImportError:  # not on POSIX
        return 0
    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


#: Share of the free memory an algorithm's own vectors may take by default; the rest
#: is left for the operator's products (a Hessian product's autograd temporaries).
DEFAULT_BUDGET_SHARE = 0.5


def default_memory_budget(device: torch.device) -> tuple[int, int]:
    """``(budget, free)``: half of :func:`spectra.exact.available_memory_bytes` now."""
    from .exact import available_memory_bytes  # (spectra.exact imports the algorithms)

    free = available_memory_bytes(device)
    return int(free * DEFAULT_BUDGET_SHARE), int(free)


def check_budget(value: Any) -> int | None:
    """``memory_budget`` as bytes (an int >= 1, integral floats accepted) or None."""
    return None if value is None else check_int("memory_budget", value)


def format_bytes(x: float) -> str:
    return f"{x / 2**30:.2f} GiB ({int(x):,} bytes)"


def progress_bar(total: int, desc: str, progress: bool | None) -> tqdm:
    """A tqdm bar; ``progress=None`` shows it only when stderr is a terminal."""
    if progress is None:
        progress = bool(getattr(sys.stderr, "isatty", lambda: False)())
    return tqdm(total=total, desc=desc, disable=not progress, leave=False, unit="matvec")


# --- checkpoints ---------------------------------------------------------------------

_MAGIC = b"SPECTRA-KRYLOV-CHECKPOINT-1\n"
_PROBE_SEED = 20240917


def operator_probe(op: LinearOperator) -> np.ndarray:
    """Four numbers that tell matrices of the same size apart (costs 1 matvec).

    ``[||A p||, u_1.(A p), u_2.(A p), u_3.(A p)]`` for fixed pseudo-random p and
    u_i (drawn on the CPU in float64 from a fixed seed, then cast), accumulated
    in float64.  :func:`~spectra.checkpoint.operator_fingerprint` identifies a
    curvature problem by its weights and data, but for a plain matrix or
    callable it only knows n and the dtype; this probe catches a different
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


def checkpoint_file(path: str | os.PathLike, kind: str, every: float) -> Path:
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


class KrylovCheckpoint:
    """One file holding the whole state of a Lanczos or SLQ run, replaced atomically.

    Layout: a magic line, the SHA-256 of the payload, and the payload, an
    ``np.savez`` archive (no pickles) with the iteration state and a JSON
    header: the algorithm (``kind``), its arguments, the operator's
    :func:`~spectra.checkpoint.operator_fingerprint` and :func:`operator_probe`.
    A file that fails the digest, cannot be parsed, or whose header differs from
    the current run raises :class:`~spectra.checkpoint.CheckpointError`.

    ``path`` is a file; when it names an existing folder the file is
    ``<folder>/<kind>.ckpt``.
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
        self.path = checkpoint_file(path, kind, every)
        self.every = float(every)
        self.kind = kind
        self.dtype = op.dtype
        self.version = int(version)
        self.header = {
            "kind": kind,
            "args": args,
            "fingerprint": operator_fingerprint(op),
        }
        if self.version != 1:  # format 1 files have no "format" key
            self.header["format"] = self.version
        self.probe = operator_probe(op)
        self._last = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.every

    def save(self, arrays: dict[str, Any]) -> None:
        """Write the state, streamed: the archive goes straight to a temporary file (arrays
        in chunks of 16 MiB, so a non-contiguous view is never copied whole), its digest is
        computed by reading it back, and the file replaces the old one atomically.  Memory:
        O(chunk), not O(state): the state may be most of a memory budget."""
        header = dict(self.header, probe=self.probe.tolist())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.",
                                   suffix=".tmp")
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)
            with os.fdopen(fd, "w+b") as fh:
                fh.write(_MAGIC + bytes(32))
                np.savez(
                    fh,
                    __header__=np.frombuffer(json.dumps(header, sort_keys=True).encode(),
                                             dtype=np.uint8),
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
        for key in ("kind", "args", "fingerprint"):
            a, b = header.get(key), self.header[key]
            if key == "fingerprint":
                diffs += _same(a or {}, b)
            elif a != b:
                diffs.append(f"{key}: checkpoint has {a!r}, this run has {b!r}")
        stored = np.asarray(header.get("probe", []), dtype=np.float64)
        if not diffs and not _probe_matches(stored, self.probe, self.dtype, n=self.header[
                "fingerprint"]["n"]):
            diffs.append(
                f"operator probe: checkpoint has {stored.tolist()}, this operator gives "
                f"{self.probe.tolist()} (another matrix of the same size?)"
            )
        if diffs:
            raise CheckpointError(
                f"{where} belongs to another computation (" + "; ".join(diffs)
                + "); use another checkpoint path or delete it"
            )
        return arrays


def _sha256_stream(fh: Any, chunk: int = 1 << 24) -> bytes:
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
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            stored, fortran, dtype = read_header(member)
            want = outs[0].dtype if outs else None
            if tuple(stored) != tuple(shape) or fortran or (want is not None and dtype != want):
                raise ValueError(f"array {key!r} is {tuple(stored)} {dtype}, expected "
                                 f"{tuple(shape)} {want}")
            if sum(o.size for o in outs) != math.prod(shape):
                raise ValueError(f"array {key!r} does not fill its destination")
            for out in outs:
                view = memoryview(out.reshape(-1).view(np.uint8))
                done = 0
                while done < view.nbytes:
                    got = member.readinto(view[done: done + (1 << 24)])
                    if not got:
                        raise ValueError(f"array {key!r} is truncated")
                    done += got


def load_into(saved: Any, key: str, tensors: Sequence[torch.Tensor],
              shape: tuple[int, ...]) -> None:
    """Array ``key`` of a checkpoint (``shape``) into ``tensors``, which partition it in
    order (e.g. one basis per probe).  CPU tensors are filled in place from the file,
    with no temporary copy; others get the array through host memory."""
    direct = all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)
    if direct and isinstance(saved, StoredArrays):
        saved.read_into(key, [_as_numpy_view(t) for t in tensors], shape)
        return
    dtype = tensors[0].dtype if tensors else torch.float64
    array = _from_numpy(saved[key], dtype)
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"array {key!r} is {tuple(array.shape)}, expected {tuple(shape)}")
    flat = array.reshape(-1)
    start = 0
    for t in tensors:
        t.copy_(flat[start: start + t.numel()].reshape(t.shape))
        start += t.numel()


def _as_numpy_view(t: torch.Tensor) -> np.ndarray:
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


class _ClosingZip(zipfile.ZipFile):
    """A ZipFile that also closes the file object it was opened on."""

    def __init__(self, fh: Any) -> None:
        super().__init__(fh)
        self._owned = fh

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._owned.close()


def stored_args(path: str | os.PathLike, kind: str) -> dict[str, Any] | None:
    """The ``args`` of the ``kind`` checkpoint at ``path`` (a file or a folder), read
    without any product and without checking the digest, or None when there is none or
    it cannot be read (then the full :meth:`KrylovCheckpoint.load` reports why).
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
