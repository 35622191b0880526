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

The probes are independent Lanczos recurrences, run in blocks of ``block_size``
probes one block after another: each step applies the operator once to an
(n, block_size) block (one block matvec) and each probe's new vector is
reorthogonalised against that probe's own basis (the shared kernel in
:mod:`spectra._krylov`).  This is *not* block Lanczos; the probes stay
independent so each gives its own Gauss rule, and only one block's bases are in
memory at a time, so memory does not grow with the number of probes.  The
block is as many probes as fit the memory budget (all of them for small n,
which is the one-block run of earlier versions, bit for bit).  When not even
one probe's full basis fits, a cheaper reorthogonalisation is used (see
``reorthogonalization``).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.linalg
import torch

from ._checks import check_int, check_seed
from ._krylov import CompactBases, breakdown_tolerance, lanczos_step, rademacher_columns
from ._precision import ieee_float32
from ._resources import check_budget, default_memory_budget, format_bytes, progress_bar
from .linear_operator import LinearOperator, as_linear_operator, check_symmetric
from .resumable import KrylovCheckpoint, RunTotals, StoredArrays, load_into, tensor_to_array
from .spectrum import Spectrum, default_sigma

__all__ = ["spectral_density", "gauss_mass_bounds", "gauss_rule_prefix", "REORTHOGONALIZATION"]

SIGMA_RULE = (
    "default_sigma: (lambda_max - lambda_min) / 200 of the quadrature nodes "
    "(1e-3 if that is 0 or below float64's smallest normal)"
)

#: Accepted ``reorthogonalization`` values.  "full": against the probe's whole basis in
#: the operator's dtype; "float32" / "float16" / "bfloat16": against a copy of the basis
#: stored in that (narrower) dtype; "local": against the previous two vectors only (no
#: stored basis); "auto": the first of full, half-width storage, local that fits.
REORTHOGONALIZATION = ("auto", "full", "float32", "float16", "bfloat16", "local")
_STORE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: The SLQ checkpoint layout: 2 since probes run in blocks (block start, per-block basis,
#: the reorthogonalisation scheme and block size among the arguments).
CHECKPOINT_FORMAT = 2

#: Vectors of the operator's dtype a probe needs besides its stored basis during a step:
#: the product ``A q`` and its contiguous transpose.
_TEMPORARIES = 2


@ieee_float32()
def spectral_density(
    op: Any,
    num_probes: int = 10,
    num_steps: int = 100,
    seed: int = 0,
    *,
    n: int | None = None,
    check_symmetry: bool = True,
    reorthogonalization: str = "auto",
    memory_budget: int | None = None,
    block_size: int | None = None,
    max_basis_bytes: int | None = None,
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
            repeated).  Probe p's start vector is column p of one (n, num_probes)
            Rademacher draw, whatever the block size.
        n: size, for a callable ``op``.
        check_symmetry: probe symmetry once (2 matvecs); raise ``ValueError``.
        reorthogonalization: how each new Lanczos vector is kept orthogonal to its
            probe's earlier ones; memory per probe for m = num_steps, in numbers:

            * ``"full"``: two Gram-Schmidt passes against the whole basis in the
              operator's dtype (``m n``).  The reference.
            * ``"float16"``, ``"bfloat16"``, ``"float32"``: the same passes
              against a copy of the basis stored in that narrower dtype
              (``(m - 2) n`` narrow + ``2 n`` working vectors: about half the
              memory); the arithmetic stays in the operator's dtype.  float16 is
              stored scaled by sqrt(n) (entries ~1, in its normal range).
            * ``"local"``: no stored basis; each new vector is orthogonalised
              against the previous two only (``2 n``), the textbook three-term
              recurrence.  Orthogonality is lost once Ritz values converge, and
              converged outliers reappear as "ghost" copies that share the
              outlier's weight, so the Gauss rules stay quadratures of nearly the
              right measure (Paige; Greenbaum 1989) but are less accurate.
            * ``"auto"`` (default): full where one probe's basis fits the memory
              budget, else the half-width copy (float16 for a float32 operator,
              float32 for a float64 one), else local.

            Measured against the exact spectrum (``eigvalsh``) of a trained
            3,605-parameter MLP Hessian, 10 probes x 80 steps, 3 seeds
            (``python -m benchmarks large --accuracy``; table in
            ``benchmarks/README.md``): a float16 / bfloat16 copy (float32
            operator) gives a Wasserstein-1 distance to full reorthogonalisation
            on the same probes of 1e-7 to 2e-7 of the spectral range, four orders
            below the probe noise (W1 to the exact spectrum 8.2e-4 either way),
            with the basis orthogonal to 2e-5 / 2e-4 instead of 5e-7; "local"
            differs from full by 7e-4 of the range (as much as the probe noise),
            W1 to exact 9.1e-4, and puts several copies of the top eigenvalue in
            one probe's rule.  The scheme used is ``info["reorthogonalization"]``.
            A disk-backed basis is not offered: every step reads the whole
            basis twice, which at the sizes that need it costs more than the
            products.
        memory_budget: bytes the probes' vectors may take at once (stored bases,
            working vectors and the 2 product temporaries per probe of a block).
            Default: half of the free memory of the operator's device
            (:func:`spectra.exact.available_memory_bytes`) at the call, the rest
            being left for the operator's products.  It sets the block size and,
            with ``"auto"``, the scheme; a fixed scheme whose one probe does not
            fit raises ``MemoryError`` naming n, the dtype, the bytes per vector
            and per probe and the budget, before any product.
        block_size: probes advanced together, one block matvec per step
            (default: as many as fit the budget, at most num_probes; 1 when
            "auto" had to fall back to a cheaper scheme).  1 runs the probes one
            after another (single-vector products; for a Hessian operator those
            reuse one cached gradient graph).  The budget counts the probes'
            vectors, not the operator's own workspace per column: a Hessian
            block product (torch.func forward-over-reverse) holds every column's
            tangents, measured at GPT-2 small (124M parameters, 512 tokens) as
            6.7 GiB more peak memory for a block of 2 than for one vector, and no cheaper
            per vector there (10.3 s against 9.2 s); pass block_size=1 for
            large models.
        max_basis_bytes: accepted as the former name of ``memory_budget`` (it
            capped the bases of all probes together, at 4 GiB by default; they no
            longer coexist); give one or the other.
        name: label for plots.
        progress: tqdm progress bar: matvecs done of ``num_probes x num_steps``
            and the estimated time left (default: only on a terminal).
        checkpoint: a file (or an existing folder, then ``<folder>/slq.ckpt``)
            where the state (the current block's basis, every probe's alphas,
            betas and lengths, matvecs, seconds) is saved atomically at a step
            boundary at most every ``checkpoint_every`` seconds, and at the end.
            Rerun with the same arguments after a crash (even SIGKILL) and the
            run resumes and returns bit-for-bit the nodes and weights of an
            uninterrupted run (given deterministic products); a scheme and block
            size chosen from the free memory are taken from the checkpoint when
            they fit.  A checkpoint of another operator (see
            :func:`~spectra.lanczos` for the fingerprint and probe) or other
            arguments (num_probes, num_steps, seed, check_symmetry, the scheme,
            the block size), a file of checkpoint format 1 (earlier versions,
            all probes in one block), or a damaged file, raises
            :class:`~spectra.checkpoint.CheckpointError`.  Size: one block's
            basis, up to ``block_size x num_steps x n`` numbers, e.g. 0.4 GB for
            10 probes x 100 steps at n = 5e4 in float64; each save writes it
            whole.  Costs 1 extra matvec (not counted).  With a distributed
            operator, give each rank its own path.  The folder must exist and be
            writable; that is checked before the first product.
        checkpoint_every: seconds between saves (default 300; 0: every step).

    Returns:
        ``Spectrum`` of kind "quadrature" whose ``eigenvalues`` are the Gauss
        nodes and ``weights`` (summing to 1) the averaged Gauss weights.  Its
        ``info`` holds ``num_probes``, ``num_steps`` (requested),
        ``steps_per_probe`` (after any early breakdown, where the Gauss rule is
        exact), ``seed``, ``matvecs``, the broadening width ``sigma`` with its
        rule ``sigma_rule`` (:func:`~spectra.spectrum.default_sigma`, 1/200 of
        the node range, used by ``.density(grid)`` when no sigma is passed),
        ``reorthogonalization`` (the scheme used), ``block_size``,
        ``basis_bytes`` (the bytes of the vectors the algorithm held at once: one
        block's bases and working vectors), ``memory_budget``, ``seconds`` (wall
        time, summed over resumed sessions) and ``peak_memory_bytes`` (the largest
        over resumed sessions) with
        ``peak_memory_source``: the process's high-water mark at the end (CPU:
        ``ru_maxrss``, process-wide since start; CUDA:
        ``torch.cuda.max_memory_allocated``).

    Counts (``num_probes``, ``num_steps``, ``memory_budget``, ``block_size``) may
    be integral floats (``5.0``); other non-integers are refused.

    Cost: ``num_probes x num_steps`` matvecs (+2 for the symmetry check), in
    ``ceil(num_probes / block_size) x num_steps`` operator calls.
    """
    t0 = time.perf_counter()
    op = as_linear_operator(op, n=n)
    size = op.shape[0]
    num_probes = check_int("num_probes", num_probes)
    num_steps = check_int("num_steps", num_steps)
    seed = check_seed(seed)
    steps = min(num_steps, size)
    if reorthogonalization not in REORTHOGONALIZATION:
        raise ValueError(
            f"reorthogonalization must be one of {REORTHOGONALIZATION}, got {reorthogonalization!r}"
        )
    budget = check_budget(memory_budget)
    if max_basis_bytes is not None:
        if budget is not None:
            raise ValueError("give memory_budget or max_basis_bytes (its former name), not both")
        budget = check_int("max_basis_bytes", max_basis_bytes)
    if block_size is not None:
        block_size = check_int("block_size", block_size)
    previous = None
    if checkpoint is not None:
        checkpoint = KrylovCheckpoint.file_for(checkpoint, "slq", checkpoint_every)
        previous = KrylovCheckpoint.stored_args(checkpoint, "slq")
    plan = _plan(op, num_probes, steps, reorthogonalization, budget, block_size, previous)
    ckpt, saved = None, None
    if checkpoint is not None:
        args = {
            "num_probes": num_probes,
            "num_steps": steps,
            "seed": seed,
            "check_symmetry": bool(check_symmetry),
            "reorthogonalization": plan.scheme,
            "block_size": plan.block,
        }
        ckpt = KrylovCheckpoint(
            checkpoint, "slq", op, args, checkpoint_every, version=CHECKPOINT_FORMAT
        )  # checks first
        saved = ckpt.load()
    totals = RunTotals(op, t0)
    if check_symmetry and saved is None:
        check_symmetric(op, seed=seed)
    run, basis_bytes = _slq_recurrences(
        op, num_probes, steps, seed, plan, progress, totals, ckpt, saved
    )
    nodes, weights = _gauss_rules(run.alphas, run.betas, run.lengths)
    sigma = default_sigma(nodes)
    device = op.device
    info = {
        "method": "slq",
        "num_probes": num_probes,
        "num_steps": num_steps,
        "steps_per_probe": [int(x) for x in run.lengths],
        "seed": seed,
        "matvecs": int(totals.matvecs),
        "sigma": float(sigma),
        "sigma_rule": SIGMA_RULE,
        "probes": "rademacher",
        "reorthogonalization": plan.scheme,
        "block_size": plan.block,
        "basis_bytes": int(basis_bytes),
        "memory_budget": int(plan.budget),
        "seconds": float(totals.seconds),
        "peak_memory_bytes": totals.peak_memory_bytes,
        "peak_memory_source": _peak_source(device),
    }
    return Spectrum.from_quadrature(
        nodes, weights, size, name=name, dtype=str(op.dtype).replace("torch.", ""), info=info
    )


def gauss_mass_bounds(nodes: Any, weights: Any, lo: float, hi: float) -> tuple[float, float]:
    """Bounds on one probe's spectral mass in [lo, hi] from its Gauss quadrature rule.

    ``nodes`` (m,) and ``weights`` (m,): one probe's m-step Lanczos rule (the Ritz values
    and the squared first components of their eigenvectors, summing to 1), as one
    probe's :func:`spectral_density` returns.  The probe's spectral measure mu (its
    weights on the exact eigenvalues) and the rule share their first 2m moments, which
    forces the Chebyshev-Markov-Stieltjes inequalities: for sorted nodes theta_j,
    ``sum_{i<j} w_i <= mu((-inf, theta_j))`` and ``mu((-inf, theta_j]) <= sum_{i<=j} w_i``.
    Hence ``mu([lo, hi])`` is at most the weight of the nodes inside plus the nearest
    node outside on each side, and at least that of the nodes inside less the first and
    the last of them.  Why: the rule's own value (the weight of the nodes inside) can be
    far off for an interval narrower than the node spacing (a near-zero fraction at a
    tolerance below SLQ's resolution reads 0 with a tiny probe-to-probe error), and
    these bounds say how far.  Exact in exact arithmetic; with an orthogonal basis
    (full reorthogonalisation, or a basis stored in a narrower dtype) they hold to about
    its rounding; with "local" reorthogonalisation ghost copies of converged nodes void
    the Gauss rule, and :func:`spectra.flatness` reports no bracket.

    Returns:
        (lower, upper) in [0, 1].
    """
    theta = np.asarray(nodes, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if theta.shape != w.shape or theta.ndim != 1 or not lo <= hi:
        raise ValueError("nodes and weights must be equal-length 1-D arrays, and lo <= hi")
    order = np.argsort(theta, kind="stable")
    theta, w = theta[order], w[order]
    cum = np.concatenate([[0.0], np.cumsum(w)])  # cum[j] = sum of the first j weights
    m = theta.size
    below = np.searchsorted(theta, lo, side="right")  # nodes <= lo: indices < below
    above = np.searchsorted(theta, hi, side="left")  # nodes >= hi: indices >= above
    # upper: from the last node <= lo through the first node >= hi (or the ends)
    first = below - 1 if below > 0 else 0
    last = above if above < m else m - 1
    upper = cum[last + 1] - cum[first]
    # lower: strictly between the first node >= lo and the last node <= hi
    start = np.searchsorted(theta, lo, side="left")  # first node >= lo
    stop = np.searchsorted(theta, hi, side="right") - 1  # last node <= hi
    lower = cum[stop] - cum[start + 1] if stop > start + 1 else 0.0
    return float(min(max(lower, 0.0), 1.0)), float(min(max(upper, 0.0), 1.0))


def gauss_rule_prefix(nodes: Any, weights: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k-node Gauss rule of the measure whose m-node Gauss rule is (nodes, weights).

    One probe's m-step Lanczos rule holds the whole Jacobi matrix T_m of its spectral
    measure; the rule of k < m steps is that of T_m's leading k x k block.  T_m is
    recovered by Lanczos on ``diag(nodes)`` from ``sqrt(weights)`` (m x m, float64,
    full reorthogonalisation), so no product of the operator is repeated.  Used to
    estimate the quadrature error of a rule by comparing it with its own k-node
    prefix.  Returns (nodes (k',), weights (k',)), weights summing to 1; k' < k where
    the recurrence ends early (the measure has fewer than k points).
    """
    theta = np.asarray(nodes, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    m = theta.size
    k = min(check_int("k", k), m)
    Q = np.zeros((k, m))
    q = np.sqrt(np.clip(w, 0.0, None))
    Q[0] = q / np.linalg.norm(q)
    alpha, beta = np.zeros(k), np.zeros(k)
    steps = k
    scale = max(float(np.abs(theta).max()), np.finfo(np.float64).tiny)
    for j in range(k):
        v = theta * Q[j]
        alpha[j] = Q[j] @ v
        for _ in range(2):  # full reorthogonalisation, twice is enough
            v -= Q[: j + 1].T @ (Q[: j + 1] @ v)
        beta[j] = np.linalg.norm(v)
        if j + 1 == k:
            break
        if beta[j] <= 1e-12 * scale:
            steps = j + 1
            break
        Q[j + 1] = v / beta[j]
    if steps == 1:
        return alpha[:1].copy(), np.ones(1)
    ritz, S = scipy.linalg.eigh_tridiagonal(alpha[:steps], beta[: steps - 1])
    tau = S[0, :] ** 2
    return ritz, tau / tau.sum()


def _peak_source(device: torch.device) -> str:
    if torch.device(device).type == "cuda":
        return "torch.cuda.max_memory_allocated (tensor memory since the last reset)"
    return "ru_maxrss (the whole process's peak resident set size since it started)"


# --- memory plan ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    scheme: str  # "full", "float32", "float16", "bfloat16" or "local"
    block: int  # probes per block
    budget: int  # bytes
    itemsize: int

    @property
    def store(self) -> torch.dtype | None:
        return _STORE.get(self.scheme)


def _probe_bytes(scheme: str, steps: int, size: int, dtype: torch.dtype) -> int:
    """Bytes one probe of a block holds: its vectors and the step's temporaries."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if scheme == "full":
        held = steps * size * itemsize
    else:
        held = CompactBases.bytes_per_recurrence(steps, size, dtype, _STORE.get(scheme))
    return held + _TEMPORARIES * size * itemsize


def _auto_chain(dtype: torch.dtype) -> list[str]:
    half = {torch.float64: ["float32"], torch.float32: ["float16"]}.get(dtype, [])
    return ["full", *half, "local"]


def _plan(
    op: LinearOperator,
    probes: int,
    steps: int,
    scheme: str,
    budget: int | None,
    block: int | None,
    previous: dict[str, Any] | None,
) -> _Plan:
    """Scheme and block size for ``budget`` bytes; raises MemoryError before any product."""
    size, dtype = op.shape[0], op.dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    if scheme in _STORE and torch.empty((), dtype=_STORE[scheme]).element_size() >= itemsize:
        raise ValueError(
            f"reorthogonalization={scheme!r} stores the basis in {scheme}, which is not "
            f"narrower than the operator's {dtype}; use 'full' (same memory, exact)"
        )
    free = None
    if budget is None:
        budget, free = default_memory_budget(op.device)
    schemes = _auto_chain(dtype) if scheme == "auto" else [scheme]
    wanted = min(block, probes) if block is not None else None
    if previous is not None and wanted is None and scheme == "auto":
        # resume with what the run started with, if it still fits
        s, b = previous.get("reorthogonalization"), previous.get("block_size")
        if (
            s in schemes
            and isinstance(b, int)
            and 1 <= b <= probes
            and b * _probe_bytes(s, steps, size, dtype) <= budget
        ):
            return _Plan(s, b, budget, itemsize)
    if previous is not None and wanted is None and scheme != "auto":
        b = previous.get("block_size")
        if (
            previous.get("reorthogonalization") == scheme
            and isinstance(b, int)
            and 1 <= b <= probes
            and b * _probe_bytes(scheme, steps, size, dtype) <= budget
        ):
            return _Plan(scheme, b, budget, itemsize)
    for s in schemes:
        per = _probe_bytes(s, steps, size, dtype)
        fits = budget // per
        if wanted is not None and fits >= wanted:
            return _Plan(s, wanted, budget, itemsize)
        if wanted is None and fits >= 1:
            # "auto" fell back (not even one full basis fits): memory is what is short,
            # so the probes run one at a time, since a block product's own workspace
            # grows with the block (see block_size)
            block = 1 if scheme == "auto" and s != "full" else int(min(probes, fits))
            return _Plan(s, block, budget, itemsize)
    s = schemes[-1]
    per = _probe_bytes(s, steps, size, dtype)
    count = wanted or 1
    held = per // (size * itemsize)
    where = (
        ""
        if free is None
        else (f" (default: half of the {format_bytes(free)} free on {op.device})")
    )
    raise MemoryError(
        f"SLQ with reorthogonalization={s!r} needs {count} probe(s) x {format_bytes(per)} "
        f"= {format_bytes(count * per)}: n = {size:,} numbers of {dtype}, "
        f"{size * itemsize:,} bytes per vector, about {held} vector-equivalents per probe "
        f"for num_steps = {steps} ({_TEMPORARIES} of them product temporaries), "
        f"but memory_budget is {format_bytes(budget)}{where}; use fewer num_steps, a "
        "cheaper reorthogonalization ('float16', 'local', or 'auto'), block_size=1, or "
        "raise memory_budget"
    )


# --- the recurrences -----------------------------------------------------------------


@dataclass
class _Quadrature:
    """The state of an SLQ run: every probe's recurrence coefficients so far, where the
    run stands (block, step, the block's live probes) and the current block's bases;
    resumable (:class:`~spectra.resumable.ResumableState`).

    Checkpoint layout (format 2): ``alphas``, ``betas`` (probes, steps), ``lengths``,
    ``anorm`` (probes,), ``active``, ``scalars`` = [block start, step, finished,
    matvecs], the totals' ``seconds`` and ``peak_memory_bytes``, and the arrays of the
    block's bases when a block is under way.  :meth:`from_arrays` restores the run;
    the block's bases are restored when that block is set up again.
    """

    alphas: np.ndarray  # (probes, steps) float64
    betas: np.ndarray  # (probes, steps) float64
    lengths: np.ndarray  # (probes,) int64: valid steps per probe
    anorm: np.ndarray  # (probes,) float64: lower bounds on ||A|| seen by each probe
    block: int  # probes per block
    totals: RunTotals
    active: list[int] = field(default_factory=list)  # the block's probes not broken down
    block_start: int = 0
    step: int = 0  # the next step of the current block
    finished: bool = False
    bases: _FullBases | _CompactBases | None = None  # the current block's

    @classmethod
    def empty(cls, probes: int, steps: int, block: int, totals: RunTotals) -> _Quadrature:
        """The state before the first product."""
        return cls(
            np.zeros((probes, steps)),
            np.zeros((probes, steps)),
            np.zeros(probes, dtype=np.int64),
            np.zeros(probes),
            block,
            totals,
        )

    def to_arrays(self) -> dict[str, Any]:
        """The state at a step or block boundary."""
        scalars = [self.block_start, self.step, int(self.finished), self.totals.matvecs]
        return {
            **({} if self.bases is None else self.bases.to_arrays()),
            "alphas": self.alphas,
            "betas": self.betas,
            "lengths": self.lengths,
            "anorm": self.anorm,
            "active": np.array(self.active, dtype=np.int64),
            "scalars": np.array(scalars, dtype=np.int64),
            **self.totals.to_arrays(),
        }

    def from_arrays(self, arrays: StoredArrays) -> None:
        """Restore the run (not yet the block's bases), checking the arrays fit it."""
        probes, steps = self.alphas.shape
        b0, j, finished, used = (int(x) for x in arrays["scalars"])
        alphas = np.array(arrays["alphas"], dtype=np.float64)
        betas = np.array(arrays["betas"], dtype=np.float64)
        lengths = np.array(arrays["lengths"], dtype=np.int64)
        anorm = np.array(arrays["anorm"], dtype=np.float64)
        active = [int(p) for p in arrays["active"]]
        b1 = min(probes, b0 + self.block)
        if (
            alphas.shape != (probes, steps)
            or betas.shape != alphas.shape
            or lengths.shape != (probes,)
            or anorm.shape != (probes,)
            or not 0 <= j < steps
            or not 0 <= b0 <= probes
            or b0 % self.block
            or (j > 0 and (not active or any(not b0 <= p < b1 for p in active)))
        ):
            raise ValueError("array shapes do not fit num_probes, num_steps and the block")
        if "seconds" not in arrays:  # (every format 2 file has it)
            raise KeyError("seconds")
        self.totals.from_arrays(arrays)
        self.totals.resume_matvecs(used)  # matvecs count as in the uninterrupted run
        self.alphas, self.betas, self.lengths, self.anorm = alphas, betas, lengths, anorm
        self.active, self.block_start, self.step, self.finished = active, b0, j, bool(finished)


class _FullBases:
    """One block's bases in the operator's dtype (the reference scheme); ``next_step``
    is the step they are ready for (saved: vectors ``0..next_step``)."""

    def __init__(self, b: int, steps: int, size: int, op: LinearOperator) -> None:
        self.Q = torch.zeros((b, steps, size), dtype=op.dtype, device=op.device)
        self.next_step = 0

    nbytes = property(lambda self: self.Q.nbytes)

    def start(self, V: torch.Tensor) -> None:
        self.Q[:, 0] = V.T

    def step(
        self, op: LinearOperator, j: int, active: list[int], iteration: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        h, beta = lanczos_step(op, self.Q, j, active, iteration=iteration)
        norms = [math.sqrt(float(h[i] @ h[i]) + beta[i] ** 2) for i in range(len(active))]
        self.next_step = j + 1
        return h[:, j], beta, np.array(norms)

    def to_arrays(self) -> dict[str, Any]:
        return {"Q": self.Q[:, : self.next_step + 1].cpu().numpy()}

    def from_arrays(self, arrays: StoredArrays) -> None:
        b, _, size = self.Q.shape
        j = self.next_step
        load_into(arrays, "Q", [self.Q[p, : j + 1] for p in range(b)], (b, j + 1, size))


class _CompactBases:
    """One block of :class:`~spectra._krylov.CompactBases` (stored copies or local only);
    ``next_step`` as for :class:`_FullBases`."""

    def __init__(
        self, b: int, steps: int, size: int, op: LinearOperator, store: torch.dtype | None
    ) -> None:
        self.bases = CompactBases(b, steps, size, op.dtype, op.device, store)
        self.next_step = 0

    nbytes = property(lambda self: self.bases.nbytes)

    def start(self, V: torch.Tensor) -> None:
        self.bases.cur.copy_(V.T)

    def step(
        self, op: LinearOperator, j: int, active: list[int], iteration: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        before = self.bases.beta[active].copy() if j > 0 else np.zeros(len(active))
        alpha, beta = self.bases.step(op, j, active, iteration)
        self.next_step = j + 1
        return alpha, beta, np.sqrt(alpha**2 + before**2 + beta**2)

    def to_arrays(self) -> dict[str, Any]:
        """The working pair, the couplings and the stored copies of q_0 .. q_{j-2}."""
        bases = self.bases
        out = {
            "cur": bases.cur.cpu().numpy(),
            "prev": bases.prev.cpu().numpy(),
            "beta_prev": bases.beta.copy(),
        }
        if bases.S is not None:
            out["stored"] = tensor_to_array(bases.S[:, : bases.filled(self.next_step)])
        return out

    def from_arrays(self, arrays: StoredArrays) -> None:
        bases = self.bases
        b, n = bases.cur.shape
        load_into(arrays, "cur", [bases.cur], (b, n))
        load_into(arrays, "prev", [bases.prev], (b, n))
        beta = np.array(arrays["beta_prev"], dtype=np.float64)
        if beta.shape != (b,):
            raise ValueError("beta_prev does not fit the block")
        bases.beta = beta
        if bases.S is not None:
            rows = bases.filled(self.next_step)
            load_into(arrays, "stored", [bases.S[p, :rows] for p in range(b)], (b, rows, n))


def _slq_recurrences(
    op: LinearOperator,
    probes: int,
    steps: int,
    seed: int,
    plan: _Plan,
    progress: bool | None,
    totals: RunTotals,
    ckpt: KrylovCheckpoint | None,
    saved: StoredArrays | None,
) -> tuple[_Quadrature, int]:
    """Run ``probes`` independent Lanczos recurrences, ``plan.block`` at a time, with one
    block matvec per step.

    Gives the run's state, whose alphas (probes, steps), betas (probes, steps) and
    lengths (the valid steps per probe: a probe that breaks down stops, its Krylov
    space is invariant and its Gauss rule exact) make the rules, and the largest
    bytes one block's bases held.  ``totals`` counts the matvecs (the symmetry check's
    included; on resume, as in the uninterrupted run).
    """
    size = op.shape[0]
    run = _Quadrature.empty(probes, steps, plan.block, totals)
    if saved is not None:
        ckpt.restore(run, saved)
    held = 0

    def save(final: bool = False) -> None:
        if ckpt is not None:
            ckpt.save_state(run, final)

    desc = f"slq({probes} probes" + ("" if plan.block == probes else f", {plan.block} at a time")
    with progress_bar(probes * steps, desc + ")", progress) as bar:
        bar.update(totals.matvecs)
        while not run.finished and run.block_start < probes:
            b0 = run.block_start
            b1 = min(probes, b0 + plan.block)
            if plan.scheme == "full":
                bases: Any = _FullBases(b1 - b0, steps, size, op)
            else:
                bases = _CompactBases(b1 - b0, steps, size, op, plan.store)
            held = max(held, bases.nbytes)
            if run.step == 0:
                gen = torch.Generator(device="cpu").manual_seed(seed + 2)
                V = rademacher_columns(size, probes, gen, op.dtype, op.device, cols=(b0, b1))
                bases.start(V / math.sqrt(size))
                del V
                run.active = list(range(b0, b1))
            else:
                bases.next_step = run.step
                ckpt.restore(bases, saved)
            run.bases = bases
            for j in range(run.step, steps):
                alpha, beta, colnorm = bases.step(op, j, [p - b0 for p in run.active], iteration=j)
                bar.update(len(run.active))
                still = []
                for i, p in enumerate(run.active):
                    run.alphas[p, j] = alpha[i]
                    run.betas[p, j] = beta[i]
                    run.lengths[p] = j + 1
                    run.anorm[p] = max(run.anorm[p], float(colnorm[i]))
                    if beta[i] > breakdown_tolerance(run.anorm[p], size, op.dtype):
                        still.append(p)
                run.active = still
                if not still:
                    break
                if j + 1 < steps:
                    run.step = j + 1
                    save()  # resume point: step j + 1 of this block
            run.bases = None
            del bases
            run.block_start, run.step, run.active = b1, 0, []
            if b1 < probes:
                save()  # resume point: the next block's start
        if not run.finished:
            run.finished = True
            save(final=True)  # the bases are no longer needed, only the rules
    return run, held


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
