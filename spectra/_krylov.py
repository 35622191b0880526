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
import io
import json
import math
import os
import sys
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import (
    CheckpointError,
    _same,
    atomic_write_bytes,
    check_writable,
    operator_fingerprint,
)
from .linear_operator import LinearOperator

__all__ = [
    "lanczos_step",
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

    Drawn in float64 on the CPU from ``gen`` and then cast and moved, so results
    are identical across devices for a given seed.
    """
    if kind == "normal":
        X = torch.randn((n, k), generator=gen, dtype=torch.float64)
    elif kind == "rademacher":
        X = torch.randint(0, 2, (n, k), generator=gen, dtype=torch.int64).to(torch.float64)
        X = 2.0 * X - 1.0
    else:
        raise ValueError(f"unknown random kind {kind!r}")
    return X.to(dtype=dtype, device=device)


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
    ) -> None:
        self.path = checkpoint_file(path, kind, every)
        self.every = float(every)
        self.kind = kind
        self.dtype = op.dtype
        self.header = {
            "kind": kind,
            "args": args,
            "fingerprint": operator_fingerprint(op),
        }
        self.probe = operator_probe(op)
        self._last = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.every

    def save(self, arrays: dict[str, Any]) -> None:
        header = dict(self.header, probe=self.probe.tolist())
        bio = io.BytesIO()
        np.savez(
            bio,
            __header__=np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8),
            **{k: np.asarray(v) for k, v in arrays.items()},
        )
        payload = bio.getvalue()
        atomic_write_bytes(self.path, _MAGIC + hashlib.sha256(payload).digest() + payload)
        self._last = time.monotonic()

    def load(self) -> dict[str, np.ndarray] | None:
        """The stored arrays, or None when there is no checkpoint yet."""
        if not self.path.exists():
            return None
        where = f"checkpoint {self.path}"
        try:
            blob = self.path.read_bytes()
            if not blob.startswith(_MAGIC):
                raise ValueError("not a spectra Krylov checkpoint (bad magic)")
            digest, payload = blob[len(_MAGIC): len(_MAGIC) + 32], blob[len(_MAGIC) + 32:]
            if hashlib.sha256(payload).digest() != digest:
                raise ValueError("checksum mismatch: the file is truncated or corrupted")
            with np.load(io.BytesIO(payload), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            header = json.loads(arrays.pop("__header__").tobytes().decode())
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise CheckpointError(f"{where} is damaged ({exc}); delete it to start over") from None
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
