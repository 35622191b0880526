"""Base class for curvature operators over (model, loss, data).

Holds everything the Hessian, GGN and empirical Fisher share: the parameter
layout, the data source and its weighting, a pure function theta -> loss built
on ``torch.func.functional_call`` (the model is never mutated), eval/train mode
handling, dtype resolution and the non-finite checks.  Subclasses implement one
method, :meth:`CurvatureOperator._batch_matmat`, the per-batch product.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .batches import Batch, DataSource, loss_reduction, mean_loss
from .linear_operator import LinearOperator
from .parameters import ParameterView, ParamSelector

__all__ = ["CurvatureOperator", "default_forward"]

ForwardFn = Callable[[nn.Module, Any], Any]


def default_forward(model: nn.Module, inputs: Any) -> Any:
    """``model(x)`` for a tensor, ``model(*x)`` for a tuple/list, ``model(**x)`` for a dict."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


class _Forward(nn.Module):
    """Wraps ``model`` so that a user's forward function runs under functional_call."""

    def __init__(self, model: nn.Module, forward: ForwardFn) -> None:
        super().__init__()
        self.model = model
        self._fn = forward

    def forward(self, inputs: Any) -> Any:
        return self._fn(self.model, inputs)


def resolve_dtype(requested: torch.dtype | None, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype curvature is computed in; half precisions are promoted to float32.

    Eigenvalues near zero (|lambda| ~ 1e-4 and below, the paper's bulk) are lost
    in float16/bfloat16 rounding, so those are never used for curvature.
    """
    dtype = requested or model_dtype
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    if dtype in (torch.float16, torch.bfloat16):
        warnings.warn(
            f"computing curvature in float32 instead of {dtype}: half precision cannot "
            "resolve small eigenvalues; pass dtype=torch.float64 for the most accurate result",
            stacklevel=3,
        )
        return torch.float32
    return dtype


class CurvatureOperator(LinearOperator):
    """Curvature of the sample-averaged loss of ``model`` on ``data`` at its current weights.

    Args:
        model: the network; its parameters are read once (a snapshot), never changed.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, e.g. ``nn.CrossEntropyLoss()``;
            ``reduction="sum"`` is rescaled to a per-sample mean.
        data: an ``(inputs, targets)`` pair or an iterable of pairs (a DataLoader);
            inputs may be a tensor, a tuple or a dict of tensors.
        params: which parameters span the operator (see :class:`ParameterView`);
            default all trainable ones.  The others are held fixed.
        dtype: computation dtype; default the parameters' (half precisions become
            float32).  Use float64 to resolve eigenvalues near zero.
        train_mode: evaluate in train mode (dropout on, BatchNorm on batch
            statistics).  Default False (eval mode), because curvature of a
            stochastic function is not defined; with True, the first product is
            computed twice and must agree.
        forward: ``forward(model, inputs) -> outputs``; default calls the model on
            a tensor, unpacks a tuple, or passes a dict as keyword arguments.
        backend: ``"func"`` (torch.func transforms, vectorised over columns),
            ``"autograd"`` (double backward, a loop over columns), or ``"auto"``
            (func, falling back to autograd where torch.func cannot trace the model).
        chunk_size: columns vectorised at once by ``torch.func.vmap``; default all
            (bounded by the caller's block).  Lower it to cap memory.
        process_group: a ``torch.distributed`` process group (or ``True`` for the
            default group).  Each rank passes its own shard of the data; products,
            gradient and loss are all-reduced with every sample weighted 1/N over
            the union of shards (shards may differ in size).  Every rank must call
            every product, with the same vector, as in any collective.

    Backends, and why: ``"func"`` is the fastest (one vectorised pass carries all
    k tangents); ``"autograd"`` works wherever double backward does;
    ``"finite_difference"`` (Hessian only) needs first derivatives alone, for
    models whose double backward is unavailable (some fused kernels and sharded
    wrappers): H v ~ (g(theta + h v) - g(theta - h v)) / 2h with
    h = eps^(1/3) (1 + ||theta||) / ||v||.  Its error is O(h^2) truncation (third
    derivatives) plus O(eps ||g|| / h) rounding; with this h both are of order
    eps^(2/3) times problem-dependent constants: ~1e-10 relative in float64
    (5e-11 measured on a tanh MLP in tests/test_hostile_inputs.py), ~1e-4 in
    float32, so use it in float64.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        data: Any,
        *,
        params: ParamSelector = None,
        dtype: torch.dtype | None = None,
        train_mode: bool = False,
        forward: ForwardFn | None = None,
        backend: str = "auto",
        chunk_size: int | None = None,
        process_group: Any = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.view = ParameterView(model, params)
        dtype = resolve_dtype(dtype, self.view.dtype)
        super().__init__(self.view.n, dtype, self.view.device)
        self.model = model
        self.loss_fn = loss_fn
        self.reduction = loss_reduction(loss_fn)
        self.train_mode = bool(train_mode)
        self.backend = backend
        self.chunk_size = chunk_size
        self._module = _Forward(model, forward or default_forward)
        self.process_group = _resolve_group(process_group)
        self.source = DataSource(data, self.device, dtype)
        self.source.count(self._sum_over_ranks_int if self.process_group is not None else None)
        self.theta = self.view.flat_params(dtype)
        self._fixed = {f"model.{k}": v for k, v in self.view.fixed_state(dtype).items()}
        self._stochastic_checked = not self.train_mode
        self.loss = self._loss_at_point()

    # --- the model as a pure function of theta ---------------------------------
    @property
    def num_samples(self) -> int:
        """N, the number of samples the curvature averages over."""
        return self.source.num_samples

    def outputs(self, theta: torch.Tensor, inputs: Any) -> Any:
        """Model outputs with the selected parameters set to ``theta`` (shape (n,))."""
        named = {f"model.{k}": v for k, v in self.view.unflatten(theta).items()}
        return torch.func.functional_call(self._module, (named, self._fixed), (inputs,))

    def batch_loss(self, theta: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Per-sample mean loss of ``batch`` at ``theta``."""
        out = self.outputs(theta, batch.inputs)
        return mean_loss(self.loss_fn, out, batch.targets, batch.size, self.reduction)

    @contextmanager
    def evaluation_mode(self) -> Iterator[None]:
        """Put the model in eval (or, if asked, train) mode; restore every module's flag after."""
        flags = [(m, m.training) for m in self.model.modules()]
        self.model.train(self.train_mode)
        try:
            yield
        finally:
            for m, flag in flags:
                m.training = flag

    def _loss_at_point(self) -> float:
        total = 0.0
        with torch.no_grad(), self.evaluation_mode():
            for batch in self.source:
                loss = self.batch_loss(self.theta, batch)
                if not torch.isfinite(loss):
                    raise ValueError(
                        f"loss is {loss.item()} on batch {batch.index} at the current weights; "
                        "curvature is undefined there (check the inputs and weights for NaN/Inf)"
                    )
                total += batch.weight * float(loss)
        if self.process_group is not None:
            total = float(self._sum_over_ranks(torch.tensor([total], dtype=torch.float64))[0])
        return total

    # --- distributed reduction ----------------------------------------------------
    def _sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) ``t`` in place over the process group; identity without one."""
        if self.process_group is not None:
            torch.distributed.all_reduce(t, group=self.process_group)
        return t

    def _sum_over_ranks_int(self, value: int) -> int:
        return int(self._sum_over_ranks(torch.tensor([value], dtype=torch.int64))[0])

    def gradient(self) -> torch.Tensor:
        """The gradient (n,) of the averaged loss at the point, with the same weighting."""
        grad = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        with self.evaluation_mode():
            for batch in self.source:
                grad.add_(torch.func.grad(self.batch_loss)(self.theta, batch), alpha=batch.weight)
        return self._sum_over_ranks(grad)

    # --- products -------------------------------------------------------------------
    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        with self.evaluation_mode():
            out = self._accumulate(V)
            if not self._stochastic_checked:
                again = self._accumulate(V)
                tol = 100 * torch.finfo(self.dtype).eps * max(float(out.abs().max()), 1e-30)
                if float((out - again).abs().max()) > tol:
                    raise RuntimeError(
                        "two identical curvature products differ in train mode: the model is "
                        "stochastic (dropout, random augmentation, ...). Use the default eval "
                        "mode (train_mode=False) or make the forward pass deterministic."
                    )
                self._stochastic_checked = True
        return out

    def _accumulate(self, V: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(V)
        for batch in self.source:
            prod = self._batch_product(batch, V)
            if not torch.isfinite(prod).all():
                raise FloatingPointError(
                    f"non-finite curvature product on batch {batch.index}; "
                    "the loss is finite there, so the curvature overflows: try dtype=torch.float64"
                )
            out.add_(prod, alpha=batch.weight)
        return self._sum_over_ranks(out)

    def _batch_product(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        if self.backend == "autograd":
            return self._batch_matmat_autograd(batch, V)
        if self.backend == "finite_difference":
            return self._batch_matmat_finite_difference(batch, V)
        try:
            return self._batch_matmat(batch, V)
        except (RuntimeError, NotImplementedError) as exc:
            if self.backend == "func":
                raise
            warnings.warn(
                f"torch.func cannot trace this model ({type(exc).__name__}: {str(exc)[:120]}); "
                "using the double-backward path instead",
                stacklevel=4,
            )
            self.backend = "autograd"
            return self._batch_matmat_autograd(batch, V)

    def _vmap(self, fn: Callable[[torch.Tensor], torch.Tensor], V: torch.Tensor) -> torch.Tensor:
        """Apply a per-column map to the columns of V, vectorised with torch.func.vmap."""
        return torch.func.vmap(
            fn, in_dims=1, out_dims=1, randomness="same", chunk_size=self.chunk_size
        )(V)

    def _batch_matmat(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        """The batch's mean-loss curvature times V (n, k), with torch.func."""
        raise NotImplementedError

    def _batch_matmat_autograd(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        """The same product with torch.autograd (for models torch.func cannot trace)."""
        raise NotImplementedError(f"{type(self).__name__} has no autograd path")

    def _batch_matmat_finite_difference(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} has no finite-difference path; it exists for the Hessian"
        )


BACKENDS = ("auto", "func", "autograd", "finite_difference")


def _resolve_group(process_group: Any) -> Any:
    if process_group is None or process_group is False:
        return None
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(
            "process_group was given but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group(...) first (e.g. under torchrun)"
        )
    return torch.distributed.group.WORLD if process_group is True else process_group
