"""What the paper-size Fig 1 costs on a GPU, part by part, in two minutes (issue 15).

    python3 benchmarks/gpu_probe_fig1.py          # on the lent GPU, from the repo root

The paper preset's small-LeNet (47,658 parameters) on its 2,000 Hessian samples (random
weights and inputs: the cost does not depend on the values), float32 on CUDA:
milliseconds per Hessian column of a block product ``H @ E`` for the double-backward
path (``autograd``) and the vectorised one (``func``) at several block sizes, against
one full-data gradient; then the dense eigensolve of a symmetric 47,658 x 47,658
float32 matrix (random, spectrum spread like a Hessian's).  Each product is timed after
one warm-up product (which also runs the operator's first-use path check).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import spectra  # noqa: E402
from benchmarks.bench_build import _problem  # noqa: E402
from spectra.dense_eigensolver import eigvalsh_inplace  # noqa: E402

DRY = "--dry" in sys.argv  # on a CPU: the same steps at toy sizes, to check the script
DEVICE = "cpu" if DRY else "cuda"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _seconds(fn, repeat: int = 2) -> float:
    fn()
    _sync()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t)
    return best


def _peak_gib() -> float:
    """Peak device memory since the last call (0 on a CPU)."""
    if DEVICE != "cuda":
        return 0.0
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return peak


def main() -> None:
    device = DEVICE
    model, loss_fn, batches, forward = _problem("fig1")
    if DRY:
        batches = [(x[:8], y[:8]) for x, y in batches]
    model = model.to(device)
    n = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, n = {n:,}", flush=True)

    def gradient() -> None:
        model.zero_grad()
        total = sum(len(y) for _, y in batches)
        for x, y in batches:
            (loss_fn(model(x.to(device)), y.to(device)) * len(y) / total).backward()

    g = _seconds(gradient, 3)
    print(f"gradient: {1e3 * g:.2f} ms", flush=True)
    plan = (("autograd", (16, 64)), ("func", (64, 256, 512)))
    for backend, blocks in ((b, (2,)) for b, _ in plan) if DRY else plan:
        op = spectra.hessian_operator(model, loss_fn, batches, backend=backend)
        for k in blocks:
            E = torch.zeros(n, k, device=device)
            E[torch.arange(k), torch.arange(k)] = 1
            try:
                s = _seconds(lambda E=E, op=op: op @ E, 1)
            except torch.OutOfMemoryError:
                print(f"{backend:9s} k={k:4d}: out of memory", flush=True)
                torch.cuda.empty_cache()
                continue
            per = s / k
            print(
                f"{backend:9s} k={k:4d}: {1e3 * per:.3f} ms/column = {per / g:.2f} gradients, "
                f"whole build {per * n:.0f} s; peak {_peak_gib():.1f} GiB",
                flush=True,
            )
        del op
        if device == "cuda":
            torch.cuda.empty_cache()
    if DRY:
        n = 400

    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen)
    a = (a + a.T) / (2 * n**0.5)
    _sync()
    t = time.perf_counter()
    w = eigvalsh_inplace(a)
    _sync()
    print(
        f"eigensolve n = {n:,} float32: {time.perf_counter() - t:.1f} s (range {w[0]:.3f}..{w[-1]:.3f})"
    )


if __name__ == "__main__":
    main()
