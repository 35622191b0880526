"""Character-level datasets: the vocabulary, Fig 3b's lines, Table 1's splits and the
truncated-BPTT stream layout."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["CharVocab", "CharLines", "char_lines", "char_splits", "batchify", "bptt_batches"]


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
        raise ValueError(
            f"need batch_size >= 1 and >= 2 tokens per row; got {len(ids)} "
            f"tokens for {batch_size} rows: use more text or a smaller batch_size"
        )
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
