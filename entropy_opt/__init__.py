"""Entropy-SGD family of optimizers (Chaudhari et al., ICLR 2017) and baselines.

``EntropySGD`` and ``EntropyAdam`` implement Algorithm 1 as ``torch.optim`` optimizers;
``SGLD`` and ``SAM`` are the comparison points; ``scoping`` holds the gamma schedules.
Each publishes the closure calls (gradient evaluations) one ``step`` makes as
``gradient_evaluations_per_step`` (``L``, ``L + 1`` with ``discard_first_grad``; SAM 2;
SGLD 1), so a training loop can count effective epochs from the optimizer itself.
"""

from .entropy_adam import EntropyAdam
from .entropy_sgd import EntropySGD
from .local_entropy import AUTHORS_CODE
from .sam import SAM
from .scoping import (
    SCHEDULES,
    bounded_exponential,
    constant,
    exponential,
    linear,
    quadratic,
    scoped_gamma,
)
from .sgld import SGLD

__all__ = [
    "AUTHORS_CODE",
    "SAM",
    "SCHEDULES",
    "SGLD",
    "EntropyAdam",
    "EntropySGD",
    "bounded_exponential",
    "constant",
    "exponential",
    "linear",
    "quadratic",
    "scoped_gamma",
]
