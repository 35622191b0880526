"""Entropy-SGD family of optimizers (Chaudhari et al., ICLR 2017) and baselines.

``EntropySGD`` and ``EntropyAdam`` implement Algorithm 1 as ``torch.optim`` optimizers;
``SGLD`` and ``SAM`` are the comparison points; ``scoping`` holds the gamma schedules;
``LocalEntropyOptimizer`` (in ``base``) is the base class of the two local-entropy ones, and
``AUTHORS_CODE`` the options that make them behave like the authors' public code.
Each publishes the closure calls (gradient evaluations) one ``step`` makes as
``gradient_evaluations_per_step`` (``L``, ``L + 1`` with ``discard_first_grad``; SAM 2;
SGLD 1), so a training loop can count effective epochs from the optimizer itself.
"""

from .base import AUTHORS_CODE, LocalEntropyOptimizer
from .entropy_adam import EntropyAdam
from .entropy_sgd import EntropySGD
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
    "LocalEntropyOptimizer",
    "bounded_exponential",
    "constant",
    "exponential",
    "linear",
    "quadratic",
    "scoped_gamma",
]
