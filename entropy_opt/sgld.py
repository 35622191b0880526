"""Stochastic gradient Langevin dynamics (Welling & Teh, 2011), the paper's App. C.1 baseline."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._common import (
    Closure,
    NoiseBuffers,
    StateDictMixin,
    check_nonneg,
    checked_group,
    params_with_grad,
    resolve_foreach,
)


class SGLD(StateDictMixin, Optimizer):
    """SGLD with the polynomially decaying step ``eta_t = lr / (1 + t)^b`` (App. C.1).

    Update, in the convention of Algorithm 1 line 6 (eq. 12's factor 1/2 is absorbed in
    ``lr``, so ``noise`` means the same as in :class:`~entropy_opt.EntropySGD`)::

        x <- x - eta_t (grad f(x) + weight_decay x) + sqrt(eta_t) noise N(0, I)

    ``t`` counts completed steps, starting at 0, so the first step uses ``lr``.

    Args:
        params: parameters or param groups; entries are re-read from the group every step.
        lr: initial step size ``eta`` (default 0.1, the paper's SGLD step inside Entropy-SGD).
        b: decay exponent of the step size (default 0.55: Welling & Teh need b in (0.5, 1]
            for the step sizes to sum to infinity while their squares stay finite).
        noise: thermal noise ``eps`` (default 1e-4, as Entropy-SGD).
        weight_decay: L2 coefficient (a Gaussian prior; default 0).
        foreach: use ``torch._foreach_*`` kernels (default None: on CPU and CUDA-like
            devices, see :func:`~entropy_opt._common.resolve_foreach`; True/False force it).
        generator: ``torch.Generator`` for the noise (default: the global RNG).

    Every hyper-parameter must be a finite number >= 0 (checked here and at every step).
    ``load_state_dict`` refuses another optimizer's state dict.
    """

    STATE_KEYS = frozenset({"step"})

    def __init__(
        self,
        params: Any,
        lr: float = 0.1,
        b: float = 0.55,
        noise: float = 1e-4,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        defaults = dict(lr=lr, b=b, noise=noise, weight_decay=weight_decay, foreach=foreach)
        _check(defaults)
        super().__init__(params, defaults)
        self.generator = generator
        self._noise = NoiseBuffers()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, refusing complex parameters and torch options SGLD does not have."""
        param_group = checked_group(param_group, self.defaults, "SGLD")
        _check({**self.defaults, **param_group})
        super().add_param_group(param_group)

    #: Closure calls one :meth:`step` makes when given a closure: one (an effective epoch
    #: is a data pass), as for ``torch.optim.SGD``.
    gradient_evaluations_per_step = 1

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor | None:  # type: ignore[override]
        """One Langevin step; ``closure`` (optional) re-evaluates the loss with backward."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            _check(group)
            params = params_with_grad(group, "SGLD")
            if not params:
                continue
            steps = []
            for p in params:
                st = self.state[p]
                if "step" not in st:
                    st["step"] = torch.tensor(0.0)
                steps.append(int(st["step"].item()))
                st["step"] += 1
            grads = [p.grad for p in params]
            noise = self._noise.draw(params, self.generator) if group["noise"] else None
            foreach = resolve_foreach(group["foreach"], params)
            wd = group["weight_decay"]
            if foreach and len(set(steps)) == 1:
                eta = group["lr"] / (1.0 + steps[0]) ** group["b"]
                if wd:
                    grads = torch._foreach_add(grads, params, alpha=wd)
                torch._foreach_add_(params, grads, alpha=-eta)
                if noise is not None:
                    torch._foreach_add_(params, noise, alpha=math.sqrt(eta) * group["noise"])
                continue
            for i, (p, g, t) in enumerate(zip(params, grads, steps, strict=True)):
                eta = group["lr"] / (1.0 + t) ** group["b"]
                if wd:
                    g = g.add(p, alpha=wd)
                p.add_(g, alpha=-eta)
                if noise is not None:
                    p.add_(noise[i], alpha=math.sqrt(eta) * group["noise"])
        return loss


def _check(group: dict[str, Any]) -> None:
    check_nonneg("lr", group["lr"], "the learning rate is a step size")
    check_nonneg("b", group["b"], "the step decays as lr / (1 + t)^b")
    check_nonneg("noise", group["noise"])
    check_nonneg("weight_decay", group["weight_decay"])
