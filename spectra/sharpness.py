"""Adaptive sharpness: worst-case and average-case, invariant to elementwise rescaling.

With ``T_w = diag(|w| + eta)`` (Kwon et al. 2021, ASAM), the *adaptive* sharpness of
the loss L at the point w with radius rho is

    worst case:    S_max(rho) = max_{||T_w^{-1} eps||_p <= rho} L(w + eps) - L(w)
    average case:  S_avg(rho) = E_{delta ~ N(0, rho^2 T_w^2)} L(w + delta) - L(w)

as used by Andriushchenko, Croce, Mueller, Hein & Flammarion (ICML 2023, "A modern
look at the relationship between sharpness and generalization"), Sec. 3, who take
``c = |w|`` (eta = 0).  Both are computed in the *scaled coordinates*
``u = T_w^{-1} eps`` (``eps = T_w u``), where the constraint set is a plain p-ball of
radius rho and the gradient is ``T_w grad L``.  A ReLU network and its rescaled
twin (layer l times a, layer l + 1 divided by a) have the same function, and
``T_w`` rescales exactly like the weights, so both sharpnesses are equal for the
two (with eta = 0), while Hessian eigenvalues are not (Dinh et al. 2017).

On a quadratic ``L(w + eps) = L(w) + 1/2 eps^T A eps`` (a minimum):
``S_max = 1/2 rho^2 lambda_max(T A T)`` for p = 2 and
``S_avg = 1/2 rho^2 tr(T A T)`` (Gaussian, p = 2); near a point with gradient g the
first-order terms are ``rho ||T g||_2`` (p = 2) and ``rho ||T g||_1`` (p = inf).

Only the operator's loss is used (``op.loss_and_gradient``, ``op.loss_at``: the same
data, batch weights and eval/train mode as its curvature), never the model.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ._checks import check_int, check_real, check_seed, user_stacklevel
from .curvature import CurvatureOperator, require_curvature_operator
from .linear_operator import PrecisionWarning

__all__ = ["SharpnessEstimate", "adaptive_sharpness"]

_KINDS = ("worst", "average")

#: Default ascent steps: Andriushchenko et al. evaluate with 20 iterations
#: (``--n_iters=20`` in their repository); here that is 20 gradient evaluations
#: (the one at w included) plus one forward pass.
DEFAULT_STEPS = 20
#: Default Monte Carlo sample count (their ``eval_average_sharpness`` uses 100).
DEFAULT_SAMPLES = 100
#: ``improving`` is set when the best value rose by more than this fraction of itself
#: during the last quarter of the ascent steps.
IMPROVING_RTOL = 1e-3
#: A loss difference is known to about this many units of the loss's rounding
#: (``eps |L|``): each loss is rounded once, and ``L(w)`` is shared by every difference.
ROUNDING_ULPS = 2.0
#: A sharpness below this many times its rounding warns: it is not resolved.
RESOLVED_OVER_ROUNDING = 10.0


@dataclass(frozen=True)
class SharpnessEstimate:
    """An adaptive sharpness value, its uncertainty and how it was computed.

    Attributes:
        value: the sharpness, in the loss's units (``L(w + eps) - L(w)``).  For
            ``kind="worst"`` the largest increase seen at a feasible point, hence a
            *lower bound* of S_max (ascent finds a local maximum at best); for
            ``"average"`` the Monte Carlo mean.
        stderr: standard error of ``value``: for ``"average"`` the Monte Carlo
            standard error and ``rounding`` in quadrature; 0.0 for ``"worst"``, whose
            value is deterministic and whose error is one-sided (see ``improving``)
            down to ``rounding``.
        kind: ``"worst"`` or ``"average"``.
        rho: the radius (dimensionless: perturbations are relative to |w| + eta).
        p: 2.0 or ``math.inf``: the norm of the worst-case ball; for ``"average"``,
            2.0 means Gaussian and inf uniform on the scaled box.
        eta: the offset in ``T_w = diag(|w| + eta)``.
        loss: L(w), the loss at the point (over all of the operator's data).
        steps: ascent steps (``"worst"``), 0 for ``"average"``.
        num_samples: perturbed loss evaluations (``"average"``), 0 for ``"worst"``.
        gradient_evals: loss-and-gradient evaluations (forward + backward over all
            data) spent.
        loss_evals: loss-only evaluations (forward passes over all data) spent.
        improving: ``"worst"``: the best value was still rising at the end (by more
            than ``IMPROVING_RTOL`` of itself over the last quarter of the steps), so
            more steps would likely raise it; always False for ``"average"``.
        radius: ``"worst"``: ``||T_w^{-1} eps||_p`` of the best perturbation (<= rho;
            below rho the maximum was found inside the ball); None for ``"average"``.
        seed: the seed of the random directions / samples.
        method: a description of the algorithm and its settings.
        samples: the independent draws ``stderr`` is the spread of (antithetic pairs
            count once; 0 for ``"worst"``), for a t interval.
        rounding: how well a loss difference is known at the operator's precision:
            ``ROUNDING_ULPS eps max|L|`` over the points evaluated (``eps`` of the
            lowest precision the forward pass runs in, :attr:`~spectra.curvature.
            CurvatureOperator.internal_eps`).  In float32 at small rho the loss
            increase is a few roundings of L: the worst case then keeps the largest of
            noisy differences (above the true maximum), and the average is biased by
            the rounding of L(w).  It is included in the average's ``stderr``; a value
            below ``RESOLVED_OVER_ROUNDING`` times it warns (use dtype=torch.float64 or
            a larger rho).
    """

    value: float
    stderr: float
    kind: str
    rho: float
    p: float
    eta: float
    loss: float
    steps: int
    num_samples: int
    gradient_evals: int
    loss_evals: int
    improving: bool
    radius: float | None
    seed: int
    method: str
    samples: int = 0
    rounding: float = 0.0

    def __repr__(self) -> str:
        err = f" +- {self.stderr:.2g}" if self.kind == "average" else ""
        flag = ", still improving" if self.improving else ""
        return (
            f"SharpnessEstimate({self.kind}, rho={self.rho:g}, p={self.p:g}: "
            f"{self.value:.6g}{err}, gradient_evals={self.gradient_evals}, "
            f"loss_evals={self.loss_evals}{flag})"
        )


def adaptive_sharpness(
    op: CurvatureOperator,
    rho: float,
    *,
    kind: str = "worst",
    p: float | str = 2,
    steps: int = DEFAULT_STEPS,
    num_samples: int = DEFAULT_SAMPLES,
    eta: float = 0.0,
    antithetic: bool = True,
    seed: int = 0,
) -> SharpnessEstimate:
    """Adaptive (ASAM-style) worst-case or average-case sharpness of ``op``'s loss at its point.

    Args:
        op: the problem: a :class:`~spectra.curvature.CurvatureOperator` (e.g. from
            :func:`spectra.hessian_operator`); the perturbed parameters are its
            ``op.view`` (choose them with ``params=`` when building it), the loss is
            its loss over all its data (Andriushchenko et al.'s m-sharpness with m =
            N; for m-sharpness build one operator per batch of m and average).
        rho: radius, a finite number > 0, relative to ``|w| + eta`` (e.g. for p = inf
            each weight moves by at most ``rho (|w_i| + eta)``).
        kind: ``"worst"`` (S_max, default) or ``"average"`` (S_avg).
        p: 2 (default) or ``math.inf`` (also ``"inf"``).  Worst case: the norm of the
            scaled ball.  Average case: 2 draws ``delta = rho T_w z`` with
            ``z ~ N(0, I)``, the definition of Andriushchenko et al.; inf draws z
            uniform on ``[-1, 1]^n`` (their code's ``linf`` option), a sample of the
            worst-case box.  Note the normalisation: the Gaussian is *not* divided by
            sqrt(n), so its typical scaled norm is ``rho sqrt(n)``, far outside the
            worst-case ball of radius rho; the two rhos are not comparable.
        steps: worst case only: ascent steps, >= 1 (default 20).  Cost: ``steps``
            gradient evaluations (the one at w, then one per step except the last)
            plus one forward pass (the last step's point needs only its loss).
        num_samples: average case only: perturbed loss evaluations (default 100),
            each one forward pass over the data, plus one at w.  Even and >= 4 with
            ``antithetic`` (>= 2 pairs for a standard error), else >= 2.
        eta: >= 0 (default 0.0).  ``T_w = diag(|w| + eta)``.  0 makes the measure
            exactly invariant to elementwise rescalings ``w -> a w`` (Andriushchenko
            et al.'s choice); ASAM's eta > 0 (0.01 in Kwon et al.) lets exactly-zero
            weights move during training, but breaks the invariance by relative
            O(eta / |w|).  With eta = 0 a weight that is exactly 0 (a zero-initialised
            bias, a pruned weight) is never perturbed.
        antithetic: average case: evaluate each draw at ``+delta`` and ``-delta`` and
            average the pair (default True).  Same expectation (the distribution is
            symmetric), but the first-order term ``g^T delta`` cancels exactly, which
            at a non-critical point is most of the variance.
        seed: seeds the Gaussian/uniform draws and, for the worst case, the
            random direction used where ``T_w grad L`` is exactly zero (a critical
            point); an int in ``[0, 2**63)``.

    Worst case, the algorithm (projected normalised-gradient ascent with
    backtracking, in ``u = T_w^{-1} eps``): start at u = 0 (where the gradient costs
    the first evaluation and gives L(w)); each step moves from the best point found
    so far along ``d = T_w grad L`` there, normalised (``d / ||d||_2`` for p = 2,
    ``sign(d)`` for p = inf), by ``alpha`` and projects onto the ball (rescaling onto
    the sphere / clipping to the box).  ``alpha`` starts at ``2 rho``, so the first
    step is ASAM's/SAM's one-step maximiser of the linearised loss (it lands on the
    boundary), as Andriushchenko et al.'s Auto-PGD starts at 2 rho; it is halved after
    every step that does not raise the best value (and the next step starts again from
    the best point).  The value is therefore monotone in ``steps`` and attained at a
    feasible point.

    Known failure modes: the worst case is a non-concave maximisation; the result is
    a lower bound that can miss a better local maximum (restart with other seeds or
    more steps; ``improving`` flags an unfinished ascent).  Large rho leaves the
    basin: L can blow up (non-finite losses raise ``FloatingPointError``).  The
    average case's standard error is unreliable with few samples when rare
    perturbations give huge losses (heavy tails); raise ``num_samples``.  Parameters
    that are all exactly zero with eta = 0 leave nothing to perturb (refused).

    Raises:
        TypeError: ``op`` is not a CurvatureOperator.
        ValueError: bad ``rho``, ``kind``, ``p``, ``steps``, ``num_samples``, ``eta`` or
            ``seed`` (before any evaluation).
    """
    require_curvature_operator(op, "adaptive_sharpness")
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    rho = check_real("rho", rho)
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho!r}")
    p = _check_p(p)
    steps = check_int("steps", steps)
    eta = check_real("eta", eta)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    antithetic = bool(antithetic)
    minimum = 4 if antithetic else 2
    num_samples = check_int("num_samples", num_samples, minimum=minimum)
    if antithetic and num_samples % 2:
        raise ValueError(
            f"num_samples must be even with antithetic=True (pairs +delta, -delta), "
            f"got {num_samples}"
        )
    seed = check_seed(seed)
    theta = op.theta
    scale = theta.abs() + eta
    if not bool((scale > 0).any()):
        raise ValueError(
            "every selected parameter is exactly zero and eta=0: the adaptive ball "
            "{||T_w^-1 eps|| <= rho} is a single point; pass eta > 0"
        )
    ball = _Ball(
        op,
        scale,
        rho,
        p,
        torch.Generator(device="cpu").manual_seed(seed),
        {"kind": kind, "rho": rho, "p": p, "eta": eta, "seed": seed},
    )
    if kind == "worst":
        return _worst(ball, steps)
    return _average(ball, num_samples, antithetic)


@dataclass(frozen=True)
class _Ball:
    """What both kinds of sharpness share: the operator, whose loss is perturbed, the
    scale ``|w| + eta`` (n,) of ``T_w``, the radius and norm, the seeded generator of the
    random draws, and the :class:`SharpnessEstimate` fields that merely echo the input."""

    op: CurvatureOperator
    scale: torch.Tensor
    rho: float
    p: float
    gen: torch.Generator
    common: dict[str, Any]


def _check_p(p: Any) -> float:
    if isinstance(p, str) and p.strip().lower() == "inf":
        return math.inf
    if isinstance(p, numbers.Real) and not isinstance(p, bool) and float(p) in (2.0, math.inf):
        return float(p)
    raise ValueError(f"p must be 2 or math.inf (or 'inf'), got {p!r}")


def _finite(loss: float, where: str) -> float:
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"the loss is {loss} {where}; the perturbation left the region where the "
            "model is finite: use a smaller rho (or dtype=torch.float64)"
        )
    return loss


def _draw(n: int, p: float, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Gaussian (p = 2) or uniform on [-1, 1] (p = inf) draws, on the CPU in float64
    from the seeded generator, then cast: the same numbers on every device."""
    if p == 2.0:
        z = torch.randn(n, generator=gen, dtype=torch.float64)
    else:
        z = 2.0 * torch.rand(n, generator=gen, dtype=torch.float64) - 1.0
    return z.to(dtype=like.dtype, device=like.device)


def _rounding(op: CurvatureOperator, largest_loss: float) -> float:
    """How well ``L(w + eps) - L(w)`` is known: ``ROUNDING_ULPS eps max|L|``."""
    eps = float(getattr(op, "internal_eps", torch.finfo(op.dtype).eps))
    return ROUNDING_ULPS * eps * largest_loss


def _warn_unresolved(value: float, rounding: float, rho: float, op: CurvatureOperator) -> None:
    if abs(value) < RESOLVED_OVER_ROUNDING * rounding:
        warnings.warn(
            f"the sharpness at rho={rho:g} is {value:.3g}, within {RESOLVED_OVER_ROUNDING:g}x "
            f"the rounding of the loss ({rounding:.1e} in {op.dtype}): the perturbation "
            "barely changes the loss, and this value is mostly rounding. Use a larger rho or "
            "build the operator in float64 (dtype=torch.float64)",
            PrecisionWarning,
            stacklevel=user_stacklevel(),
        )


def _worst(ball: _Ball, steps: int) -> SharpnessEstimate:
    op, scale, rho, p, gen = ball.op, ball.scale, ball.rho, ball.p, ball.gen
    theta = op.theta
    n = theta.shape[0]
    movable = (scale > 0).to(theta.dtype)

    def unit(d: torch.Tensor) -> torch.Tensor:
        if not bool((d != 0).any()):  # a critical point (in the scaled coordinates)
            d = _draw(n, 2.0, gen, theta) * movable
        return d / d.norm() if p == 2.0 else d.sign()

    def project(u: torch.Tensor) -> torch.Tensor:
        if p != 2.0:
            return u.clamp(-rho, rho)
        norm = float(u.norm())
        return u * (rho / norm) if norm > rho else u

    loss0, grad = op.loss_and_gradient(theta)
    loss0 = _finite(loss0, "at the point")
    gradient_evals, loss_evals = 1, 0
    best_u, best_value, best_d = torch.zeros_like(theta), 0.0, scale * grad
    alpha = 2.0 * rho
    history = [0.0]
    largest = abs(loss0)
    for k in range(steps):
        u = project(best_u + alpha * unit(best_d))
        point = theta + scale * u
        if k + 1 < steps:
            loss, grad = op.loss_and_gradient(point)
            gradient_evals += 1
        else:
            loss, grad = op.loss_at(point), None
            loss_evals += 1
        gain = _finite(loss, f"at ascent step {k + 1} (rho={rho:g})") - loss0
        largest = max(largest, abs(loss))
        if gain > best_value:
            best_u, best_value = u, gain
            if grad is not None:
                best_d = scale * grad
        else:
            alpha *= 0.5
        history.append(best_value)
    window = max(1, math.ceil(steps / 4))
    recent = history[-1] - history[-1 - window]
    improving = recent > IMPROVING_RTOL * abs(history[-1])
    norm = float(best_u.norm()) if p == 2.0 else float(best_u.abs().max())
    method = (
        f"projected normalised-gradient ascent in T_w^-1 coordinates (p={p:g}, {steps} "
        "steps, step 2*rho halved after each non-improving step)"
    )
    rounding = _rounding(op, largest)
    _warn_unresolved(best_value, rounding, rho, op)
    return SharpnessEstimate(
        value=best_value,
        stderr=0.0,
        loss=loss0,
        steps=steps,
        num_samples=0,
        gradient_evals=gradient_evals,
        loss_evals=loss_evals,
        improving=improving,
        radius=norm,
        method=method,
        rounding=rounding,
        **ball.common,
    )


def _average(ball: _Ball, num_samples: int, antithetic: bool) -> SharpnessEstimate:
    op, scale, rho, p, gen = ball.op, ball.scale, ball.rho, ball.p, ball.gen
    theta = op.theta
    loss0 = _finite(op.loss_at(theta), "at the point")
    draws = num_samples // 2 if antithetic else num_samples
    values = torch.empty(draws, dtype=torch.float64)
    largest = abs(loss0)
    for i in range(draws):
        delta = (rho * scale) * _draw(theta.shape[0], p, gen, theta)
        where = f"at Monte Carlo sample {i + 1} (rho={rho:g})"
        plus = _finite(op.loss_at(theta + delta), where)
        largest = max(largest, abs(plus))
        if antithetic:
            minus = _finite(op.loss_at(theta - delta), where)
            largest = max(largest, abs(minus))
            values[i] = 0.5 * (plus + minus) - loss0
        else:
            values[i] = plus - loss0
    law = "N(0, rho^2 T_w^2)" if p == 2.0 else "uniform on the box |T_w^-1 delta| <= rho"
    pairing = "antithetic pairs" if antithetic else "independent draws"
    rounding = _rounding(op, largest)
    value = float(values.mean())
    _warn_unresolved(value, rounding, rho, op)
    return SharpnessEstimate(
        value=value,
        stderr=math.hypot(float(values.std() / math.sqrt(draws)), rounding),
        rounding=rounding,
        loss=loss0,
        steps=0,
        num_samples=num_samples,
        gradient_evals=0,
        loss_evals=num_samples + 1,
        improving=False,
        radius=None,
        method=f"Monte Carlo, delta ~ {law}, {num_samples} evaluations in {pairing}",
        samples=draws,
        **ball.common,
    )
