"""Seeded synthetic data for the tests and the data-free smoke runs (no files needed).

Two image generators with different jobs, under different names: :func:`prototype_images`
(noisy copies of ten class prototypes, the Hessian figures' smoke data) and
:func:`teacher_images` (Gaussian images labelled by a random linear teacher, the training
harness's), plus :func:`letter_text` (a character string) and :func:`markov_tokens`
(a token stream with learnable structure).
"""

from __future__ import annotations

import math
import string

import numpy as np
import torch
from torch import Tensor

__all__ = ["prototype_images", "teacher_images", "letter_text", "markov_tokens"]


def prototype_images(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Ten noisy class prototypes, ``(n, 1, 28, 28)`` float32 in [0, 1] (MNIST-shaped,
    learnable) and int64 labels; the prototypes are fixed, ``seed`` draws labels and noise."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(1234))
    y = torch.randint(0, 10, (n,), generator=g)
    x = (protos[y] + 0.3 * torch.randn(n, 1, 28, 28, generator=g)).clamp_(0, 1)
    return x, y


def teacher_images(n: int, shape: list[int], classes: int, seed: int) -> tuple[Tensor, Tensor]:
    """Gaussian images ``(n, *shape)`` labelled by a random linear teacher (learnable)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    w = torch.randn(math.prod(shape), classes, generator=g)
    return x, (x.flatten(1) @ w).argmax(1)


def letter_text(n_chars: int, seed: int) -> str:
    """A seeded pseudo-random string of ``n_chars`` letters a-h and spaces."""
    rng = np.random.default_rng(seed)
    alphabet = np.array(list(string.ascii_lowercase[:8] + " "))
    return "".join(alphabet[rng.integers(0, len(alphabet), n_chars)])


def markov_tokens(n: int, vocab: int, seed: int) -> Tensor:
    """``n`` int64 ids of a first-order Markov chain with 3 likely successors per token."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(vocab, (vocab, 3), generator=g)
    ids = torch.empty(n, dtype=torch.long)
    ids[0] = 0
    choice = torch.randint(3, (n,), generator=g)
    noise = torch.rand(n, generator=g) < 0.1
    rand = torch.randint(vocab, (n,), generator=g)
    for t in range(1, n):
        ids[t] = rand[t] if noise[t] else succ[ids[t - 1], choice[t]]
    return ids
