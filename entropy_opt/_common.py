"""Helpers shared by every optimizer here: argument checks, gradient collection, noise."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

Closure = Callable[[], Tensor]


def check_nonneg(name: str, value: float, hint: str = "") -> None:
    """Raise ``ValueError`` unless ``value >= 0``."""
    if not value >= 0.0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, got {value!r}{'; ' + hint if hint else ''}")


def check_fraction(name: str, value: float, hint: str = "") -> None:
    """Raise ``ValueError`` unless ``0 < value <= 1``."""
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must lie in (0, 1], got {value!r}{'; ' + hint if hint else ''}")


def check_momentum(momentum: float, nesterov: bool, prefix: str = "") -> None:
    """Momentum in [0, 1); Nesterov needs a positive momentum (as in ``torch.optim.SGD``)."""
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"{prefix}momentum must lie in [0, 1), got {momentum!r}")
    if nesterov and momentum <= 0.0:
        raise ValueError(f"{prefix}nesterov=True requires {prefix}momentum > 0, got {momentum!r}")


def require_closure(closure: Closure | None, who: str) -> Closure:
    """Return ``closure`` wrapped in ``enable_grad``, or explain why one is needed."""
    if closure is None:
        raise ValueError(
            f"{who}.step() needs a closure: it evaluates the loss several times per step "
            "(at other points than the current weights). Pass "
            "`def closure(): opt.zero_grad(); loss = loss_fn(model(next_batch())); "
            "loss.backward(); return loss` and call `opt.step(closure)`."
        )
    return torch.enable_grad()(closure)


def params_with_grad(group: dict, who: str) -> list[Tensor]:
    """Parameters of ``group`` that received a gradient; sparse gradients are refused."""
    out = []
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise ValueError(
                f"{who} does not support sparse gradients (parameter of shape "
                f"{tuple(p.shape)}); use dense gradients, e.g. nn.Embedding(sparse=False)"
            )
        out.append(p)
    return out


class GeneratorStateMixin:
    """``state_dict`` carries the optimizer's private ``generator`` (if any), so a resumed
    run draws the same noise as an uninterrupted one.  Mix in before ``Optimizer``."""

    generator: torch.Generator | None

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()  # type: ignore[misc]
        if self.generator is not None:
            sd["generator_state"] = self.generator.get_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        gen_state = state_dict.pop("generator_state", None)
        super().load_state_dict(state_dict)  # type: ignore[misc]
        if gen_state is not None and self.generator is not None:
            self.generator.set_state(gen_state)


class NoiseBuffers:
    """Standard-normal noise for a list of tensors, drawn as one flat vector per (device, dtype).

    One ``normal_`` call per bucket instead of one per tensor keeps models with many small
    tensors cheap, and makes the for-loop and foreach paths consume the RNG identically.
    The flat buffers and their views are cached while the parameter list is unchanged.
    """

    def __init__(self) -> None:
        self._key: tuple = ()
        self._flats: list[Tensor] = []
        self._views: list[Tensor] = []

    def draw(self, tensors: Sequence[Tensor], generator: torch.Generator | None) -> list[Tensor]:
        """Fresh N(0, 1) samples shaped like ``tensors`` (views into cached buffers)."""
        key = tuple((id(t), t.shape) for t in tensors)
        if key != self._key:
            self._build(tensors)
            self._key = key
        for flat in self._flats:
            flat.normal_(generator=generator)
        return self._views

    def _build(self, tensors: Sequence[Tensor]) -> None:
        buckets: dict[tuple, list[int]] = {}
        for i, t in enumerate(tensors):
            buckets.setdefault((t.device, t.dtype), []).append(i)
        self._flats, views = [], [None] * len(tensors)
        for (device, dtype), idx in buckets.items():
            flat = torch.empty(sum(tensors[i].numel() for i in idx), device=device, dtype=dtype)
            for i, v in zip(idx, split_views(flat, [tensors[i] for i in idx]), strict=True):
                views[i] = v
            self._flats.append(flat)
        self._views = views  # type: ignore[assignment]


def split_views(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Consecutive views of the 1-D ``flat`` shaped like the tensors in ``like``."""
    views, offset = [], 0
    for t in like:
        n = t.numel()
        views.append(flat[offset : offset + n].view_as(t))
        offset += n
    return views
