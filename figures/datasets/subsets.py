"""Seeded subsets of a labelled dataset."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["subsample", "split_off"]


def subsample(x: Tensor, y: Tensor, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A random subset of ``n`` examples (same rows of x and y), reproducible by ``seed``;
    used to shrink datasets so Hessians fit a small machine."""
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
    if not 1 <= n <= len(x):
        raise ValueError(f"n must be in [1, {len(x)}], got {n}")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


def split_off(
    x: Tensor, y: Tensor, n: int, seed: int = 0
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``(rest, held_out)``: ``n`` examples held out at random (seeded), e.g. a validation
    split of the training set; ``0 < n < len(x)``."""
    if not 0 < n < len(x):
        raise ValueError(f"val_size must be in (0, {len(x)}), got {n}")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return (x[perm[n:]], y[perm[n:]]), (x[perm[:n]], y[perm[:n]])
