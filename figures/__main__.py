"""Command line: ``python -m figures <name>|all|list [--preset P] [--device D] [--out DIR]
[--no-cache] [--dry-run] [--threads N]``.

``all`` makes every figure in order (fig1, fig2, fig3a, fig3b, fig3c, fisher-compare) and
prints a summary table and the total wall time; ``list`` names the figures and presets;
``--dry-run`` prints each figure's plan (parameters, runs, samples, memory against what is
free) without training.  ``compare``, ``table1`` and ``curves`` run the optimizer
experiments with their own options (``python -m figures compare --help``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from typing import Any

import torch

from . import presets
from .data import MissingDataError
from .report import summary_table

MODULES = {name: f"figures.{name}" for name in presets.FIGURES}
MODULES["fisher-compare"] = "figures.fig_fisher_compare"  # a name that is no module name


def _module(name: str) -> Any:
    return importlib.import_module(MODULES[name])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m figures", description=__doc__.split("\n\n")[1])
    p.add_argument("name", help=f"one of {', '.join(MODULES)}, 'all' or 'list'")
    p.add_argument("--preset", default="default", help=f"one of {', '.join(presets.PRESETS)}")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", default="figures/out", help="output folder (cache in <out>/cache)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--dry-run", action="store_true", help="print the plan, compute nothing")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: 1 for the small presets, where "
                        "per-op threading only adds overhead; all cores for 'paper')")
    return p


#: Experiments with their own command lines (training harness, issue 7), not part of ``all``:
#: ``python -m figures compare|table1|curves [their options]``.
EXPERIMENTS = {"compare": "figures.compare", "table1": "figures.table1", "curves": "figures.curves",
               "search": "figures.search"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in EXPERIMENTS:
        importlib.import_module(EXPERIMENTS[argv[0]]).main(argv[1:])
        return 0
    args = _parser().parse_args(argv)
    if args.name == "list":
        print("figures:", ", ".join(MODULES))
        print("experiments (own options, not in 'all'):", ", ".join(EXPERIMENTS))
        print("presets:", ", ".join(presets.PRESETS))
        return 0
    names = list(MODULES) if args.name == "all" else [args.name]
    unknown = [n for n in names if n not in MODULES]
    if unknown:
        print(f"error: unknown figure {unknown[0]!r}; valid: {', '.join(MODULES)}, all, list",
              file=sys.stderr)
        return 2
    if args.preset not in presets.PRESETS:
        print(f"error: unknown preset {args.preset!r}; valid: {', '.join(presets.PRESETS)}",
              file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    threads = args.threads or (torch.get_num_threads() if args.preset == "paper" else 1)
    torch.set_num_threads(threads)

    if args.dry_run:
        for name in names:
            mod = _module(name)
            plan = mod.plan(args.preset, args.device) if hasattr(mod, "plan") else \
                {"figure": name, "preset": args.preset, "note": "quadrature only, < 1 s"}
            print(json.dumps(plan, default=str))
        return 0

    t0 = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        print(f"== {name} (preset {args.preset}) ==", flush=True)
        try:
            results[name] = _module(name).run(args.preset, args.out, args.device,
                                              not args.no_cache)
        except MissingDataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"   wrote {args.out}/{name}.png/.pdf/.json in {results[name]['seconds']:.1f} s",
              flush=True)
    print()
    print(summary_table(results))
    print(f"\ntotal wall time: {time.perf_counter() - t0:.1f} s (preset {args.preset}, "
          f"{threads} torch thread{'s' if threads > 1 else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
