"""The optimizers every run can use, built by name from JSON-ready keyword arguments."""

from __future__ import annotations

from typing import Any

import torch

from entropy_opt import SAM, SGLD, EntropyAdam, EntropySGD

__all__ = ["OPTIMIZERS", "build_optimizer"]

OPTIMIZERS = ("sgd", "adam", "entropy-sgd", "entropy-adam", "sgld", "sam")


def build_optimizer(name: str, params: Any, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    """The optimizer ``name`` (one of :data:`OPTIMIZERS`) on ``params``.

    ``"sgd"`` defaults to Nesterov momentum 0.9 (the paper's baseline); ``"sam"`` wraps
    ``torch.optim.SGD`` (Nesterov 0.9 by default) or, with ``base="adam"``, Adam.  Lists
    (``betas`` read back from JSON) become the tuples torch expects.
    """
    kw = dict(kwargs)
    if "betas" in kw:
        kw["betas"] = tuple(kw["betas"])
    if name == "sgd":
        kw.setdefault("momentum", 0.9)
        kw.setdefault("nesterov", kw["momentum"] > 0)
        return torch.optim.SGD(params, **kw)
    if name == "adam":
        return torch.optim.Adam(params, **kw)
    if name == "entropy-sgd":
        return EntropySGD(params, **kw)
    if name == "entropy-adam":
        return EntropyAdam(params, **kw)
    if name == "sgld":
        return SGLD(params, **kw)
    if name == "sam":
        base = kw.pop("base", "sgd")
        if base == "sgd":
            kw.setdefault("momentum", 0.9)
            kw.setdefault("nesterov", kw["momentum"] > 0)
            return SAM(params, torch.optim.SGD, **kw)
        return SAM(params, torch.optim.Adam, **kw)
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")
