"""hessian-spectra: curvature of neural-network loss landscapes as linear operators.

Data flows one way: model + loss + data -> operator -> algorithm -> result
(:class:`Spectrum` or eigenpairs) -> plot or report.
"""

__version__ = "0.1.0"

from . import plot  # noqa: E402
from .density import spectral_density  # noqa: E402
from .exact import exact_hessian, exact_spectrum  # noqa: E402
from .fisher import EmpiricalFisherOperator, empirical_fisher_operator  # noqa: E402
from .fisher_diagonal import (  # noqa: E402
    FisherDiagonal,
    empirical_fisher_diagonal,
    fisher_diagonal_from_adam,
)
from .flatness_report import FlatnessReport, Measure, flatness  # noqa: E402
from .flatness_table import FlatnessTable, compare_minima  # noqa: E402
from .gauss_newton import GGNOperator, ggn_operator  # noqa: E402
from .hessian import HessianOperator, hessian_operator  # noqa: E402
from .hessian_diagonal import DiagonalEstimate, hessian_diagonal  # noqa: E402
from .lanczos import ConvergenceWarning, LanczosResult, lanczos  # noqa: E402
from .linear_operator import LinearOperator, as_linear_operator  # noqa: E402
from .parameters import ParameterView  # noqa: E402
from .relative_flatness import RelativeFlatness, relative_flatness  # noqa: E402
from .sharpness import SharpnessEstimate, adaptive_sharpness  # noqa: E402
from .spectrum import Spectrum  # noqa: E402
from .trace import TraceEstimate, trace  # noqa: E402

__all__ = [
    "FlatnessReport",
    "RelativeFlatness",
    "SharpnessEstimate",
    "adaptive_sharpness",
    "relative_flatness",
    "FlatnessTable",
    "Measure",
    "compare_minima",
    "flatness",
    "DiagonalEstimate",
    "FisherDiagonal",
    "empirical_fisher_diagonal",
    "fisher_diagonal_from_adam",
    "hessian_diagonal",
    "ConvergenceWarning",
    "LanczosResult",
    "TraceEstimate",
    "lanczos",
    "spectral_density",
    "trace",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "HessianOperator",
    "LinearOperator",
    "ParameterView",
    "Spectrum",
    "as_linear_operator",
    "empirical_fisher_operator",
    "exact_hessian",
    "exact_spectrum",
    "ggn_operator",
    "hessian_operator",
    "plot",
]
