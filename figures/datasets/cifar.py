"""CIFAR-10 from its python pickled batches (not fetched by ``make data``)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .files import DataFormatError, PathLike, check_split, find_file, missing_error, resolve_root

__all__ = ["load_cifar10"]


_CIFAR_FIX = (
    "CIFAR-10 is not fetched by `make data` (no package provides it): download the "
    "'python version' from https://www.cs.toronto.edu/~kriz/cifar.html, unpack it and pass "
    "root=... or set HS_CIFAR10_DIR to the cifar-10-batches-py directory (or its parent)."
)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays, so a CIFAR batch cannot run arbitrary code."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data batch")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> (uint8 (n, 3072), int64 (n,)); keys may be bytes or str."""
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataFormatError(f"{path}: not a CIFAR-10 python batch ({e})") from e
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataFormatError(f"{path}: CIFAR-10 batch lacks 'data'/'labels' keys")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DataFormatError(f"{path}: data shape {data.shape}, {len(labels)} labels")
    return data, labels


def load_cifar10(root: PathLike | None = None, split: str = "train") -> tuple[Tensor, Tensor]:
    """CIFAR-10 from the python pickled batches, as ``(images, labels)``.

    images: float32 (N, 3, 32, 32) in [0, 1]; labels: int64 (N,).  ``split="train"``
    concatenates ``data_batch_1`` .. ``data_batch_5`` (N = 50000), ``"test"`` reads
    ``test_batch`` (N = 10000).  Files are looked up in ``root`` or
    ``root/cifar-10-batches-py``; root defaults to ``$HS_CIFAR10_DIR``, then
    ``data/cifar10``.  Unpickling is restricted to numpy arrays.
    """
    check_split(split, ("train", "test"))
    base, origin = resolve_root(root, "HS_CIFAR10_DIR", "cifar10")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts = []
    for name in names:
        path = find_file(base, ("", "cifar-10-batches-py"), (name,))
        if path is None:
            raise missing_error(f"CIFAR-10 batch {name}", origin, _CIFAR_FIX)
        parts.append(_read_cifar_batch(path))
    data = np.concatenate([d for d, _ in parts])
    labels = np.concatenate([lab for _, lab in parts])
    x = torch.from_numpy(data).to(torch.float32).div_(255.0).view(-1, 3, 32, 32)
    return x, torch.from_numpy(labels)
