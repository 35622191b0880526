"""A small, reusable training loop for the figures (and later the optimizer experiments).

``train`` runs mini-batch training on an in-memory ``(inputs, targets)`` pair with any
``torch.optim.Optimizer``.  Every step goes through ``optimizer.step(closure)``, so
closure-based optimizers (LBFGS, Entropy-SGD's inner Langevin loop, SAM) work unchanged:
the closure zeroes the gradients, runs forward and backward and returns the loss, and may
be called any number of times per step.

Determinism: the order of mini-batches comes from a ``torch.Generator`` seeded with
``seed`` (the global RNG is also seeded, for dropout and for optimizers that draw noise),
so the same model initialisation, data and seed give the same weights on the same
machine and thread count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = ["TrainResult", "train", "evaluate_error", "evaluate_loss", "batches"]

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class TrainResult:
    """What a training run produced besides the weights (which stay in the model).

    Attributes:
        epoch_losses: mean mini-batch loss of each epoch (the losses the closures
            returned, weighted by batch size).
        steps: optimizer steps taken.
        seconds: wall time of the loop.
    """

    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"epoch_losses": self.epoch_losses, "steps": self.steps, "seconds": self.seconds}


def batches(
    data: tuple[Tensor, Tensor], batch_size: int, generator: torch.Generator | None = None
) -> list[tuple[Tensor, Tensor]]:
    """Split ``(inputs, targets)`` into mini-batches along dim 0, shuffled if a generator
    is given (a fresh permutation per call), in order otherwise.  The last batch may be
    short."""
    x, y = data
    if len(x) != len(y):
        raise ValueError(f"inputs and targets differ in length: {len(x)} vs {len(y)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(x)
    order = torch.randperm(n, generator=generator) if generator is not None else None
    out = []
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size] if order is not None else slice(start, start + batch_size)
        out.append((x[idx], y[idx]))
    return out


def train(
    model: nn.Module,
    loss_fn: LossFn,
    train_data: tuple[Tensor, Tensor],
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
    seed: int,
    device: torch.device | str = "cpu",
    scheduler: Any | None = None,
    progress: bool = True,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` in place for ``epochs`` passes over ``train_data``.

    Args:
        model: the network (already on ``device``; put in train mode here).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` mean over the batch.
        train_data: ``(inputs, targets)`` tensors; moved to ``device`` batch by batch.
        optimizer: any ``torch.optim.Optimizer``; stepped as ``optimizer.step(closure)``.
        epochs, batch_size: passes over the data and samples per step.
        seed: seeds the batch order and the global RNG.
        device: where the batches go.
        scheduler: optional learning-rate scheduler, stepped once per epoch.
        progress: show a progress bar over the steps.
        desc: label of the progress bar.

    Returns a :class:`TrainResult`.  Raises ``FloatingPointError`` if the loss becomes
    non-finite.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    device = torch.device(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    result = TrainResult()
    n_batches = -(-len(train_data[0]) // batch_size)
    bar = tqdm(total=epochs * n_batches, desc=desc, unit="step", disable=not progress,
               leave=False, dynamic_ncols=True)
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        total, count = 0.0, 0
        for xb, yb in batches(train_data, batch_size, gen):
            xb, yb = xb.to(device), yb.to(device)

            def closure(xb: Tensor = xb, yb: Tensor = yb) -> Tensor:
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), yb)
                loss.backward()
                return loss

            loss = optimizer.step(closure)
            value = float(loss.detach())
            if not torch.isfinite(torch.tensor(value)):
                bar.close()
                raise FloatingPointError(f"training loss became {value} at step {result.steps}")
            total += value * len(xb)
            count += len(xb)
            result.steps += 1
            bar.update(1)
        result.epoch_losses.append(total / max(count, 1))
        bar.set_postfix(loss=f"{result.epoch_losses[-1]:.4f}")
        if scheduler is not None:
            scheduler.step()
    bar.close()
    model.eval()
    result.seconds = time.perf_counter() - t0
    return result


@torch.no_grad()
def evaluate_error(
    model: nn.Module, data: tuple[Tensor, Tensor], batch_size: int = 1000,
    device: torch.device | str = "cpu",
) -> float:
    """Classification error of ``model`` on ``(inputs, targets)``: the fraction of targets
    that differ from the argmax over the last dimension of the outputs.  Works for image
    labels (N,) with logits (N, C) and for sequences (N, L) with logits (N, L, V) (then
    the fraction of mispredicted characters)."""
    was_training = model.training
    model.eval()
    wrong, total = 0, 0
    for xb, yb in batches(data, batch_size):
        pred = model(xb.to(device)).argmax(dim=-1)
        wrong += int((pred != yb.to(device)).sum())
        total += yb.numel()
    model.train(was_training)
    return wrong / max(total, 1)


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, loss_fn: LossFn, data: tuple[Tensor, Tensor], batch_size: int = 1000,
    device: torch.device | str = "cpu",
) -> float:
    """Sample-averaged ``loss_fn`` over ``data`` in eval mode (batches weighted by size)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for xb, yb in batches(data, batch_size):
        total += float(loss_fn(model(xb.to(device)), yb.to(device))) * len(xb)
        count += len(xb)
    model.train(was_training)
    return total / max(count, 1)
