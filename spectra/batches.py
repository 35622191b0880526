"""Data handling for curvature operators, and the one data-weighting rule.

Every operator is the curvature of the loss *averaged over samples*:

    L(theta) = (1/N) sum_i l_i(theta)  =  sum_b (m_b / N) * Lbar_b(theta)

where batch b holds m_b samples and ``Lbar_b`` is its per-sample mean loss.
Weighting each batch by m_b / N (not 1 / num_batches, as PyHessian and
hessian-eigenthings do) makes the operator independent of how the same data are
split into batches; a short last batch biases nothing.  :class:`DataSource` is
the only place that computes these weights, and :func:`mean_loss` the only
place that turns a user's loss into a per-sample mean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DataSource", "Batch", "mean_loss", "batch_size", "move_inputs"]

Inputs = Any  # a tensor, a tuple/list of tensors, or a dict of tensors


@dataclass(frozen=True)
class Batch:
    """One batch, moved to the operator's device and dtype, with its weight m_b / N."""

    index: int
    inputs: Inputs
    targets: Any
    size: int
    weight: float


def _is_pair(data: Any) -> bool:
    return (
        isinstance(data, tuple | list)
        and len(data) == 2
        and isinstance(data[1], torch.Tensor)
        and isinstance(data[0], torch.Tensor | tuple | list | dict)
    )


def batch_size(inputs: Inputs, targets: Any) -> int:
    """Number of samples in a batch: the leading dimension of the targets (else inputs)."""
    for obj in (targets, inputs):
        t = _first_tensor(obj)
        if t is not None:
            if t.ndim == 0:
                raise ValueError(
                    "a batch tensor is 0-dimensional; batches need a leading sample dimension"
                )
            return int(t.shape[0])
    raise ValueError("a batch holds no tensors: expected (inputs, targets) with tensors")


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, tuple | list):
        for item in obj:
            t = _first_tensor(item)
            if t is not None:
                return t
    return None


def move_inputs(obj: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """Move tensors (recursively in tuples/lists/dicts) to ``device``; cast floats to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device=device)
    if isinstance(obj, dict):
        return {k: move_inputs(v, device, dtype) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(move_inputs(v, device, dtype) for v in obj)
    return obj


def loss_reduction(loss_fn: Callable[..., torch.Tensor]) -> str:
    """``"mean"`` or ``"sum"``, read from a ``torch.nn`` loss's ``reduction`` attribute.

    Plain functions are assumed to average over the batch, as the ``torch.nn``
    losses do by default; ``reduction="none"`` is refused because the operator
    needs a scalar loss per batch.
    """
    reduction = getattr(loss_fn, "reduction", "mean")
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"loss_fn has reduction={reduction!r}; curvature needs a scalar batch loss: "
            "use reduction='mean' (or 'sum', which is rescaled to a per-sample mean)"
        )
    return reduction


def mean_loss(
    loss_fn: Callable[..., torch.Tensor], outputs: Any, targets: Any, size: int, reduction: str
) -> torch.Tensor:
    """The per-sample mean loss of one batch (a ``sum``-reduced loss is divided by m_b)."""
    loss = loss_fn(outputs, targets)
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar tensor, got {shape}")
    return loss / size if reduction == "sum" else loss


class DataSource:
    """A re-iterable view of ``data`` that yields weighted :class:`Batch` es.

    Args:
        data: one ``(inputs, targets)`` pair or any re-iterable of pairs (a list,
            a ``DataLoader``).  A one-shot iterator (a generator) is materialised
            once, since every matvec passes over the data again.
        device, dtype: where batches go; floating inputs are cast to ``dtype``.

    The total sample count N is found by one pass (:meth:`count`), so the
    weights m_b / N are exact for any batching, uneven last batch included.
    """

    def __init__(
        self, data: Any, device: torch.device, dtype: torch.dtype | None
    ) -> None:
        if _is_pair(data):
            self._data: Iterable[Any] = [tuple(data)]
        elif isinstance(data, Iterable) and not isinstance(data, torch.Tensor | str | dict):
            self._data = list(data) if iter(data) is data else data
        else:
            raise TypeError(
                "data must be an (inputs, targets) pair or an iterable of such pairs "
                f"(e.g. a DataLoader), got {type(data).__name__}"
            )
        self.device = device
        self.dtype = dtype
        self.num_samples = 0  # N: all samples the average runs over (all ranks)
        self.local_samples = 0  # samples in this object's data (this rank's shard)
        self.num_batches = 0

    def count(self, reduce_total: Callable[[int], int] | None = None) -> int:
        """Pass over the data once to find N; raise on empty data or malformed batches.

        ``reduce_total`` maps this shard's sample count to the total over all
        shards (a sum over ranks when the data are distributed); by default the
        data are all there is.  A shard may be empty; the total may not.
        """
        sizes = [batch_size(*self._unpack(i, item)) for i, item in enumerate(self._data)]
        self.local_samples = sum(sizes)
        self.num_batches = len(sizes)
        total = reduce_total(self.local_samples) if reduce_total else self.local_samples
        if total == 0:
            raise ValueError("data is empty: no samples to average the curvature over")
        self.num_samples = total
        return total

    def _unpack(self, index: int, item: Any) -> tuple[Inputs, Any]:
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise ValueError(
                f"batch {index} is a {type(item).__name__}, expected an (inputs, targets) pair"
            )
        return item[0], item[1]

    def __iter__(self) -> Iterator[Batch]:
        if not self.num_samples:
            self.count()
        seen = 0
        for index, item in enumerate(self._data):
            inputs, targets = self._unpack(index, item)
            size = batch_size(inputs, targets)
            seen += size
            yield Batch(
                index=index,
                inputs=move_inputs(inputs, self.device, self.dtype),
                targets=move_inputs(targets, self.device, self.dtype),
                size=size,
                weight=size / self.num_samples,
            )
        if seen != self.local_samples:
            raise RuntimeError(
                f"data yielded {seen} samples this pass but {self.local_samples} when counted; "
                "the curvature needs the same data on every pass (no infinite or "
                "resampling loaders)"
            )

    def __len__(self) -> int:
        return self.num_batches
