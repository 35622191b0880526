"""Exact Hessian build cost per column against one gradient, at the paper's sizes (issue 15).

    python -m benchmarks build                 # Fig 1, 3a, 3b (small-LeNet, -mnistfc, -LSTM)
    python -m benchmarks build --figures fig1 --blocks 16 64 --backends func autograd

For each paper-preset spectrum network on the paper preset's Hessian sample count (random
weights and random inputs of the data's shape: the cost does not depend on the values;
Fig 3b's char-LSTM through the preset's Hessian forward, the unrolled cell),
times one full-data gradient and one block product ``H @ V`` of ``k`` columns, the unit the
exact build repeats n / k times, and prints milliseconds per column and their ratio to the
gradient, side by side in one process (ratios hold on a loaded machine; absolute times do
not), and the growth of resident memory per column during that product (heap trimmed and
high-water mark reset before it, Linux) beside ``column_workspace_bytes()``, the estimate
that sizes blocks.  ``k`` defaults to the operator's own ``block_size()`` and 4x that.
"""

from __future__ import annotations

import argparse
import time

import torch

import spectra
from figures import presets
from figures.models import build
from figures.spectrum_figure import forward_for, loss_for
from spectra._resources import release_freed_heap

FIGURES = ("fig1", "fig3a", "fig3b")


def _problem(figure: str, seed: int = 0):
    """Model, loss, batches and Hessian forward of the paper preset of ``figure``."""
    cfg = presets.get("paper", figure)
    torch.manual_seed(seed)
    model = build(cfg.model, **cfg.model_kwargs).float()
    n_samples, batch = cfg.data.n_hessian, cfg.data.hessian_batch
    if cfg.data.source == "austen":  # lines of 32 characters, one-hot, next-char targets
        vocab = model.lstm.input_size
        ids = torch.randint(0, vocab, (n_samples, 33))
        X = torch.nn.functional.one_hot(ids[:, :-1], vocab).float()
        y = ids[:, 1:]
    else:
        X = torch.randn(n_samples, 1, 28, 28)
        y = torch.randint(0, 10, (n_samples,))
    batches = [(X[i : i + batch], y[i : i + batch]) for i in range(0, n_samples, batch)]
    return model, loss_for(cfg), batches, forward_for(cfg)


def _gradient_seconds(model, loss_fn, batches, forward, repeat: int = 3) -> float:
    total = sum(len(y) for _, y in batches)
    best = float("inf")
    for _ in range(repeat + 1):
        model.zero_grad()
        t = time.perf_counter()
        for x, y in batches:
            out = model(x) if forward is None else forward(model, x)
            (loss_fn(out, y) * len(y) / total).backward()
        best = min(best, time.perf_counter() - t)
    return best


def _reset_high_water_mark() -> int | None:
    """Trim the heap, reset the resident set's high-water mark to the resident set now
    (Linux ``/proc/self/clear_refs``) and return it in bytes; None where unavailable.
    The trim comes first, since the reset takes the resident set as it is."""
    release_freed_heap()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None
    return _high_water_mark()


def _high_water_mark() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM"))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--figures", nargs="+", default=list(FIGURES), choices=FIGURES)
    ap.add_argument("--blocks", nargs="*", type=int, default=None)
    ap.add_argument("--backends", nargs="+", default=["func", "autograd"])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}")
    print(
        "| figure | n | samples | backend | k | ms / column | gradient ms | column / gradient "
        "| MiB / column, measured | estimated |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for figure in args.figures:
        model, loss_fn, batches, forward = _problem(figure)
        n = sum(p.numel() for p in model.parameters())
        samples = sum(len(y) for _, y in batches)
        for backend in args.backends:
            op = spectra.hessian_operator(
                model, loss_fn, batches, dtype=torch.float32, backend=backend, forward=forward
            )
            auto = op.block_size()
            for k in dict.fromkeys(args.blocks or (auto, 4 * auto)):
                V = torch.randn(n, k)
                op @ V[:, :2]  # first use: path check and warm-up
                grad = _gradient_seconds(model, loss_fn, batches, forward)
                start = _reset_high_water_mark()
                t = time.perf_counter()
                op @ V
                col = (time.perf_counter() - t) / k
                grown = None if start is None else _high_water_mark() - start
                measured = "-" if grown is None else f"{grown / k / 2**20:.1f}"
                print(
                    f"| {figure} | {n:,} | {samples:,} | {backend} | {k} | {1000 * col:.0f} | "
                    f"{1000 * grad:.0f} | {col / grad:.2f}x | {measured} | "
                    f"{op.column_workspace_bytes() / 2**20:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
