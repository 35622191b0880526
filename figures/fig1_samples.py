"""Fig 1's near-zero fraction against the number of Hessian samples (issue 15).

    python -m figures.fig1_samples 100 400 1000 2500      # default preset, ~20 min on 2 cores
    python -m figures.fig1_samples 500 --preset paper --runs 1   # the paper size, first run

Each sample count N runs Fig 1 of ``--preset`` (default: "default") with ``n_hessian = N``
(the first N training images; training is unchanged, so every N sees the same weights) into
``--out`` (its own folder, default /tmp/fig1-samples) and writes the table
``figures/out/fig1-samples.md``: N, the GGN rank bound N(C - 1) and the fraction it forces to
zero, and the near-zero fractions per run.  ``--runs K`` keeps the preset's first K runs
(the same seeds, so the same trained weights as the figure's first K runs): at the paper
size each point costs hours of Hessian build per run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from . import catalog, presets
from .request import FigureRequest


def sweep(counts: list[int], preset: str, out: str, runs: int | None = None) -> list[dict]:
    """One Fig 1 per sample count (the preset's first ``runs`` runs, default all);
    returns a row of statistics per count."""
    base = presets.get(preset, "fig1")
    if runs is not None:
        if not 1 <= runs <= base.runs:
            raise ValueError(f"runs must be in 1..{base.runs} (the {preset} preset's), got {runs}")
        base = dataclasses.replace(base, runs=runs)
    rows = []
    for n in counts:
        name = f"{preset}-n_hessian-{n}"
        data = dataclasses.replace(
            base.data, n_hessian=n, hessian_batch=min(n, base.data.hessian_batch)
        )
        presets.PRESETS[name] = {"fig1": dataclasses.replace(base, data=data)}
        t = time.perf_counter()
        try:  # a preset of its own only while it runs (and names its cache entries)
            s = catalog.run("fig1", FigureRequest(name, out, progress=False))
        finally:
            del presets.PRESETS[name]
        rows.append(
            {
                "n_hessian": n,
                "minutes": (time.perf_counter() - t) / 60,
                "n_params": s["n_params"],
                "bound": s["sample_rank_bound"],
                "near_zero": [r["fraction_near_zero"] for r in s["runs"]],
                "near_zero_1e-2": [r["fraction_near_zero_at"]["0.01"] for r in s["runs"]],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict], preset: str) -> str:
    """Markdown table of :func:`sweep`'s rows."""
    lines = [
        f"## Fig 1 ({preset} preset) near-zero fraction against the Hessian's sample count",
        "",
        f"{rows[0]['n_params']:,} parameters, {len(rows[0]['near_zero'])} of the preset's "
        "runs, the first N training images; "
        "`python -m figures.fig1_samples " + " ".join(str(r["n_hessian"]) for r in rows) + "`.",
        "",
        "| N | GGN rank bound min(n, N(C-1)) | forced zero by N | |λ| ≤ 1e-4 per run | mean "
        "| |λ| ≤ 1e-2 mean | minutes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        runs = " / ".join(f"{100 * x:.1f}%" for x in r["near_zero"])
        mean = sum(r["near_zero"]) / len(r["near_zero"])
        mean2 = sum(r["near_zero_1e-2"]) / len(r["near_zero_1e-2"])
        forced = 100 * r["bound"]["fraction_forced_zero_by_samples"]
        lines.append(
            f"| {r['n_hessian']:,} | {r['bound']['ggn_rank_bound']:,} | {forced:.1f}% | {runs} "
            f"| {100 * mean:.1f}% | {100 * mean2:.1f}% | {r['minutes']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m figures.fig1_samples", description=__doc__)
    p.add_argument("counts", type=int, nargs="+")
    p.add_argument("--preset", default="default")
    p.add_argument("--out", default="/tmp/fig1-samples")
    p.add_argument("--table", default="figures/out/fig1-samples.md")
    p.add_argument("--runs", type=int, default=None, help="the preset's first K runs only")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = sweep(args.counts, args.preset, args.out, args.runs)
    Path(args.table).write_text(table(rows, args.preset))


if __name__ == "__main__":
    main()
