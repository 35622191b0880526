"""Shared references for the tests: dense Hessians computed independently of spectra."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

# The first forward-mode product of a process imports torch's jvp decompositions, which
# warns that torch.jit.script is deprecated; a test that turns warnings into errors
# would fail or pass depending on whether an earlier test had imported them already.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import torch._decomp.decompositions_for_jvp  # noqa: F401


def flat_params(model: nn.Module) -> tuple[list[str], list[torch.Size], torch.Tensor]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])
    return names, shapes, theta


def reference_hessian(model: nn.Module, loss_fn, inputs, targets) -> torch.Tensor:
    """Hessian of loss_fn(model(inputs), targets) over ALL data at once, by
    torch.autograd.functional.hessian (double backward, no torch.func, no batching)."""
    names, shapes, theta = flat_params(model)
    sizes = [s.numel() for s in shapes]
    buffers = {n: b for n, b in model.named_buffers()}

    def f(t: torch.Tensor) -> torch.Tensor:
        params = {
            n: p.view(s) for n, p, s in zip(names, torch.split(t, sizes), shapes, strict=True)
        }
        out = torch.func.functional_call(model, {**params, **buffers}, (inputs,))
        return loss_fn(out, targets)

    return torch.autograd.functional.hessian(f, theta)


def relu_mlp(sizes: tuple[int, ...] = (5, 16, 16, 3), seed: int = 0) -> nn.Module:
    """A float64 ReLU MLP (Linear layers at even indices of an nn.Sequential)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers).double()


def rescaled_twin(model: nn.Module, a: float) -> nn.Module:
    """Dinh et al.'s reparametrisation: layer 0 (weight and bias) times a, layer 2's weight
    divided by a; relu(a z) = a relu(z), so the function is the same."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[0].weight.mul_(a)
        twin[0].bias.mul_(a)
        twin[2].weight.div_(a)
    return twin


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread: the suite is many small products, where more threads on a
    2-core machine only spin-wait (measured 8-100x slowdowns on a loaded box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
