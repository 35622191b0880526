"""Exact-Hessian pipeline cost on the paper's small-mnistfc (784-64-10 ReLU, 50,890 parameters).

    python -m benchmarks.bench_exact                # n = 50,890, 1,000 samples (about an hour on 2 cores)
    python -m benchmarks.bench_exact --hidden 16    # n = 12,730 (minutes)

Each stage runs in its own subprocess so that its peak resident memory
(``ru_maxrss``) is its own.  Reports, side by side from one run:
gradient time; one HVP (forward-over-reverse and double backward); batched HVP
per vector; exact-Hessian build; in-place eigensolve; peak memory against the
n x n matrix plus solver workspace; and plain ``torch.func.hessian`` on the same
problem (run under an address-space cap, so it fails cleanly instead of
exhausting the machine).  Random inputs are fine for timing.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from torch import nn

STAGES = ("timing", "spectrum", "func_hessian")


def problem(hidden: int, samples: int, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    X = torch.rand(samples, 1, 28, 28)
    y = torch.randint(0, 10, (samples,))
    return model, nn.CrossEntropyLoss(), (X, y)


def _time(fn, repeat: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def stage_timing(args) -> dict:
    import spectra

    model, loss, data = problem(args.hidden, args.samples)
    H = spectra.hessian_operator(model, loss, data)
    n = H.shape[0]
    v = torch.randn(n)
    V = torch.randn(n, args.block)
    uncached = spectra.hessian_operator(model, loss, data, cache_graph=False)
    forward_over_reverse = spectra.hessian_operator(model, loss, data, backend="func")
    t_grad = _time(H.gradient)
    t_hvp = _time(lambda: H @ v)
    t_hvp_dd = _time(lambda: uncached @ v)
    t_hvp_func = _time(lambda: forward_over_reverse @ v)
    t_block = _time(lambda: H @ V, repeat=3) / args.block
    return {
        "n": n,
        "grad_s": t_grad,
        "hvp_s": t_hvp,
        "hvp_double_backward_s": t_hvp_dd,
        "hvp_func_s": t_hvp_func,
        "batched_hvp_per_vector_s": t_block,
        "block": args.block,
        "baseline_rss": _rss_bytes(),
    }


def stage_spectrum(args) -> dict:
    import spectra

    model, loss, data = problem(args.hidden, args.samples)
    base = _rss_bytes()
    s = spectra.exact_spectrum(
        model, loss, data, dtype=torch.float32, chunk_size=args.block, progress=True
    )
    return {
        "n": s.n_params,
        "build_s": s.info["build_seconds"],
        "solve_s": s.info["solve_seconds"],
        "asymmetry": s.info["asymmetry"],
        "peak_rss": _rss_bytes(),
        "baseline_rss": base,
        "top": float(s.top(1)[0]),
    }


def stage_func_hessian(args) -> dict:
    """Plain torch.func.hessian of the loss in the flat parameters (all columns at once)."""
    from spectra.parameters import ParameterView

    model, loss, (X, y) = problem(args.hidden, args.samples)
    view = ParameterView(model)
    theta = view.flat_params()

    def f(t):
        return loss(torch.func.functional_call(model, view.unflatten(t), (X,)), y)

    cap = int(args.func_cap_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    t0 = time.perf_counter()
    try:
        Hm = torch.func.hessian(f)(theta)
        return {
            "func_hessian_s": time.perf_counter() - t0,
            "shape": list(Hm.shape),
            "peak_rss": _rss_bytes(),
        }
    except (RuntimeError, MemoryError) as exc:
        return {
            "func_hessian_failed": f"{type(exc).__name__}: {str(exc)[:160]}",
            "after_s": time.perf_counter() - t0,
            "cap_gb": args.func_cap_gb,
        }


def run_stage(name: str, args) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_exact",
        "--stage",
        name,
        "--hidden",
        str(args.hidden),
        "--samples",
        str(args.samples),
        "--block",
        str(args.block),
        "--func-cap-gb",
        str(args.func_cap_gb),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    last = proc.stdout.strip().splitlines()[-1:] or ["{}"]
    try:
        return json.loads(last[0])
    except json.JSONDecodeError:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--func-cap-gb", type=float, default=16.0)
    ap.add_argument("--stage", choices=STAGES)
    ap.add_argument("--skip", nargs="*", default=[], choices=STAGES)
    args = ap.parse_args()
    if args.stage:
        print(json.dumps(globals()[f"stage_{args.stage}"](args)))
        return
    results = {s: run_stage(s, args) for s in STAGES if s not in args.skip}
    print(json.dumps(results, indent=1))
    t, sp = results.get("timing", {}), results.get("spectrum", {})
    n = t.get("n") or sp.get("n")
    print(
        f"\n### small-mnistfc 784-{args.hidden}-10, n = {n:,}, {args.samples} samples, float32, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    print("| quantity | value | target |\n|---|---|---|")
    if t:
        g = t["grad_s"]
        print(f"| gradient | {g * 1e3:.2f} ms | |")
        for label, key in (
            ("one HVP (default: double backward, graph cached)", "hvp_s"),
            ("one HVP (double backward, graph rebuilt)", "hvp_double_backward_s"),
            ("one HVP (jvp of grad)", "hvp_func_s"),
        ):
            print(f"| {label} | {t[key] * 1e3:.2f} ms = {t[key] / g:.2f}x grad | |")
        print(
            f"| batched HVP per vector (k={t['block']}) | {t['batched_hvp_per_vector_s'] * 1e3:.3f} ms"
            f" = {t['batched_hvp_per_vector_s'] / g:.2f}x grad | <= 2x |"
        )
    if sp and "build_s" in sp:
        item = 4
        matrix = n * n * item
        print(f"| exact-Hessian build | {sp['build_s']:.1f} s | |")
        if t:
            ratio = sp["build_s"] / (n * t["batched_hvp_per_vector_s"])
            print(f"| build / (n x batched HVP) | {ratio:.2f} | <= 1.3 |")
        print(f"| eigensolve (in place, syevd) | {sp['solve_s']:.1f} s | |")
        workspace = 8 * n * item
        peak = sp["peak_rss"] - sp["baseline_rss"]
        print(
            f"| peak memory above model+data | {peak / 2**30:.2f} GiB = "
            f"{peak / (matrix + workspace):.3f} x (matrix + workspace) | <= 1.1 |"
        )
        print(f"| asymmetry before symmetrising | {sp['asymmetry']:.1e} | |")
    elif sp:
        print(f"| spectrum | {sp} | |")
    fh = results.get("func_hessian")
    if fh:
        if "func_hessian_s" in fh:
            print(f"| torch.func.hessian | {fh['func_hessian_s']:.1f} s | |")
        else:
            print(
                f"| torch.func.hessian | failed after {fh.get('after_s', 0):.1f} s under a "
                f"{fh.get('cap_gb')} GB cap: {fh.get('func_hessian_failed', fh)} | |"
            )


if __name__ == "__main__":
    main()
