"""The one training loop of the figures and the optimizer experiments.

:func:`run_loop` steps any ``torch.optim.Optimizer`` through ``optimizer.step(closure)``
over a mini-batch stream, counting optimizer *steps* and closure *calls* (gradient
evaluations), and hands control to a callback at evaluation boundaries.  Everything
else is built on it:

:func:`figures.harness.train` adds configs, evaluation on held-out splits, BatchNorm
recomputation, logs and checkpoints; every figure, Table 1 and Figs. 4-6 train through it.

Closures.  The closure zeroes the gradients, runs forward and backward and returns the
loss; optimizers may call it any number of times per step (LBFGS, SAM twice on the same
mini-batch, Entropy-SGD ``L`` times).  Local-entropy optimizers (``EntropySGD``,
``EntropyAdam``) draw a *fresh* mini-batch on every call (Alg. 1 line 4 of the paper);
all others see one mini-batch per step.

Running train metrics are the loss (and, for integer targets, the argmax error) of the
*first* closure call of each step, which is always evaluated at the current weights x,
averaged over the steps since the last boundary with each batch weighted by its number of
targets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from entropy_opt import EntropyAdam, EntropySGD

from .datasets import batchify

__all__ = [
    "cross_entropy",
    "ImageStream",
    "LoopCounters",
    "RunningMetrics",
    "TokenStream",
    "calls_per_step",
    "evaluate_metrics",
    "forward",
    "recompute_batchnorm",
    "run_loop",
]

LossFn = Callable[[Tensor, Tensor], Tensor]


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over every target: (N, C) vs (N,) or (N, L, V) vs (N, L)."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


# --------------------------------------------------------------------------------------
# Mini-batch streams
# --------------------------------------------------------------------------------------


class ImageStream:
    """Endless shuffled mini-batches of ``(x, y)``.

    Pass ``p`` visits the samples in the order ``randperm(n)`` of a generator seeded with
    ``seed * 1_000_003 + p``, so the position ``(pass, index)`` is the stream's whole state
    (no hidden generator to checkpoint).  ``drop_last=True`` (the harness's default) drops
    the last short batch of a pass so every step sees ``batch_size`` samples; with False
    it is kept and a pass is ``ceil(n / batch_size)`` steps.
    """

    def __init__(
        self, x: Tensor, y: Tensor, batch_size: int, seed: int, drop_last: bool = True
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"inputs and targets differ in length: {len(x)} vs {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(x) == 0 or (drop_last and len(x) < batch_size):
            raise ValueError(f"{len(x)} training samples < batch_size {batch_size}")
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self.per_pass = len(x) // batch_size if drop_last else math.ceil(len(x) / batch_size)
        self.pass_, self.index = 0, 0
        self._perm: Tensor | None = None

    def _permutation(self) -> Tensor:
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.pass_)
            self._perm = torch.randperm(len(self.x), generator=g)
        return self._perm

    def next(self) -> tuple[Tensor, Tensor]:
        if self.index == self.per_pass:
            self.pass_, self.index, self._perm = self.pass_ + 1, 0, None
        b = self.batch_size
        idx = self._permutation()[self.index * b : (self.index + 1) * b]
        self.index += 1
        return self.x[idx], self.y[idx]

    def carry(self, state: Any) -> None:
        """Images carry no state between batches."""

    def state_dict(self) -> dict[str, Any]:
        return {"pass": self.pass_, "index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pass_, self.index, self._perm = state["pass"], state["index"], None


class TokenStream:
    """Truncated-BPTT windows over a batchified token stream (B, T), in order.

    ``next()`` returns ``((x, state), y)``: the LSTM state carried from the previous window
    (detached; None at the start of each pass).  The model's new state is handed back
    through :meth:`carry` by the loop, so every closure call continues the sequence, and is
    part of :meth:`state_dict` (checkpoints may fall mid-pass)."""

    def __init__(self, ids: Tensor, batch_size: int, bptt: int) -> None:
        if bptt < 1:
            raise ValueError(f"bptt must be >= 1, got {bptt}")
        self.data = batchify(ids, batch_size)  # refuses < 2 tokens per row
        self.bptt = bptt
        self.per_pass = (self.data.shape[1] - 2) // bptt + 1
        self.pass_, self.index = 0, 0
        self.state: tuple[Tensor, Tensor] | None = None

    def next(self) -> tuple[tuple[Tensor, Any], Tensor]:
        if self.index == self.per_pass:
            self.pass_, self.index, self.state = self.pass_ + 1, 0, None
        i = self.index * self.bptt
        n = min(self.bptt, self.data.shape[1] - 1 - i)
        self.index += 1
        return (self.data[:, i : i + n], self.state), self.data[:, i + 1 : i + 1 + n]

    def carry(self, state: tuple[Tensor, Tensor] | None) -> None:
        if state is not None:
            self.state = tuple(s.detach() for s in state)  # type: ignore[assignment]

    def state_dict(self) -> dict[str, Any]:
        return {"pass": self.pass_, "index": self.index, "state": self.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pass_, self.index, self.state = state["pass"], state["index"], state["state"]


Stream = ImageStream | TokenStream


# --------------------------------------------------------------------------------------
# Forward, metrics, BatchNorm
# --------------------------------------------------------------------------------------


def forward(model: nn.Module, inputs: Any) -> tuple[Tensor, Any]:
    """Logits and (for sequence inputs ``(x, state)``) the model's new recurrent state."""
    if isinstance(inputs, tuple):
        x, state = inputs
        return model(x, state, return_state=True)
    return model(inputs), None


def batch_error(logits: Tensor, targets: Tensor) -> Tensor | None:
    """Fraction of integer targets that differ from the argmax over the last dimension of
    the logits; None for non-integer (regression) targets."""
    if targets.is_floating_point() or targets.is_complex():
        return None
    with torch.no_grad():
        return (logits.argmax(-1) != targets).float().mean()


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(_to(o, device) for o in obj)
    return obj


def _in_order(data: tuple[Tensor, Tensor], batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    x, y = data
    if len(x) != len(y):
        raise ValueError(f"inputs and targets differ in length: {len(x)} vs {len(y)}")
    for start in range(0, len(x), batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]


@torch.no_grad()
def evaluate_metrics(
    model: nn.Module,
    data: tuple[Tensor, Tensor],
    loss_fn: LossFn = cross_entropy,
    batch_size: int = 1000,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """``loss`` (mean of ``loss_fn``) and, for integer targets, ``error`` (fraction of
    targets that differ from the argmax over the last dimension of the outputs) of
    ``model`` on ``data = (inputs, targets)``, in one eval-mode pass; each batch weighted
    by its number of targets, the model's mode restored.  Images: (N, C) outputs vs (N,)
    labels; sequences: (N, L, V) vs (N, L), the error is then per character.
    ``batch_size`` only bounds memory (1000 MNIST images: ~3 MB of inputs)."""
    running = RunningMetrics()
    was = model.training
    model.eval()
    try:
        for xb, yb in _in_order(data, batch_size):
            yb = yb.to(device)
            logits = model(xb.to(device))
            running.add(loss_fn(logits, yb), batch_error(logits, yb), yb.numel())
    finally:
        model.train(was)
    out = {"loss": running.loss}
    if running.error_weight:
        out["error"] = running.error
    return out


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches: Any, num_batches: int | None = None) -> int:
    """Reset every BatchNorm's running statistics and recompute them at the current weights.

    Runs forward passes in train mode without gradients over up to ``num_batches`` inputs
    from ``batches`` (an iterable of input tensors, or of ``(inputs, targets)`` pairs), with
    ``momentum=None`` so the running mean/var become the plain average of the per-batch
    mean/unbiased variance; with one batch holding all the data they are the data's exact
    statistics.  The model's mode and each layer's momentum are restored.  Returns the
    number of batches used (0, touching nothing, for a model without BatchNorm).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    device = next(model.parameters()).device
    used = 0
    try:
        for batch in batches:
            if num_batches is not None and used >= num_batches:
                break
            x = batch[0] if isinstance(batch, tuple | list) else batch
            forward(model, (x.to(device), None) if not x.is_floating_point() else x.to(device))
            used += 1
    finally:
        for m, mom in zip(bns, momenta, strict=True):
            m.momentum = mom
        model.train(was_training)
    return used


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


def fresh_batch_per_call(optimizer: torch.optim.Optimizer) -> bool:
    """Whether each closure call should see a new mini-batch: True for the local-entropy
    optimizers, whose inner SGLD loop samples one per iteration (Alg. 1 line 4)."""
    return isinstance(optimizer, EntropySGD | EntropyAdam)


def calls_per_step(optimizer: torch.optim.Optimizer) -> int:
    """Closure calls (gradient evaluations) per step, the ``L`` of "effective epochs =
    epochs x L", as the optimizer publishes it in ``gradient_evaluations_per_step``
    (``L``, or ``L + 1`` with ``discard_first_grad``, for the local-entropy optimizers, 2
    for SAM); 1 for optimizers that do not publish it (``torch.optim``; LBFGS-like ones
    that call the closure a variable number of times count as 1 here)."""
    return int(getattr(optimizer, "gradient_evaluations_per_step", 1))


@dataclass
class LoopCounters:
    """Progress of a loop: optimizer steps and closure calls (gradient evaluations) so far.
    Checkpointed by the harness; :func:`run_loop` advances it in place."""

    steps: int = 0
    calls: int = 0


@dataclass
class RunningMetrics:
    """Sums of the first-call loss / error since the last boundary, weighted by targets."""

    loss_sum: float = 0.0
    error_sum: float = 0.0
    weight: int = 0
    error_weight: int = 0

    def add(self, loss: Tensor, error: Tensor | None, weight: int) -> None:
        self.loss_sum += float(loss.detach()) * weight
        self.weight += weight
        if error is not None:
            self.error_sum += float(error) * weight
            self.error_weight += weight

    @property
    def loss(self) -> float:
        return self.loss_sum / self.weight if self.weight else math.nan

    @property
    def error(self) -> float:
        return self.error_sum / self.error_weight if self.error_weight else math.nan

    def reset(self) -> None:
        self.loss_sum = self.error_sum = 0.0
        self.weight = self.error_weight = 0


def run_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    stream: Stream,
    *,
    total_steps: int,
    on_boundary: Callable[[LoopCounters, RunningMetrics], bool],
    every: int,
    unit: Literal["calls", "steps"] = "calls",
    loss_fn: LossFn = cross_entropy,
    scheduler: Any | None = None,
    clip_grad_norm: float | None = None,
    counters: LoopCounters | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "train",
) -> LoopCounters:
    """Step ``optimizer`` until ``counters.steps == total_steps`` or a boundary asks to stop.

    Args:
        model: trained in place, in train mode during the loop and eval mode after it.
        optimizer: stepped as ``optimizer.step(closure)``.
        stream: :class:`ImageStream` or :class:`TokenStream` (``per_pass`` steps a pass);
            local-entropy optimizers draw a new batch on every closure call
            (:func:`fresh_batch_per_call`), the others one per step.
        total_steps: optimizer steps to reach (counted from 0, not from ``counters``).
        on_boundary: called as ``on_boundary(counters, running)`` at every boundary and
            after the last step; returns True to stop the loop early.  ``running`` is reset
            after the call.
        every, unit: a boundary falls at the first step at or after each multiple of
            ``every x stream.per_pass`` closure calls (``unit="calls"``: effective epochs;
            a step is never split) or optimizer steps (``"steps"``: passes).
        loss_fn: ``loss_fn(logits, targets)``, a scalar mean (default cross-entropy over
            every target, for images and sequences alike).
        scheduler: LR scheduler stepped after each pass of ``per_pass`` steps (an *outer*
            epoch, as the paper's recipes count them).
        clip_grad_norm: clip every closure's gradient to this total norm (RNNs); None = off.
        counters: where to start (a resumed run); a fresh :class:`LoopCounters` if None.
        device: where batches go (the model must already be there).
        progress, desc: tqdm bar over steps and its label.

    Returns the counters.  Raises ``FloatingPointError`` naming the step if the loss
    becomes non-finite.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if unit not in ("calls", "steps"):
        raise ValueError(f"unit must be 'calls' or 'steps', got {unit!r}")
    device = torch.device(device)
    counters = counters if counters is not None else LoopCounters()
    per_pass = stream.per_pass
    fresh = fresh_batch_per_call(optimizer)
    running = RunningMetrics()
    pending: list[Any] = [None]
    first_loss: list[Tensor | None] = [None]  # None until the step's first closure call

    def next_boundary() -> int:
        done = counters.calls if unit == "calls" else counters.steps
        return (done // per_pass // every + 1) * every * per_pass

    @torch.enable_grad()  # SAM and others may call it under no_grad
    def closure() -> Tensor:
        drew = fresh or pending[0] is None
        if drew:
            inputs, y = stream.next()
            pending[0] = (_to(inputs, device), y.to(device))
        inputs, y = pending[0]
        optimizer.zero_grad(set_to_none=True)
        logits, state = forward(model, inputs)
        loss = loss_fn(logits, y)
        loss.backward()
        if clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        if drew:  # a repeat call on the same window (SAM's perturbed pass) must not carry
            stream.carry(state)
        if first_loss[0] is None:
            first_loss[0] = loss.detach()
            running.add(loss, batch_error(logits, y), y.numel())
        counters.calls += 1
        return loss

    boundary = next_boundary()
    bar = tqdm(
        total=total_steps,
        initial=counters.steps,
        desc=desc,
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
        leave=False,
    )
    model.train()
    try:
        while counters.steps < total_steps:
            pending[0], first_loss[0] = None, None
            loss = optimizer.step(closure)
            if loss is None:  # the Optimizer API allows step() to return nothing
                loss = first_loss[0]
            if loss is None:
                raise RuntimeError(
                    f"{desc}: {type(optimizer).__name__}.step never called "
                    "the closure; run_loop needs closure-driven optimizers"
                )
            value = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"{desc}: the training loss became {value} at step {counters.steps}; "
                    "lower the learning rate or check the data for NaN/inf"
                )
            counters.steps += 1
            bar.update(1)
            if scheduler is not None and counters.steps % per_pass == 0:
                scheduler.step()
            done = counters.calls if unit == "calls" else counters.steps
            if done >= boundary or counters.steps == total_steps:
                stop = on_boundary(counters, running)
                running.reset()
                boundary = next_boundary()
                if stop and counters.steps < total_steps:
                    break
    finally:
        bar.close()
        model.eval()
    return counters
