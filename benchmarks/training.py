"""Small trained problems shared by the benchmarks and the tests: full-batch training.

A Hessian measured at random weights is not the object of study (the benchmarks and the
accuracy tests want a trained network's spectrum: a few outliers over a bulk near zero),
so each problem takes a few hundred full-batch steps first.  The tests import this module
as ``benchmarks.training`` (the checkout's root is on ``sys.path``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


def train_full_batch(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    lr: float,
    optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.Adam,
) -> torch.optim.Optimizer:
    """Minimise ``cross_entropy(model(X), y)`` over all of X for ``steps`` steps, in place.

    Args:
        model: put in train mode (batch norm uses the batch's statistics, as in training).
        X: inputs, (N, ...); y: class indices, (N,).
        steps: optimizer steps, each on the whole of (X, y).
        lr: the learning rate.
        optimizer: its class, called as ``optimizer(model.parameters(), lr=lr)``.

    Returns:
        The optimizer, whose state (Adam's moments) some benchmarks read or save.
    """
    opt = optimizer(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return opt


def tanh_mlp(sizes: Iterable[int]) -> nn.Module:
    """``nn.Sequential`` of Linear layers of the given sizes with Tanh between them."""
    sizes = list(sizes)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers += [nn.Linear(a, b)] + ([nn.Tanh()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


def trained_tanh_mlp(
    sizes: tuple[int, ...],
    samples: int,
    steps: int,
    label_noise: float = 0.0,
    seed: int = 0,
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A float32 tanh MLP trained by Adam (lr 1e-2) on a synthetic linear-softmax task.

    Inputs X ~ N(0, I), (samples, sizes[0]); labels y = argmax(X W + label_noise * E) with
    W, E standard normal, (samples,) in [0, sizes[-1]).  The data come from a generator
    seeded with ``seed``, the weights from ``torch.manual_seed(seed)``, so a call is
    reproducible and leaves the global generator in a fixed state.

    Returns:
        ``(model, X, y)``, the model in train mode (it has no dropout or batch norm).
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    features, classes = sizes[0], sizes[-1]
    X = torch.randn(samples, features, generator=g)
    logits = X @ torch.randn(features, classes, generator=g)
    if label_noise:
        logits = logits + label_noise * torch.randn(samples, classes, generator=g)
    y = logits.argmax(1)
    model = tanh_mlp(sizes)
    train_full_batch(model, X, y, steps, lr=1e-2)
    return model, X, y
