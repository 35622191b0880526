"""Local entropy at a minimum under the quadratic (Laplace) approximation.

The local entropy of Chaudhari et al. (eq. 3) is

    F(x, gamma) = log  integral  exp( -f(x') - gamma/2 ||x - x'||^2 ) dx'.

If f is quadratic around a minimum x*, f(x') = f(x*) + 1/2 (x' - x*)^T H (x' - x*), with
Hessian eigenvalues lambda_i, the Gaussian integral at x = x* is exact:

    F(x*, gamma) = -f(x*) + n/2 log(2 pi) - 1/2 sum_i log(lambda_i + gamma)
                 = -f(x*) - 1/2 sum_i log(1 + lambda_i / gamma)  +  n/2 log(2 pi / gamma).

The last term is the "+ const" of the usual form: it is the log-normaliser of the coupling
Gaussian, ``log integral exp(-gamma/2 ||x - x'||^2) dx'``, and depends on n and gamma only,
so at fixed (n, gamma) it cancels between minima.  :func:`laplace_local_entropy` returns
the part that depends on the minimum, ``-f - 1/2 sum log(1 + lambda/gamma)`` (which is
``log E[exp(-f(x'))]`` for x' drawn from the coupling Gaussian N(x*, I / gamma)), and the
constant separately.

The integral exists only when every lambda_i > -gamma.  Eigenvalues at or below -gamma
(directions of negative curvature stronger than the coupling) make the approximation
undefined; they are excluded from the sum and counted in ``excluded``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ._checks import check_real
from .spectrum import Spectrum

__all__ = ["LaplaceLocalEntropy", "laplace_local_entropy", "laplace_table"]


@dataclass(frozen=True)
class LaplaceLocalEntropy:
    """Result of :func:`laplace_local_entropy`.

    Attributes:
        gamma: the scope.
        value: ``-f - 1/2 sum_i log(1 + lambda_i / gamma)`` over the included eigenvalues.
        constant: ``n/2 log(2 pi / gamma)``; ``value + constant`` is the Laplace
            approximation of F(x*, gamma) itself.
        log_volume: ``-1/2 sum_i log(1 + lambda_i / gamma)`` alone (the flatness term;
            0 for a perfectly flat minimum, negative for curved ones).
        loss: the f(x*) used.
        excluded: number of eigenvalues <= -gamma left out (weights x n for quadrature
            spectra, so possibly fractional).
    """

    gamma: float
    value: float
    constant: float
    log_volume: float
    loss: float
    excluded: float

    @property
    def total(self) -> float:
        """``value + constant``: the approximation of F(x*, gamma) including the constant."""
        return self.value + self.constant


def laplace_local_entropy(
    spectrum: Spectrum | Iterable[float],
    gamma: float,
    loss: float | None = None,
    n_params: int | None = None,
) -> LaplaceLocalEntropy:
    """Laplace local entropy ``-f - 1/2 sum_i log(1 + lambda_i / gamma)`` (see module doc).

    Args:
        spectrum: a :class:`~spectra.Spectrum` (exact: every eigenvalue; quadrature: the
            sum becomes ``n sum_k w_k log(1 + theta_k / gamma)``) or plain eigenvalues.
        gamma: scope, > 0.
        loss: f(x*) (default: the spectrum's ``loss``; 0 if it has none).
        n_params: n for plain eigenvalues (default: their count).
    """
    try:
        valid = check_real("gamma", gamma) > 0
    except ValueError:
        valid = False
    if not valid:
        raise ValueError(f"gamma must be a positive finite number, got {gamma!r}")
    if isinstance(spectrum, Spectrum):
        ev, w, n = spectrum.eigenvalues, spectrum.weights * spectrum.n_params, spectrum.n_params
        if loss is None:
            loss = spectrum.loss
    else:
        ev = np.asarray(list(spectrum), dtype=np.float64)
        n = int(n_params) if n_params is not None else ev.size
        w = np.full(ev.size, n / max(ev.size, 1))
    loss = 0.0 if loss is None else float(loss)
    ok = ev > -gamma
    log_volume = -0.5 * float(np.sum(w[ok] * np.log1p(ev[ok] / gamma)))
    return LaplaceLocalEntropy(
        gamma=float(gamma),
        value=-loss + log_volume,
        constant=0.5 * n * math.log(2 * math.pi / gamma),
        log_volume=log_volume,
        loss=loss,
        excluded=float(w[~ok].sum()),
    )


def laplace_table(
    spectrum: Spectrum,
    gammas: Iterable[float] = (1e-3, 1e-2, 1e-1, 1.0),
    loss: float | None = None,
) -> dict[float, LaplaceLocalEntropy]:
    """:func:`laplace_local_entropy` for several gammas, keyed by gamma."""
    return {float(g): laplace_local_entropy(spectrum, g, loss) for g in gammas}
