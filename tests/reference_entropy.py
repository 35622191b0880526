"""A straightforward per-parameter Entropy-SGD, written the way the authors wrote theirs.

An independent implementation for the tests to compare ``entropy_opt`` with, and the cost
baseline of ``benchmarks/bench_optimizers.py``; it lives with the tests because it is not
part of the library.  Not meant for training: hyper-parameters live in a private
``config`` dict (LR schedulers cannot reach them), every parameter must have a gradient,
there is no foreach path and noise is drawn one tensor at a time.

``authors=False`` follows the paper (alpha weights the new sample, noise
``eps sqrt(eta')``, gamma scoped, the first gradient used). ``authors=True`` transcribes
``python/optim.py`` of github.com/ucla-vision/entropy-sgd, quirks included:
``mu <- alpha mu + (1 - alpha) x'`` with their alpha = 0.75, noise ``eps sqrt(2 eta')``,
gamma frozen at gamma0, the first gradient discarded, weight decay added again in the outer
step, the inner loop using the outer momentum with the coupling and noise added *after* it
(and, without Nesterov, into the momentum buffer itself), and the outer momentum buffer
seeded with the first gradient instead of zero.
"""

from __future__ import annotations

import math
from copy import deepcopy
from typing import Any

import torch
from torch.optim import Optimizer

from entropy_opt._common import check_finite_group

#: A configuration that exercises outer Nesterov momentum, weight decay and a fast scoping
#: schedule, without noise (the tests that compare with this implementation start here).
CONFIG: dict[str, Any] = dict(
    lr=0.5,
    momentum=0.9,
    nesterov=True,
    weight_decay=1e-3,
    L=5,
    sgld_lr=0.1,
    noise=0.0,
    gamma=0.03,
    scoping_rate=0.05,
    alpha=0.75,
)


class ReferenceEntropySGD(Optimizer):
    """Per-parameter Algorithm 1; ``config`` keys: lr, momentum, nesterov, weight_decay, L,
    sgld_lr, noise, gamma, scoping_rate, alpha, sgld_momentum, sgld_nesterov (paper mode)."""

    def __init__(self, params: Any, config: dict[str, Any], authors: bool = False) -> None:
        check_finite_group(config, "ReferenceEntropySGD")
        super().__init__(params, dict(lr=config["lr"]))
        self.config = dict(config)
        self.authors = authors

    def step(self, closure: Any = None) -> torch.Tensor:  # type: ignore[override]
        c = self.config
        L, g0, g1 = c["L"], c["gamma"], c["scoping_rate"]
        llr, eps, wd, alpha = c["sgld_lr"], c["noise"], c["weight_decay"], c["alpha"]
        mom, nesterov = c["momentum"], c["nesterov"]
        imom = mom if self.authors else c.get("sgld_momentum", 0.0)
        inest = nesterov if self.authors else c.get("sgld_nesterov", False)
        params = self.param_groups[0]["params"]
        state = self.state

        loss = closure()
        if "t" not in state:
            state["t"] = 0
            state["wc"] = [deepcopy(w.data) for w in params]
            # the authors seed the outer momentum with the first gradient (deepcopy of w.grad)
            state["mdw"] = [w.grad.clone() if self.authors else torch.zeros_like(w) for w in params]
            state["mw"] = [deepcopy(w.data) for w in params]
            state["imdw"] = [torch.zeros_like(w) for w in params]
            state["eta"] = [torch.zeros_like(w) for w in params]
        for i, w in enumerate(params):
            state["wc"][i].copy_(w.data)
            state["mw"][i].copy_(w.data)
            state["imdw"][i].zero_()
            if self.authors:  # their reset loop draws (and never uses) one noise sample
                state["eta"][i].normal_()
        g = g0 if self.authors else g0 * (1 + g1) ** state["t"]
        sigma = eps * math.sqrt(llr)

        with torch.no_grad():
            for it in range(L):
                if it > 0 or self.authors:
                    with torch.enable_grad():
                        closure()
                for i, w in enumerate(params):
                    dw = w.grad.data.clone()
                    if wd > 0:
                        dw.add_(w.data, alpha=wd)
                    if not self.authors:
                        dw.add_(state["wc"][i] - w.data, alpha=-g)
                    if imom > 0:
                        state["imdw"][i].mul_(imom).add_(dw)
                        if inest:
                            dw.add_(state["imdw"][i], alpha=imom)
                        else:
                            dw = state["imdw"][i] if self.authors else state["imdw"][i].clone()
                    eta = state["eta"][i]
                    eta.normal_()
                    if self.authors:
                        dw.add_(state["wc"][i] - w.data, alpha=-g)
                        dw.add_(eta, alpha=eps / math.sqrt(0.5 * llr))
                        w.data.add_(dw, alpha=-llr)
                        state["mw"][i].mul_(alpha).add_(w.data, alpha=1 - alpha)
                    else:
                        w.data.add_(dw, alpha=-llr)
                        w.data.add_(eta, alpha=sigma)
                        state["mw"][i].mul_(1 - alpha).add_(w.data, alpha=alpha)

            for i, w in enumerate(params):
                w.data.copy_(state["wc"][i])
                dw = w.data - state["mw"][i]
                if self.authors and wd > 0:
                    dw.add_(w.data, alpha=wd)
                if mom > 0:
                    state["mdw"][i].mul_(mom).add_(dw)
                    if nesterov:
                        dw.add_(state["mdw"][i], alpha=mom)
                    else:
                        dw = state["mdw"][i].clone()
                w.grad = dw
                w.data.add_(dw, alpha=-c["lr"])
            if not self.authors:
                state["t"] += 1
        return loss
