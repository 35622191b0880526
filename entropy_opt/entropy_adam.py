"""Entropy-Adam (paper, Sec. 5.4.2): Adam fed the local-entropy gradient ``x - mu``."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._common import check_nonneg
from .base import AUTHORS_CODE, LocalEntropyOptimizer, use_fused


class EntropyAdam(LocalEntropyOptimizer):
    """Adam whose gradient is the local-entropy gradient estimated by ``L`` SGLD iterations.

    Defaults follow the paper's char-LSTM run (the one Entropy-Adam experiment): ``L=5``,
    fixed ``gamma=0.01`` (``scoping="constant"``), ``betas=(0.5, 0.999)``.

    Args:
        params: parameters or param groups; every entry is re-read from the group at every
            step (schedulers work on ``lr``, and on ``gamma`` if you edit the group).
        lr: Adam step size (default 1e-3, Adam's usual value; the paper's is not legible).
        betas: Adam's moment decays (default ``(0.5, 0.999)``: the paper's beta1 = 0.5).
        eps: Adam's denominator guard (default 1e-8). Not the thermal noise: that is
            ``noise``.
        weight_decay, L, sgld_lr, noise, gamma, scoping, scoping_rate, alpha, and the
            remaining keyword options: as in :class:`~entropy_opt.EntropySGD`. With
            ``foreach`` the outer Adam step is one ``torch._fused_adam_`` pass where the
            build has it for the parameters' device and dtype (instead of seven passes).
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.5, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        L: int = 5,
        sgld_lr: float = 0.1,
        noise: float = 1e-4,
        gamma: float = 0.01,
        scoping: str = "constant",
        alpha: float = 0.75,
        *,
        scoping_rate: float = 0.0,
        **options: Any,
    ) -> None:
        betas = tuple(betas)  # stored as a tuple whatever sequence was passed
        super().__init__(params, locals(), **options)  # the arguments above: group entries

    @classmethod
    def authors_code(cls, params: Any, **kwargs: Any) -> EntropyAdam:
        """An instance with the authors' code choices (:data:`AUTHORS_CODE`); kwargs override."""
        return cls(params, **{**AUTHORS_CODE, **kwargs})

    STATE_KEYS = LocalEntropyOptimizer.STATE_KEYS | {"step", "exp_avg", "exp_avg_sq"}

    def _check_outer(self, group: dict[str, Any]) -> None:
        _check_adam(group["betas"], group["eps"])

    def _outer_update(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], foreach: bool
    ) -> None:
        beta1, beta2 = group["betas"]
        lr, eps = group["lr"], group["eps"]
        m, v, steps = [], [], []
        for p in params:
            st = self.state[p]
            if "exp_avg" not in st:
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["step"] += 1
            m.append(st["exp_avg"])
            v.append(st["exp_avg_sq"])
            steps.append(int(st["step"].item()))
        if foreach and use_fused("adam", params, grads, m, v):
            # one pass instead of the seven below, same equations (rounding aside)
            torch._fused_adam_(
                params,
                grads,
                m,
                v,
                [],
                # the steps live on the host (read once per step above); the kernel
                # reads them on the parameters' device, as torch's own fused Adam keeps them
                [self.state[p]["step"].to(p.device) for p in params],
                amsgrad=False,
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                weight_decay=0.0,
                eps=eps,
                maximize=False,
            )
            return
        if foreach and len(set(steps)) == 1:
            bc1, bc2 = 1.0 - beta1 ** steps[0], 1.0 - beta2 ** steps[0]
            torch._foreach_lerp_(m, grads, 1.0 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, 1.0 - beta2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, math.sqrt(bc2))
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, m, denom, value=-lr / bc1)
            return
        for p, g, mi, vi, t in zip(params, grads, m, v, steps, strict=True):
            bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
            mi.lerp_(g, 1.0 - beta1)
            vi.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            denom = (vi.sqrt() / math.sqrt(bc2)).add_(eps)
            p.addcdiv_(mi, denom, value=-lr / bc1)


def _check_adam(betas: tuple[float, float], eps: float) -> None:
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    check_nonneg("eps", eps, "eps is Adam's denominator guard")
