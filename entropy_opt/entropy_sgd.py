"""Entropy-SGD (Chaudhari et al., ICLR 2017, Algorithm 1): SGD on the local-entropy gradient."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._common import check_momentum
from .base import AUTHORS_CODE, LocalEntropyOptimizer, fused_sgd_step, use_fused


class EntropySGD(LocalEntropyOptimizer):
    """Entropy-SGD: ``L`` SGLD iterations estimate ``mu = <x'>``, then SGD steps on ``x - mu``.

    Args (defaults are the paper's, Sec. 4.2-4.3 and 5.2-5.3, unless said otherwise):
        params: iterable of parameters or param-group dicts (every entry below may be set
            per group and is re-read at every step, so ``torch.optim.lr_scheduler`` drives
            ``lr`` and any code that edits ``group["gamma"]`` drives the scope).
        lr: outer step size ``eta`` (default 1.0: every experiment of the paper starts the
            outer loop at 1; the local-entropy gradient is smooth enough to allow it).
        momentum: outer momentum (default 0, as ``torch.optim.SGD``; the paper's MNIST run
            uses Nesterov momentum in both loops).
        nesterov: Nesterov form of the outer momentum (needs ``momentum > 0``).
        weight_decay: L2 coefficient added to the SGLD gradient (default 0). It enters the
            local entropy once, through ``x - mu``; see ``outer_weight_decay``.
        L: SGLD iterations, i.e. closure calls, per outer step (default 20; paper: 5 to 20).
        sgld_lr: inner step size ``eta'`` (default 0.1; paper: fixed in [0.1, 1], annealing
            it hurts, so it is *not* tied to ``lr``).
        noise: thermal noise ``eps`` (default 1e-4; paper: 1e-4 to 1e-3). The injected noise
            has standard deviation ``eps * sqrt(sgld_lr)`` per coordinate (paper convention).
        gamma: initial scope ``gamma0`` (1 / parameter-units^2; default 0.03, the CIFAR-10
            value; MNIST used 1e-4).
        scoping: schedule name from :mod:`entropy_opt.scoping` (default ``"exponential"``,
            ``gamma0 (1 + scoping_rate)^t``; ``"constant"`` for a fixed gamma).
        alpha: weight of the newest SGLD sample in the running mean ``mu`` (default 0.75,
            which weights later samples more, a soft burn-in).
        scoping_rate: ``gamma1`` (or ``tau`` of the bounded exponential); default 1e-3, the
            paper's factor 1.001 per update.
        options: the keyword options every local-entropy optimizer takes, documented with
            :class:`~entropy_opt.LocalEntropyOptimizer`: ``sgld_momentum``,
            ``sgld_nesterov`` (inner momentum, default off), ``scale_by_gamma``,
            ``noise_convention``, ``advance_scoping``, ``discard_first_grad``,
            ``outer_weight_decay`` (the paper's choices by default; see
            :meth:`authors_code`), ``foreach`` (default None: on for CPU and CUDA-like
            devices; with momentum, inner or outer, it runs the step through
            ``torch._fused_sgd_``), ``flat``, ``generator``, ``diagnostics``.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1.0,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        L: int = 20,
        sgld_lr: float = 0.1,
        noise: float = 1e-4,
        gamma: float = 0.03,
        scoping: str = "exponential",
        alpha: float = 0.75,
        *,
        scoping_rate: float = 1e-3,
        **options: Any,
    ) -> None:
        super().__init__(params, locals(), **options)  # the arguments above: group entries

    @classmethod
    def authors_code(cls, params: Any, **kwargs: Any) -> EntropySGD:
        """An instance that reproduces the authors' public PyTorch code, for comparison.

        Applies :data:`~entropy_opt.AUTHORS_CODE` and makes the inner loop use
        the outer momentum, as their code does; ``kwargs`` override anything.
        """
        opts: dict[str, Any] = dict(AUTHORS_CODE)
        opts["sgld_momentum"] = kwargs.get("momentum", 0.0)
        opts["sgld_nesterov"] = kwargs.get("nesterov", False)
        opts.update(kwargs)
        return cls(params, **opts)

    STATE_KEYS = LocalEntropyOptimizer.STATE_KEYS | {"momentum_buffer"}

    def _check_outer(self, group: dict[str, Any]) -> None:
        check_momentum(group["momentum"], group["nesterov"])

    def _outer_update(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], foreach: bool
    ) -> None:
        lr, momentum, nesterov = group["lr"], group["momentum"], group["nesterov"]
        if momentum:
            bufs = []
            for p in params:
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(st["momentum_buffer"])
            if foreach and use_fused("sgd", params, grads, bufs):
                # one pass; grads (p.grad, the local-entropy gradient) stay as they are
                fused_sgd_step(params, grads, bufs, lr=lr, momentum=momentum, nesterov=nesterov)
                return
            if foreach:
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, grads)
            else:
                for b, g in zip(bufs, grads, strict=True):
                    b.mul_(momentum).add_(g)
            # out of place, so that p.grad keeps the local-entropy gradient itself
            step = torch._foreach_add(grads, bufs, alpha=momentum) if nesterov else bufs
        else:
            step = grads
        if foreach:
            torch._foreach_add_(params, step, alpha=-lr)
        else:
            for p, s in zip(params, step, strict=True):
                p.add_(s, alpha=-lr)
