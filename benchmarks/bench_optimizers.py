"""Cost of one Entropy-SGD outer step against L plain SGD steps with the same closure.

    python -m benchmarks.bench_optimizers [--L 10] [--repeats 5] [--threads N] [--no-rng]
                                          [--rng-only] [--against REV]

Two tables, both markdown.

**Noise** (skipped with ``--no-rng``): drawing N(0, I) for the 1,863,690 weights of mnistfc
by every method at hand, timed interleaved with one in-place pass over the weights
(``add_``, the unit of the SGLD arithmetic) and one plain SGD step (closure + update), so
the noise can be read in SGD steps.  ns/element and GB/s (4-byte floats written) are from
process CPU time; wall time is shown too, since only it can show what threads buy.

**Step cost**: an outer step makes L closure calls, so the fair baseline is L steps of
``torch.optim.SGD`` (foreach) with the same closure; "ratio" is (one outer step) / (L SGD
steps), and "own cost" is the time the optimizer adds to L bare closure calls (forward,
backward and zero_grad only). Rows: EntropySGD with foreach on and off and with
``flat=True`` (one contiguous buffer), with the paper's thermal noise and without it (the
arithmetic alone), the MNIST recipe's momentum in both loops with the fused inner step
(``torch._fused_sgd_``) on and off, EntropyAdam with the fused outer Adam on and off, and the
per-parameter implementation written the way the authors wrote theirs
(``tests/reference_entropy.py``). Models: mnistfc 784-1024-1024-10 at batch 128, and 200 small
Linear(32, 32) layers (400 tensors) at batch 128; inputs are random. Variants are timed
interleaved (each round in a rotated order); the table gives the median time over repeats
and, for the ratios, the median of the per-round ratios (each round times every variant
once, so a slow spell of a shared machine hits numerator and denominator alike). Times are process CPU time, not wall
time, so that other jobs on a shared machine distort them less; run with ``--threads 1``
there (several multi-threaded processes on few cores slow each other down many-fold).
The header gives the CPU and the load average before and after. ``--against HEAD`` adds the
main configurations as committed at a git revision, timed in the same rounds (before/after
of a change, side by side).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from entropy_opt import EntropyAdam, EntropySGD, base
from tests.reference_entropy import ReferenceEntropySGD


def mnistfc() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(784, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 1024),
        torch.nn.ReLU(),
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


def unfused(make: Callable) -> Callable:
    """``make`` with ``entropy_opt``'s fused kernels switched off for each step."""

    def build(p):
        opt = make(p)
        step = opt.step

        def step_unfused(closure):
            saved, base.USE_FUSED = base.USE_FUSED, False
            try:
                return step(closure)
            finally:
                base.USE_FUSED = saved

        opt.step = step_unfused
        return opt

    return build


def load_revision(rev: str):
    """``entropy_opt`` as committed at git revision ``rev``, imported under another name
    (``entropy_opt_at_<rev>``) from a temporary copy, to time it next to the working tree."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> bytes:
        return subprocess.run(
            ["git", "-C", str(root), *args], check=True, capture_output=True
        ).stdout

    name = "entropy_opt_at_" + re.sub(r"\W", "_", rev)
    tmp = Path(tempfile.mkdtemp(prefix="bench_optimizers_"))
    (tmp / name).mkdir()
    for path in git("ls-tree", "--name-only", rev, "entropy_opt/").decode().split():
        if path.endswith(".py"):
            (tmp / name / Path(path).name).write_bytes(git("show", f"{rev}:{path}"))
    sys.path.insert(0, str(tmp))
    return importlib.import_module(name)


def variants(L: int, old: Any = None, rev: str = "") -> dict[str, Callable | None]:
    """The timed variants; with ``old`` (a module from :func:`load_revision`) the main
    configurations again as committed at ``rev``."""
    paper = dict(lr=1.0, L=L, sgld_lr=0.1, noise=1e-4, gamma=0.03, scoping_rate=1e-3)
    # the MNIST run's Nesterov momentum in both loops (Sec. 5.2), with the paper's noise
    mom = dict(paper, momentum=0.9, nesterov=True, sgld_momentum=0.9, sgld_nesterov=True)
    ref_cfg = dict(paper, momentum=0.0, nesterov=False, weight_decay=0.0, alpha=0.75)
    adam = dict(paper, lr=1e-3)
    out = {
        "bare closures x L": None,
        "SGD x L (foreach)": lambda p: torch.optim.SGD(p, lr=0.01, foreach=True),
        "EntropySGD foreach": lambda p: EntropySGD(p, **paper, foreach=True),
        "EntropySGD for-loop": lambda p: EntropySGD(p, **paper, foreach=False),
        "EntropySGD foreach, noise=0": lambda p: EntropySGD(p, **dict(paper, noise=0.0)),
        "EntropySGD flat": lambda p: EntropySGD(p, **paper, flat=True),
        "EntropySGD flat, noise=0": lambda p: EntropySGD(p, **dict(paper, noise=0.0), flat=True),
        "EntropySGD momentum both loops, fused": lambda p: EntropySGD(p, **mom),
        "EntropySGD momentum both loops, unfused": unfused(lambda p: EntropySGD(p, **mom)),
        "EntropySGD momentum, fused, noise=0": lambda p: EntropySGD(p, **dict(mom, noise=0.0)),
        "EntropyAdam foreach, fused": lambda p: EntropyAdam(p, **adam),
        "EntropyAdam foreach, unfused": unfused(lambda p: EntropyAdam(p, **adam)),
        "reference per-parameter": lambda p: ReferenceEntropySGD(p, ref_cfg),
    }
    if old is not None:
        for label, cls, cfg in (
            ("EntropySGD foreach", "EntropySGD", paper),
            ("EntropySGD foreach, noise=0", "EntropySGD", dict(paper, noise=0.0)),
            ("EntropySGD momentum both loops", "EntropySGD", mom),
            ("EntropySGD momentum, noise=0", "EntropySGD", dict(mom, noise=0.0)),
            ("EntropyAdam foreach", "EntropyAdam", adam),
        ):
            out[f"{label} [{rev}]"] = lambda p, k=cls, c=cfg: getattr(old, k)(p, **c)
    return out


def _batches() -> list:
    torch.manual_seed(0)
    return [(torch.randn(128, 784), torch.randint(0, 10, (128,))) for _ in range(4)]


def time_model(
    name: str, build: Callable, L: int, repeats: int, old: Any = None, rev: str = ""
) -> list[tuple]:
    batches = _batches()
    runs: dict[str, Callable[[], object]] = {}
    resets: dict[str, Callable[[], None]] = {}
    for vname, make in variants(L, old, rev).items():
        model = build()
        closure = make_closure(model, batches)
        resets[vname] = weight_reset(model)
        if make is None:
            runs[vname] = lambda c=closure: [c() for _ in range(L)]
        elif vname.startswith("SGD"):
            opt = make(model.parameters())
            runs[vname] = lambda o=opt, c=closure: [o.step(c) for _ in range(L)]
        else:
            opt = make(model.parameters())
            runs[vname] = lambda o=opt, c=closure: o.step(c)
    times = interleaved(runs, repeats, resets)
    cpu = {v: [c for c, _ in ts] for v, ts in times.items()}
    bare, sgd = cpu["bare closures x L"], cpu["SGD x L (foreach)"]

    def paired(ts: list[float], base: list[float]) -> float:
        # per-round ratios, then the median: a slow spell of the machine hits both
        return statistics.median(t / b for t, b in zip(ts, base, strict=True))

    return [
        (name, v, statistics.median(ts) * 1e3, paired(ts, sgd), paired(ts, bare) - 1.0)
        for v, ts in cpu.items()
    ]


def weight_reset(model: torch.nn.Module) -> Callable[[], None]:
    """Puts the model's initial weights back. Every timed call starts from them: fitting the
    four random batches drives the loss to 0 within ten momentum steps, and the denormal
    numbers met on the way make single steps up to 10x slower, which would time the
    optimisation's progress instead of the optimizer."""
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]

    def reset() -> None:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)

    return reset


def interleaved(
    runs: dict[str, Callable[[], object]],
    repeats: int,
    resets: dict[str, Callable[[], None]] | None = None,
) -> dict[str, list]:
    """(CPU s, wall s) of each run per round; round 0 is warm-up and dropped. ``resets``
    (untimed) run before each call. Each round starts one variant further down the list,
    so that no variant always follows the same one (what runs before a step, and what it
    left in the caches, shifts its time by several percent)."""
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in runs}
    names = list(runs)
    for rep in range(repeats + 1):
        k = rep % len(names)
        for vname in names[k:] + names[:k]:
            fn = runs[vname]
            if resets and vname in resets:
                resets[vname]()
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            if rep:
                times[vname].append((time.process_time() - c0, time.perf_counter() - w0))
    return times


def noise_methods(shapes: list[torch.Size], sigma: float, chunks: int) -> dict[str, Callable]:
    """Ways to fill len(shapes) tensors' worth of N(0, 1) (or N(0, sigma^2)) floats."""
    n = sum(s.numel() for s in shapes)
    flat, flat64 = torch.empty(n), torch.empty(n, dtype=torch.float64)
    per = [torch.empty(s) for s in shapes]
    ints = torch.empty(n, dtype=torch.int32)
    gen = torch.Generator().manual_seed(0)
    parts = list(flat.chunk(chunks))
    gens = [torch.Generator().manual_seed(i + 1) for i in range(chunks)]
    pool = ThreadPoolExecutor(chunks)
    arr = flat.numpy()  # shares memory with flat
    pcg, sfc = np.random.Generator(np.random.PCG64(0)), np.random.Generator(np.random.SFC64(0))
    block = 1 << 16

    def threaded() -> None:
        for f in [pool.submit(c.normal_, generator=g) for c, g in zip(parts, gens, strict=True)]:
            f.result()

    def blocked() -> None:
        for i in range(0, n, block):
            flat[i : i + block].normal_(generator=gen)

    return {
        "`normal_` on one flat buffer, private Generator (what the optimizers do)": lambda: (
            flat.normal_(generator=gen)
        ),
        "`normal_` on one flat buffer, global generator": lambda: flat.normal_(),
        "`torch.randn(n, out=flat)`": lambda: torch.randn(n, out=flat, generator=gen),
        "`normal_(0, sigma)` on the flat buffer (scale folded in)": lambda: flat.normal_(
            0.0, sigma, generator=gen
        ),
        f"`normal_` per parameter ({len(shapes)} tensors)": lambda: [
            t.normal_(generator=gen) for t in per
        ],
        "`torch.randn` per parameter, fresh tensors": lambda: [
            torch.randn(s, generator=gen) for s in shapes
        ],
        f"flat buffer in {block // 1024}K-element blocks (cache-sized)": blocked,
        f"{chunks} chunks on {chunks} Python threads, one Generator each": threaded,
        "`normal_` into float64 (GB/s of 8-byte numbers)": lambda: flat64.normal_(generator=gen),
        "numpy PCG64 `standard_normal(out=, float32)` into the buffer": lambda: pcg.standard_normal(
            out=arr, dtype=np.float32
        ),
        "numpy SFC64 `standard_normal(out=, float32)` into the buffer": lambda: sfc.standard_normal(
            out=arr, dtype=np.float32
        ),
        "raw mt19937 bits only: `random_()` into int32": lambda: ints.random_(generator=gen),
    }


def time_noise(repeats: int, L: int) -> tuple[int, list[tuple]]:
    model = mnistfc()
    shapes = [p.shape for p in model.parameters()]
    n = sum(s.numel() for s in shapes)
    closure = make_closure(model, _batches())
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, foreach=True)
    unit = "one SGD step (closure + update), the unit"
    a, b = torch.randn(n), torch.randn(n)
    runs = {
        unit: lambda: sgd.step(closure),
        "one in-place pass `a.add_(b, alpha=s)` over n floats": lambda: a.add_(b, alpha=1e-9),
    }
    runs.update(noise_methods(shapes, 1e-4 * math.sqrt(0.1), chunks=2))
    times = interleaved(runs, max(3 * repeats, 9), {unit: weight_reset(model)})
    rows = []
    for v, ts in times.items():
        c, w = statistics.median(t for t, _ in ts), statistics.median(t for _, t in ts)
        per_step = statistics.median(a / b for (a, _), (b, _) in zip(ts, times[unit], strict=True))
        size = 8 if "float64" in v else 4
        rows.append((v, c * 1e3, w * 1e3, c / n * 1e9, size * n / c / 1e9, per_step))
    return n, rows


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--L", type=int, default=10, help="SGLD iterations per outer step")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (after 1 warm-up)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--no-rng", action="store_true", help="skip the noise table")
    ap.add_argument("--rng-only", action="store_true", help="only the noise table")
    ap.add_argument(
        "--against",
        metavar="REV",
        default=None,
        help="also time the main configurations of entropy_opt as committed at "
        "git revision REV (e.g. HEAD), interleaved with the working tree",
    )
    args = ap.parse_args(argv)
    old = load_revision(args.against) if args.against else None
    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()} "
        f"({os.cpu_count()} logical CPUs), L={args.L}, batch 128, median of {args.repeats}; "
        f"load average {load0[0]:.2f} at the start\n"
    )
    if not args.no_rng:
        n, rows = time_noise(args.repeats, args.L)
        print(f"Noise for n = {n:,} float32 weights (mnistfc); CPU time unless marked wall\n")
        print("| method | CPU ms | wall ms | CPU ns / element | GB/s written | x one SGD step |")
        print("|---|---:|---:|---:|---:|---:|")
        for v, ms, wms, ns, gbs, steps in rows:
            print(f"| {v} | {ms:.2f} | {wms:.2f} | {ns:.2f} | {gbs:.2f} | {steps:.3f} |")
        print()
    if not args.rng_only:
        rows = []
        for name, build in (
            ("mnistfc 784-1024-1024-10", mnistfc),
            ("200 x Linear(32,32)", ManySmall),
        ):
            rows += time_model(name, build, args.L, args.repeats, old, args.against or "")
        print(
            "| model | variant | CPU ms / outer step | ratio vs L SGD steps "
            "| own cost vs L closures |"
        )
        print("|---|---|---:|---:|---:|")
        for name, v, ms, ratio, own in rows:
            print(f"| {name} | {v} | {ms:.1f} | {ratio:.3f} | {100 * own:+.1f}% |")
    load1 = os.getloadavg()
    print(f"\nload average {load1[0]:.2f} at the end (1-minute; {os.cpu_count()} logical CPUs)")


if __name__ == "__main__":
    main()
