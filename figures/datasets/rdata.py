"""A decoder of R's serialisation format and lazy-load databases (``Rdata.rdb`` +
``Rdata.rdx``), enough to read data packages such as janeaustenr without R."""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

from .files import DataFormatError, MissingDataError, PathLike

__all__ = ["RVector", "unserialize_r", "read_rdata"]


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
