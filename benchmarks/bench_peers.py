"""spectra against its peers on real networks, side by side in one run (issue 4).

Run (needs the peers; they live in their own venv, see benchmarks/README.md):

    .venv-anchors/bin/python -m benchmarks.bench_peers [--quick] [--cnn-width 0.25]

Peers: PyHessian 0.1 (power iteration with deflation, Hutchinson, SLQ),
hessian-eigenthings 1.0.0a5 (Lanczos without restarts, SLQ, Hutch++) and
curvlinops 3.0.1 (``HessianLinearOperator``) + ``scipy.sparse.linalg.eigsh``
(ARPACK).  Every peer uses its own Hessian-vector product; matvecs are counted
by wrapping that product.  Everything runs in float64 (PyHessian draws its
random vectors in the default dtype, which is set to float64 around it).

Problems:

* small-mnistfc (784-64-10, 50,890 parameters), Adam for 2 epochs on 10,000
  MNIST training images, Hessian of the cross-entropy over 1,000 of them.
  Top-5 truth: ``spectra.lanczos(tol=1e-10)`` (residual-certified).
* All-CNN-BN (eval-mode BatchNorm) at ``--cnn-width`` (default 0.125: 22,374
  parameters, 64 samples; 1.0 is 1,372,254 parameters) on synthetic
  CIFAR-shaped inputs (no CIFAR on this machine), 20 Adam steps.  Measured on
  the shared 2-core CPU, one HVP costs 0.7 s at width 0.125 / 64 samples and
  4-6 s at width 0.25 / 128 samples, so PyHessian's ~500 matvecs at full width
  on 1,000 samples would take hours: run the full width on a GPU.
* density and trace need the exact spectrum, so they run on small-mnistfc with
  4 hidden units (3,190 parameters, ``eigvalsh`` of the dense Hessian), same data.

Tables (markdown): top-5 matvecs/seconds to 1e-6 relative error and at
PyHessian's default accuracy; SLQ Wasserstein-1 at equal matvecs; trace RMS
relative error against matvecs.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy.stats import wasserstein_distance
from torch import nn

import spectra

F64 = torch.float64
TARGET = 1e-6


# --- problems ------------------------------------------------------------------------


def mnistfc_problem(hidden: int, train: int, hess: int, epochs: int, seed: int = 0):
    from figures.datasets import load_mnist
    from figures.models import small_mnistfc

    X, y = load_mnist(split="train")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(X.shape[0], generator=g)[:train]
    X, y = X[idx], y[idx]
    torch.manual_seed(seed)
    model = small_mnistfc(hidden=hidden)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        perm = torch.randperm(train, generator=g)
        for b in range(0, train, 128):
            j = perm[b : b + 128]
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[j]), y[j]).backward()
            opt.step()
    model = model.double().eval()
    return model, X[:hess].double(), y[:hess]


def allcnn_problem(width: float, samples: int, steps: int, seed: int = 0):
    from figures.models import all_cnn_bn

    from .training import train_full_batch

    g = torch.Generator().manual_seed(seed)
    X = torch.randn(samples, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (samples,), generator=g)
    torch.manual_seed(seed)
    model = all_cnn_bn(width=width, dropout=0.0)
    train_full_batch(model, X, y, steps, lr=1e-3)
    return model.double().eval(), X.double(), y


# --- the contenders -------------------------------------------------------------------


class Counter:
    def __init__(self) -> None:
        self.n = 0


def _rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    got = np.sort(np.asarray(got, dtype=np.float64))[::-1][: ref.size]
    return float(np.max(np.abs(got - ref) / np.abs(ref)))


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def ours_top(model, X, y, tol: float, backend: str = "auto") -> dict:
    H = spectra.hessian_operator(model, nn.CrossEntropyLoss(), (X, y), backend=backend)
    r, t = _timed(lambda: spectra.lanczos(H, k=5, tol=tol, return_eigenvectors=False))
    return {
        "values": r.eigenvalues.numpy(),
        "matvecs": r.matvecs,
        "seconds": t,
        "certified": float((r.residuals / r.eigenvalues.abs()).max()),
    }


def pyhessian_top(model, X, y, tol: float, max_iter: int, dtype: torch.dtype = F64) -> dict:
    ph = importlib.import_module("pyhessian.hessian")

    count = Counter()
    real = ph.hessian_vector_product

    def counted(*a, **kw):
        count.n += 1
        return real(*a, **kw)

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # PyHessian draws its vectors in the default dtype
    ph.hessian_vector_product = counted
    try:
        torch.manual_seed(0)
        model.zero_grad()
        comp, t_setup = _timed(
            lambda: ph.hessian(model, nn.CrossEntropyLoss(), data=(X, y), cuda=False)
        )
        (vals, _), t = _timed(lambda: comp.eigenvalues(maxIter=max_iter, tol=tol, top_n=5))
    finally:
        ph.hessian_vector_product = real
        torch.set_default_dtype(old)
        model.zero_grad(set_to_none=True)
    return {"values": np.array(vals), "matvecs": count.n, "seconds": t + t_setup}


def eigenthings_operator(model, X, y, dtype: torch.dtype = F64):
    import hessian_eigenthings as he

    op = he.HessianOperator(model, [(X, y)], he.supervised_loss(nn.CrossEntropyLoss()))
    count = Counter()

    def mv(v):
        count.n += 1
        return op.matvec(v)

    return he.LambdaOperator(mv, op.size, dtype=dtype), count


def eigenthings_top(model, X, y, ref: np.ndarray, schedule=(10, 15, 20, 30, 40, 50, 70, 100)):
    """Their Lanczos has no restart and no stopping rule: the smallest max_iter that
    reaches the target (an oracle choice; the time is that of the one run)."""
    import hessian_eigenthings as he

    for m in schedule:
        op, count = eigenthings_operator(model, X, y)
        r, t = _timed(lambda op=op, m=m: he.lanczos(op, k=5, max_iter=m, which="LA", seed=0))
        err = _rel_err(r.eigenvalues.numpy(), ref)
        if err <= TARGET:
            break
    return {
        "values": r.eigenvalues.numpy(),
        "matvecs": count.n,
        "seconds": t,
        "setting": f"max_iter={m} (smallest of {list(schedule)} reaching 1e-6)",
    }


def curvlinops_eigsh(model, X, y, tol: float) -> dict:
    import scipy.sparse.linalg as sla
    from curvlinops import HessianLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    op = HessianLinearOperator(
        model, nn.CrossEntropyLoss(), params, [(X, y)], check_deterministic=False
    ).to_scipy()
    count = Counter()

    def mv(v):
        count.n += 1 if v.ndim == 1 else v.shape[1]
        return op @ v

    lin = sla.LinearOperator(op.shape, matvec=mv, dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(op.shape[0])
    vals, t = _timed(
        lambda: sla.eigsh(lin, k=5, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
    )
    return {"values": vals, "matvecs": count.n, "seconds": t}


def top5_table(label: str, model, X, y, quick: bool) -> list[str]:
    truth = spectra.lanczos(
        spectra.hessian_operator(model, nn.CrossEntropyLoss(), (X, y)),
        k=5,
        tol=1e-10,
        return_eigenvectors=False,
    )
    ref = truth.eigenvalues.numpy()
    n = sum(p.numel() for p in model.parameters())
    rows = [
        f"\n### top-5 eigenvalues, {label} (n = {n:,}, float64)\n",
        f"truth: spectra.lanczos tol=1e-10, max residual/|lambda| "
        f"{float((truth.residuals / truth.eigenvalues.abs()).max()):.1e}; "
        f"top-5 = {np.array2string(ref, precision=6)}\n",
        "| method | setting | matvecs | seconds | max rel. error | reaches 1e-6 |",
        "|---|---|---:|---:|---:|:-:|",
    ]
    runs: list[tuple[str, str, Callable[[], dict]]] = [
        ("spectra.lanczos", "tol=1e-6 (default)", lambda: ours_top(model, X, y, 1e-6)),
        ("spectra.lanczos", "tol=1e-3", lambda: ours_top(model, X, y, 1e-3)),
        (
            "spectra.lanczos",
            "tol=1e-6, backend=autograd",
            lambda: ours_top(model, X, y, 1e-6, "autograd"),
        ),
        (
            "spectra.lanczos",
            "tol=1e-3, backend=autograd",
            lambda: ours_top(model, X, y, 1e-3, "autograd"),
        ),
        (
            "PyHessian",
            "default: maxIter=100, tol=1e-3",
            lambda: pyhessian_top(model, X, y, 1e-3, 100),
        ),
        ("PyHessian", "tol=1e-8, maxIter=300", lambda: pyhessian_top(model, X, y, 1e-8, 300)),
        ("hessian-eigenthings", "", lambda: eigenthings_top(model, X, y, ref)),
        ("curvlinops + eigsh", "tol=1e-6", lambda: curvlinops_eigsh(model, X, y, 1e-6)),
    ]
    if quick:
        runs = [r for r in runs if "maxIter=300" not in r[1]]
    for name, setting, fn in runs:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = fn()
        except Exception as exc:  # a peer that fails is a result too
            rows.append(
                f"| {name} | {setting} | - | - | FAILED: {type(exc).__name__}: "
                f"{str(exc)[:80]} | no |"
            )
            continue
        err = _rel_err(out["values"], ref)
        rows.append(
            f"| {name} | {out.get('setting', setting)} | {out['matvecs']} | "
            f"{out['seconds']:.2f} | {err:.1e} | {'yes' if err <= TARGET else 'no'} |"
        )
        print(rows[-1], file=sys.stderr, flush=True)  # progress while the table fills
    return rows


# --- density and trace on a small exactly-solved network -----------------------------


def density_table(model, X, y, exact: np.ndarray, probes: int, steps: int) -> list[str]:
    rng_ = exact[-1] - exact[0]
    rows = [
        f"\n### SLQ density at equal matvecs ({probes} probes x {steps} steps), "
        f"small-mnistfc hidden=4 (n = {exact.size:,}), W1 vs eigvalsh\n",
        "| method | matvecs | seconds | W1 / range |",
        "|---|---:|---:|---:|",
    ]
    H = spectra.hessian_operator(model, nn.CrossEntropyLoss(), (X, y))
    s, t = _timed(lambda: spectra.spectral_density(H, num_probes=probes, num_steps=steps))
    w = wasserstein_distance(s.eigenvalues, exact, u_weights=s.weights) / rng_
    rows.append(f"| spectra.spectral_density | {s.info['matvecs']} | {t:.2f} | {w:.1e} |")
    try:
        import hessian_eigenthings as he

        op, count = eigenthings_operator(model, X, y)
        r, t = _timed(lambda: he.spectral_density(op, num_runs=probes, lanczos_steps=steps, seed=0))
        nodes, wts = r.raw_eigenvalues.numpy(), r.raw_weights.numpy()
        keep = np.isfinite(nodes)
        wts = np.where(keep, wts, 0.0)
        wts = wts / wts.sum(1, keepdims=True) / wts.shape[0]
        w = wasserstein_distance(nodes[keep], exact, u_weights=wts[keep]) / rng_
        rows.append(f"| hessian-eigenthings spectral_density | {count.n} | {t:.2f} | {w:.1e} |")
    except Exception as exc:
        rows.append(f"| hessian-eigenthings | - | - | FAILED: {type(exc).__name__}: {exc} |")
    try:
        ph = importlib.import_module("pyhessian.hessian")

        old = torch.get_default_dtype()
        torch.set_default_dtype(F64)
        try:
            comp = ph.hessian(model, nn.CrossEntropyLoss(), data=(X, y), cuda=False)
            comp.density(iter=steps, n_v=probes)
        finally:
            torch.set_default_dtype(old)
            model.zero_grad(set_to_none=True)
        rows.append("| PyHessian density | ran | | (not scored) |")
    except Exception as exc:
        rows.append(
            f"| PyHessian density | - | - | FAILED: {type(exc).__name__}: {str(exc)[:70]} |"
        )
    return rows


def trace_table(model, X, y, exact_trace: float, budgets, seeds: int) -> list[str]:
    rows = [
        f"\n### trace: RMS relative error over {seeds} seeds vs matvecs, small-mnistfc "
        f"hidden=4 (exact trace {exact_trace:.6g})\n",
        "| method | " + " | ".join(f"m={m}" for m in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    H = spectra.hessian_operator(model, nn.CrossEntropyLoss(), (X, y))

    def ours(method):
        return lambda m, s: spectra.trace(H, method=method, num_matvecs=m, seed=s).estimate

    def pyh(m, s):
        ph = importlib.import_module("pyhessian.hessian")

        old = torch.get_default_dtype()
        torch.set_default_dtype(F64)
        try:
            torch.manual_seed(s)
            comp = ph.hessian(model, nn.CrossEntropyLoss(), data=(X, y), cuda=False)
            return float(np.mean(comp.trace(maxIter=m, tol=0.0)))
        finally:
            torch.set_default_dtype(old)
            model.zero_grad(set_to_none=True)

    def eig(m, s):
        import hessian_eigenthings as he

        op, _ = eigenthings_operator(model, X, y)
        return he.hutch_plus_plus(op, num_matvecs=m, seed=s).estimate

    for name, fn in [
        ("spectra hutch++", ours("hutch++")),
        ("spectra hutchinson", ours("hutchinson")),
        ("PyHessian Hutchinson (tol=0)", pyh),
        ("hessian-eigenthings hutch++", eig),
    ]:
        cells = []
        for m in budgets:
            try:
                errs = [(fn(m, s) - exact_trace) / exact_trace for s in range(seeds)]
                cells.append(f"{math.sqrt(np.mean(np.square(errs))):.1e}")
            except Exception as exc:
                cells.append(f"FAILED {type(exc).__name__}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


MEMORY_CHILD = """
import sys, json, torch
torch.set_num_threads(1)
from torch import nn
import spectra
from benchmarks.bench_peers import mnistfc_problem
model, X, y = mnistfc_problem(64, 2000, 1000, 1)
H = spectra.hessian_operator(model, nn.CrossEntropyLoss(), (X, y))
v = torch.randn(H.shape[0], dtype=torch.float64)
def hwm():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("VmHWM"))
def reset_peak():  # Linux: "5" resets the peak RSS (VmHWM) to the current RSS
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
reset_peak()
for _ in range(3):
    H @ v  # the model's own peak: a single-vector product, warmed up
base = hwm()
reset_peak()
r = spectra.lanczos(H, k=5, tol=1e-6)
peak = hwm()
print(json.dumps({"n": H.shape[0], "base_kb": base, "peak_kb": peak, "ncv": 20}))
"""


def memory_table() -> list[str]:
    """Peak RSS (VmHWM, reset through /proc/self/clear_refs) of lanczos(k=5) above the peak
    of a warmed-up single-vector product, in a child process (Linux only)."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD], capture_output=True, text=True, check=True
    )
    d = json.loads(out.stdout.strip().splitlines()[-1])
    vec_kb = d["n"] * 8 / 1024
    above = (d["peak_kb"] - d["base_kb"]) / vec_kb
    stored = d["ncv"] + 1
    return [
        f"\n### memory: lanczos(k=5) on small-mnistfc (n = {d['n']:,}, float64)\n",
        "| peak RSS above the model's own (vectors of n) | bound: stored (ncv + 1 = "
        f"{stored}) + 4 | within |",
        "|---:|---:|:-:|",
        f"| {above:.1f} | {stored + 4} | {'yes' if above <= stored + 4 else 'no'} |",
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="smaller budgets (a smoke run)")
    ap.add_argument("--cnn-width", type=float, default=0.125)
    ap.add_argument("--cnn-samples", type=int, default=64)
    ap.add_argument(
        "--skip", nargs="*", default=[], choices=["mnistfc", "allcnn", "density", "trace"]
    )
    ap.add_argument(
        "--memory",
        action="store_true",
        help="also the RSS memory row (at n = 5e4 a vector is 0.4 MB and glibc's "
        "arenas move RSS by +-30 vectors between identical calls: not "
        "conclusive; bench_matrix_free measures the bound at large n)",
    )
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    missing = [
        m
        for m in ("pyhessian", "hessian_eigenthings", "curvlinops")
        if importlib.util.find_spec(m) is None
    ]
    if missing:
        print(
            f"bench_peers: peers not installed ({', '.join(missing)}); run it with "
            ".venv-anchors/bin/python (see benchmarks/README.md). Skipped."
        )
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    lines: list[str] = []
    if "mnistfc" not in args.skip:
        model, X, y = mnistfc_problem(64, 2000 if args.quick else 10000, 1000, 2)
        lines += top5_table("small-mnistfc, MNIST, 1,000 samples", model, X, y, args.quick)
        print("\n".join(lines), flush=True)
    if args.memory:
        rows = memory_table()
        print("\n".join(rows), flush=True)
        lines += rows
    if "allcnn" not in args.skip:
        model, X, y = allcnn_problem(args.cnn_width, args.cnn_samples, 20)
        rows = top5_table(
            f"All-CNN-BN width {args.cnn_width}, {args.cnn_samples} synthetic "
            "CIFAR-shaped samples, eval-mode BN",
            model,
            X,
            y,
            args.quick,
        )
        print("\n".join(rows), flush=True)
        lines += rows
    if "density" not in args.skip or "trace" not in args.skip:
        model, X, y = mnistfc_problem(4, 2000 if args.quick else 10000, 1000, 2)
        H = spectra.hessian_operator(model, nn.CrossEntropyLoss(), (X, y))
        D = H.to_dense()
        exact = torch.linalg.eigvalsh(0.5 * (D + D.T)).numpy()
        del D
        if "density" not in args.skip:
            rows = density_table(model, X, y, exact, 10, 40 if args.quick else 80)
            print("\n".join(rows), flush=True)
            lines += rows
        if "trace" not in args.skip:
            rows = trace_table(
                model,
                X,
                y,
                float(exact.sum()),
                (30, 99) if args.quick else (30, 99, 300),
                3 if args.quick else 5,
            )
            print("\n".join(rows), flush=True)
            lines += rows


if __name__ == "__main__":
    main()
