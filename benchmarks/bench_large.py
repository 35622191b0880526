"""Large models on one machine: Lanczos, SLQ and Hutch++ in bounded memory.

Run:  python -m benchmarks large [--size tiny|10m|124m] [--probes 4] [--steps 60] [--k 5]
                                 [--tol 1e-3] [--trace-matvecs 30] [--threads 2]
                                 [--sections products,lanczos,arpack,slq,trace]
                                 [--checkpoint DIR] [--json FILE]
      python -m benchmarks large --accuracy

The model is a GPT-2 built from its config with random weights, in float32, on 4 x
128 random tokens (next-token cross-entropy): ``--size 124m`` is GPT-2 small
(``GPT2Config()``, 124,439,808 parameters); ``--size 10m`` the same architecture at
n_embd = 256, 6 layers, a 20,000-token vocabulary (10,121,216 parameters); ``tiny``
(61,440) checks the script.  The Hessian is ``spectra.hessian_operator`` with its
default backend: a single vector goes through double backward on the batch's cached
gradient graph, a block through vectorised forward-over-reverse.

Sections (markdown tables; wall time, matvecs and the process's peak RSS, which is
a high-water mark since the start, after each):

* products: the first HVP (the operator's path check and graph build), ``--warmup``
  more (the first few are slower while the allocator settles), then, interleaved
  ``--repeat`` times so a changing machine load hits them alike (medians): a plain
  ``loss.backward()`` gradient, the operator's gradient (torch.func) and one HVP; then
  ``--repeat`` blocks ``H @ V`` of ``--block-width`` vectors (after an untimed one),
  per vector.  Which of single and block
  is cheaper per vector sets the SLQ and trace block size (1 if single; else the
  memory budget's choice) unless ``--block`` is given;
* lanczos: top-k eigenvalues with residuals (``tol``) and the ncv its memory budget
  chose; ``--lanczos-max-matvecs`` caps it (a short run at 124M);
* arpack (not at 124m): ``scipy.sparse.linalg.eigsh(op.to_scipy(), k)``, the same
  eigenvalues cross-checked against Lanczos' error bars;
* slq: ``spectral_density`` with ``--probes`` x ``--steps``, the reorthogonalisation
  and block size its memory budget chose;
* trace: Hutch++ with ``--trace-matvecs``.

Then the projected time of the full run at this size, per matvec as measured inside
the algorithms that ran (else from the product timings).  ``--checkpoint DIR`` makes
the run resumable: finished sections are kept in ``DIR/results-<size>.json`` (rerun
with the same arguments to skip them) and Lanczos and SLQ checkpoint into DIR.

``--accuracy``: the cheaper SLQ reorthogonalisation schemes against the exact
spectrum (``eigvalsh``) of a trained 3,605-parameter MLP Hessian, float32 and
float64, 10 probes x 80 steps, 3 seeds: Wasserstein-1 to the exact spectrum and to
full reorthogonalisation on the same probes, the smoothed-density L1 (Gaussians of
width range/200), the basis orthogonality and the copies of the top eigenvalue
among one probe's nodes (ghosts when orthogonality is lost), and the stored bytes
per probe.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spectra._resources import release_freed_heap

SIZES = {
    "tiny": dict(n_embd=32, n_layer=2, n_head=2, vocab_size=100),  # a smoke test of the script
    "10m": dict(n_embd=256, n_layer=6, n_head=4, vocab_size=20000),
    "124m": {},
}
SECTIONS = ("products", "lanczos", "arpack", "slq", "trace")
#: Sections that run only when asked for (``--sections ...,peers``; the peers' venv).
OPTIONAL_SECTIONS = ("peers",)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def build(size: str, batch: int, tokens: int, seed: int = 0, distributed: bool = False):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    import spectra

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = GPT2Config(**SIZES[size])
    model = GPT2LMHeadModel(config).eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, tokens), generator=g)
    if distributed:  # every rank draws all sequences and keeps its share of them
        import torch.distributed as dist

        ids = ids[dist.get_rank() :: dist.get_world_size()]
    data = [({"input_ids": ids}, ids[:, 1:].reshape(-1))]

    def forward(m, b):
        # next-token logits as (B (T - 1), V) rows, the layout of Hugging Face's own loss:
        # cross-entropy over a (B, V, T - 1) transposed view made each product 12% slower
        logits = m(**b).logits[:, :-1]
        return logits.reshape(-1, logits.shape[-1])

    H = spectra.hessian_operator(
        model, nn.CrossEntropyLoss(), data, forward=forward, process_group=distributed or None
    )
    return model, ids, forward, H


def timed(fn, repeat: int = 1) -> tuple[float, Any]:
    out = None
    t0 = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return (time.perf_counter() - t0) / repeat, out


# --- sections ------------------------------------------------------------------------


def section_products(H, model, ids, forward, args) -> dict:
    """The first product, then gradients and products interleaved (medians), so a
    changing machine load hits them alike."""
    loss_fn = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]

    def plain():
        loss = loss_fn(forward(model, {"input_ids": ids}), ids[:, 1:].reshape(-1))
        return torch.autograd.grad(loss, params)

    gen = torch.Generator().manual_seed(1)
    v = torch.randn(H.shape[0], generator=gen)
    V = torch.randn(H.shape[0], args.block_width, generator=gen)
    before = H.matvecs
    t_first, _ = timed(lambda: H @ v)
    peak_first = peak_rss()
    # warm up: the first few products after the first are slower (about 3x at 10M, 3
    # of them, measured) while the allocator settles into reusing its freed memory
    warm = [timed(lambda: H @ v)[0] for _ in range(args.warmup)]
    timed(plain)
    times: dict[str, list[float]] = {"grad_plain": [], "grad_func": [], "hvp": [], "block": []}
    for _ in range(args.repeat):
        times["grad_plain"].append(timed(plain)[0])
        times["grad_func"].append(timed(H.loss_and_gradient)[0])
        times["hvp"].append(timed(lambda: H @ v)[0])
    # blocks after the singles, one untimed first: a block product between single ones
    # makes the next single one ~3x slower (measured at 10M; the allocator again)
    timed(lambda: H @ V)
    for _ in range(args.repeat):
        times["block"].append(timed(lambda: H @ V)[0] / V.shape[1])
    med = {k: float(np.median(x)) for k, x in times.items()}
    rss = current_rss()  # the blocks are freed; glibc may still hold their pages
    release_freed_heap()
    return {
        "hvp_first_s": t_first,
        "peak_rss_after_first": peak_first,
        "grad_plain_s": med["grad_plain"],
        "grad_func_s": med["grad_func"],
        "hvp_s": med["hvp"],
        "block_per_vector_s": med["block"],
        "width": V.shape[1],
        "cheaper": "block" if med["block"] < med["hvp"] else "single",
        "repeat": args.repeat,
        "times": times,
        "warmup_s": warm,
        "matvecs": H.matvecs - before,
        "peak_rss": peak_rss(),
        "rss": rss,
        "rss_after_trim": current_rss(),  # what available_memory_bytes sees next
        "backend": H.backend,
        "cache_graph": H.cache_graph,
    }


def section_lanczos(H, args, ckpt: Path | None) -> dict:
    import spectra

    kw = dict(k=args.k, tol=args.tol, seed=0, progress=args.progress)
    if args.lanczos_max_matvecs:
        kw["max_matvecs"] = args.lanczos_max_matvecs
    if args.ncv:
        kw["ncv"] = args.ncv
    if ckpt is not None:
        kw.update(checkpoint=ckpt / f"lanczos-{args.size}.ckpt", checkpoint_every=600)
    with _no_convergence_warning():
        r = spectra.lanczos(H, return_eigenvectors=False, **kw)
    return {
        "eigenvalues": r.eigenvalues.tolist(),
        "residuals": r.residuals.tolist(),
        "converged": r.converged.tolist(),
        "matvecs": r.matvecs,
        "restarts": r.restarts,
        "ncv": r.ncv,
        "seconds": r.seconds,
        "basis_bytes": r.basis_bytes,
        "peak_rss": r.peak_memory_bytes,
        "tol": r.tol,
    }


def section_arpack(H, args, lanczos_result: dict | None) -> dict:
    import scipy.sparse.linalg

    before = H.matvecs
    t0 = time.perf_counter()
    vals = scipy.sparse.linalg.eigsh(
        H.to_scipy(), k=args.k, which="LA", tol=args.arpack_tol, return_eigenvectors=False
    )
    seconds = time.perf_counter() - t0
    vals = np.sort(vals)[::-1]
    out = {
        "eigenvalues": vals.tolist(),
        "matvecs": H.matvecs - before,
        "seconds": seconds,
        "tol": args.arpack_tol,
        "peak_rss": peak_rss(),
    }
    if lanczos_result is not None:
        lv = np.array(lanczos_result["eigenvalues"])
        res = np.array(lanczos_result["residuals"])
        diff = np.abs(vals - lv)
        # ARPACK's own error: tol x |lambda| (its stopping rule), plus Lanczos' bound
        out["abs_diff"] = diff.tolist()
        out["within_bounds"] = bool(np.all(diff <= res + args.arpack_tol * np.abs(vals)))
    return out


class _FlatLM(nn.Module):
    """The language model as the peers call a model: ``model(x)`` -> (B (T - 1), V)
    logits of the next token, for ``CrossEntropyLoss`` against ``ids[:, 1:].reshape(-1)``
    (the same loss as the operator's)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.lm(input_ids=ids).logits[:, :-1]
        return logits.reshape(-1, logits.shape[-1])


def section_peers(model, ids, args, reference: dict | None) -> dict:
    """PyHessian's top-5 (power iteration with deflation, its defaults) and
    hessian-eigenthings' Lanczos (``max_iter`` = the matvecs our Lanczos used, which has
    no stopping rule of its own) on the same model, data and loss, float32, attention
    through the math kernel as in our products (the fused CPU kernel has no double
    backward).  Errors are relative to ``reference`` (ARPACK's top-5, else ours)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from benchmarks.bench_peers import eigenthings_operator, pyhessian_top

    flat, X, y = _FlatLM(model), ids, ids[:, 1:].reshape(-1)
    ref = np.array(reference["eigenvalues"]) if reference else None
    out: dict[str, Any] = {"reference": None if ref is None else ref.tolist()}

    def errors(values) -> list[float] | None:
        if ref is None:
            return None
        got = np.sort(np.asarray(values, dtype=np.float64))[::-1][: ref.size]
        return (np.abs(got - ref) / np.abs(ref)).tolist()

    with sdpa_kernel(SDPBackend.MATH), _no_convergence_warning():
        try:
            r = pyhessian_top(flat, X, y, tol=1e-3, max_iter=100, dtype=torch.float32)
            r["values"] = np.asarray(r["values"]).tolist()
            out["pyhessian"] = {**r, "rel_errors": errors(r["values"]), "peak_rss": peak_rss()}
        except Exception as exc:  # a peer that fails is a result too
            out["pyhessian"] = {"failed": f"{type(exc).__name__}: {str(exc)[:200]}"}
        print(f"[peers] pyhessian {out['pyhessian']}", file=sys.stderr, flush=True)
        try:
            import hessian_eigenthings as he

            iters = int((reference or {}).get("lanczos_matvecs") or 60)
            op, count = eigenthings_operator(flat, X, y, dtype=torch.float32)
            t0 = time.perf_counter()
            e = he.lanczos(op, k=args.k, max_iter=iters, which="LA", seed=0)
            values = np.sort(e.eigenvalues.numpy())[::-1].tolist()
            out["eigenthings"] = {
                "values": values,
                "matvecs": count.n,
                "seconds": time.perf_counter() - t0,
                "max_iter": iters,
                "rel_errors": errors(values),
                "peak_rss": peak_rss(),
            }
        except Exception as exc:
            out["eigenthings"] = {"failed": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return out


def section_slq(H, args, block: int | None, ckpt: Path | None) -> dict:
    import spectra

    kw = dict(num_probes=args.probes, num_steps=args.steps, seed=0, progress=args.progress)
    if block is not None:
        kw["block_size"] = block
    if args.reorthogonalization:
        kw["reorthogonalization"] = args.reorthogonalization
    if ckpt is not None:
        kw.update(checkpoint=ckpt / f"slq-{args.size}.ckpt", checkpoint_every=600)
    s = spectra.spectral_density(H, **kw)
    info = s.info
    top = float(np.abs(s.eigenvalues).max())
    return {
        "matvecs": info["matvecs"],
        "seconds": info["seconds"],
        "reorthogonalization": info["reorthogonalization"],
        "block_size": info["block_size"],
        "basis_bytes": info["basis_bytes"],
        "memory_budget": info["memory_budget"],
        "peak_rss": info["peak_memory_bytes"],
        "top_node": float(s.eigenvalues.max()),
        "bottom_node": float(s.eigenvalues.min()),
        "trace": float(s.trace()),
        "near_zero": s.fraction_near_zero(1e-3 * top),
        "negative": float(s.weights[s.eigenvalues < -1e-3 * top].sum()),
    }


def section_trace(H, args, block: int | None) -> dict:
    import spectra

    t = spectra.trace(
        H, num_matvecs=args.trace_matvecs, block_size=block, seed=0, progress=args.progress
    )
    return {
        "estimate": t.estimate,
        "stderr": t.stderr,
        "matvecs": t.matvecs,
        "seconds": t.seconds,
        "peak_rss": t.peak_memory_bytes,
        "block_size": "auto (memory budget)" if block is None else block,
    }


class _no_convergence_warning:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore", category=RuntimeWarning)

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


# --- report --------------------------------------------------------------------------


def report(res: dict, args) -> None:
    info = res["model"]
    print(
        f"### GPT-2 {args.size}: n = {info['n']:,} parameters, float32, {args.batch} x "
        f"{args.tokens} tokens, {torch.get_num_threads()} threads\n"
    )
    print(f"model + operator built in {info['build_s']:.1f} s, RSS {gib(info['rss'])}\n")
    print("| section | wall s | matvecs | peak RSS | notes |\n|---|---|---|---|---|")
    if "products" in res:
        h = res["products"]
        print(
            f"| first HVP (path check + graph build) | {h['hvp_first_s']:.2f} | 1 | "
            f"{gib(h['peak_rss_after_first'])} | backend {h['backend']}, cached graph "
            f"{h['cache_graph']} |"
        )
        if h.get("warmup_s"):
            print(
                f"| next {len(h['warmup_s'])} HVPs (warm-up, untimed below) | "
                + " / ".join(f"{x:.2f}" for x in h["warmup_s"])
                + f" | {len(h['warmup_s'])} "
                "| | |"
            )
        print(
            f"| gradient, plain loss.backward() | {h['grad_plain_s']:.2f} | - | | median of "
            f"{h['repeat']}, interleaved with the single HVPs |"
        )
        print(f"| gradient, operator (torch.func) | {h['grad_func_s']:.2f} | - | | |")
        print(
            f"| HVP, single vector | {h['hvp_s']:.2f} | 1 | | "
            f"{h['hvp_s'] / h['grad_plain_s']:.2f} x plain gradient |"
        )
        print(
            f"| HVP, block of {h['width']}, per vector | {h['block_per_vector_s']:.2f} | "
            f"{h['width']} | {gib(h['peak_rss'])} | "
            f"{h['block_per_vector_s'] / h['grad_plain_s']:.2f} x plain gradient; "
            f"{h['cheaper']} is cheaper per vector |"
        )
        if "rss_after_trim" in h:
            print(
                f"| (freed blocks) | | | | resident {gib(h['rss'])}, after malloc_trim "
                f"{gib(h['rss_after_trim'])} |"
            )
    if "lanczos" in res:
        r = res["lanczos"]
        conv = sum(r["converged"])
        print(
            f"| lanczos top-{args.k}, tol {r['tol']:.0e} | {r['seconds']:.1f} | {r['matvecs']} "
            f"| {gib(r['peak_rss'])} | {r['seconds'] / r['matvecs']:.2f} s/matvec; ncv "
            f"{r['ncv']}, basis {gib(r['basis_bytes'])}, {r['restarts']} restarts, "
            f"{conv}/{args.k} converged |"
        )
    if "arpack" in res:
        a = res["arpack"]
        note = f"tol {a['tol']:.0e}"
        if "within_bounds" in a:
            note += (
                f"; max abs diff to lanczos {max(a['abs_diff']):.2e}, within error bars: "
                f"{a['within_bounds']}"
            )
        print(
            f"| ARPACK eigsh(op.to_scipy(), k={args.k}) | {a['seconds']:.1f} | {a['matvecs']} "
            f"| {gib(a['peak_rss'])} | {note} |"
        )
    if "slq" in res:
        s = res["slq"]
        print(
            f"| SLQ {args.probes} probes x {args.steps} steps | {s['seconds']:.1f} | "
            f"{s['matvecs']} | {gib(s['peak_rss'])} | {s['seconds'] / s['matvecs']:.2f} "
            f"s/matvec; {s['reorthogonalization']}, block "
            f"{s['block_size']}, basis {gib(s['basis_bytes'])} of budget "
            f"{gib(s['memory_budget'])} |"
        )
    if "trace" in res:
        t = res["trace"]
        print(
            f"| Hutch++ trace, {t['matvecs']} matvecs | {t['seconds']:.1f} | {t['matvecs']} | "
            f"{gib(t['peak_rss'])} | {t['seconds'] / t['matvecs']:.2f} s/matvec; "
            f"{t['estimate']:.5g} +- {t['stderr']:.2g} (block {t['block_size']}) |"
        )
    for peer, label in (
        ("pyhessian", "PyHessian top-5 (defaults)"),
        ("eigenthings", "hessian-eigenthings Lanczos top-5"),
    ):
        r = res.get("peers", {}).get(peer)
        if r is None:
            continue
        if "failed" in r:
            print(f"| {label} | - | - | - | failed: {r['failed'][:120]} |")
            continue
        err = "" if r["rel_errors"] is None else f"max rel. error {max(r['rel_errors']):.1e}"
        print(
            f"| {label} | {r['seconds']:.1f} | {r['matvecs']} | {gib(r['peak_rss'])} | "
            f"{r['seconds'] / max(r['matvecs'], 1):.2f} s/matvec; {err} |"
        )
    if "lanczos" in res:
        r = res["lanczos"]
        print(
            "\ntop eigenvalues (residual bound):",
            ", ".join(
                f"{v:.6g} ({e:.1e})" for v, e in zip(r["eigenvalues"], r["residuals"], strict=True)
            ),
        )
    if "arpack" in res:
        print("ARPACK:", ", ".join(f"{v:.6g}" for v in res["arpack"]["eigenvalues"]))
    if "slq" in res:
        s = res["slq"]
        print(
            f"SLQ: nodes in [{s['bottom_node']:.4g}, {s['top_node']:.4g}], trace "
            f"{s['trace']:.5g}; weight within 1e-3 lambda_max of 0: {s['near_zero']:.3f}, "
            f"below -1e-3 lambda_max: {s['negative']:.3f}"
        )
    projection(res, args)


def projection(res: dict, args) -> None:
    """Projected time of the full run: per matvec as measured inside the algorithms where
    they ran, else the interleaved product measurements."""
    if "products" not in res:
        return
    h = res["products"]
    single = h["hvp_s"]
    vector = min(single, h["block_per_vector_s"])
    per = {"lanczos": single, "slq": vector, "trace": vector}
    for name in per:
        if name in res and res[name]["matvecs"]:
            per[name] = res[name]["seconds"] / res[name]["matvecs"]
    lanczos_mv = args.projected_lanczos_matvecs
    if "lanczos" in res and all(res["lanczos"]["converged"]):
        lanczos_mv = res["lanczos"]["matvecs"]
    rows = [
        ("lanczos", lanczos_mv),
        ("slq", args.probes * args.steps + 2),
        ("trace", args.trace_matvecs),
    ]
    total = h["hvp_first_s"]
    print(
        f"\nprojected time of the full run at this size (first product {h['hvp_first_s']:.0f} s; "
        f"single HVP {single:.2f} s, cheaper path {vector:.2f} s per vector, or the "
        "algorithms' own s/matvec where they ran):"
    )
    for name, mv in rows:
        total += mv * per[name]
        print(f"  {name}: {mv} matvecs x {per[name]:.2f} s = {mv * per[name] / 60:.1f} min")
    print(f"  total ~ {total / 60:.1f} min ({total / 3600:.2f} h)")


# --- accuracy of the cheaper schemes -------------------------------------------------


def accuracy(args) -> None:
    from scipy.stats import wasserstein_distance

    import spectra
    from spectra.linear_operator import CallableOperator

    from .training import trained_tanh_mlp

    model, X, y = trained_tanh_mlp((20, 48, 48, 5), samples=512, steps=300, label_noise=0.5)
    probes, steps = args.accuracy_probes, args.accuracy_steps
    print(
        f"### Cheaper reorthogonalisation against the exact spectrum: trained MLP 20-48-48-5 "
        f"(n = 3,605), {probes} probes x {steps} steps, mean of 3 seeds\n"
    )
    print(
        "| dtype | scheme | bytes / probe | W1/range to exact | W1/range to full (same "
        "probes) | L1 smoothed density to exact | max abs(Q^T Q - I), 1 probe | nodes at "
        "lambda_max, 1 probe | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.float64):
        H = spectra.hessian_operator(model, nn.CrossEntropyLoss(), (X, y), dtype=dtype)
        n = H.shape[0]
        D = H.to_dense().double()
        lam = np.linalg.eigvalsh((0.5 * (D + D.T)).numpy())
        span = lam.max() - lam.min()
        sigma = span / 200
        grid = np.linspace(lam.min() - 5 * sigma, lam.max() + 5 * sigma, 4001)
        exact_density = _smooth(lam, np.full(n, 1 / n), grid, sigma)
        schemes = ["full", "float16", "bfloat16", "local"]
        if dtype == torch.float64:
            schemes.insert(1, "float32")
        rows: dict[str, list] = {s: [] for s in schemes}
        for seed in range(3):
            full = None
            for scheme in schemes:
                t0 = time.perf_counter()
                s = spectra.spectral_density(
                    H, num_probes=probes, num_steps=steps, seed=seed, reorthogonalization=scheme
                )
                seconds = time.perf_counter() - t0
                d = _smooth(s.eigenvalues, s.weights, grid, sigma)
                full = full or (s, d)
                rows[scheme].append(
                    (
                        wasserstein_distance(s.eigenvalues, lam, u_weights=s.weights) / span,
                        wasserstein_distance(
                            s.eigenvalues, full[0].eigenvalues, s.weights, full[0].weights
                        )
                        / span,
                        np.abs(d - exact_density).sum() * (grid[1] - grid[0]),
                        s.info["basis_bytes"] / probes,
                        seconds,
                    )
                )
        for scheme in schemes:
            vecs = []

            def record(V, vecs=vecs, H=H):
                vecs.append(V[:, 0].double().clone())
                return H @ V

            op = CallableOperator(record, n, dtype=dtype)
            one = spectra.spectral_density(
                op,
                num_probes=1,
                num_steps=steps,
                seed=0,
                reorthogonalization=scheme,
                check_symmetry=False,
            )
            copies = int(np.sum(np.abs(one.eigenvalues - lam.max()) <= 1e-5 * lam.max()))
            Q = torch.stack(vecs, 1)
            orth = float((Q.T @ Q - torch.eye(Q.shape[1], dtype=torch.float64)).abs().max())
            m = np.array(rows[scheme]).mean(axis=0)
            print(
                f"| {str(dtype).replace('torch.', '')} | {scheme} | {int(m[3]):,} | {m[0]:.2e} | "
                f"{m[1]:.1e} | {m[2]:.2e} | {orth:.1e} | {copies} | {m[4]:.1f} |"
            )


def _smooth(x: np.ndarray, w: np.ndarray, grid: np.ndarray, sigma: float) -> np.ndarray:
    z = (grid[:, None] - x[None, :]) / sigma
    return (w[None, :] * np.exp(-0.5 * z * z)).sum(axis=1) / (sigma * math.sqrt(2 * math.pi))


# --- main ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="10m")
    p.add_argument("--probes", type=int, default=4)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--arpack-tol", type=float, default=1e-4)
    p.add_argument("--trace-matvecs", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--repeat",
        type=int,
        default=2,
        help="gradients and single HVPs timed (after a warm-up / the first)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="untimed single HVPs after the first, before the timed ones",
    )
    p.add_argument("--block-width", type=int, default=4)
    p.add_argument(
        "--block",
        type=int,
        default=None,
        help="SLQ / trace block size (default: 1 if single products are cheaper "
        "per vector in the block section, else the memory budget's choice)",
    )
    p.add_argument("--ncv", type=int, default=None)
    p.add_argument("--lanczos-max-matvecs", type=int, default=None)
    p.add_argument(
        "--projected-lanczos-matvecs",
        type=int,
        default=60,
        help="Lanczos matvecs assumed in the projection when it did not converge",
    )
    p.add_argument("--reorthogonalization", default=None)
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--progress", action="store_true")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="under torchrun: shard the sequences over the ranks (gloo); rank 0 reports",
    )
    p.add_argument("--accuracy", action="store_true")
    p.add_argument("--accuracy-probes", type=int, default=10)
    p.add_argument("--accuracy-steps", type=int, default=80)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.accuracy:
        accuracy(args)
        return 0
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS) - set(OPTIONAL_SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    if args.size == "124m" and "arpack" in sections:
        sections.remove("arpack")  # ARPACK's matvecs at 124M are hours on a CPU
    lead = True
    if args.distributed:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        lead = dist.get_rank() == 0
        if "arpack" in sections:
            sections.remove("arpack")  # to_scipy() is a single-process operator
    store = None
    res: dict[str, Any] = {}
    if args.checkpoint is not None and lead:
        args.checkpoint.mkdir(parents=True, exist_ok=True)
        store = args.checkpoint / f"results-{args.size}.json"
        if store.exists():
            res = json.loads(store.read_text())
            key = {
                k: v
                for k, v in vars(args).items()
                if k not in ("checkpoint", "json", "progress", "sections")
            }
            if res.get("args") != json.loads(json.dumps(key, default=str)):
                print(f"{store} was written with other arguments; delete it to start over")
                return 2

    def keep(name: str, value: dict) -> None:
        res[name] = value
        if store is not None:
            key = {
                k: v
                for k, v in vars(args).items()
                if k not in ("checkpoint", "json", "progress", "sections")
            }
            res["args"] = json.loads(json.dumps(key, default=str))
            tmp = store.with_suffix(".tmp")
            tmp.write_text(json.dumps(res, indent=1, default=str))
            os.replace(tmp, store)
        if lead:
            print(f"[{name}] {json.dumps(value, default=str)[:400]}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    model, ids, forward, H = build(args.size, args.batch, args.tokens, distributed=args.distributed)
    if "model" not in res:
        keep(
            "model",
            {
                "n": H.shape[0],
                "build_s": time.perf_counter() - t0,
                "rss": current_rss(),
                "peak_rss": peak_rss(),
            },
        )
    for name in sections:
        if name in res:
            continue
        if name == "products":
            keep(name, section_products(H, model, ids, forward, args))
        elif name == "lanczos":
            keep(name, section_lanczos(H, args, args.checkpoint))
        elif name == "arpack":
            keep(name, section_arpack(H, args, res.get("lanczos")))
        elif name == "slq":
            keep(name, section_slq(H, args, _block(res, args), args.checkpoint))
        elif name == "trace":
            keep(name, section_trace(H, args, _block(res, args)))
        elif name == "peers":
            keep(name, section_peers(model, ids, args, _peer_reference(res)))
    if lead:
        report(res, args)
        if args.json is not None:
            args.json.write_text(json.dumps(res, indent=1, default=str))
    if args.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _peer_reference(res: dict) -> dict | None:
    """ARPACK's top eigenvalues where it ran (else ours), and our Lanczos' matvecs."""
    source = res.get("arpack") or res.get("lanczos")
    if source is None:
        return None
    return {
        "eigenvalues": source["eigenvalues"],
        "lanczos_matvecs": res.get("lanczos", {}).get("matvecs"),
    }


def _block(res: dict, args) -> int | None:
    if args.block is not None:
        return args.block
    if res.get("products", {}).get("cheaper") == "single":
        return 1
    return None


if __name__ == "__main__":
    sys.exit(main())
