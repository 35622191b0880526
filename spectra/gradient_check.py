"""Does autograd's gradient agree with the loss it is the gradient of?

Every curvature product differentiates autograd's gradient; if that gradient is not the
derivative of the loss (a forward pass that reads ``.data`` or ``.detach()`` of a
parameter, a straight-through estimator, a custom ``autograd.Function`` whose backward is
not its forward's derivative), the products are the curvature of something else, with no
error.  One direction ``u`` on one batch tells: autograd's ``g . u`` against the central
difference of the loss along ``u``, with that difference's own error estimated from two
step sizes (Richardson), so that a kink or rounding never reads as a mismatch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

#: Safety factor over the finite difference's estimated error before a mismatch counts.
ERROR_FACTOR = 10.0
#: Smallest mismatch, relative to the directional derivative, worth reporting where the
#: forward pass rounds in float64; in float32 a gradient near an interpolating minimum
#: (a sum of cancelling per-sample terms) was measured 1.6% off by rounding alone.
RELATIVE_FLOOR = {"float64": 1e-3, "narrower": 0.1}


@dataclass(frozen=True)
class DirectionalCheck:
    """``autograd`` (g . u) against ``finite_difference`` (Richardson-extrapolated central
    differences at steps h and 2h), ``error`` that difference's estimated error bound."""

    autograd: float
    finite_difference: float
    error: float
    relative_floor: float = RELATIVE_FLOOR["float64"]

    @property
    def mismatch(self) -> float:
        """|g . u - finite difference| relative to the larger of the two (0 when both are 0)."""
        scale = max(abs(self.autograd), abs(self.finite_difference), 1e-300)
        return abs(self.autograd - self.finite_difference) / scale

    @property
    def disagrees(self) -> bool:
        """Whether the two differ by more than the difference's error can explain."""
        gap = abs(self.autograd - self.finite_difference)
        scale = max(abs(self.autograd), abs(self.finite_difference))
        return gap > ERROR_FACTOR * self.error and gap > self.relative_floor * scale


def directional_check(
    loss: Callable[[torch.Tensor], float],
    theta: torch.Tensor,
    gradient: torch.Tensor,
    direction: torch.Tensor,
    eps: float,
) -> DirectionalCheck:
    """Compare ``gradient . direction`` with the loss's derivative along ``direction``.

    Args:
        loss: ``loss(theta) -> float``, the function ``gradient`` claims to differentiate
            (forward passes only).
        theta: (n,) the point.
        gradient: (n,) autograd's gradient of ``loss`` at ``theta``.
        direction: (n,) the direction (any norm; normalised here).
        eps: the relative rounding of ``loss`` (the lowest precision the forward pass
            computes in); sets the step h = eps^(1/3) max(||theta||, 1), the step that
            balances truncation against rounding for a central difference.

    Returns:
        The two derivatives and the finite difference's error bound: |D(h) - D(2h)| (its
        truncation error, which also grows where a kink lies within 2h), plus the
        spread of the one-sided differences / ERROR_FACTOR (a kink at the point itself,
        where every central difference averages both sides and autograd takes one),
        plus the rounding of the loss values, 4 eps max|loss| / h.  Five forward passes.
    """
    u = direction / direction.norm()
    h = eps ** (1 / 3) * max(float(theta.norm()), 1.0)
    values = {k: loss(theta + k * h * u) for k in (-2, -1, 0, 1, 2)}
    d1 = (values[1] - values[-1]) / (2 * h)
    d2 = (values[2] - values[-2]) / (4 * h)
    one_sided = abs(values[1] - 2 * values[0] + values[-1]) / h
    rounding = 4 * eps * max(abs(v) for v in values.values()) / h
    return DirectionalCheck(
        autograd=float(gradient.double() @ u.double()),
        finite_difference=(4 * d1 - d2) / 3,
        error=abs(d1 - d2) + one_sided / ERROR_FACTOR + rounding,
        relative_floor=RELATIVE_FLOOR["float64" if eps < 1e-10 else "narrower"],
    )
