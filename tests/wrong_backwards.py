"""autograd.Functions whose backward hides or distorts curvature, shared by the tests
(imported as ``from wrong_backwards import ...``)."""

from __future__ import annotations

import torch


class FusedCrossEntropy(torch.autograd.Function):
    """A loss with a hand-written backward, as fused kernels are written: its gradient
    has no graph, so double backward cannot see the loss's curvature."""

    @staticmethod
    def forward(ctx, logits, labels):
        ctx.save_for_backward(logits, labels)
        return torch.nn.functional.cross_entropy(logits, labels)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        logits, labels = ctx.saved_tensors
        p = logits.softmax(-1)
        p[torch.arange(len(labels)), labels] -= 1
        return grad * p / len(labels), None


class ScaledProduct(torch.autograd.Function):
    """a * b with the derivative in a off by a factor (1 + delta): a wrong double backward
    (set ``ScaledProduct.delta`` to choose how wrong)."""

    delta = 0.5

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        return g * b * (1 + ScaledProduct.delta), g * a
