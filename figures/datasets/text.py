"""Plain UTF-8 text files and word-level Penn Treebank."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .files import (
    DataFormatError,
    MissingDataError,
    PathLike,
    find_file,
    missing_error,
    resolve_root,
)

__all__ = ["load_text", "PTBCorpus", "load_ptb"]


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
    base, origin = resolve_root(root, "HS_PTB_DIR", "ptb")
    texts = {}
    for split in ("train", "valid", "test"):
        name = f"ptb.{split}.txt"
        path = find_file(base, ("", "data", "simple-examples/data"), (name,))
        if path is None:
            raise missing_error(
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
