"""hessian-spectra: curvature of neural-network loss landscapes as linear operators."""

__version__ = "0.1.0"

from .hessian import HessianOperator, hessian_operator  # noqa: E402
from .linear_operator import LinearOperator, as_linear_operator  # noqa: E402
from .parameters import ParameterView  # noqa: E402
from .spectrum import Spectrum  # noqa: E402

__all__ = [
    "HessianOperator",
    "LinearOperator",
    "ParameterView",
    "Spectrum",
    "as_linear_operator",
    "hessian_operator",
]
