"""EntropyAdam: Adam on the local-entropy gradient."""

from __future__ import annotations

import pytest
import torch

from entropy_opt import EntropyAdam


def run(make, steps=8, scale=1.0):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    X, Y = torch.randn(32, 5), torch.randn(32, 1)
    opt = make(model.parameters())

    def closure():
        opt.zero_grad()
        loss = scale * ((model(X) - Y) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("foreach", [True, False])
def test_reduces_to_torch_adam_on_scaled_gradient(foreach):
    # L=1, alpha=1, gamma=0, noise=0: x - mu = sgld_lr * grad f(x); Adam of that gradient
    # equals torch.optim.Adam on the loss scaled by sgld_lr.
    kw = dict(L=1, alpha=1.0, gamma=0.0, noise=0.0, sgld_lr=0.3, foreach=foreach)
    a = run(lambda p: EntropyAdam(p, lr=1e-2, betas=(0.5, 0.99), eps=1e-6, **kw))
    b = run(lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.5, 0.99), eps=1e-6), scale=0.3)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_foreach_and_loop_agree_with_noise_and_coupling():
    kw = dict(lr=1e-2, L=4, noise=1e-3, gamma=0.1, weight_decay=1e-3)
    a = run(lambda p: EntropyAdam(p, foreach=True, **kw))
    b = run(lambda p: EntropyAdam(p, foreach=False, **kw))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_bad_betas():
    with pytest.raises(ValueError, match="betas"):
        EntropyAdam([torch.nn.Parameter(torch.ones(1))], betas=(1.0, 0.9))
