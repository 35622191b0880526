"""The fused inner SGLD step (torch._fused_sgd_) and fused outer Adam equal the reference
update equations, for a fixed noise draw, to rounding: 1e-6 in float32, 1e-12 in float64."""

from __future__ import annotations

import pytest
import torch
from reference_entropy import CONFIG, ReferenceEntropySGD

from entropy_opt import EntropyAdam, EntropySGD, base
from entropy_opt._common import fused_ok, resolve_foreach
from entropy_opt.base import _fused_for, _sgld_update

CPU = torch.device("cpu")
TOL = {torch.float32: 1e-6, torch.float64: 1e-12}
needs_fused_sgd = pytest.mark.skipif(
    not fused_ok("sgd", CPU, torch.float32), reason="this torch has no CPU torch._fused_sgd_"
)
needs_fused_adam = pytest.mark.skipif(
    not fused_ok("adam", CPU, torch.float32), reason="this torch has no CPU torch._fused_adam_"
)
SHAPES = [(7, 5), (5,), (3, 5), (1,)]


def _textbook(xp, x, g, mu, bufs, z, *, lr, gamma, wd, alpha, momentum, nesterov, sigma):
    """Alg. 1 lines 5-7 written out once, out of place, in float64."""
    out_xp, out_mu, out_b = [], [], []
    for p, a, d, m, b, e in zip(xp, x, g, mu, bufs, z, strict=True):
        p, a, d, m, b, e = (t.double() for t in (p, a, d, m, b, e))
        d = d + wd * p + gamma * (p - a)
        if momentum:
            b = momentum * b + d
            d = d + momentum * b if nesterov else b
        p = p - lr * d + sigma * e
        out_xp.append(p)
        out_mu.append(m + alpha * (p - m))
        out_b.append(b)
    return out_xp, out_mu, out_b


CASES = [
    dict(momentum=0.0, nesterov=False, wd=0.0, gamma=0.03),
    dict(momentum=0.0, nesterov=False, wd=1e-3, gamma=0.03),
    dict(momentum=0.9, nesterov=False, wd=0.0, gamma=0.03),
    dict(momentum=0.9, nesterov=True, wd=1e-3, gamma=0.03),
    dict(momentum=0.5, nesterov=True, wd=1e-3, gamma=0.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("path", ["fused", "foreach", "loop"])
def test_inner_step_equals_textbook_update_for_fixed_noise(dtype, case, path):
    if path == "fused" and not (case["momentum"] and fused_ok("sgd", CPU, dtype)):
        pytest.skip("the fused kernel is only used with inner momentum, where available")
    gen = torch.Generator().manual_seed(5)

    def rand(scale=1.0):
        return [
            scale * torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES
        ]

    x = rand()
    xp = [a + 1e-2 * d for a, d in zip(x, rand(), strict=True)]
    mu = [t.clone() for t in x]
    bufs = [torch.zeros_like(t) for t in x]
    hyper = dict(lr=0.1, alpha=0.75, sigma=0.05, **case)
    want_xp, want_mu, want_b = ([t.double() for t in ts] for ts in (xp, mu, bufs))
    for _ in range(5):  # buffers carried across iterations, fresh gradient and noise each
        g, z = rand(), rand()
        want_xp, want_mu, want_b = _textbook(want_xp, x, g, want_mu, want_b, z, **hyper)
        _sgld_update(
            xp,
            x,
            [t.clone() for t in g],
            mu,
            bufs,
            z,
            foreach=path != "loop",
            fused=path == "fused",
            **hyper,
        )
    tol = TOL[dtype]
    for got, want in ((xp, want_xp), (mu, want_mu)) + (
        ((bufs, want_b),) if case["momentum"] else ()
    ):
        for a, b in zip(got, want, strict=True):
            assert a.dtype == dtype
            torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


class NoiseTape:
    """Replaces ``Tensor.normal_``: every call takes the next numbers of one fixed sequence,
    so a single flat draw over all parameters and one draw per parameter (in the same
    order) see the same noise."""

    def __init__(self, n: int, seed: int) -> None:
        self.values = torch.randn(
            n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        )
        self.pos = 0

    def __call__(
        self,
        t: torch.Tensor,
        mean: float = 0.0,
        std: float = 1.0,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        k = t.numel()
        assert self.pos + k <= self.values.numel(), "noise tape exhausted"
        t.copy_((self.values[self.pos : self.pos + k] * std + mean).view(t.shape))
        self.pos += k
        return t


def _run(make_opt, dtype, steps=4, tape_seed=None):
    """Final weights after ``steps`` outer steps; with ``tape_seed`` the noise comes from a
    :class:`NoiseTape` of that seed."""
    with pytest.MonkeyPatch.context() as mp:
        if tape_seed is not None:
            tape = NoiseTape(10**5, tape_seed)
            mp.setattr(torch.Tensor, "normal_", lambda t, *a, **k: tape(t, *a, **k))
        return _train(make_opt, dtype, steps)


def _train(make_opt, dtype, steps):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(
        dtype
    )
    X, Y = torch.randn(64, 5, dtype=dtype), torch.randint(0, 3, (64,))
    opt = make_opt(model.parameters())
    k = [0]

    def closure():
        opt.zero_grad()
        sl = slice(16 * (k[0] % 4), 16 * (k[0] % 4) + 16)
        k[0] += 1
        loss = torch.nn.functional.cross_entropy(model(X[sl]), Y[sl])
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return torch.cat([p.detach().flatten() for p in model.parameters()]).double()


PAPER = dict(CONFIG, noise=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "inner",
    [dict(sgld_momentum=0.9, sgld_nesterov=True), dict(sgld_momentum=0.0, sgld_nesterov=False)],
    ids=["inner-nesterov", "inner-plain"],
)
@pytest.mark.parametrize("foreach", [True, False])
def test_optimizer_equals_per_parameter_reference_with_the_same_noise(dtype, inner, foreach):
    cfg = dict(PAPER, **inner)
    # noise = 0.1: sigma = 0.03 per coordinate, so noise that went astray would show
    a = _run(lambda p: EntropySGD(p, **cfg, foreach=foreach), dtype, tape_seed=1)
    b = _run(lambda p: ReferenceEntropySGD(p, cfg), dtype, tape_seed=1)
    torch.testing.assert_close(a, b, rtol=0, atol=TOL[dtype])
    c = _run(lambda p: ReferenceEntropySGD(p, cfg), dtype, tape_seed=2)
    assert (a - c).abs().max() > 1e3 * TOL[torch.float32]  # the noise matters at this size


class _Marked(torch.Tensor):
    """A tensor subclass: torch.optim keeps those off the foreach path."""


def test_foreach_none_is_torch_optims_rule_with_the_cpu_added():
    from torch.optim.optimizer import _default_to_fused_or_foreach

    cpu = [torch.nn.Parameter(torch.ones(3)), torch.ones(2)]
    meta = [torch.ones(2, device="meta")]
    marked = [torch.ones(2).as_subclass(_Marked)]
    assert resolve_foreach(None, cpu) and not resolve_foreach(False, cpu)
    assert resolve_foreach(True, meta) and not resolve_foreach(None, meta)
    assert not resolve_foreach(None, marked)
    for tensors in (meta, marked):  # off the CPU, torch.optim's own answer
        assert resolve_foreach(None, tensors) == _default_to_fused_or_foreach(tensors, False)[1]
    if torch.cuda.is_available():
        assert resolve_foreach(None, [torch.ones(2, device="cuda")])
    # the CPU default is the foreach path, fused kernels included: bit-identical to True
    cfg = dict(PAPER, momentum=0.9, sgld_momentum=0.9, sgld_nesterov=True)
    default = _run(lambda p: EntropySGD(p, **cfg), torch.float32)
    assert torch.equal(default, _run(lambda p: EntropySGD(p, **cfg, foreach=True), torch.float32))


@needs_fused_sgd
def test_fused_path_is_taken_and_agrees_with_unfused(monkeypatch):
    cfg = dict(PAPER, sgld_momentum=0.9, sgld_nesterov=True)
    params = [torch.nn.Parameter(torch.ones(3))]
    assert _fused_for(params, 0.9, foreach=True)
    assert not _fused_for(params, 0.0, foreach=True)  # no pass to save without momentum
    assert not _fused_for(params, 0.9, foreach=False)
    assert not _fused_for([torch.nn.Parameter(torch.ones(4, 3).t())], 0.9, foreach=True)
    a = _run(lambda p: EntropySGD(p, **cfg), torch.float32)
    monkeypatch.setattr(base, "USE_FUSED", False)
    b = _run(lambda p: EntropySGD(p, **cfg), torch.float32)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@needs_fused_sgd
@pytest.mark.parametrize("nesterov", [False, True])
def test_fused_outer_momentum_step_leaves_the_local_entropy_gradient_in_grad(nesterov):
    torch.manual_seed(0)
    x = torch.nn.Parameter(torch.randn(6, 4))
    opt = EntropySGD([x], lr=0.3, momentum=0.9, nesterov=nesterov, L=2, noise=1e-2)
    target = torch.randn(6, 4)

    def closure():
        opt.zero_grad()
        loss = ((x - target) ** 2).sum()
        loss.backward()
        return loss

    for _ in range(3):
        before = x.detach().clone()
        buf = opt.state[x].get("momentum_buffer")
        buf = torch.zeros_like(x) if buf is None else buf.clone()
        opt.step(closure)
        G = x.grad.clone()  # x - mu, which the fused step must not have overwritten
        buf = 0.9 * buf + G
        step = G + 0.9 * buf if nesterov else buf
        torch.testing.assert_close(opt.state[x]["momentum_buffer"], buf, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(x.detach(), before - 0.3 * step, rtol=1e-6, atol=1e-7)
        assert opt.diagnostics["dist_x_mu"].item() == pytest.approx(G.norm().item(), rel=1e-5)


@needs_fused_sgd
def test_non_contiguous_gradients_fall_back_to_the_foreach_step():
    # the CPU kernel walks memory linearly and silently mixes up elements of tensors with
    # different layouts; a transposed-layout gradient must take the unfused path
    def run(foreach):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(4, 3))
        opt = EntropySGD([w], lr=0.5, L=3, sgld_momentum=0.9, noise=0.0, gamma=0.1, foreach=foreach)
        target = torch.arange(12.0).view(4, 3)

        def closure():
            opt.zero_grad()
            loss = 0.5 * (((w - target) * (1.0 + target)) ** 2).sum() / 100
            loss.backward()
            w.grad = w.grad.t().contiguous().t()  # same values, column-major layout
            assert not w.grad.is_contiguous()
            return loss

        for _ in range(3):
            opt.step(closure)
        return w.detach().clone()

    a, b = run(True), run(False)
    assert a.isfinite().all()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@needs_fused_adam
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_outer_adam_equals_the_foreach_and_loop_updates(dtype, monkeypatch):
    kw = dict(lr=1e-2, L=3, noise=1e-2, gamma=0.1, weight_decay=1e-3)
    fused = _run(lambda p: EntropyAdam(p, **kw), dtype, tape_seed=3)
    loop = _run(lambda p: EntropyAdam(p, **kw, foreach=False), dtype, tape_seed=3)
    monkeypatch.setattr(base, "USE_FUSED", False)
    plain = _run(lambda p: EntropyAdam(p, **kw), dtype, tape_seed=3)
    torch.testing.assert_close(fused, plain, rtol=0, atol=TOL[dtype])
    torch.testing.assert_close(fused, loop, rtol=0, atol=TOL[dtype])


def test_fused_probe_refuses_what_it_cannot_run():
    assert not fused_ok("sgd", CPU, torch.int64)
    assert not fused_ok("no_such_kernel", CPU, torch.float32)


@pytest.mark.parametrize("sgld_momentum", [0.0, 0.9])
def test_same_seed_same_result_on_the_fused_path(sgld_momentum):
    cfg = dict(PAPER, noise=1e-2, sgld_momentum=sgld_momentum)
    a = _run(lambda p: EntropySGD(p, **cfg), torch.float32)
    b = _run(lambda p: EntropySGD(p, **cfg), torch.float32)
    assert torch.equal(a, b)


def _trajectory_end(name: str, device: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(1)
    model = torch.nn.Linear(5, 1).double().to(device)
    if name == "sgd":
        opt = EntropySGD(model.parameters(), lr=0.05, L=3, noise=0.0, momentum=0.9)
    else:
        opt = EntropyAdam(model.parameters(), lr=0.05, L=3, noise=0.0)
    xd, yd = x.to(device), y.to(device)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(xd), yd)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return torch.cat([p.detach().cpu().reshape(-1) for p in model.parameters()])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_cuda_steps_match_the_cpu_steps(name):
    """The default (foreach, fused where the kernel passes its check) path on a GPU
    follows the CPU's trajectory to float64 rounding; Entropy-Adam's fused kernel gets
    its step counts on the parameters' device."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 5, dtype=torch.float64), torch.randn(64, 1, dtype=torch.float64)
    cpu, gpu = (_trajectory_end(name, d, x, y) for d in ("cpu", "cuda"))
    torch.testing.assert_close(gpu, cpu, rtol=1e-12, atol=1e-12)
