"""Cost of one Entropy-SGD outer step against L plain SGD steps with the same closure.

    python -m benchmarks.bench_optimizers [--L 10] [--repeats 5] [--threads N]

An outer step makes L closure calls, so the fair baseline is L steps of ``torch.optim.SGD``
(foreach) with the same closure; "ratio" is (one outer step) / (L SGD steps), and
"own cost" is the time the optimizer adds to L bare closure calls (forward, backward and
zero_grad only). Rows: EntropySGD with foreach on and off and with ``flat=True`` (one
contiguous buffer), with the paper's thermal noise and without it (the arithmetic alone; on
CPUs drawing N(0, I) is a large share), EntropyAdam, and the
per-parameter implementation written the way the authors wrote theirs
(``entropy_opt.reference``). Models: mnistfc 784-1024-1024-10 at batch 128, and 200 small
Linear(32, 32) layers (400 tensors) at batch 128; inputs are random. Variants are timed
interleaved and the median over repeats is reported. Times are process CPU time, not wall
time, so that other jobs on a shared machine distort them less; run with ``--threads 1``
there (several multi-threaded processes on few cores slow each other down many-fold).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from entropy_opt import EntropyAdam, EntropySGD
from entropy_opt.reference import ReferenceEntropySGD


def mnistfc() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(784, 1024), torch.nn.ReLU(),
        torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
        torch.nn.Linear(1024, 10),
    )


class ManySmall(torch.nn.Module):
    def __init__(self, layers: int = 200, width: int = 32) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(784, width)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(layers))
        self.out = torch.nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for layer in self.layers:
            h = h + 0.1 * torch.tanh(layer(h))
        return self.out(h)


def make_closure(model: torch.nn.Module, batches: list) -> Callable[[], torch.Tensor]:
    k = [0]
    params = list(model.parameters())

    def closure() -> torch.Tensor:
        for p in params:
            p.grad = None
        X, Y = batches[k[0] % len(batches)]
        k[0] += 1
        loss = torch.nn.functional.cross_entropy(model(X), Y)
        loss.backward()
        return loss

    return closure


def variants(L: int) -> dict[str, Callable]:
    paper = dict(lr=1.0, L=L, sgld_lr=0.1, noise=1e-4, gamma=0.03, scoping_rate=1e-3)
    ref_cfg = dict(paper, momentum=0.0, nesterov=False, weight_decay=0.0, alpha=0.75)
    return {
        "bare closures x L": None,
        "SGD x L (foreach)": lambda p: torch.optim.SGD(p, lr=0.01, foreach=True),
        "EntropySGD foreach": lambda p: EntropySGD(p, **paper, foreach=True),
        "EntropySGD for-loop": lambda p: EntropySGD(p, **paper, foreach=False),
        "EntropySGD foreach, noise=0": lambda p: EntropySGD(p, **dict(paper, noise=0.0)),
        "EntropySGD flat": lambda p: EntropySGD(p, **paper, flat=True),
        "EntropySGD flat, noise=0": lambda p: EntropySGD(p, **dict(paper, noise=0.0), flat=True),
        "EntropyAdam foreach": lambda p: EntropyAdam(p, **dict(paper, lr=1e-3)),
        "reference per-parameter": lambda p: ReferenceEntropySGD(p, ref_cfg),
    }


def time_model(name: str, build: Callable, L: int, repeats: int) -> list[tuple]:
    torch.manual_seed(0)
    batches = [(torch.randn(128, 784), torch.randint(0, 10, (128,))) for _ in range(4)]
    runs: dict[str, Callable[[], None]] = {}
    for vname, make in variants(L).items():
        model = build()
        closure = make_closure(model, batches)
        if make is None:
            runs[vname] = lambda c=closure: [c() for _ in range(L)]
        elif vname.startswith("SGD"):
            opt = make(model.parameters())
            runs[vname] = lambda o=opt, c=closure: [o.step(c) for _ in range(L)]
        else:
            opt = make(model.parameters())
            runs[vname] = lambda o=opt, c=closure: o.step(c)
    times: dict[str, list[float]] = {v: [] for v in runs}
    for rep in range(repeats + 1):
        for vname, fn in runs.items():
            t0 = time.process_time()
            fn()
            if rep:  # the first round is warm-up
                times[vname].append(time.process_time() - t0)
    med = {v: statistics.median(ts) * 1e3 for v, ts in times.items()}
    bare, sgd = med["bare closures x L"], med["SGD x L (foreach)"]
    return [(name, v, ms, ms / sgd, (ms - bare) / bare) for v, ms in med.items()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--L", type=int, default=10, help="SGLD iterations per outer step")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (after 1 warm-up)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name, build in (("mnistfc 784-1024-1024-10", mnistfc), ("200 x Linear(32,32)", ManySmall)):
        rows += time_model(name, build, args.L, args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.machine()}, L={args.L}, batch 128, median of {args.repeats}\n")
    print("| model | variant | CPU ms / outer step | ratio vs L SGD steps | own cost vs L closures |")
    print("|---|---|---:|---:|---:|")
    for name, v, ms, ratio, own in rows:
        print(f"| {name} | {v} | {ms:.1f} | {ratio:.3f} | {100 * own:+.1f}% |")


if __name__ == "__main__":
    main()
