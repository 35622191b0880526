"""Exact Hessians and exact spectra for networks up to ~50k parameters.

The full matrix is built column block by column block from the Hessian
operator's batched products (forward-over-reverse under ``vmap``, as
``torch.func.hessian`` does, but never more than one block of tangents alive),
written straight into the preallocated result, symmetrised in place, and
diagonalised in place.  Peak memory is the matrix plus one block.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ._resources import available_memory_bytes
from .checkpoint import MatrixCheckpoint, StaleCheckpointError
from .curvature import CurvatureOperator, path_tolerance
from .dense_eigensolver import eigensolver_workspace_bytes, eigvalsh_inplace
from .hessian import hessian_operator
from .linear_operator import LinearOperator
from .spectrum import Spectrum

__all__ = [
    "AssembledMatrix",
    "available_memory_bytes",
    "dense_matrix",
    "exact_hessian",
    "exact_spectrum",
    "spectrum_of",
]


def _require_memory(
    n: int, dtype: torch.dtype, device: torch.device, extra: int, what: str
) -> None:
    itemsize = torch.empty((), dtype=dtype).element_size()
    need = n * n * itemsize + extra
    free = available_memory_bytes(device)
    if need > free:
        raise MemoryError(
            f"{what} needs about {need / 2**30:.2f} GiB ({need:,} bytes) for n = {n:,} "
            f"parameters in {dtype}, but only {free / 2**30:.2f} GiB ({free:,} bytes) is free "
            f"on {device}. Free memory (another process may hold it), use the matrix-free "
            "path instead (spectra.lanczos for extreme eigenvalues, spectra.spectral_density "
            "for the density), or select fewer parameters with params="
            + (", or use dtype=torch.float32." if itemsize > 4 else ".")
        )


class AssembledMatrix(NamedTuple):
    """A symmetric operator assembled densely (:func:`dense_matrix`).

    Attributes:
        matrix: (n, n) tensor in the operator's dtype and device, symmetrised.
        asymmetry: ``||A - A^T||_F / ||A||_F`` of the assembled matrix before it was
            symmetrised (round-off only, for a true Hessian).

    A tuple, so ``matrix, asymmetry = dense_matrix(op)`` unpacks it.
    """

    matrix: torch.Tensor
    asymmetry: float


def dense_matrix(
    op: LinearOperator,
    *,
    chunk_size: int | None = None,
    progress: bool | None = None,
    memory_check: bool = True,
    checkpoint: str | os.PathLike | MatrixCheckpoint | None = None,
    checkpoint_every: float = 300.0,
) -> AssembledMatrix:
    """Assemble a symmetric operator into an (n, n) tensor; symmetrise it in place.

    Returns the matrix with its asymmetry before symmetrisation
    (:class:`AssembledMatrix`); an asymmetry above :func:`asymmetry_tolerance` raises
    ``ValueError`` instead of being symmetrised away.  Rows are written block by
    block (the operator's block product, transposed: the operator is symmetric) of
    ``chunk_size`` columns (default :meth:`~spectra.linear_operator.LinearOperator.block_size`:
    for a curvature operator as many as fit a 1 GiB tangent budget), so peak memory
    is the matrix plus one block.

    With ``checkpoint`` (a folder; CPU only) the matrix is built in a memory-mapped
    file there and progress is committed atomically at most every
    ``checkpoint_every`` seconds (default 5 minutes: a commit flushes the rows
    written since the last one, so more frequent commits cost disk bandwidth).
    A run killed at any point and restarted with the same arguments resumes from
    the last commit and gives the same matrix, bit for bit.  A resumed build first
    checks its finished rows against the current code (one product against all of
    them, and its last committed block entry by entry) and raises
    :class:`StaleCheckpointError` if they differ beyond round-off (rows of other code
    for the same problem).  The returned tensor then shares memory with the file.
    """
    n = op.shape[0]
    chunk = _resolve_chunk(op, chunk_size)
    itemsize = torch.empty((), dtype=op.dtype).element_size()
    if memory_check:
        _require_memory(n, op.dtype, op.device, 4 * chunk * n * itemsize, "the exact Hessian")
    store = _open_checkpoint(op, checkpoint)
    started = time.monotonic()
    spent = float(store.state.get("build_seconds", 0.0)) if store is not None else 0.0
    if store is not None and store.rows_done and "build_seconds" not in store.state:
        store.state["build_seconds_untimed_rows"] = store.rows_done  # written by older code

    def elapsed() -> float:  # this build's seconds over all the sessions it spans
        return spent + time.monotonic() - started

    if store is not None:
        mapped = store.open("r+")
        H = torch.from_numpy(mapped)
        first = store.rows_done
        if first:
            _check_resumed_rows(op, H, first, chunk, store.folder, store.state.get("asymmetry"))
    else:
        mapped = None
        H = torch.empty((n, n), dtype=op.dtype, device=op.device)
        first = 0
    bar = tqdm(total=n, initial=first, desc="Hessian rows", unit="row", disable=_quiet(progress, n))
    last_commit = time.monotonic()
    for start in range(first, n, chunk):
        stop = min(n, start + chunk)
        E = torch.zeros((n, stop - start), dtype=op.dtype, device=op.device)
        E[torch.arange(start, stop), torch.arange(stop - start)] = 1
        H[start:stop] = (op @ E).T
        bar.update(stop - start)
        if store is not None and (stop == n or time.monotonic() - last_commit >= checkpoint_every):
            store.commit(mapped, rows_done=stop, build_seconds=elapsed())
            last_commit = time.monotonic()
    bar.close()
    block = max(chunk, 256)
    if store is not None and "asymmetry" in store.state:
        asym = float(store.state["asymmetry"])  # measured before an interrupted symmetrisation
    else:
        asym = _asymmetry(H, block)
        _refuse_asymmetry(op, asym)
        if store is not None:
            store.commit(mapped, asymmetry=asym, build_seconds=elapsed())
    _symmetrize_inplace(H, block)  # idempotent, so safe to redo after a crash
    if store is not None:
        store.commit(mapped, symmetrized=True, build_seconds=elapsed())
    return AssembledMatrix(H, asym)


def _check_resumed_rows(
    op: LinearOperator,
    H: torch.Tensor,
    rows_done: int,
    chunk: int,
    folder: Any,
    asymmetry: float | None = None,
) -> None:
    """Recompute part of a checkpoint's finished rows and compare them with the stored.

    The fingerprint names the problem (operator, weights, data, dtype), not the code that
    computed the rows; a resumed build, or a finished one whose eigenvalues are reused,
    must not splice rows (or return eigenvalues) of another function: a fixed bug,
    another library version.  Two checks, 1 + ``chunk`` products: every finished row
    against one product, ``H[:rows_done] p`` with ``(A p)[:rows_done]`` for a fixed
    random ``p`` (a change anywhere in those rows), and the last committed block entry
    by entry (a change that one product averages away).  The rows' own round-off is the
    tolerance: :func:`asymmetry_tolerance` bounds the relative Frobenius difference of
    two computations of the same entries.  A matrix already (or partly) symmetrised,
    ``asymmetry`` given, differs from freshly computed rows by up to half its recorded
    asymmetry as well, so ``asymmetry x ||H||_F`` (times ``||p||`` for the probe) is
    added to the allowed gap.  A difference below it, or in rows neither check
    reaches, cannot be seen.  ``StaleCheckpointError`` names the folder to delete.
    """
    n, tolerance = op.shape[0], asymmetry_tolerance(op)
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(n, generator=gen, dtype=torch.float64)
    product = (op @ probe.to(op.dtype).to(op.device)).to("cpu", torch.float64)[:rows_done]
    rows = max(1, (64 << 20) // (8 * n))  # read the stored rows 64 MiB at a time
    stored_product, squares = [], 0.0
    for r in range(0, rows_done, rows):
        block = H[r : min(r + rows, rows_done)].to(torch.float64)
        stored_product.append(block @ probe)
        squares += float(block.square().sum())
    stored_norm = squares**0.5  # ||H[:rows_done]||_F
    start = max(0, rows_done - chunk)
    E = torch.zeros((n, rows_done - start), dtype=op.dtype, device=op.device)
    E[torch.arange(start, rows_done), torch.arange(rows_done - start)] = 1
    fresh = (op @ E).T.to("cpu")
    del E
    stored = H[start:rows_done]
    symmetrised = float(asymmetry or 0.0) * stored_norm
    probe_norm = float(torch.linalg.vector_norm(probe))
    checks = (
        (
            f"rows 0..{rows_done - 1} times a probe vector",
            product,
            torch.cat(stored_product),
            symmetrised * probe_norm,
        ),
        (f"rows {start}..{rows_done - 1}", fresh, stored, symmetrised),
    )
    for what, new, old, allowance in checks:
        scale = float(torch.linalg.vector_norm(old, dtype=torch.float64))
        gap = float(torch.linalg.vector_norm(new - old.to(new.dtype), dtype=torch.float64))
        allowed = tolerance * scale + allowance
        if not gap <= max(allowed, torch.finfo(op.dtype).tiny):
            difference = gap / max(scale, torch.finfo(op.dtype).tiny)
            raise StaleCheckpointError(
                f"the checkpoint in {folder} holds rows that this code computes "
                f"differently ({what}: relative difference {difference:.2e}, tolerance "
                f"{allowed / max(scale, torch.finfo(op.dtype).tiny):.1e}): it was built by "
                "other code for the same problem. Delete the folder to rebuild from the start"
            )


def _open_checkpoint(
    op: LinearOperator, checkpoint: str | os.PathLike | MatrixCheckpoint | None
) -> MatrixCheckpoint | None:
    if checkpoint is None or isinstance(checkpoint, MatrixCheckpoint):
        return checkpoint
    if op.device.type != "cpu":
        raise ValueError(
            f"checkpoint= builds the matrix in a file on the host; the operator is on {op.device}"
        )
    return MatrixCheckpoint(checkpoint, op.fingerprint(), op.shape[0], op.dtype)


def _resolve_chunk(op: LinearOperator, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return min(int(chunk_size), op.shape[0])
    return op.block_size()


def _quiet(progress: bool | None, n: int) -> bool:
    return not progress if progress is not None else n < 5000


def _block_pairs(n: int, block: int):
    for i in range(0, n, block):
        for j in range(i, n, block):
            yield i == j, slice(i, min(n, i + block)), slice(j, min(n, j + block))


def _asymmetry(H: torch.Tensor, block: int) -> float:
    """||H - H^T||_F / ||H||_F, one block pair at a time (no n x n temporary)."""
    diff_sq = norm_sq = 0.0
    for diagonal, bi, bj in _block_pairs(H.shape[0], block):
        upper, lower_t = H[bi, bj].double(), H[bj, bi].T.double()
        factor = 1.0 if diagonal else 2.0
        diff_sq += factor * float(((upper - lower_t) ** 2).sum())
        norm_sq += float((upper**2).sum()) + (0.0 if diagonal else float((lower_t**2).sum()))
    return (diff_sq / norm_sq) ** 0.5 if norm_sq > 0 else 0.0


def asymmetry_tolerance(op: LinearOperator) -> float:
    """Largest ||A - A^T||_F / ||A||_F an assembled symmetric operator may show.

    Round-off of the products, scaled up from the operator's measured
    ``precision`` where it has one; a wrong product is far above it.
    """
    eps = float(getattr(op, "internal_eps", torch.finfo(op.dtype).eps))
    return max(path_tolerance(eps), 100 * float(getattr(op, "precision", 0.0)))


def _refuse_asymmetry(op: LinearOperator, asym: float) -> None:
    tol = asymmetry_tolerance(op)
    if asym > tol:
        raise ValueError(
            f"the assembled matrix is not symmetric: ||A - A^T||_F / ||A||_F = {asym:.2e}, far "
            f"above the rounding level of its products ({tol:.1e}); its products do not "
            "compute a symmetric matrix (for a curvature operator: an operation whose "
            "backward is not the derivative of its forward). Try backend='autograd'; "
            "symmetrising would hide the error"
        )


def _symmetrize_inplace(H: torch.Tensor, block: int) -> None:
    """H <- (H + H^T) / 2, block pair by block pair."""
    for _, bi, bj in _block_pairs(H.shape[0], block):
        avg = (H[bi, bj] + H[bj, bi].T) / 2
        H[bi, bj] = avg
        H[bj, bi] = avg.T


#: The arguments of :func:`exact_hessian` and :func:`exact_spectrum` that go to the dense
#: build (:func:`dense_matrix`, :func:`spectrum_of`); the others go to the operator.
BUILD_ARGUMENTS = ("chunk_size", "progress", "checkpoint", "checkpoint_every")


def exact_hessian(
    model: nn.Module, loss_fn: Callable[..., torch.Tensor], data: Any, **options: Any
) -> torch.Tensor:
    """The full (n, n) Hessian of the sample-averaged loss, symmetrised: always a tensor.

    The matrix :func:`exact_spectrum` diagonalises, built the same way, with the same
    arguments (but ``name``):

    Args:
        model, loss_fn, data: as for :func:`spectra.hessian_operator`.
        options: the build's ``chunk_size``, ``progress``, ``checkpoint`` and
            ``checkpoint_every``, and the operator's ``params``, ``dtype`` (default
            the model's), ``train_mode``, ``forward``, ``backend``, ...; see
            :func:`exact_spectrum`.  With ``checkpoint`` the returned tensor shares
            memory with the file in that folder.

    For the asymmetry ``||H - H^T||_F / ||H||_F`` measured before symmetrising, build
    the operator and assemble it: ``dense_matrix(hessian_operator(model, loss_fn, data,
    dtype=...))`` returns an :class:`AssembledMatrix` (matrix, asymmetry).

    Raises ``MemoryError`` before allocating anything if the matrix does not fit.
    """
    op, build = _exact_problem(model, loss_fn, data, options)
    return dense_matrix(op, **build).matrix


def exact_spectrum(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    data: Any,
    *,
    name: str | None = None,
    **options: Any,
) -> Spectrum:
    """All eigenvalues of the Hessian, as a :class:`~spectra.spectrum.Spectrum`.

    Args:
        model, loss_fn, data: as for :func:`spectra.hessian_operator`.
        name: label for plots.
        options: the dense build's and the operator's keyword arguments:

            * ``chunk_size``: columns per block; default the operator's
              :meth:`~spectra.curvature.CurvatureOperator.block_size` (as many as
              fit a 1 GiB tangent budget).  Memory is n^2 + ~4 x chunk x n scalars
              plus the model's activations for ``chunk`` tangents.
            * ``progress``: show a progress bar (default: for n >= 5000).
            * ``checkpoint``: a folder; the build resumes from it after an
              interruption (see :func:`dense_matrix`) and the eigenvalues are
              stored there once computed, so a re-run returns them without
              rebuilding; a checkpoint of another problem is refused.
            * ``checkpoint_every``: seconds between progress commits (default 300).
            * ``params``, ``dtype`` and the rest (``train_mode``, ``forward``,
              ``backend``, ...): the operator's (:func:`spectra.hessian_operator`);
              ``dtype`` follows the model's parameters, as for every operator (a
              float64 model is not silently solved in float32, whose eigenvalues are
              off by ~1e-7 x lambda_max).  ``dtype=torch.float32`` halves the memory
              of a float64 model's matrix (the paper's 50k-parameter networks: 10
              instead of 20 GB).

    Builds the matrix as :func:`exact_hessian` does and diagonalises it in place
    (:func:`~spectra.dense_eigensolver.eigvalsh_inplace`), so peak memory is one
    n x n matrix plus O(n) workspace on the CPU.  The memory check covers both
    steps and runs before any allocation (``MemoryError``).  Metadata: n
    parameters, n samples, dtype, the loss at the point, the asymmetry, build and
    solve seconds (with a checkpoint, the build's over all the sessions it spans, and
    reused eigenvalues report the times they took; ``build_seconds_untimed_rows``
    counts leading rows an older version built without timing them).
    """
    op, build = _exact_problem(model, loss_fn, data, options)
    return spectrum_of(op, name=name, **build)


def _exact_problem(
    model: nn.Module, loss_fn: Callable[..., torch.Tensor], data: Any, options: dict[str, Any]
) -> tuple[CurvatureOperator, dict[str, Any]]:
    """The Hessian operator of the exact path (in the model's dtype unless ``options``
    say ``dtype=``) and the build's arguments, split from ``options``."""
    build = {key: options.pop(key) for key in BUILD_ARGUMENTS if key in options}
    return hessian_operator(model, loss_fn, data, **options), build


def spectrum_of(
    op: CurvatureOperator,
    *,
    chunk_size: int | None = None,
    name: str | None = None,
    progress: bool | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: float = 300.0,
) -> Spectrum:
    """Exact spectrum of an already-built curvature operator (Hessian, GGN or Fisher).

    The build's arguments (:data:`BUILD_ARGUMENTS`) are those of :func:`exact_spectrum`,
    and ``name`` labels the result.
    """
    n = op.shape[0]
    itemsize = torch.empty((), dtype=op.dtype).element_size()
    store = _open_checkpoint(op, checkpoint)
    eigenvalues = store.load_array("eigenvalues") if store is not None else None
    from_checkpoint = eigenvalues is not None
    t0 = time.perf_counter()
    if eigenvalues is None:
        chunk = _resolve_chunk(op, chunk_size)
        extra = max(4 * chunk * n * itemsize, eigensolver_workspace_bytes(n, op.dtype, op.device))
        _require_memory(n, op.dtype, op.device, extra, "the exact spectrum")
        H, asym = dense_matrix(
            op,
            chunk_size=chunk,
            progress=progress,
            memory_check=False,
            checkpoint=store,
            checkpoint_every=checkpoint_every,
        )
        if store is not None:
            # solve on a private copy-on-write view so the checkpointed matrix stays intact
            del H
            H = torch.from_numpy(store.open("c"))
        t1 = time.perf_counter()
        eigenvalues = eigvalsh_inplace(H)
        del H
        if store is not None:
            store.state["solve_seconds"] = time.perf_counter() - t1
            store.save_array("eigenvalues", eigenvalues)
    else:
        asym = float(store.state["asymmetry"])
        # stored eigenvalues are only as current as the stored matrix: re-check it
        _check_resumed_rows(
            op,
            torch.from_numpy(store.open("c")),  # copy-on-write: read, never written
            n,
            _resolve_chunk(op, chunk_size),
            store.folder,
            asym,
        )
        t1 = t0
    t2 = time.perf_counter()
    timing = {"build_seconds": t1 - t0, "solve_seconds": t2 - t1}
    if store is not None:  # the build's and the solve's own times, over all sessions
        timing = {key: store.state.get(key, value) for key, value in timing.items()}
        if "build_seconds_untimed_rows" in store.state:
            timing["build_seconds_untimed_rows"] = store.state["build_seconds_untimed_rows"]
    return Spectrum.from_eigenvalues(
        eigenvalues,
        n_params=n,
        n_samples=op.num_samples,
        dtype=str(op.dtype).replace("torch.", ""),
        loss=op.loss,
        name=name,
        info={
            "operator": type(op).__name__,
            "reduction": op.reduction.kind,
            "loss_terms": op.num_terms,
            "precision": op.precision,
            "asymmetry": asym,
            **timing,
            "device": str(op.device),
            "eigenvalues_from_checkpoint": from_checkpoint,
        },
    )
