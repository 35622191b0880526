"""The one command line: ``python -m figures <command> [options]``.

Figures: ``python -m figures <name>|all|list [--preset P] [--device D] [--out DIR]
[--no-cache] [--dry-run] [--threads N] [--only-runs K ...]``.  ``all`` makes every figure in order (fig1,
fig2, fig3a, fig3b, fig3c, fisher-compare) and prints a summary table and the total wall
time; ``list`` names the figures, experiments and presets; ``--dry-run`` prints each
figure's plan (parameters, runs, samples, memory against what is free) without training.

Optimizer experiments (not part of ``all``), each with its own options
(``python -m figures <experiment> --help``): ``compare`` (flatness of the minima of SGD,
Adam, Entropy-SGD and SAM), ``table1`` (the paper's Table 1), ``curves`` (Figs 4-6 from
the runs' logs) and ``search`` (the reduced-budget hyper-parameter search).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from . import catalog, compare, curves, presets, search, spectrum_figure, table1
from .datasets import MissingDataError
from .report import summary_table
from .request import FigureRequest

__all__ = ["main", "parser", "EXPERIMENTS"]

#: Experiment -> (what it is, its options, what runs it).
EXPERIMENTS: dict[
    str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
] = {
    "compare": (
        "flatness of the minima of several optimizers",
        compare.add_arguments,
        compare.run_command,
    ),
    "table1": ("the paper's Table 1, resumable runs", table1.add_arguments, table1.run_command),
    "curves": ("Figs 4-6 from the runs' logs", curves.add_arguments, curves.run_command),
    "search": (
        "the reduced-budget hyper-parameter search",
        search.add_arguments,
        search.run_command,
    ),
}


def _figure_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--preset", default="default", choices=list(presets.PRESETS))
    p.add_argument("--out", default="figures/out", help="output folder (cache in <out>/cache)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--dry-run", action="store_true", help="print the plan, compute nothing")
    p.add_argument(
        "--only-runs",
        type=int,
        nargs="+",
        default=(),
        metavar="K",
        help="spectrum figures: compute only runs K... (numbered from 1) into the cache and "
        "write no figure, so that several processes can share a figure's runs; a later call "
        "without it writes the figure from the cache",
    )
    p.add_argument(
        "--runs-dir",
        default=None,
        metavar="DIR",
        help="spectrum figures: read finished runs of the same problem from DIR instead of "
        "computing them, and store each run computed there (<figure>-run<K>.json/.npz), "
        "to make a figure from runs computed on other machines",
    )
    _device_options(
        p,
        "(default: 1 for the small presets, where per-op threading only adds overhead; "
        "all cores for 'paper')",
    )
    return p


def _experiment_options(with_device: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--out", default="figures/out", help="output folder")
    if with_device:
        _device_options(p, "(default: torch's)")
        p.add_argument("--no-progress", action="store_true")
    return p


def _device_options(p: argparse.ArgumentParser, threads_default: str) -> None:
    """``--device`` and ``--threads``, the same for every command that computes."""
    p.add_argument("--device", default="cpu", help="cpu or cuda (e.g. cuda:1)")
    p.add_argument(
        "--threads", type=int, default=None, help=f"torch intra-op threads {threads_default}"
    )


def parser() -> argparse.ArgumentParser:
    """The parser of every command."""
    p = argparse.ArgumentParser(
        prog="python -m figures",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    commands = p.add_subparsers(dest="command", required=True, metavar="command")
    figure_options = _figure_options()
    for name in (*catalog.FIGURES, "all", "list"):
        commands.add_parser(
            name, parents=[figure_options], help=f"make {name}" if name in catalog.FIGURES else None
        )
    for name, (what, add_arguments, _) in EXPERIMENTS.items():
        sub = commands.add_parser(
            name, help=what, description=what, parents=[_experiment_options(name != "curves")]
        )
        add_arguments(sub)
    return p


def _figures(args: argparse.Namespace) -> int:
    if args.command == "list":
        print("figures:", ", ".join(catalog.FIGURES))
        print("experiments (own options, not in 'all'):", ", ".join(EXPERIMENTS))
        print("presets:", ", ".join(presets.PRESETS))
        return 0
    names = list(catalog.FIGURES) if args.command == "all" else [args.command]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.runs_dir is not None and args.command not in spectrum_figure.TITLES:
        print(
            f"error: --runs-dir applies to one spectrum figure "
            f"({', '.join(spectrum_figure.TITLES)}), not to {args.command!r}",
            file=sys.stderr,
        )
        return 2
    only_runs = tuple(args.only_runs)
    if only_runs:
        keeps = not args.no_cache or args.runs_dir is not None
        problem = _only_runs_problem(args.command, args.preset, only_runs, keeps)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    threads = args.threads or (torch.get_num_threads() if args.preset == "paper" else 1)
    torch.set_num_threads(threads)
    if args.dry_run:
        for name in names:
            print(json.dumps(catalog.plan(name, args.preset, args.device), default=str))
        return 0
    t0 = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        print(f"== {name} (preset {args.preset}) ==", flush=True)
        try:
            request = FigureRequest(
                args.preset,
                args.out,
                args.device,
                not args.no_cache,
                only_runs=only_runs,
                runs_dir=args.runs_dir,
            )
            results[name] = catalog.run(name, request)
        except MissingDataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if results[name].get("partial"):
            done = ", ".join(str(k) for k in only_runs)
            where = args.runs_dir or f"{args.out}/cache"
            print(
                f"   runs {done} of {results[name]['runs_total']} are in {where} "
                f"({results[name]['seconds']:.1f} s); the figure is written by a call "
                "without --only-runs once every run is there",
                flush=True,
            )
            return 0
        print(
            f"   wrote {args.out}/{name}.png/.pdf/.json in {results[name]['seconds']:.1f} s",
            flush=True,
        )
    print()
    print(summary_table(results))
    print(
        f"\ntotal wall time: {time.perf_counter() - t0:.1f} s (preset {args.preset}, "
        f"{threads} torch thread{'s' if threads > 1 else ''})"
    )
    return 0


def _only_runs_problem(
    command: str, preset: str, only_runs: tuple[int, ...], use_cache: bool
) -> str | None:
    """What is wrong with ``--only-runs`` here (None: nothing), checked before any work."""
    if command not in spectrum_figure.TITLES:
        return (
            f"--only-runs applies to one spectrum figure ({', '.join(spectrum_figure.TITLES)}), "
            f"not to {command!r}"
        )
    try:
        spectrum_figure.selected_runs(only_runs, presets.get(preset, command).runs, use_cache)
    except ValueError as exc:
        return str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (2 for a bad command line)."""
    try:
        args = parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as exc:  # argparse has printed the usage and the error
        return int(exc.code or 0)
    if args.command in EXPERIMENTS:
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        return EXPERIMENTS[args.command][2](args)
    return _figures(args)
