"""Dense symmetric eigenvalues (all of them, no vectors): each CPU backend against the flop floor.

    python -m benchmarks.bench_eigensolver                      # n = 4k, 8k, 12k, float32
    python -m benchmarks.bench_eigensolver --sizes 2000 3000 --solvers mkl scipy

Solvers: the backends of ``spectra.dense_eigensolver`` -- ``mkl`` (PyTorch's MKL ``?syevd``,
in place), ``openblas-2stage`` (SciPy's OpenBLAS ``?syevd_2stage``, in place), ``scipy``
(``scipy.linalg.eigh(driver="evd")``, today's fallback) -- and ``torch``
(``torch.linalg.eigvalsh``, which copies).  Every (solver, n) runs in its own process, on
the same seeded Wigner matrix, with ``--threads`` threads (default: all cores this process
may use), so one library's idle thread pool cannot slow the next.  Reported: seconds, the
process's CPU seconds, GFLOP/s against the tridiagonal reduction's 4/3 n^3, the largest
eigenvalue difference to the first solver (over the spectral norm), and the exponent of a
least-squares fit of log t on log n with its extrapolation to the paper's sizes (32,640 /
47,658 / 50,890 parameters) against the flop floor 4/3 n^3 / peak.

Two bases for the fit: wall seconds (right on an idle machine), and CPU seconds / threads,
the time the same work takes on cores nobody else uses (right on a shared machine, where the
wall clock mostly measures the other jobs; exact for one thread, high for several, whose
spinning at barriers counts as CPU time).  Two peaks for the floor, both for the threads
used: ``--peak-gflops`` per core (default 83: the issue's 166 GFLOP/s for 2 cores, two
256-bit FMA pipes per core at 2.6 GHz) and the float32 SGEMM rate measured here per CPU
second times the threads (AVX-512 cores exceed the former).
Matrices of 4k-8k float32 (64-256 MiB) may still fit a large L3 cache, so the fitted
exponent can understate the cost at the paper's sizes (4-10 GiB).

    python -m benchmarks.bench_eigensolver --from-json bench_eigensolver.json   # reprint
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SOLVERS = ("mkl", "openblas-2stage", "scipy", "torch")
PAPER_SIZES = (32_640, 47_658, 50_890)


def reduction_flops(n: int) -> float:
    """Flops of the reduction to tridiagonal form, the O(n^3) part of eigenvalues-only."""
    return 4.0 / 3.0 * n**3


def wigner(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A seeded symmetric (n, n) Gaussian matrix (its spectrum: the semicircle)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=dtype)
    a += a.T.clone()
    return a


def solve_once(solver: str, n: int, dtype: torch.dtype, threads: int, out: Path) -> dict:
    """Time one solve in this process; the eigenvalues go to ``out`` (.npy)."""
    from spectra.dense_eigensolver import eigvalsh_inplace

    torch.set_num_threads(threads)
    a = wigner(n, dtype)
    load = os.getloadavg()[0]
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    w = eigvalsh_inplace(a, backend=solver)
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    np.save(out, w)
    return {
        "solver": solver,
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": threads,
        "seconds": seconds,
        "cpu_seconds": r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime,
        "gflops": reduction_flops(n) / seconds / 1e9,
        "load_before": load,
        "peak_rss_gib": r1.ru_maxrss * 1024 / 2**30,
    }


def sgemm_gflops(threads: int, n: int = 4096, repeat: int = 3) -> dict[str, float]:
    """Float32 matrix-product rates here, GFLOP/s (2 n^3 per product), best of ``repeat``.

    ``wall``: flops per second; ``capacity``: flops per CPU second times ``threads``, what
    the cores deliver when they are not shared (the number to use on a loaded machine).
    """
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    wall = cpu = float("inf")
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        a @ b
        wall = min(wall, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() - c0)
    return {"wall": 2 * n**3 / wall / 1e9, "capacity": 2 * n**3 / cpu * threads / 1e9}


def fit_exponent(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least-squares ``log t = p log n + c``: returns ``(p, c)`` (needs two sizes or more)."""
    p, c = np.polyfit(np.log(sizes), np.log(seconds), 1)
    return float(p), float(c)


def machine() -> dict:
    """CPU model (``lscpu``), cores this process may use, load average (``uptime``)."""
    model = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "uptime": uptime}


def run_child(solver: str, n: int, dtype: str, threads: int, out: Path) -> dict:
    """One (solver, n) in a fresh interpreter; its JSON result, or the error it printed."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_eigensolver",
        "--child",
        solver,
        str(n),
        "--dtype",
        dtype,
        "--threads",
        str(threads),
        "--eigenvalues",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    if done.returncode != 0:
        return {"solver": solver, "n": n, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


BASES = {"wall": "wall seconds", "busy": "CPU seconds / threads (the wall time unshared)"}


def busy_seconds(r: dict) -> float:
    """A run's CPU seconds over its threads: its wall time on cores nobody else uses."""
    return r["cpu_seconds"] / r["threads"]


def fits_of(results: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """``{basis: {solver: (exponent, log coefficient)}}`` over the sizes each solver ran."""
    fits: dict[str, dict[str, tuple[float, float]]] = {basis: {} for basis in BASES}
    for solver in dict.fromkeys(r["solver"] for r in results):
        ok = [r for r in results if r["solver"] == solver and "error" not in r]
        if len({r["n"] for r in ok}) >= 2:
            sizes = [r["n"] for r in ok]
            fits["wall"][solver] = fit_exponent(sizes, [r["seconds"] for r in ok])
            fits["busy"][solver] = fit_exponent(sizes, [busy_seconds(r) for r in ok])
    return fits


def markdown(report: dict) -> str:
    """The measurements, the fits and the extrapolation of a report as markdown tables."""
    results = report["results"]
    sizes = sorted({r["n"] for r in results})
    lines = [
        f"{report['machine']['cpu']}, {report['threads']} threads, {report['dtype']}; "
        f"before: {report['machine']['uptime']}; after: {report['machine']['uptime_after']}",
        "",
        "| solver | "
        + " | ".join(f"n = {n:,}: s (GFLOP/s), CPU s" for n in sizes)
        + " | max diff / norm |",
        "|---|" + "---|" * (len(sizes) + 1),
    ]
    for solver in dict.fromkeys(r["solver"] for r in results):
        cells, diff = [], 0.0
        for n in sizes:
            r = next((r for r in results if r["solver"] == solver and r["n"] == n), None)
            if r is None or "error" in r:
                cells.append("failed" if r else "-")
                continue
            cells.append(f"{r['seconds']:.1f} ({r['gflops']:.0f}), {r['cpu_seconds']:.1f}")
            diff = max(diff, r.get("max_diff", 0.0))
        lines.append(f"| {solver} | " + " | ".join(cells) + f" | {diff:.1e} |")
    sgemm = report["sgemm_gflops"]
    peaks = {"stated": report["peak_gflops"] * report["threads"], "SGEMM": sgemm["capacity"]}
    lines += [
        "",
        f"max diff: largest eigenvalue difference to the first solver, over the spectral norm. "
        f"SGEMM here: {sgemm['wall']:.0f} GFLOP/s wall, {sgemm['capacity']:.0f} GFLOP/s "
        f"unshared (per CPU second x threads).",
    ]
    for basis, label in BASES.items():
        fits = report["fits"][basis]
        lines += [
            "",
            f"Fit on {label}; extrapolated minutes (x the floor at {peaks['stated']:.0f} / "
            f"{peaks['SGEMM']:.0f} GFLOP/s):",
            "",
            "| solver | exponent | " + " | ".join(f"n = {n:,}" for n in PAPER_SIZES) + " |",
            "|---|---|" + "---|" * len(PAPER_SIZES),
        ]
        for solver, (p, c) in fits.items():
            cells = []
            for n in PAPER_SIZES:
                t = float(np.exp(c) * n**p)
                ratios = " / ".join(
                    f"{t * peak * 1e9 / reduction_flops(n):.1f}x" for peak in peaks.values()
                )
                cells.append(f"{t / 60:.0f} ({ratios})")
            lines.append(f"| {solver} | {p:.2f} | " + " | ".join(cells) + " |")
        floor = " | ".join(
            " / ".join(f"{reduction_flops(n) / peak / 1e9 / 60:.0f}" for peak in peaks.values())
            for n in PAPER_SIZES
        )
        lines.append(f"| floor | 3 | {floor} |")
    return "\n".join(lines)


def measure(args: argparse.Namespace) -> dict:
    """Run every (solver, size) in its own process; the report :func:`markdown` prints."""
    from spectra.dense_eigensolver import choose_backend

    dtype = getattr(torch, args.dtype)
    info = machine()
    print(
        f"{info['cpu']}, {info['cores']} cores, {args.threads} threads, {args.dtype}\n"
        f"uptime: {info['uptime']}",
        flush=True,
    )
    results, auto = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            first = None
            for solver in args.solvers:
                out = Path(tmp) / f"{solver}-{n}.npy"
                r = run_child(solver, n, args.dtype, args.threads, out)
                if "error" not in r:
                    w = np.load(out)
                    first = w if first is None else first
                    r["max_diff"] = float(np.abs(w - first).max() / np.abs(first).max())
                results.append(r)
                print(json.dumps(r), flush=True)
            auto[n] = choose_backend(n, dtype)
            print(f"n = {n:,}: backend='auto' takes {auto[n]}", flush=True)
    sgemm = sgemm_gflops(args.threads)
    info["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {
        "machine": info,
        "threads": args.threads,
        "dtype": args.dtype,
        "peak_gflops": args.peak_gflops,
        "sgemm_gflops": sgemm,
        "auto": auto,
        "results": results,
        "fits": fits_of(results),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4000, 8000, 12000])
    ap.add_argument("--solvers", nargs="+", choices=SOLVERS, default=list(SOLVERS))
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--peak-gflops", type=float, default=83.0, help="per core")
    ap.add_argument(
        "--json",
        type=Path,
        default=Path("bench_eigensolver.json"),
        help="where to write the results ('' for nowhere)",
    )
    ap.add_argument("--from-json", type=Path, help="print the tables of an earlier run")
    ap.add_argument("--child", nargs=2, metavar=("SOLVER", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--eigenvalues", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        solver, n = args.child
        dtype = getattr(torch, args.dtype)
        print(json.dumps(solve_once(solver, int(n), dtype, args.threads, args.eigenvalues)))
        return 0
    if args.from_json:
        report = json.loads(args.from_json.read_text())
        report["fits"] = fits_of(report["results"])
        print(markdown(report))
        return 0
    report = measure(args)
    print()
    print(markdown(report))
    if str(args.json):
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
