"""Full IEEE float32 inside the library's computations, whatever the process asked for.

PyTorch lets float32 convolutions, matrix products and RNNs run in a reduced format:
on NVIDIA GPUs cuDNN's convolutions use TF32 (a 10-bit mantissa, ~5e-4 relative) *by
default*, and ``torch.set_float32_matmul_precision("high")``, common in training
scripts, sends float32 matrix products to TF32 on GPUs and to oneDNN's reduced formats
on CPUs.  Curvature computed that way is silently ~1e3 times less accurate than the
float32 tolerances the algorithms set from ``torch.finfo(float32).eps``: eigenvalues
below ~1e-3 of the largest become noise, exactly the near-zero mass a Hessian spectrum
is asked about.  :func:`ieee_float32` switches every such setting to plain IEEE float32
for the duration and restores each as it was; float64 is never affected.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["ieee_float32", "reduced_float32_settings"]

#: The per-operation settings of PyTorch >= 2.9 (``<backend>.<op>.fp32_precision``).
_NEW_API = (("cuda", "matmul"), ("cudnn", "conv"), ("cudnn", "rnn"))
_NEW_API_CPU = (("mkldnn", "matmul"), ("mkldnn", "conv"), ("mkldnn", "rnn"))


def _settings() -> list[tuple[str, Any]]:
    """``(name, holder)`` of each ``fp32_precision`` setting this PyTorch has (none
    before 2.9)."""
    found = []
    for backend, op in (*_NEW_API, *_NEW_API_CPU):
        holder = getattr(getattr(torch.backends, backend, None), op, None)
        if holder is not None and hasattr(holder, "fp32_precision"):
            found.append((f"{backend}.{op}", holder))
    return found


def reduced_float32_settings() -> list[str]:
    """The settings that would run float32 below IEEE precision now, e.g.
    ``["cudnn.conv: tf32"]`` (empty when every float32 operation is plain IEEE)."""
    found = _settings()
    if found:
        values = [(name, holder.fp32_precision) for name, holder in found]
        return [f"{name}: {value}" for name, value in values if value not in ("ieee", "none")]
    legacy = [
        ("cudnn.allow_tf32", torch.backends.cudnn.allow_tf32),
        ("cuda.matmul.allow_tf32", torch.backends.cuda.matmul.allow_tf32),
    ]
    return [f"{name}: True" for name, on in legacy if on]


@contextmanager
def ieee_float32() -> Iterator[None]:
    """Run the body with every float32 convolution, matrix product and RNN in IEEE
    float32 (no TF32, no bfloat16 internals); each setting is restored after.

    Usable as a decorator.  Nested use is cheap (a few attribute writes).
    """
    holders = [holder for _, holder in _settings()]
    if holders:
        saved = [h.fp32_precision for h in holders]
        try:
            for h in holders:
                h.fp32_precision = "ieee"
            yield
        finally:
            for h, value in zip(holders, saved, strict=True):
                h.fp32_precision = value
        return
    saved_legacy = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved_legacy
