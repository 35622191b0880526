"""Spectral density by stochastic Lanczos quadrature (SLQ).

For a Rademacher probe v (normalised), ``v^T f(A) v`` is a quadrature of f
against the probe's spectral measure ``sum_i (q_i^T v)^2 delta(lambda_i)``,
whose average over probes is the spectrum's measure ``(1/n) sum_i
delta(lambda_i)``.  m Lanczos steps from v give the m-point Gauss rule for the
probe's measure: nodes are the Ritz values of the tridiagonal T, weights the
squared first components of T's eigenvectors (Golub & Meurant).  Averaging the
rules of ``num_probes`` probes gives a discrete measure with
``num_probes x num_steps`` nodes, returned as a quadrature
:class:`~spectra.Spectrum`.

The probes run as independent Lanczos recurrences advanced together: each step
applies the operator once to an (n, num_probes) block (one block matvec), and
each probe's new vector is fully reorthogonalised against that probe's own
basis (the shared kernel in :mod:`spectra._krylov`).  This is *not* block
Lanczos; the probes stay independent so each gives its own Gauss rule.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import scipy.linalg
import torch

from ._checks import check_int, check_seed
from ._krylov import (
    KrylovCheckpoint,
    breakdown_tolerance,
    lanczos_step,
    progress_bar,
    random_block,
)
from .checkpoint import CheckpointError
from .linear_operator import LinearOperator, as_linear_operator, check_symmetric
from .spectrum import Spectrum, default_sigma

__all__ = ["spectral_density"]

SIGMA_RULE = "default_sigma: (lambda_max - lambda_min) / 200 of the quadrature nodes (1e-3 if 0)"


def spectral_density(
    op: Any,
    num_probes: int = 10,
    num_steps: int = 100,
    seed: int = 0,
    *,
    n: int | None = None,
    check_symmetry: bool = True,
    max_basis_bytes: int = 2**32,
    name: str | None = None,
    progress: bool | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: float = 300.0,
) -> Spectrum:
    """Stochastic Lanczos quadrature of a symmetric operator's spectrum.

    Args:
        op: anything :func:`~spectra.as_linear_operator` accepts (a callable needs
            ``n=``).
        num_probes: Rademacher probes (default 10).  The probe error of the
            cumulative spectral distribution shrinks like ``1 / sqrt(n *
            num_probes)``, so for networks (n >= 1e4) 10 probes already put it
            below the quadrature error; more probes mainly help tiny n.
        num_steps: Lanczos steps per probe (default 100, capped at n).  The
            Gauss rule's resolution is ~ (lambda_max - lambda_min) / num_steps in
            the bulk, while isolated outliers converge to working precision in a
            few tens of steps; 100 steps resolve a neural network's
            bulk-plus-outliers shape.
        seed: seeds the probes and the symmetry check; deterministic given it.
            An int in ``[0, 2**63)``; None is refused (pick one, so the run can be
            repeated).
        n: size, for a callable ``op``.
        check_symmetry: probe symmetry once (2 matvecs); raise ``ValueError``.
        max_basis_bytes: the reorthogonalisation basis holds ``num_probes x
            (num_steps + 1) x n`` numbers of the operator's dtype; above this
            many bytes (default 4 GiB) a ``MemoryError`` names the size and what
            to reduce.
        name: label for plots.
        progress: tqdm progress bar (default: only on a terminal).
        checkpoint: a file (or an existing folder, then ``<folder>/slq.ckpt``)
            where the state of all recurrences (the bases so far, alphas,
            betas, lengths, matvecs) is saved atomically at a step boundary at
            most every ``checkpoint_every`` seconds, and at the end.  Rerun with
            the same arguments after a crash (even SIGKILL) and the run resumes
            and returns bit-for-bit the nodes and weights of an uninterrupted
            run (given deterministic products).  A checkpoint of another
            operator (see :func:`~spectra.lanczos` for the fingerprint and probe)
            or other arguments (num_probes, num_steps, seed, check_symmetry), or a
            damaged file, raises :class:`~spectra.checkpoint.CheckpointError`.
            Size: up to ``num_probes x (num_steps + 1) x n`` numbers (the
            bases), e.g. 0.4 GB for 10 probes x 100 steps at n = 5e4 in float64;
            each save writes it whole.  Costs 1 extra matvec (not counted).
            With a distributed operator, give each rank its own path.  The
            folder must exist and be writable; that is checked before the first
            product.
        checkpoint_every: seconds between saves (default 300; 0: every step).

    Returns:
        ``Spectrum`` of kind "quadrature" whose ``eigenvalues`` are the Gauss
        nodes and ``weights`` (summing to 1) the averaged Gauss weights.  Its
        ``info`` holds ``num_probes``, ``num_steps`` (requested),
        ``steps_per_probe`` (after any early breakdown, where the Gauss rule is
        exact), ``seed``, ``matvecs`` and the broadening width ``sigma`` with
        its rule ``sigma_rule``: :func:`~spectra.spectrum.default_sigma`, 1/200
        of the node range, used by ``.density(grid)`` when no sigma is passed.

    Counts (``num_probes``, ``num_steps``, ``max_basis_bytes``) may be integral
    floats (``5.0``); other non-integers are refused.

    Cost: ``num_probes x num_steps`` matvecs (+2 for the symmetry check).
    """
    op = as_linear_operator(op, n=n)
    size = op.shape[0]
    num_probes = check_int("num_probes", num_probes)
    num_steps = check_int("num_steps", num_steps)
    seed = check_seed(seed)
    steps = min(num_steps, size)
    _check_memory(num_probes, steps, size, op.dtype, check_int("max_basis_bytes", max_basis_bytes))
    ckpt, saved = None, None
    if checkpoint is not None:
        args = {"num_probes": num_probes, "num_steps": steps, "seed": seed,
                "check_symmetry": bool(check_symmetry)}
        ckpt = KrylovCheckpoint(checkpoint, "slq", op, args, checkpoint_every)  # checks first
        saved = ckpt.load()
    start = op.matvecs
    if check_symmetry and saved is None:
        check_symmetric(op, seed=seed)
    gen = torch.Generator(device="cpu").manual_seed(seed + 2)
    alphas, betas, lengths, used = _slq_recurrences(op, num_probes, steps, gen, progress,
                                                    start, ckpt, saved)
    start = op.matvecs - used
    nodes, weights = _gauss_rules(alphas, betas, lengths)
    sigma = default_sigma(nodes)
    info = {
        "method": "slq",
        "num_probes": num_probes,
        "num_steps": num_steps,
        "steps_per_probe": [int(x) for x in lengths],
        "seed": seed,
        "matvecs": int(op.matvecs - start),
        "sigma": float(sigma),
        "sigma_rule": SIGMA_RULE,
        "probes": "rademacher",
        "reorthogonalization": "full",
    }
    return Spectrum.from_quadrature(
        nodes, weights, size, name=name, dtype=str(op.dtype).replace("torch.", ""), info=info
    )


def _check_memory(
    probes: int, steps: int, size: int, dtype: torch.dtype, limit: int
) -> None:
    itemsize = torch.empty((), dtype=dtype).element_size()
    need = probes * (steps + 1) * size * itemsize
    if need > limit:
        raise MemoryError(
            f"SLQ with full reorthogonalisation stores num_probes x (num_steps + 1) x n = "
            f"{probes} x {steps + 1} x {size} values = {need / 2**30:.2f} GiB "
            f"(> max_basis_bytes = {limit / 2**30:.2f} GiB); use fewer num_steps or "
            "num_probes, or raise max_basis_bytes"
        )


def _slq_recurrences(
    op: LinearOperator,
    probes: int,
    steps: int,
    gen: torch.Generator,
    progress: bool | None,
    start: int,
    ckpt: KrylovCheckpoint | None = None,
    saved: dict[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Run ``probes`` independent Lanczos recurrences with one block matvec per step.

    Returns alphas (probes, steps), betas (probes, steps) and the number of valid
    steps per probe (a probe that breaks down stops: its Krylov space is
    invariant and its Gauss rule exact), and the matvecs used since ``start``
    (the symmetry check's included; on resume, as in the uninterrupted run).
    """
    size = op.shape[0]
    Q = torch.zeros((probes, steps + 1, size), dtype=op.dtype, device=op.device)
    if saved is None:
        V = random_block(size, probes, gen, op.dtype, op.device, kind="rademacher")
        Q[:, 0] = (V / math.sqrt(size)).T
        del V
        alphas = np.zeros((probes, steps))
        betas = np.zeros((probes, steps))
        lengths = np.zeros(probes, dtype=np.int64)
        anorm = np.zeros(probes)
        active = list(range(probes))
        j0, done = 0, False
    else:
        alphas, betas, lengths, anorm, active, j0, done, offset = _restore(saved, Q, ckpt)
        start = op.matvecs - offset  # matvecs count as in the uninterrupted run

    def save(j_next: int, finished: bool) -> None:
        if ckpt is not None and (finished or ckpt.due()):
            ckpt.save({
                "Q": Q[:, : j_next + 1].cpu().numpy(), "alphas": alphas, "betas": betas,
                "lengths": lengths, "anorm": anorm, "active": np.array(active, dtype=np.int64),
                "scalars": np.array([j_next, int(finished), op.matvecs - start], dtype=np.int64),
            })

    with progress_bar(probes * steps, f"slq({probes} probes)", progress) as bar:
        bar.update(op.matvecs - start)
        for j in range(j0, steps if not done else j0):
            h, beta = lanczos_step(op, Q, j, active, iteration=j)
            bar.update(len(active))
            still = []
            for i, p in enumerate(active):
                alphas[p, j] = h[i, j]
                betas[p, j] = beta[i]
                lengths[p] = j + 1
                anorm[p] = max(anorm[p], math.sqrt(float(h[i] @ h[i]) + beta[i] ** 2))
                if beta[i] > breakdown_tolerance(anorm[p], size, op.dtype):
                    still.append(p)
            active = still
            if not active:
                break
            save(j + 1, False)  # resume point: step j + 1
    if not done:
        save(0, True)  # finished: the bases are no longer needed, only the rules
    return alphas, betas, lengths, op.matvecs - start


def _restore(
    saved: dict[str, np.ndarray], Q: torch.Tensor, ckpt: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[int], int, bool, int]:
    probes, rows, size = Q.shape
    try:
        j, finished, used = (int(x) for x in saved["scalars"])
        alphas = np.array(saved["alphas"], dtype=np.float64)
        betas = np.array(saved["betas"], dtype=np.float64)
        lengths = np.array(saved["lengths"], dtype=np.int64)
        anorm = np.array(saved["anorm"], dtype=np.float64)
        active = [int(p) for p in saved["active"]]
        basis = torch.from_numpy(saved["Q"])
        if (alphas.shape != (probes, rows - 1) or betas.shape != alphas.shape
                or lengths.shape != (probes,) or anorm.shape != (probes,)
                or not 0 <= j < rows or basis.shape != (probes, j + 1, size)
                or any(not 0 <= p < probes for p in active)):
            raise ValueError("array shapes do not fit num_probes, num_steps and n")
        Q[:, : j + 1] = basis.to(Q.dtype)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt.path} is damaged ({exc}); delete it to start "
                              "over") from None
    return alphas, betas, lengths, anorm, active, j, bool(finished), used


def _gauss_rules(
    alphas: np.ndarray, betas: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of the averaged Gauss rules (weights sum to 1)."""
    probes = alphas.shape[0]
    nodes, weights = [], []
    for p in range(probes):
        m = int(lengths[p])
        theta, S = scipy.linalg.eigh_tridiagonal(alphas[p, :m], betas[p, : m - 1])
        tau = S[0, :] ** 2
        nodes.append(theta)
        weights.append(tau / tau.sum() / probes)
    return np.concatenate(nodes), np.concatenate(weights)
