"""Fisher diagonal of All-CNN-BN: read from Adam's moments vs computed from per-sample gradients.

    python -m benchmarks.bench_fisher_diagonal [--batch 128] [--width 1.0] [--chunk-size 32]
                                               [--adam-steps 3] [--threads 2]

Setup (not timed): All-CNN-BN (``figures.models.all_cnn_bn``, 1,372,254 parameters at
width 1), one batch of random 3 x 32 x 32 inputs with random labels, and ``--adam-steps``
Adam steps on it in train mode; model, optimizer and batch are saved to a temporary folder.
Each method then runs in its own fresh subprocess that loads them, so every row's memory
is measured from the same starting point:

* ``adam moments``: :func:`spectra.fisher_diagonal.fisher_diagonal_from_adam` (median of 5 calls).
* ``per-sample``: :func:`spectra.fisher_diagonal.empirical_fisher_diagonal` on the batch
  (``vmap(grad)``, eval mode, ``chunk_size`` samples at a time; the batch's (m, n)
  per-sample gradients are held at once, m x n x 4 bytes).
* ``one backward``: a plain forward + backward of the batch, for scale.

Peak memory is the process's peak resident set size during the call minus its RSS just
before it: sampled every millisecond with psutil in a thread, and also taken from
``getrusage`` ``ru_maxrss`` whenever the call raised the process's lifetime peak (torch's
CPU allocations are invisible to tracemalloc).  Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

LABELS = {
    "adam": "adam moments (`fisher_diagonal_from_adam`)",
    "per_sample": "per-sample (`empirical_fisher_diagonal`)",
    "backward": "one forward + backward of the batch",
}


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class PeakRSS:
    """Peak RSS above the starting RSS while the ``with`` block runs."""

    def __enter__(self) -> PeakRSS:
        self.start = _rss()
        self.max_before = _maxrss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        max_after = _maxrss()
        if max_after > self.max_before:
            self.peak = max(self.peak, max_after)
        self.delta = self.peak - self.start


def prepare(folder: Path, width: float, batch: int, steps: int, seed: int) -> dict[str, Any]:
    from figures.models import all_cnn_bn

    from .training import train_full_batch

    torch.manual_seed(seed)
    model = all_cnn_bn(width)
    X, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    opt = train_full_batch(model, X, y, steps, lr=1e-3)
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "X": X, "y": y}, folder / "state.pt"
    )
    return {"n_params": sum(p.numel() for p in model.parameters())}


def worker(method: str, folder: Path, width: float, chunk_size: int | None) -> dict[str, Any]:
    from figures.models import all_cnn_bn
    from spectra.fisher_diagonal import empirical_fisher_diagonal, fisher_diagonal_from_adam

    saved = torch.load(folder / "state.pt")
    model = all_cnn_bn(width)
    model.load_state_dict(saved["model"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt.load_state_dict(saved["opt"])
    X, y = saved["X"], saved["y"]
    del saved
    loss = nn.CrossEntropyLoss()
    extra: dict[str, Any] = {}

    def run() -> None:
        if method == "adam":
            fd = fisher_diagonal_from_adam(opt, model=model)
            extra.update(n_negative=fd.n_negative, steps=sorted(set(fd.steps)))
        elif method == "per_sample":
            diag = empirical_fisher_diagonal(model, loss, (X, y), chunk_size=chunk_size)
            extra.update(n=int(diag.numel()))
        else:
            model.eval()
            model.zero_grad()
            loss(model(X), y).backward()

    t0 = time.perf_counter()
    with PeakRSS() as mem:
        run()
    seconds = [time.perf_counter() - t0]
    if method == "adam":  # cheap: take the median of 5
        for _ in range(4):
            t0 = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - t0)
    return {
        "method": method,
        "seconds": statistics.median(seconds),
        "peak_mb": mem.delta / 2**20,
        **extra,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=32,
        help="samples vmapped at once for the per-sample gradients (0: all)",
    )
    parser.add_argument("--adam-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=sorted(LABELS), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    chunk = args.chunk_size or None
    if args.worker:
        print(json.dumps(worker(args.worker, args.folder, args.width, chunk)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        meta = prepare(folder, args.width, args.batch, args.adam_steps, args.seed)
        rows = [_spawn(m, folder, args) for m in ("adam", "per_sample", "backward")]
    _report(rows, meta, args)


def _spawn(method: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_fisher_diagonal",
        "--worker",
        method,
        "--folder",
        str(folder),
        "--width",
        str(args.width),
        "--chunk-size",
        str(args.chunk_size),
        "--threads",
        str(args.threads),
    ]
    out = subprocess.run(
        cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _report(rows: list[dict[str, Any]], meta: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"All-CNN-BN width {args.width}: {meta['n_params']:,} parameters, batch {args.batch}, "
        f"{args.adam_steps} Adam steps before reading; CPU ({platform.processor() or 'cpu'}), "
        f"{args.threads} threads, torch {torch.__version__}, load average "
        f"{os.getloadavg()[0]:.1f}; per-sample chunk_size={args.chunk_size or 'all'}\n"
    )
    print("| method | seconds | peak memory above start (MiB) |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| {LABELS[r['method']]} | {r['seconds']:.4f} | {r['peak_mb']:.1f} |")
    adam = next(r for r in rows if r["method"] == "adam")
    per = next(r for r in rows if r["method"] == "per_sample")
    print(
        f"\nper-sample / adam: {per['seconds'] / adam['seconds']:.0f}x time; "
        f"Adam estimate: {adam['n_negative']:,} negative entries after steps {adam['steps']}"
    )


if __name__ == "__main__":
    main()
