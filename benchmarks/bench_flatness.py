"""Cost of ``spectra.flatness`` matrix-free on small-mnistfc (n = 50,890), per measure group.

    python -m benchmarks.bench_flatness [--samples 1000] [--train-steps 200] [--threads N]
                                        [--dtype float64] [--repeats 20] [--synthetic]

small-mnistfc (``figures.models.small_mnistfc``: 784-64-ReLU-10, 50,890 parameters) on
``--samples`` images: MNIST training images when ``data/`` has them (``make data``), else
synthetic 28 x 28 images in [0, 1] (10 random class templates plus noise); the output says
which.  The network is briefly trained (``--train-steps`` Adam steps on mini-batches of
those images, 0 for the random initialisation), then ``spectra.flatness`` runs with its
defaults (n is far above the exact threshold of 5,000, so it is matrix-free: Lanczos for
the top-5 and the bottom eigenvalue, Hutch++ for the trace, SLQ for the near-zero
fractions and the local entropy; adaptive sharpness worst and average case at three
radii; relative flatness of the last layer).

Reported, all from one run:

1. wall time per measure group (``report.info["seconds"]``) and, inside it, per call
   (Lanczos top-k, Lanczos bottom, Hutch++, SLQ, each adaptive sharpness kind and rho,
   relative flatness), with its Hessian-vector products ("matvecs") and, for the sharpness,
   its gradient and loss evaluations.  The per-call split is measured by wrapping the
   public functions ``spectra.flatness`` calls (``spectra.lanczos.lanczos``, ...) with a
   timer in this process; nothing in ``spectra`` is changed.
2. peak RSS of the process against the n^2 x 8 bytes a dense float64 Hessian would need,
   and the number of dense-Hessian builds (calls of ``spectra.exact``'s builders: 0).
3. the cost of one Hessian-vector product against one gradient on the same operator
   (same data, same dtype), and of a plain ``loss.backward()`` of the model, timed
   interleaved, median of ``--repeats``: the ratio is what converts the matvec counts above
   into "gradient evaluations".

Times are wall-clock seconds, and for ``spectra.flatness`` also process CPU seconds (less
distorted by other jobs on a shared machine; with one thread the two agree when the
machine is otherwise idle), on the machine named in the output.  Run it with one thread
(``OMP_NUM_THREADS=1``), ``nice``-d on a shared machine.  Prints markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import importlib
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import spectra

LOSS = nn.CrossEntropyLoss()


def machine() -> str:
    """CPU model, core count, and whether a GPU is visible."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    gpu = "CUDA GPU visible" if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores visible, {gpu}"


def rss() -> int:
    """Current resident set size of this process, bytes."""
    import psutil

    return psutil.Process().memory_info().rss


def maxrss() -> int:
    """Lifetime peak resident set size of this process, bytes (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def synthetic_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-shaped stand-ins: 10 smooth random templates in [0, 1], one per class, plus
    pixel noise, clipped to [0, 1]; float32 (n, 1, 28, 28) and int64 labels."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(10, 1, 7, 7, generator=g)
    templates = nn.functional.interpolate(
        coarse, size=(28, 28), mode="bilinear", align_corners=False
    )
    y = torch.randint(0, 10, (n,), generator=g)
    x = (templates[y] + 0.35 * torch.randn(n, 1, 28, 28, generator=g)).clamp(0.0, 1.0)
    return x, y


def load_data(n: int, synthetic: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    if not synthetic:
        from figures.datasets import MissingDataError, load_mnist, subsample

        try:
            x, y = load_mnist(split="train")
            x, y = subsample(x, y, n, seed)
            return x, y, f"MNIST ({n} training images drawn with seed {seed})"
        except MissingDataError:
            pass
    x, y = synthetic_images(n, seed)
    return (
        x,
        y,
        (
            f"SYNTHETIC 28x28 images ({n}; MNIST not found in data/, run `make data`)"
            if not synthetic
            else f"SYNTHETIC 28x28 images ({n}, --synthetic)"
        ),
    )


def build_model(x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> nn.Module:
    from figures.models import small_mnistfc

    torch.manual_seed(seed)
    model = small_mnistfc(64)
    if steps:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            idx = torch.randint(0, len(x), (100,), generator=g)
            opt.zero_grad()
            LOSS(model(x[idx]), y[idx]).backward()
            opt.step()
    return model


class Recorder:
    """Wraps module-level functions that ``spectra.flatness`` imports at call time, and
    records per call: label, seconds, operator products, and the result."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self._undo: list[tuple[Any, str, Any]] = []

    def wrap(self, module: Any, name: str, label: Callable[..., str]) -> None:
        original = getattr(module, name)

        @functools.wraps(original)
        def timed(op: Any, *args: Any, **kwargs: Any) -> Any:
            before = getattr(op, "matvecs", None)
            t0, c0 = time.perf_counter(), time.process_time()
            result = original(op, *args, **kwargs)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            after = getattr(op, "matvecs", None)
            self.calls.append(
                {
                    "label": label(*args, **kwargs),
                    "seconds": seconds,
                    "cpu": cpu,
                    "result": result,
                    "matvecs": None if before is None or after is None else after - before,
                }
            )
            return result

        setattr(module, name, timed)
        self._undo.append((module, name, original))

    def restore(self) -> None:
        for module, name, original in reversed(self._undo):
            setattr(module, name, original)
        self._undo.clear()


def _lanczos_label(k: int, which: str = "LA", *a: Any, **kw: Any) -> str:
    return f"Lanczos {'top' if which == 'LA' else 'bottom'}-{k} ({which})"


def _sharpness_label(rho: float, *a: Any, kind: str = "worst", **kw: Any) -> str:
    return f"{'adaptive' if kind == 'worst' else 'average'} sharpness rho={rho:g}"


def instrument(rec: Recorder, dense_builds: list[str]) -> None:
    # the modules (``spectra.lanczos`` etc. are the functions on the package itself)
    mod = {
        m: importlib.import_module(f"spectra.{m}")
        for m in ("lanczos", "trace", "density", "sharpness", "relative_flatness", "exact")
    }
    rec.wrap(mod["lanczos"], "lanczos", _lanczos_label)
    rec.wrap(mod["trace"], "trace", lambda method="hutch++", *a, **kw: f"trace ({method})")
    rec.wrap(mod["density"], "spectral_density", lambda *a, **kw: "SLQ probe")
    rec.wrap(mod["sharpness"], "adaptive_sharpness", _sharpness_label)
    rec.wrap(
        mod["relative_flatness"],
        "relative_flatness",
        lambda layer, *a, **kw: f"relative flatness {layer}",
    )
    exact = mod["exact"]
    for name in ("spectrum_of", "exact_hessian", "exact_spectrum"):
        if hasattr(exact, name):
            original = getattr(exact, name)

            def counted(*a: Any, _name: str = name, _f: Any = original, **kw: Any) -> Any:
                dense_builds.append(_name)
                return _f(*a, **kw)

            setattr(exact, name, counted)


def hvp_vs_gradient(
    model: nn.Module, data: Any, dtype: torch.dtype, repeats: int
) -> dict[str, float]:
    """Median CPU seconds of one gradient and one HVP on the same operator, and of a plain
    autograd gradient of a copy of the model in the same dtype, interleaved."""
    op = spectra.hessian_operator(model, LOSS, data, dtype=dtype)
    theta = op.theta
    plain = copy.deepcopy(model).to(dtype).eval()
    X, Y = data[0].to(dtype), data[1]

    def backward() -> None:
        plain.zero_grad(set_to_none=True)
        LOSS(plain(X), Y).backward()

    g = torch.Generator().manual_seed(0)
    vs = [torch.randn(op.shape[0], generator=g, dtype=op.dtype) for _ in range(repeats + 1)]
    block = torch.randn(op.shape[0], 8, generator=g, dtype=op.dtype)
    times: dict[str, list[float]] = {"backward": [], "gradient": [], "hvp": [], "hvp_block8": []}
    for i in range(repeats + 1):
        runs = {
            "backward": backward,
            "gradient": lambda: op.loss_and_gradient(theta),
            "hvp": lambda i=i: op @ vs[i],
            "hvp_block8": lambda: op @ block,
        }
        for key, fn in runs.items():
            t0 = time.process_time()
            fn()
            if i:  # the first round is warm-up
                times[key].append(time.process_time() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def fmt_bytes(b: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b:.0f} B"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1000, help="images the Hessian averages over")
    ap.add_argument(
        "--train-steps",
        type=int,
        default=200,
        help="Adam steps (batch 100) before measuring; 0 = random initialisation",
    )
    ap.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    ap.add_argument("--repeats", type=int, default=20, help="timed HVPs / gradients (median)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--synthetic", action="store_true", help="synthetic images even with MNIST")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    omp = os.environ.get("OMP_NUM_THREADS")
    command = (
        f"{'OMP_NUM_THREADS=' + omp + ' ' if omp else ''}python -m benchmarks flatness"
        f" {shlex.join(sys.argv[1:] if argv is None else argv)}"
    ).rstrip()

    x, y, data_name = load_data(args.samples, args.synthetic, args.seed)
    model = build_model(x, y, args.train_steps, args.seed)
    data = (x, y)
    n = sum(p.numel() for p in model.parameters())
    del x, y  # the full MNIST arrays are gone; only the subset stays
    gc.collect()
    rss_before, max_before = rss(), maxrss()

    rec, dense_builds = Recorder(), []
    instrument(rec, dense_builds)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        report = spectra.flatness(
            model, LOSS, data, dtype=dtype, feature_layer="3.weight", progress=False
        )
    finally:
        rec.restore()
    total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
    max_after = maxrss()
    # ru_maxrss is the lifetime peak: it bounds the peak during flatness from above, and
    # equals it when flatness raised it
    raised = max_after > max_before
    cost = hvp_vs_gradient(model, data, dtype, args.repeats)

    info = report.info
    print(f"command: `{command}`")
    print(
        f"machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} "
        f"thread(s), {platform.python_implementation()} {platform.python_version()}"
    )
    print(
        f"model: small-mnistfc 784-64-10, n = {n:,} parameters, "
        f"{'briefly trained: ' + str(args.train_steps) + ' Adam steps' if args.train_steps else 'random initialisation'}"
        f"; data: {data_name}; {info['method']}, {info['dtype']}, {info['mode']} mode, "
        f"exact threshold {info['exact_threshold']:,}; loss {report['loss']:.4f}\n"
    )

    print(
        "| measure group / call | wall s | CPU s | matvecs (HVPs) | gradient evals | loss evals |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    groups = {
        "spectrum": ("Lanczos", "trace", "SLQ"),
        "sharpness": ("adaptive", "average"),
        "relative_flatness": ("relative",),
    }
    slq = [c for c in rec.calls if c["label"] == "SLQ probe"]
    slq_steps = report.measure("negative_mass").details.get("steps")
    for group, prefixes in groups.items():
        if group not in info["seconds"]:
            continue
        calls = [c for c in rec.calls if c["label"].startswith(prefixes)]
        mv = sum(c["matvecs"] or 0 for c in calls)
        cpu = sum(c["cpu"] for c in calls)
        print(
            f"| **{group}** (info['seconds']) | **{info['seconds'][group]:.2f}** | "
            f"**{cpu:.2f}** | **{mv:,}** | | |"
        )
        shown_slq = False
        for c in calls:
            if c["label"] == "SLQ probe":
                if shown_slq:
                    continue
                shown_slq = True
                secs, mvs = sum(s["seconds"] for s in slq), sum(s["matvecs"] or 0 for s in slq)
                cpu = sum(s["cpu"] for s in slq)
                print(
                    f"| &nbsp; SLQ, {len(slq)} probes x {slq_steps} steps | "
                    f"{secs:.2f} | {cpu:.2f} | {mvs:,} | | |"
                )
                continue
            r = c["result"]
            ge = getattr(r, "gradient_evals", "")
            le = getattr(r, "loss_evals", "")
            print(
                f"| &nbsp; {c['label']} | {c['seconds']:.2f} | {c['cpu']:.2f} | "
                f"{c['matvecs'] or 0:,} | {ge} | {le} |"
            )
    print(
        f"| **total** (spectra.flatness) | **{total:.2f}** | **{total_cpu:.2f}** | "
        f"**{info['matvecs']:,}** | | |"
    )

    worst = [c["result"] for c in rec.calls if c["label"].startswith("adaptive")]
    most = max((r.gradient_evals for r in worst), default=0)
    print(
        f"\nadaptive sharpness (worst case): at most {most} gradient evaluations per rho "
        f"({'OK, <= 20' if most <= 20 else 'MORE THAN 20'}); "
        + ", ".join(
            f"rho={r.rho:g}: {r.gradient_evals} grad + {r.loss_evals} loss"
            f"{', still improving' if r.improving else ''}"
            for r in worst
        )
    )

    dense = n * n * 8
    bound = "=" if raised else "<="
    print("\n| memory (process RSS) | bytes |")
    print("|---|---:|")
    print(f"| before flatness (torch, model, data subset) | {fmt_bytes(rss_before)} |")
    print(
        f"| lifetime peak before flatness (includes loading the data) | {fmt_bytes(max_before)} |"
    )
    print(f"| peak during flatness | {bound} {fmt_bytes(max_after)} |")
    print(f"| peak growth during flatness | {bound} {fmt_bytes(max_after - rss_before)} |")
    print(f"| a dense float64 Hessian, n^2 x 8 | {fmt_bytes(dense)} |")
    never = not dense_builds and max_after < dense / 10
    print(
        f"\ndense-Hessian builds during flatness: {len(dense_builds)}"
        f"{' (' + ', '.join(dense_builds) + ')' if dense_builds else ''}; peak RSS {bound} "
        f"{max_after / dense:.2%} of a dense Hessian: {'never built' if never else 'CHECK'}"
    )

    print(
        f"\n| one product on the same operator ({info['n_samples']:,} samples, {info['dtype']}) "
        f"| median CPU ms of {args.repeats} | / gradient |"
    )
    print("|---|---:|---:|")
    base = cost["gradient"]
    print(f"| gradient (`op.loss_and_gradient`) | {1e3 * base:.1f} | 1.00 |")
    print(
        f"| plain autograd gradient (`loss.backward()` on a {info['dtype']} copy) | "
        f"{1e3 * cost['backward']:.1f} | {cost['backward'] / base:.2f} |"
    )
    print(
        f"| Hessian-vector product (`op @ v`) | {1e3 * cost['hvp']:.1f} | "
        f"{cost['hvp'] / base:.2f} |"
    )
    print(
        f"| 8 HVPs as one block (`op @ V`, V n x 8), per column | "
        f"{1e3 * cost['hvp_block8'] / 8:.1f} | {cost['hvp_block8'] / 8 / base:.2f} |"
    )
    hvps = info["matvecs"]
    print(
        f"\nso spectra.flatness's {hvps:,} HVPs cost about {hvps * cost['hvp'] / base:,.0f} "
        f"of the operator's gradient evaluations, or "
        f"{hvps * cost['hvp'] / cost['backward']:,.0f} plain backward passes "
        f"(at the single-vector rate)"
    )
    print("\n" + report.summary())
    return 0 if not dense_builds else 1


if __name__ == "__main__":
    sys.exit(main())
