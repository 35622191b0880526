"""hessian-spectra: curvature of neural-network loss landscapes as linear operators.

Data flows one way: model + loss + data -> operator -> algorithm -> result
(:class:`Spectrum`, :class:`CurvatureDiagonal` or eigenpairs) -> plot or report.
Every public name of the submodules that other code uses is importable from here.
"""

__version__ = "0.1.0"

from . import plot
from .batches import batch_size
from .checkpoint import CheckpointError, StaleCheckpointError, atomic_write_bytes, atomic_write_json
from .dense_eigensolver import choose_backend, eigensolver_workspace_bytes, eigvalsh_inplace
from .density import spectral_density
from .diagonal import CurvatureDiagonal
from .exact import available_memory_bytes, dense_matrix, exact_hessian, exact_spectrum, spectrum_of
from .fisher import EmpiricalFisherOperator, empirical_fisher_operator
from .fisher_diagonal import adam_noise_factor, empirical_fisher_diagonal, fisher_diagonal_from_adam
from .flatness_report import FlatnessFileError, FlatnessReport, Measure, flatness
from .flatness_table import FlatnessTable, compare_minima, split_data
from .gauss_newton import GGNOperator, ggn_operator
from .hessian import HessianOperator, hessian_operator
from .hessian_diagonal import hessian_diagonal
from .lanczos import DENSE_THRESHOLD, ConvergenceWarning, LanczosResult, lanczos
from .laplace import LaplaceLocalEntropy, laplace_local_entropy, laplace_table
from .linear_operator import (
    CallableOperator,
    LinearOperator,
    PrecisionWarning,
    as_linear_operator,
    check_symmetric,
)
from .parameters import ParameterView
from .relative_flatness import RelativeFlatness, relative_flatness
from .sharpness import SharpnessEstimate, adaptive_sharpness
from .spectrum import Spectrum, default_sigma
from .trace import TraceEstimate, trace

__all__ = [
    # operators
    "CallableOperator",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "HessianOperator",
    "LinearOperator",
    "ParameterView",
    "as_linear_operator",
    "check_symmetric",
    "empirical_fisher_operator",
    "ggn_operator",
    "hessian_operator",
    # spectra and eigenvalues
    "DENSE_THRESHOLD",
    "ConvergenceWarning",
    "LanczosResult",
    "PrecisionWarning",
    "Spectrum",
    "TraceEstimate",
    "default_sigma",
    "dense_matrix",
    "choose_backend",
    "eigvalsh_inplace",
    "exact_hessian",
    "exact_spectrum",
    "lanczos",
    "spectral_density",
    "spectrum_of",
    "trace",
    # diagonals
    "CurvatureDiagonal",
    "adam_noise_factor",
    "empirical_fisher_diagonal",
    "fisher_diagonal_from_adam",
    "hessian_diagonal",
    # flatness
    "FlatnessFileError",
    "FlatnessReport",
    "FlatnessTable",
    "LaplaceLocalEntropy",
    "Measure",
    "RelativeFlatness",
    "SharpnessEstimate",
    "adaptive_sharpness",
    "compare_minima",
    "flatness",
    "laplace_local_entropy",
    "laplace_table",
    "relative_flatness",
    "split_data",
    # data, memory and files
    "CheckpointError",
    "StaleCheckpointError",
    "atomic_write_bytes",
    "atomic_write_json",
    "available_memory_bytes",
    "batch_size",
    "eigensolver_workspace_bytes",
    "plot",
]
