"""Jane Austen's six novels (janeaustenr): from ``make data``'s text files or decoded
from the package's ``Rdata.rdb``."""

from __future__ import annotations

from .files import DataFormatError, PathLike, find_file, missing_error, resolve_root
from .rdata import RVector, read_rdata
from .text import load_text

__all__ = ["AUSTEN_ORDER", "austen_novels_from_rdata", "join_austen", "load_austen"]


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
    base, origin = resolve_root(root, "HS_AUSTEN_DIR", "austen")
    text_file = base / f"{novel or 'austen'}.txt"
    if text_file.is_file():
        return load_text(text_file)
    rdb = find_file(base, ("", "data"), ("Rdata.rdb",))
    if rdb is None:
        raise missing_error(
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
