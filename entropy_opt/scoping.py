"""Scoping schedules for the coupling ``gamma`` of local entropy (paper, Sec. 4.3).

``gamma`` (units: 1 / parameter-units squared, it multiplies ``||x - x'||^2 / 2``) sets the
radius of the neighbourhood the inner SGLD chain explores: small ``gamma`` looks far, large
``gamma`` looks close.  "Scoping" increases it as training proceeds so the landscape is
explored on progressively finer scales.  Every schedule maps ``(gamma0, rate, t)`` to
``gamma(t)``, where ``t`` counts completed outer (parameter) updates, starting at 0.

The optimizers store the schedule *name* in each param group (plain data, so it survives
``state_dict()``); the functions here are also usable on their own.
"""

from __future__ import annotations

import math
from collections.abc import Callable

ScopingFn = Callable[[float, float, int], float]


def constant(gamma0: float, rate: float, t: int) -> float:
    """``gamma(t) = gamma0``: no scoping (the paper's PTB and char-LSTM runs); ``rate`` unused."""
    return gamma0


def exponential(gamma0: float, rate: float, t: int) -> float:
    """``gamma(t) = gamma0 (1 + rate)^t``, the paper's schedule (Sec. 4.3).

    The paper uses ``rate = gamma1 = 1e-3`` ("increases by a factor of 1.001 after each
    parameter update") for MNIST and CIFAR-10.
    """
    return gamma0 * (1.0 + rate) ** t


def linear(gamma0: float, rate: float, t: int) -> float:
    """``gamma(t) = gamma0 (1 + rate t)``: same first-order growth as :func:`exponential`."""
    return gamma0 * (1.0 + rate * t)


def quadratic(gamma0: float, rate: float, t: int) -> float:
    """``gamma(t) = gamma0 (1 + rate t)^2``.

    The paper names a quadratic schedule without giving its form; this one starts at
    ``gamma0`` like the others and grows quadratically in ``t``.
    """
    return gamma0 * (1.0 + rate * t) ** 2


def bounded_exponential(gamma0: float, rate: float, t: int) -> float:
    """``gamma(t) = gamma0 (1 - exp(-rate t))`` (the paper's bounded exponential, ``tau = rate``).

    Note ``gamma(0) = 0``: the first outer step is uncoupled, and ``gamma`` saturates at
    ``gamma0`` rather than growing without bound.
    """
    return gamma0 * (1.0 - math.exp(-rate * t))


SCHEDULES: dict[str, ScopingFn] = {
    "constant": constant,
    "exponential": exponential,
    "linear": linear,
    "quadratic": quadratic,
    "bounded_exponential": bounded_exponential,
}


def check_scoping(name: str) -> None:
    """Raise ``ValueError`` naming the valid choices if ``name`` is not a known schedule."""
    if name not in SCHEDULES:
        raise ValueError(
            f"unknown scoping schedule {name!r}; choose one of {sorted(SCHEDULES)} "
            "(use 'constant' for a fixed gamma)"
        )


def scoped_gamma(name: str, gamma0: float, rate: float, t: int) -> float:
    """Value of schedule ``name`` at outer step ``t`` (see the module docstring)."""
    check_scoping(name)
    return SCHEDULES[name](gamma0, rate, t)
