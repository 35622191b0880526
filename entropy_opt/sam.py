"""Sharpness-aware minimisation (Foret et al., ICLR 2021) around any base optimizer."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._common import (
    OPTIMIZER_KEY,
    Closure,
    check_finite_group,
    check_group_keys,
    check_nonneg,
    check_state_dict,
    is_state_init_probe,
    params_with_grad,
    require_closure,
)


class SAM(Optimizer):
    """SAM: ascend to ``x + rho g / ||g||``, take the gradient there, step from ``x``.

    ``base_optimizer`` is a ``torch.optim.Optimizer`` class; it is built on this optimizer's
    param groups (shared, so LR schedulers attached to either drive both).

    Args:
        params: parameters or param groups.
        base_optimizer: class of the optimizer that takes the actual step (e.g. ``SGD``).
        rho: radius of the ascent step in parameter units (default 0.05, Foret et al.'s
            CIFAR value). ``||g||`` is the norm over all parameters of all groups.
        **kwargs: passed to ``base_optimizer``.

    ``step(closure)`` calls the closure twice (at ``x``, then at the perturbed point) and
    returns the loss at ``x``: :attr:`gradient_evaluations_per_step` is 2.  A BatchNorm in
    train mode updates its running statistics at both points; recompute them at ``x``
    before evaluating (``torch.optim.swa_utils.update_bn``).

    Every numeric hyper-parameter, the base optimizer's included, must be finite (checked
    here and at every step: ``torch.optim`` itself accepts ``lr=inf``).  ``state_dict``
    records "SAM"; ``load_state_dict`` refuses a state dict that lacks any hyper-parameter
    of this SAM and its base optimizer (another optimizer's) before loading anything.
    """

    def __init__(
        self, params: Any, base_optimizer: type[Optimizer], rho: float = 0.05, **kwargs: Any
    ) -> None:
        check_nonneg("rho", rho, "rho is the radius of the sharpness neighbourhood")
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer)):
            what = (
                f"an instance of {type(base_optimizer).__name__}"
                if isinstance(base_optimizer, Optimizer)
                else repr(base_optimizer)
            )
            raise TypeError(
                f"base_optimizer must be a torch.optim.Optimizer class (e.g. torch.optim.SGD), "
                f"got {what}; SAM builds it on its own param groups: pass its options as "
                "keyword arguments, SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)"
            )
        if issubclass(base_optimizer, torch.optim.LBFGS):
            raise TypeError(
                "SAM's base optimizer takes one step from the gradient SAM computed; LBFGS "
                "re-evaluates a closure inside its step, which SAM cannot give it"
            )
        check_finite_group(kwargs, "SAM")
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.defaults.update(self.base_optimizer.defaults)
        for group in self.param_groups:
            check_group_keys(group, self.defaults, "SAM")
        self._share_base()

    def _share_base(self) -> None:
        # one set of groups and one state: what tools reading ``optimizer.state`` see
        # (torch.distributed.checkpoint, moving state to a device) is the base's
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to SAM and its base optimizer (a torch option neither implements
        is refused, as at construction)."""
        if not hasattr(self, "base_optimizer"):  # inside Optimizer.__init__
            super().add_param_group(param_group)
            return
        candidate = {**self.defaults, **param_group}
        check_group_keys(candidate, self.defaults, "SAM")
        self.base_optimizer.add_param_group(param_group)
        group = self.base_optimizer.param_groups[-1]
        group.setdefault("rho", self.defaults["rho"])
        self._share_base()

    @property
    def gradient_evaluations_per_step(self) -> int:
        """Closure calls (gradient evaluations) one :meth:`step` makes: 2, whatever the
        param groups hold (``rho = 0`` included); effective epochs = steps x 2.  (A step
        in which no parameter receives a gradient stops after the first call.)"""
        return 2

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        """Ascent step, gradient at the perturbed point, base step from the original point."""
        if is_state_init_probe(closure, self.param_groups, self.state):
            self.base_optimizer.step()  # creates its state; lr 0 and zero gradients
            return None
        closure = require_closure(closure, "SAM")
        for group in self.param_groups:
            check_nonneg("rho", group["rho"])
            check_finite_group(group, "SAM")
        loss = closure()
        active = [params_with_grad(g, "SAM") for g in self.param_groups]
        flat = [p for ps in active for p in ps]
        if not flat:
            return loss
        grads = [p.grad for p in flat]
        if any(g.dtype in (torch.float16, torch.bfloat16) for g in grads):
            # a float16 norm overflows above 65504: scale 1 / inf = 0 skipped the ascent
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        else:
            norms = torch._foreach_norm(grads)
        gnorm = torch.linalg.vector_norm(torch.stack(norms))
        # x is kept, not recomputed as (x + e) - e, which rounds: the base step starts
        # from exactly the weights the first gradient was taken at
        originals = [torch._foreach_mul(params, 1.0) if params else [] for params in active]
        scale = 1.0 / (float(gnorm) + 1e-12)
        for group, params in zip(self.param_groups, active, strict=True):
            # the worst point in the ball: uphill for a loss, downhill when maximising
            sign = -1.0 if group.get("maximize", False) else 1.0
            if params:
                torch._foreach_add_(
                    params, [p.grad for p in params], alpha=sign * group["rho"] * scale
                )
        closure()
        for params, x in zip(active, originals, strict=True):
            if params:
                torch._foreach_copy_(params, x)
        self.base_optimizer.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (SAM keeps no state of its own), marked "SAM"."""
        return {**self.base_optimizer.state_dict(), OPTIMIZER_KEY: "SAM"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict written by :meth:`state_dict`; another optimizer's is refused
        (``ValueError`` naming both) before anything is loaded."""
        check_state_dict(self, state_dict)
        state_dict = {k: v for k, v in state_dict.items() if k != OPTIMIZER_KEY}
        self.base_optimizer.load_state_dict(state_dict)
        self._share_base()
