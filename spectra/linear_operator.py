"""The one operator abstraction every algorithm in :mod:`spectra` consumes.

An algorithm sees only ``op @ v`` / ``op @ V``, ``op.shape``, ``op.dtype`` and
``op.device``.  Curvature operators (Hessian, GGN, Fisher) subclass
:class:`LinearOperator`; anything else a user hands in (a dense tensor, a SciPy
``LinearOperator``, a plain callable) is wrapped by :func:`as_linear_operator`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse.linalg
import torch

__all__ = [
    "LinearOperator",
    "DenseOperator",
    "CallableOperator",
    "as_linear_operator",
    "check_symmetric",
]


class LinearOperator(ABC):
    """A square linear map R^n -> R^n applied to vectors (n,) or blocks (n, k).

    Subclasses implement :meth:`_matmat` on a validated (n, k) block of the
    operator's dtype and device.  ``matvecs`` counts vectors multiplied (a block
    of k columns counts k), which is the unit every algorithm reports cost in.
    """

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device | str) -> None:
        if n < 1:
            raise ValueError(f"operator size must be >= 1, got {n}")
        self._n = int(n)
        self._dtype = dtype
        self._device = torch.device(device)
        self.matvecs = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self._n, self._n)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

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
        if not bool(torch.isfinite(x).all()):
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

    def to_dense(self, block_size: int = 256) -> torch.Tensor:
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
    """Wrap an explicit square (n, n) tensor."""

    def __init__(self, matrix: torch.Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"expected a square matrix, got shape {tuple(matrix.shape)}")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.matrix @ V


class CallableOperator(LinearOperator):
    """Wrap ``fn(V) -> W`` acting on (n, k) blocks (or, with ``block=False``, on (n,))."""

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        n: int,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
        block: bool = True,
    ) -> None:
        super().__init__(n, dtype, device)
        self._fn = fn
        self._block = block

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        if self._block:
            W = self._fn(V)
        else:
            W = torch.stack([self._fn(V[:, j]) for j in range(V.shape[1])], dim=1)
        if W.shape != V.shape:
            raise ValueError(
                f"the wrapped callable returned shape {tuple(W.shape)} for input "
                f"{tuple(V.shape)}; it must map (n, k) to (n, k)"
            )
        return W


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
    the precision algorithms need to resolve small eigenvalues).
    """
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


def check_symmetric(
    op: LinearOperator, seed: int = 0, rtol: float | None = None
) -> float:
    """Probe symmetry with two random vectors; raise ``ValueError`` if it fails.

    Compares u.(A v) with v.(A u), relative to ||u|| ||v|| max(||A u||, ||A v||).
    The default tolerance scales with the dtype's machine epsilon (1e3 eps) since
    a symmetric operator evaluated in floating point is symmetric only to rounding.
    Costs 2 matvecs.  Returns the measured relative asymmetry.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = op.shape[0]
    UV = torch.randn((n, 2), generator=gen, dtype=torch.float64).to(op.dtype).to(op.device)
    AUV = op @ UV
    u, v = UV[:, 0], UV[:, 1]
    Au, Av = AUV[:, 0], AUV[:, 1]
    scale = float(u.norm() * v.norm() * max(Au.norm(), Av.norm()))
    if scale == 0.0 or not math.isfinite(scale):
        if not math.isfinite(scale):
            raise ValueError("operator returned non-finite values on a random probe")
        return 0.0
    asym = abs(float(u @ Av - v @ Au)) / scale
    tol = rtol if rtol is not None else 1e3 * torch.finfo(op.dtype).eps
    if asym > tol:
        raise ValueError(
            f"operator is not symmetric: |u.Av - v.Au| / (|u||v||A|) = {asym:.2e} > {tol:.1e}; "
            "Lanczos and quadrature need a symmetric operator"
        )
    return asym
