"""Where the data files live, and the errors every reader raises.

Directory resolution for every ``load_*`` reader, first match wins:

1. the ``root`` argument;
2. the dataset's environment variable (``HS_MNIST_DIR``, ``HS_FASHION_MNIST_DIR``,
   ``HS_CIFAR10_DIR``, ``HS_AUSTEN_DIR``, ``HS_PTB_DIR``);
3. ``<data dir>/<name>`` where the data dir is ``$HS_DATA_DIR`` or ``data/`` in the
   current directory (the checkout root, where ``make data`` writes it).
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "PathLike",
    "MissingDataError",
    "DataFormatError",
    "data_dir",
    "resolve_root",
    "missing_error",
    "find_file",
    "read_bytes",
    "check_split",
]


PathLike = str | os.PathLike


class MissingDataError(FileNotFoundError):
    """A data file is absent; the message says which command, argument or env var fixes it."""


class DataFormatError(ValueError):
    """A data file exists but is not in the expected format (bad magic, truncated, ...)."""


def data_dir() -> Path:
    """The default data directory: ``$HS_DATA_DIR``, else ``data`` in the current directory."""
    env = os.environ.get("HS_DATA_DIR")
    return Path(env) if env else Path("data")


def resolve_root(root: PathLike | None, env: str, name: str) -> tuple[Path, str]:
    """Pick the directory to search and describe where it came from (for error messages)."""
    if root is not None:
        return Path(root), f"root={str(root)!r}"
    if os.environ.get(env):
        return Path(os.environ[env]), f"${env}={os.environ[env]!r}"
    return data_dir() / name, f"the default {data_dir() / name}"


def missing_error(what: str, origin: str, fix: str) -> MissingDataError:
    """The error for an absent file: what is missing, where we looked and what fixes it."""
    return MissingDataError(f"{what} not found (looked in {origin}). {fix}")


def find_file(root: Path, layouts: Sequence[str], names: Sequence[str]) -> Path | None:
    """First existing ``root/layout/name`` over layouts (outer) and names (inner)."""
    for layout in layouts:
        for name in names:
            path = root / layout / name
            if path.is_file():
                return path
    return None


def read_bytes(path: Path) -> bytes:
    """File contents, transparently gunzipped when the name ends in ``.gz``."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataFormatError(f"{path}: corrupt or truncated gzip stream ({e})") from e


def check_split(split: str, allowed: Sequence[str]) -> None:
    """Refuse a split name outside ``allowed`` (before any file is read)."""
    if split not in allowed:
        raise ValueError(f"split must be one of {tuple(allowed)}, got {split!r}")
