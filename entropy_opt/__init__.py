"""Entropy-SGD family of optimizers (Chaudhari et al., ICLR 2017) and baselines.

``EntropySGD`` and ``EntropyAdam`` implement Algorithm 1 as ``torch.optim`` optimizers;
``SGLD`` and ``SAM`` are the comparison points; ``scoping`` holds the gamma schedules.
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
