"""The one operator abstraction every algorithm in :mod:`spectra` consumes.

An algorithm sees only ``op @ v`` / ``op @ V``, ``op.shape``, ``op.dtype``,
``op.device`` and two questions an operator answers about itself:
:meth:`LinearOperator.fingerprint` (what identifies it, for checkpoints) and
:meth:`LinearOperator.block_size` (how many columns one product may take within a
memory budget, for dense assembly).  Curvature operators (Hessian, GGN, Fisher) subclass
:class:`LinearOperator`; anything else a user hands in (a dense tensor, a SciPy
``LinearOperator``, a plain callable) is wrapped by :func:`as_linear_operator`.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse.linalg
import torch

from ._checks import all_finite, check_int, check_seed, resolve_dtype

__all__ = [
    "LinearOperator",
    "DenseOperator",
    "CallableOperator",
    "PrecisionWarning",
    "as_linear_operator",
    "check_symmetric",
    "operator_precision",
    "symmetry_tolerance",
]

#: Columns per product of a generic operator's dense assembly (:meth:`LinearOperator.block_size`).
DEFAULT_BLOCK_SIZE = 256

#: An operator passes the symmetry probe when its asymmetry is below this many times
#: the relative accuracy of its products.
SYMMETRY_FACTOR = 1e3


class PrecisionWarning(RuntimeWarning):
    """An operator's products look less accurate than its dtype (e.g. float32 internals)."""


class LinearOperator(ABC):
    """A square linear map R^n -> R^n applied to vectors (n,) or blocks (n, k).

    Subclasses implement :meth:`_matmat` on a validated (n, k) block of the
    operator's dtype and device.  ``matvecs`` counts vectors multiplied (a block
    of k columns counts k), which is the unit every algorithm reports cost in.

    An operator whose products are less accurate than its dtype (a float64
    operator computed through float32 layers, a finite-difference product) should
    expose ``precision``: a float, the normwise relative error of one product,
    ``||computed(A v) - A v|| <~ precision ||A|| ||v||``.  Algorithms read it with
    ``getattr(op, "precision", None)`` (see :func:`operator_precision`) to set
    their tolerances and error bars.  Without it, Lanczos takes a product to be
    accurate to the rounding of an n-term sum in the dtype (``sqrt(n) eps``) and
    the symmetry probe allows float32-level asymmetry (:func:`symmetry_tolerance`).
    A distributed operator must report the same ``precision`` on every rank, or the
    ranks' convergence decisions can differ.
    """

    def __init__(self, n: int, dtype: torch.dtype | str, device: torch.device | str) -> None:
        self._n = check_int("n (the operator size)", n)
        self._dtype = resolve_dtype(dtype)
        self._device = torch.device(device)
        self.matvecs = 0

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, n)``."""
        return (self._n, self._n)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the vectors the operator takes and returns."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """The device of the vectors the operator takes and returns."""
        return self._device

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this operator in a checkpoint: a JSON-serialisable dict.

        Here the class name, n and the dtype: all a generic operator (a matrix, a
        callable) can say about itself, so it does not tell two matrices of the same
        size apart; :mod:`spectra.resumable` therefore also stores a content probe
        (one product) with every algorithm state.  Operators that know what they
        compute (curvature operators: weights, data, loss) add fields that do.
        """
        return {"operator": type(self).__name__, "n": self._n, "dtype": str(self._dtype)}

    def block_size(self, memory_budget_bytes: int | None = None) -> int:
        """Columns per product when the matrix is assembled block by block.

        A generic operator's products hold no workspace per column that it could
        measure, so this is ``min(DEFAULT_BLOCK_SIZE, n)`` whatever the budget;
        curvature operators size the block from their activations (see
        :meth:`spectra.curvature.CurvatureOperator.block_size`).
        """
        return min(DEFAULT_BLOCK_SIZE, self._n)

    def column_workspace_bytes(self) -> int:
        """Memory one more column of a block product takes inside the operator.

        What an algorithm adds to its own vectors when it sizes a block of columns to
        a memory budget.  A generic operator holds nothing per column that it could
        measure: 0.  Curvature operators measure their activations (see
        :meth:`spectra.curvature.CurvatureOperator.column_workspace_bytes`).
        """
        return 0

    @abstractmethod
    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Apply the operator to a validated block ``V`` of shape (n, k)."""

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        V = self._validate(x)
        out = self._matmat(V if x.ndim == 2 else V.unsqueeze(1))
        self.matvecs += out.shape[1]
        return out if x.ndim == 2 else out.squeeze(1)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``self @ v`` for a vector of shape (n,)."""
        if not isinstance(v, torch.Tensor) or v.ndim != 1:
            raise ValueError("matvec expects a 1-D tensor of shape (n,); use `op @ V` for blocks")
        return self @ v

    def _validate(self, x: Any) -> torch.Tensor:
        n = self._n
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"operator @ expects a torch.Tensor of shape ({n},) or ({n}, k), "
                f"got {type(x).__name__}; use .to_scipy() for NumPy arrays"
            )
        if x.ndim not in (1, 2) or x.shape[0] != n:
            raise ValueError(
                f"operator of size {n} got a tensor of shape {tuple(x.shape)}; "
                f"expected ({n},) or ({n}, k)"
            )
        if x.dtype != self._dtype:
            raise TypeError(
                f"operator dtype is {self._dtype} but the vector is {x.dtype}; "
                f"convert with v.to({self._dtype})"
            )
        if x.device != self._device:
            raise ValueError(
                f"operator lives on {self._device} but the vector is on {x.device}; "
                f"move it with v.to('{self._device}')"
            )
        if not all_finite(x):
            raise ValueError("the vector contains NaN or Inf; curvature products need finite input")
        return x

    def to_scipy(self) -> scipy.sparse.linalg.LinearOperator:
        """A SciPy ``LinearOperator`` view (NumPy in, NumPy out, on the host).

        Vectors are converted to the operator's dtype and device on the way in
        and back to NumPy on the way out, so ``scipy.sparse.linalg.eigsh(
        op.to_scipy(), k=5)`` works for any operator.
        """
        np_dtype = torch.empty((), dtype=self._dtype).numpy().dtype

        def mm(X: np.ndarray) -> np.ndarray:
            X = np.asarray(X)
            T = torch.as_tensor(np.ascontiguousarray(X), dtype=self._dtype, device=self._device)
            return (self @ T).detach().cpu().numpy()

        return scipy.sparse.linalg.LinearOperator(
            self.shape, matvec=mm, matmat=mm, rmatvec=mm, rmatmat=mm, dtype=np_dtype
        )

    def to_dense(self, block_size: int = DEFAULT_BLOCK_SIZE) -> torch.Tensor:
        """The (n, n) matrix, assembled from blocks of identity columns (small n only)."""
        n = self._n
        out = torch.empty((n, n), dtype=self._dtype, device=self._device)
        for start in range(0, n, block_size):
            stop = min(n, start + block_size)
            E = torch.zeros((n, stop - start), dtype=self._dtype, device=self._device)
            E[torch.arange(start, stop), torch.arange(stop - start)] = 1
            out[:, start:stop] = self @ E
        return out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={self._n}, dtype={self._dtype}, "
            f"device={self._device}, matvecs={self.matvecs})"
        )


class DenseOperator(LinearOperator):
    """Wrap an explicit square (n, n) tensor.

    ``precision`` is ``sqrt(n) eps(dtype)``: the products are those of the stored
    matrix, exact up to the rounding of the multiplication itself (so a stored
    matrix is held to symmetry at rounding level).
    """

    def __init__(self, matrix: torch.Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"expected a square matrix, got shape {tuple(matrix.shape)}")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix
        self.precision = math.sqrt(self.shape[0]) * torch.finfo(self.dtype).eps

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.matrix @ V


class CallableOperator(LinearOperator):
    """Wrap ``fn(V) -> W`` acting on (n, k) blocks (or, with ``block=False``, on (n,)).

    ``precision`` (default None: unknown, see :class:`LinearOperator`) declares
    the normwise relative accuracy of ``fn``'s products when it computes in a
    lower precision than ``dtype`` (e.g. ``(A.float() @ V.float()).double()``:
    between 1.2e-7 and ``sqrt(n) * 1.2e-7``), so that tolerances and error bars
    account for it.
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        n: int,
        dtype: torch.dtype | str = torch.float64,
        device: torch.device | str = "cpu",
        block: bool = True,
        precision: float | None = None,
    ) -> None:
        super().__init__(n, dtype, device)
        self._fn = fn
        self._block = block
        if precision is not None:
            self.precision = _check_precision(precision)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        if self._block:
            W = self._output(self._fn(V))
        else:
            W = torch.stack([self._output(self._fn(V[:, j])) for j in range(V.shape[1])], dim=1)
        if W.shape != V.shape:
            raise ValueError(
                f"the wrapped callable returned shape {tuple(W.shape)} for input "
                f"{tuple(V.shape)}; it must map (n, k) to (n, k)"
            )
        return W

    def _output(self, W: Any) -> torch.Tensor:
        """The callable's result as a tensor of the operator's dtype and device: NumPy
        arrays are taken, another float dtype is cast (its precision is the callable's)."""
        if not isinstance(W, torch.Tensor):
            try:
                W = torch.as_tensor(W)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise TypeError(
                    f"the wrapped callable returned {type(W).__name__}; it must return a "
                    "tensor or array of the input's shape"
                ) from exc
        if not W.is_floating_point():
            raise TypeError(f"the wrapped callable returned {W.dtype} values; they must be floats")
        return W.to(dtype=self.dtype, device=self.device)


class _ScipyOperator(LinearOperator):
    def __init__(self, op: scipy.sparse.linalg.LinearOperator, dtype: torch.dtype) -> None:
        if op.shape[0] != op.shape[1]:
            raise ValueError(f"expected a square operator, got shape {op.shape}")
        super().__init__(op.shape[0], dtype, "cpu")
        self._op = op

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        W = self._op.matmat(V.numpy())
        return torch.as_tensor(np.asarray(W), dtype=self._dtype).reshape(V.shape)


def as_linear_operator(
    obj: Any,
    n: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> LinearOperator:
    """Coerce ``obj`` to a :class:`LinearOperator`.

    Accepts a :class:`LinearOperator` (returned as is), a square ``torch.Tensor``
    or NumPy array, a ``scipy.sparse.linalg.LinearOperator`` or sparse matrix
    (float64 unless ``dtype`` says otherwise), or a callable mapping (n, k)
    blocks to (n, k) blocks together with ``n`` (default dtype float64, device cpu:
    the precision algorithms need to resolve small eigenvalues).  ``dtype`` may be
    a ``torch.dtype`` or its name (``"float64"``).
    """
    if dtype is not None:
        dtype = resolve_dtype(dtype)
    if isinstance(obj, LinearOperator):
        return obj
    if isinstance(obj, torch.Tensor):
        return DenseOperator(obj if dtype is None else obj.to(dtype))
    if isinstance(obj, np.ndarray):
        return DenseOperator(torch.as_tensor(obj, dtype=dtype or torch.float64))
    if isinstance(obj, scipy.sparse.linalg.LinearOperator) or scipy.sparse.issparse(obj):
        return _ScipyOperator(scipy.sparse.linalg.aslinearoperator(obj), dtype or torch.float64)
    if callable(obj):
        if n is None:
            raise ValueError("a callable operator needs its size: pass n=<number of rows>")
        return CallableOperator(obj, n, dtype or torch.float64, device or "cpu")
    raise TypeError(
        f"cannot use {type(obj).__name__} as a linear operator; pass a LinearOperator, "
        "a square tensor/array, a scipy LinearOperator, or a callable with n="
    )


def _check_precision(value: Any) -> float:
    if (
        isinstance(value, int | float | np.floating)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0.0 <= value < 1.0
    ):
        return float(value)
    raise ValueError(
        f"an operator's precision must be a number in [0, 1) (the relative accuracy of its "
        f"products), got {value!r}"
    )


def operator_precision(op: LinearOperator) -> float | None:
    """The operator's declared ``precision`` (validated), or None when it declares none.

    Never less than the dtype's epsilon: no product is more accurate than that.
    Reading it may cost the operator a check of its own (curvature operators
    compare two product paths once), so algorithms read it after their argument
    checks.
    """
    value = getattr(op, "precision", None)
    if value is None:
        return None
    return max(_check_precision(value), torch.finfo(op.dtype).eps)


def symmetry_tolerance(op: LinearOperator) -> float:
    """Default ``rtol`` of :func:`check_symmetric`: ``1e3`` x the products' relative accuracy.

    With a declared ``precision`` p: ``1e3 * p``.  Without one, ``1e3 * max(eps(dtype),
    eps(float32))``: many float64 models compute parts in float32 (Hugging Face
    RMSNorm/LayerNorm upcasts, mixed-precision kernels), which leaves a symmetric
    operator asymmetric at ~1e-7, while a genuinely non-symmetric product (a bug, a
    non-differentiable operation) shows 1e-2 to 1; 1.2e-4 separates the two.
    Measured (``||A - A^T||_F / ||A||_F`` estimates, n = 300 to 5225): symmetric
    float64 operators 5e-16 to 2e-15, float32 ones 6e-8 to 1.2e-6, float32 internals
    in float64 5e-9 to 2e-7; an asymmetric perturbation of relative size 1e-2 shows
    5e-4 to 9e-3.
    """
    p = operator_precision(op)
    if p is None:
        p = max(torch.finfo(op.dtype).eps, torch.finfo(torch.float32).eps)
    return SYMMETRY_FACTOR * p


def check_symmetric(op: LinearOperator, seed: int = 0, rtol: float | None = None) -> float:
    """Probe symmetry with two random vectors; raise ``ValueError`` if it fails.

    For Gaussian u, v the bilinear form ``u.(A v) - v.(A u) = u^T (A - A^T) v`` has
    standard deviation ``||A - A^T||_F`` and ``||A u|| ~ ||A||_F``, so the measured
    asymmetry ``|u.Av - v.Au| n / (||u|| ||v|| max(||A u||, ||A v||))`` estimates
    ``||A - A^T||_F / ||A||_F`` (the factor n / (||u|| ||v||) ~ 1 makes it scale-free;
    without it the measure would shrink like 1/n and let real asymmetry through at
    large n).  It is compared with ``rtol`` (default :func:`symmetry_tolerance`: a
    symmetric operator evaluated in floating point is symmetric only to the rounding
    of its products).  An operator without a declared ``precision`` that passes only
    because float32-level asymmetry is allowed gets a :class:`PrecisionWarning`: its
    products are less accurate than its dtype, which tolerances cannot know unless it
    declares ``precision``.  Costs 2 matvecs.  Returns the measured asymmetry.
    """
    seed = check_seed(seed)
    tol = symmetry_tolerance(op) if rtol is None else rtol
    if not (isinstance(tol, int | float) and tol > 0 and math.isfinite(tol)):
        raise ValueError(f"rtol must be a positive finite number, got {rtol!r}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = op.shape[0]
    UV = torch.randn((n, 2), generator=gen, dtype=torch.float64).to(op.dtype).to(op.device)
    AUV = op @ UV
    u, v = UV[:, 0], UV[:, 1]
    Au, Av = AUV[:, 0], AUV[:, 1]
    scale = float(u.norm() * v.norm() * max(Au.norm(), Av.norm())) / n
    if scale == 0.0 or not math.isfinite(scale):
        if not math.isfinite(scale):
            raise ValueError("operator returned non-finite values on a random probe")
        return 0.0
    asym = abs(float(u @ Av - v @ Au)) / scale
    if asym > tol:
        raise ValueError(
            f"operator is not symmetric: ||A - A^T||_F / ||A||_F ~ {asym:.2e} (2-vector probe) "
            f"> {tol:.1e}, the rounding level of its products; Lanczos and quadrature need a "
            "symmetric operator. Check that the operator is what you meant (a Hessian, GGN or "
            "Fisher is symmetric; a bug or a non-differentiable operation is not). If its "
            "products are this inexact by design, set op.precision to their relative accuracy, "
            "or pass check_symmetry=False"
        )
    dtype_level = SYMMETRY_FACTOR * torch.finfo(op.dtype).eps
    if rtol is None and operator_precision(op) is None and asym > dtype_level:
        warnings.warn(
            f"operator is symmetric only to {asym:.1e}, above the {op.dtype} rounding level "
            f"({dtype_level:.1e}) but within float32's: its products seem to be computed in "
            "float32 internally. Results are then accurate to ~1e-7 relative at best; set "
            "op.precision (e.g. CallableOperator(..., precision=...)) so that tolerances and "
            "error bars account for it",
            PrecisionWarning,
            stacklevel=3,
        )
    return asym
