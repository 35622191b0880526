"""Data handling for curvature operators: what a sample is, and the one data-weighting rule.

Every operator is the curvature of the loss the user wrote, over all the data
(see :mod:`spectra.reduction`): a batch's loss is weighted by its share T_b / T
of the counted loss terms for a mean, by 1 for a sum, so the operator does not
depend on how the same data are split into batches and a short last batch
biases nothing (PyHessian and hessian-eigenthings weight 1 / num_batches).
:class:`DataSource` is the only place that holds these weights.

A **sample** is one index along ``batch_dim`` (default 0) of the inputs: every
input tensor that has that dimension must agree on its size (size-1 tensors
broadcast); otherwise the layout is ambiguous and is refused, naming
``batch_dim=`` and ``count_samples=``.  Samples matter for the per-sample
gradients of the empirical Fisher, for plain-function means, and in reports.

Each pass re-reads the data; a cheap content fingerprint of every batch (shape,
dtype, sum and a strided position-weighted sum of every tensor) is compared
with the first pass, so a reshuffling loader is refused instead of silently
giving every product different data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn.utils.rnn import PackedSequence

__all__ = ["DataSource", "Batch", "batch_size", "move_inputs", "batch_leaves"]

Inputs = Any  # a tensor, a tuple/list of tensors, or a mapping of tensors
CountSamples = Callable[[Any, Any], int]

_LEAF = (torch.Tensor, np.ndarray)


@dataclass(frozen=True)
class Batch:
    """One batch, moved to the operator's device and dtype, with its weight in the loss.

    ``size`` is its number of samples, ``terms`` the number of loss terms its
    loss divides by (1 for a sum), ``weight`` its loss's weight in the total
    (T_b / T for a mean, 1 for a sum).
    """

    index: int
    inputs: Inputs
    targets: Any
    size: int
    weight: float
    terms: float


def is_pair(data: Any) -> bool:
    """One (inputs, targets) batch rather than a sequence of two batches.

    Targets that are a tensor, None or a mapping make it one batch, and so do tensor
    inputs whatever the targets: a batch is an (inputs, targets) pair, never a bare
    tensor or a mapping.  ``((a, b), (c, d))`` is two batches."""
    if not (isinstance(data, tuple | list) and len(data) == 2):
        return False
    if isinstance(data[0], _LEAF) or isinstance(data[1], Mapping):
        return True
    return (data[1] is None or isinstance(data[1], _LEAF)) and isinstance(
        data[0], tuple | list | Mapping
    )


def batch_leaves(obj: Any) -> list[torch.Tensor]:
    """Every tensor in ``obj`` (recursively in tuples, lists and mappings), in order.

    NumPy arrays count as tensors (viewed, not copied)."""
    if isinstance(obj, np.ndarray):
        return [torch.as_tensor(obj)]
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, tuple | list):
        return [t for item in obj for t in batch_leaves(item)]
    return []


def _sample_counts(obj: Any, batch_dim: int) -> list[int]:
    """The size along ``batch_dim`` of every tensor in ``obj`` that has it; a
    ``PackedSequence`` counts its sequences (its data are flattened over time)."""
    if isinstance(obj, PackedSequence):
        return [int(obj.batch_sizes[0])] if obj.batch_sizes.numel() else [0]
    if isinstance(obj, np.ndarray | torch.Tensor):
        t = torch.as_tensor(obj)
        return [int(t.shape[batch_dim])] if t.ndim > batch_dim else []
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, tuple | list):
        return [c for item in obj for c in _sample_counts(item, batch_dim)]
    return []


def batch_size(inputs: Inputs, targets: Any, batch_dim: int = 0) -> int:
    """Number of samples in a batch: the size of the inputs' dimension ``batch_dim``.

    Every input tensor with at least ``batch_dim + 1`` dimensions must have the same
    size there (size 1 broadcasts; a ``PackedSequence`` counts its sequences); the targets are used only when the inputs hold
    no tensors.  Raises ``ValueError`` naming the sizes when they disagree.
    """
    for what, obj in (("inputs", inputs), ("targets", targets)):
        if not batch_leaves(obj):
            continue
        sizes = set(_sample_counts(obj, batch_dim))
        if not sizes:
            raise ValueError(
                f"no {what} tensor has a dimension {batch_dim} (batch_dim={batch_dim}); "
                "batches need a sample dimension: pass batch_dim= or count_samples="
            )
        if len(sizes) > 1:
            sizes.discard(1)
        if len(sizes) > 1:
            raise ValueError(
                f"the {what} tensors disagree on the sample count along batch_dim={batch_dim} "
                f"(sizes {sorted(sizes)}), so what a sample is is ambiguous; pass batch_dim= "
                "(e.g. batch_dim=1 for time-major sequences) or "
                "count_samples=lambda inputs, targets: <number of samples>"
            )
        return sizes.pop()
    raise ValueError("a batch holds no tensors: expected (inputs, targets) with tensors")


def move_inputs(obj: Any, device: torch.device | None, dtype: torch.dtype | None) -> Any:
    """Move tensors (recursively in tuples/lists/mappings) to ``device``; cast floats to ``dtype``.

    ``device=None`` leaves tensors where they are.  Tensors come out detached.

    NumPy arrays become tensors; a mapping that is not a dict (a Hugging Face
    ``BatchEncoding``, a ``UserDict``) becomes a dict with the same keys.
    """
    if isinstance(obj, np.ndarray):
        obj = torch.as_tensor(obj)
    if isinstance(obj, torch.Tensor):
        obj = obj.detach()  # data are constants: a graph behind them must not leak in
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device=device)
    if isinstance(obj, Mapping):
        return {k: move_inputs(v, device, dtype) for k, v in obj.items()}
    if isinstance(obj, PackedSequence):  # its batch_sizes must stay on the CPU
        moved = obj.to(device=device) if device is not None else obj
        floating = dtype is not None and moved.data.is_floating_point()
        moved = moved.to(dtype=dtype) if floating else moved
        return PackedSequence(
            moved.data.detach(), moved.batch_sizes, moved.sorted_indices, moved.unsorted_indices
        )
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(move_inputs(v, device, dtype) for v in obj))
    if isinstance(obj, tuple | list):
        return type(obj)(move_inputs(v, device, dtype) for v in obj)
    return obj


def _fingerprint(inputs: Any, targets: Any) -> tuple:
    """Shape, dtype, sum and a strided position-weighted sum of every tensor.

    Computed where the data live, in the data's own dtype (no copy: a float32 sum is
    as exact a mark as a float64 one, identical data give identical bits) with the
    position weights in float64 over at most ~1,000 strided entries; reshuffled
    samples change the sums.
    """
    marks = []
    for t in batch_leaves((inputs, targets)):
        flat = t.detach().reshape(-1)
        probe = flat[:: max(1, flat.numel() // 1024)].to(torch.float64)
        weights = torch.arange(1, probe.numel() + 1, dtype=torch.float64, device=probe.device)
        total = flat.sum() if flat.numel() else 0
        # hex strings: exact, and NaN compares equal to itself
        marks.append(
            (tuple(t.shape), str(t.dtype), float(total).hex(), float(probe @ weights).hex())
        )
    return tuple(marks)


#: Bytes of moved/cast copies of in-memory batches a data source keeps between passes.
MOVED_CACHE_BYTES = 1 << 30


class DataSource:
    """A re-iterable view of ``data`` that yields weighted :class:`Batch` es.

    Args:
        data: one ``(inputs, targets)`` pair or any re-iterable of pairs (a list,
            a ``DataLoader``); ``targets`` may be None (a loss computed by the
            model).  A one-shot iterator (a generator) is materialised once,
            since every matvec passes over the data again.  NumPy arrays are
            converted to tensors.
        device, dtype: where batches go; floating inputs are cast to ``dtype``.
        batch_dim: the inputs' sample dimension (see the module docstring).
        count_samples: ``(inputs, targets) -> int`` for layouts the rule cannot
            read; overrides ``batch_dim`` for counting.

    :meth:`count` passes over the data once to find each batch's samples and
    fingerprint; the operator then sets the batches' weights with
    :meth:`set_weights` (they need the loss, which this class never sees).
    """

    def __init__(
        self,
        data: Any,
        device: torch.device,
        dtype: torch.dtype | None,
        *,
        batch_dim: int = 0,
        count_samples: CountSamples | None = None,
    ) -> None:
        if is_pair(data):
            self._data: Iterable[Any] = [tuple(data)]
        elif isinstance(data, Iterable) and not isinstance(data, _LEAF + (str, Mapping)):
            self._data = list(data) if iter(data) is data else data
        else:
            raise TypeError(
                "data must be an (inputs, targets) pair or an iterable of such pairs "
                f"(e.g. a DataLoader), got {type(data).__name__}"
            )
        if isinstance(batch_dim, bool) or not isinstance(batch_dim, int) or batch_dim < 0:
            raise ValueError(f"batch_dim must be an int >= 0, got {batch_dim!r}")
        if count_samples is not None and not callable(count_samples):
            raise TypeError("count_samples must be a callable (inputs, targets) -> int")
        self.device = device
        self.dtype = dtype
        self.batch_dim = batch_dim
        self._count_samples = count_samples
        self.num_samples = 0  # N: all samples (all ranks)
        self.local_samples = 0  # samples in this object's data (this rank's shard)
        self.num_batches = 0
        self._sizes: list[int] = []
        self._fingerprints: list[tuple] = []
        self._weights: list[float] | None = None
        self._terms: list[float] | None = None
        # batches already moved/cast, kept for data held in memory (a list) while they fit
        self._moved: dict[int, tuple[Any, Any]] = {}
        self._moved_bytes = 0
        self._keep_moved = isinstance(self._data, list)

    def _size(self, inputs: Any, targets: Any) -> int:
        if self._count_samples is None:
            return batch_size(inputs, targets, self.batch_dim)
        size = self._count_samples(inputs, targets)
        if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 0:
            raise ValueError(f"count_samples returned {size!r}; it must return an int >= 0")
        return int(size)

    def count(self, reduce_total: Callable[[int], int] | None = None) -> int:
        """Pass over the data once to find N; raise on empty data or malformed batches.

        ``reduce_total`` maps this shard's sample count to the total over all
        shards (a sum over ranks when the data are distributed); by default the
        data are all there is.  A shard may be empty; the total may not.
        """
        self._sizes, self._fingerprints = [], []
        for i, item in enumerate(self._data):
            inputs, targets = self._unpack(i, item)
            self._sizes.append(self._size(inputs, targets))
            self._fingerprints.append(_fingerprint(inputs, targets))
        self.local_samples = sum(self._sizes)
        self.num_batches = len(self._sizes)
        total = reduce_total(self.local_samples) if reduce_total else self.local_samples
        if total == 0:
            raise ValueError("data is empty: no samples to average the curvature over")
        self.num_samples = total
        return total

    def set_weights(self, weights: list[float], terms: list[float]) -> None:
        """Each batch's weight in the total loss and its term count (from the loss's rule)."""
        if not len(weights) == len(terms) == self.num_batches:
            raise ValueError(f"expected {self.num_batches} weights and term counts")
        self._weights = [float(w) for w in weights]
        self._terms = [float(t) for t in terms]

    def _unpack(self, index: int, item: Any) -> tuple[Inputs, Any]:
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise ValueError(
                f"batch {index} is a {type(item).__name__}, expected an (inputs, targets) pair"
            )
        return item[0], item[1]

    def __iter__(self) -> Iterator[Batch]:
        if not self.num_samples:
            self.count()
        index = -1
        for index, item in enumerate(self._data):
            inputs, targets = self._unpack(index, item)
            if (
                index >= self.num_batches
                or _fingerprint(inputs, targets) != self._fingerprints[index]
            ):
                raise RuntimeError(
                    f"batch {index} differs from the first pass over the data: the curvature "
                    "needs the same data on every pass. A DataLoader with shuffle=True (or "
                    "random augmentation, or a resampling/infinite loader) gives every product "
                    "different data; use shuffle=False, or fix the data once with "
                    "data = list(loader)"
                )
            moved_inputs, moved_targets = self._move(index, inputs, targets)
            yield Batch(
                index=index,
                inputs=moved_inputs,
                targets=moved_targets,
                size=self._sizes[index],
                weight=self._weights[index] if self._weights is not None else float("nan"),
                terms=self._terms[index] if self._terms is not None else float("nan"),
            )
        if index + 1 != self.num_batches:
            raise RuntimeError(
                f"data yielded {index + 1} batches this pass but {self.num_batches} when "
                "counted; the curvature needs the same data on every pass (no infinite or "
                "resampling loaders)"
            )

    def _move(self, index: int, inputs: Any, targets: Any) -> tuple[Any, Any]:
        """The batch on the operator's device and dtype; copies of in-memory data are
        kept (up to :data:`MOVED_CACHE_BYTES`) so later passes do not cast again."""
        if index in self._moved:
            return self._moved[index]
        moved = move_inputs((inputs, targets), self.device, self.dtype)
        if self._keep_moved:
            raw = {t.data_ptr() for t in batch_leaves((inputs, targets))}  # views are free
            copies = [t for t in batch_leaves(moved) if t.data_ptr() not in raw]
            size = sum(t.numel() * t.element_size() for t in copies)
            if copies and self._moved_bytes + size <= MOVED_CACHE_BYTES:
                self._moved[index] = moved
                self._moved_bytes += size
        return moved

    def __len__(self) -> int:
        return self.num_batches
