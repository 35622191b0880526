"""Table 1 of the paper: Entropy-SGD / Entropy-Adam against the baseline, per experiment.

    python -m figures table1 mnistfc               # full paper recipe (hours on 2 cores)
    python -m figures table1 mnistfc --quick       # 1 outer epoch each on 5k images
    python -m figures table1 char-lstm --reduced   # the documented CPU-sized variant
    python -m figures table1 lenet --device cuda   # GPU machines
    python -m figures table1 mnistfc --tuned --seeds 0 1 2   # the search's winners

Each optimizer of the pair trains through :func:`figures.harness.train` (resumable: rerun
the same command after an interruption) and the table ``<out>/<experiment>.md`` reports
the final test error (or perplexity per character / word), the effective epochs and the
wall time, next to the paper's numbers, in ``figures/out/table1-<experiment>.md``
(``-quick`` / ``-reduced`` for the variants).  ``--only`` runs one side (to run the two in
parallel processes); the table is rebuilt from whatever logs exist.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from entropy_opt import AUTHORS_CODE

from .harness import RunConfig, run_dir, train
from .recipes import PAPER, RECIPES, quick
from .search import tuned_config

__all__ = ["configs", "REDUCED", "table", "authors_conventions", "add_arguments", "run_command"]

#: CPU-sized variants (``--reduced``), documented in the README.
REDUCED: dict[str, dict[str, Any]] = {
    # char-LSTM: first 500k characters of Austen (of ~4.3M; 80/10/10 of those), Adam 5
    # epochs vs Entropy-Adam 1 epoch x L=5: the same 5 effective epochs, no LR decay yet.
    "char-lstm": {"chars": 500_000, "epochs": {"adam": 5, "entropy-adam": 1}},
    # mnistfc: 20 Adam epochs (LR / 5 at 10, 15) vs Entropy-SGD 1 epoch x L=20.
    "mnistfc": {"chars": None, "epochs": {"adam": 20, "entropy-sgd": 1}},
}


def authors_conventions(cfg: RunConfig) -> RunConfig:
    """A local-entropy config run the way the authors' public code runs it (issue 17):
    :data:`entropy_opt.AUTHORS_CODE` (alpha 0.25, sqrt(2) noise, gamma
    never scoped, the first gradient discarded, weight decay twice) and the inner loop on
    the outer momentum, as ``EntropySGD.authors_code`` does; named ``<name>-authors``.
    Other configs are returned unchanged (the baseline is shared)."""
    if not cfg.optimizer.startswith("entropy"):
        return cfg
    kw = dict(cfg.optimizer_kwargs)
    kw.update(AUTHORS_CODE)
    if cfg.optimizer == "entropy-sgd":
        kw["sgld_momentum"] = kw.get("momentum", 0.0)
        kw["sgld_nesterov"] = kw.get("nesterov", False)
    return cfg.replace(name=cfg.name + "-authors", optimizer_kwargs=kw)


def configs(
    experiment: str,
    mode: str = "full",
    conventions: str = "paper",
    search_runs: str | Path = "runs/search",
    search_seeds: tuple[int, ...] = (0, 1),
    search_fraction: float = 0.2,
) -> list[RunConfig]:
    """The pair of configs for ``experiment`` in ``mode`` "full", "reduced", "quick" or
    "tuned" (the full recipes with the winners of :mod:`figures.search`, read from
    ``search_runs``, searched with ``search_seeds`` at ``search_fraction``), with the
    local-entropy side under the paper's or the authors' ``conventions``."""
    if conventions not in ("paper", "authors"):
        raise ValueError(f"conventions must be 'paper' or 'authors', got {conventions!r}")
    if mode == "tuned" and conventions != "paper":
        raise ValueError(
            "mode='tuned' takes the settings the search found under the paper's "
            "conventions; the authors' conventions were not searched"
        )
    pair = RECIPES[experiment]
    out = []
    for opt, make in pair.items():
        if mode == "tuned":
            cfg = tuned_config(experiment, opt, search_runs, search_seeds, search_fraction)
        else:
            cfg = make()
        if conventions == "authors":
            cfg = authors_conventions(cfg)
        if mode == "quick":
            extra = {"chars": 200_000} if cfg.data == "austen" else {"train_size": 5000}
            cfg = quick(cfg, epochs=1, **extra)
        elif mode == "reduced":
            red = REDUCED[experiment]
            epochs = red["epochs"][opt]
            scale = epochs / cfg.epochs
            milestones = sorted({max(1, round(m * scale)) for m in cfg.milestones})
            extra = {"chars": red["chars"]} if red.get("chars") else {}
            cfg = quick(cfg, epochs=epochs, **extra).replace(
                name=cfg.name + "-reduced", milestones=[m for m in milestones if m < epochs]
            )
        out.append(cfg)
    return out


def _metric(row: dict[str, Any]) -> float:
    """Test perplexity for language models, test error in % otherwise."""
    return row["test_perplexity"] if "test_perplexity" in row else 100 * row["test_error"]


def _metric_text(row: dict[str, Any]) -> str:
    """The metric of a log row, with the cross-entropy for language models."""
    ce = f" (CE {row['test_loss']:.3f} nats)" if "test_perplexity" in row else ""
    return f"{_metric(row):.3f}{ce}"


def _row_text(cfg: RunConfig, log: list[dict[str, Any]]) -> str:
    last = log[-1]
    done = last["epoch"] >= cfg.epochs
    extra = "" if done else f" (partial: {last['epoch']:.2f}/{cfg.epochs} epochs)"
    return f"{_metric_text(last)}{extra}"


def _side(cfg: RunConfig) -> str:
    return "entropy" if cfg.optimizer.startswith("entropy") else "base"


def table(
    experiment: str,
    cfgs: list[RunConfig],
    path: Path,
    runs_dir: Path,
    seeds: tuple[int, ...] | None = None,
) -> str:
    """Markdown table from the runs' logs, written to ``path`` and returned (missing runs
    are reported as such, unfinished ones as partial).  With several ``seeds`` each row
    gives the mean +/- sample standard deviation over the finished runs and lists every
    seed's value; the configs' own seed is replaced by each of ``seeds`` (default: the
    configs' own seed alone)."""
    seeds = tuple(dict.fromkeys(seeds)) if seeds else (cfgs[0].seed,)
    logs: dict[tuple[int, int], list[dict[str, Any]]] = {}  # (config index, seed) -> log
    for i, cfg in enumerate(cfgs):
        for seed in seeds:
            log_path = run_dir(cfg.replace(seed=seed), runs_dir) / "log.json"
            if log_path.exists() and (log := json.loads(log_path.read_text())["log"]):
                logs[i, seed] = log
    paper = PAPER[experiment]
    lines = [
        f"## Table 1, {experiment}",
        "",
        "| optimizer | ours | effective epochs | wall time (min) | paper | paper epochs |",
        "|---|---|---|---|---|---|",
    ]
    for i, cfg in enumerate(cfgs):
        ref = paper[_side(cfg)]
        tail = f"{ref[0]} +/- {ref[1]} | {paper[_side(cfg) + '_epochs']} |"
        mine = {seed: logs[i, seed] for seed in seeds if (i, seed) in logs}
        if not mine:
            lines.append(f"| {cfg.optimizer} | not run | | | {tail}")
            continue
        last = next(iter(mine.values()))[-1]
        minutes = "/".join(f"{log[-1]['seconds'] / 60:.1f}" for log in mine.values())
        if len(seeds) == 1:
            ours = _row_text(cfg, mine[seeds[0]])
        else:
            finished = [_metric(log[-1]) for log in mine.values() if log[-1]["epoch"] >= cfg.epochs]
            each = ", ".join(f"seed {k}: {_row_text(cfg, log)}" for k, log in mine.items())
            if len(finished) >= 2:
                ours = (
                    f"{statistics.mean(finished):.3f} +/- {statistics.stdev(finished):.3f} "
                    f"({len(finished)} runs; {each})"
                )
            else:
                ours = each
        lines.append(
            f"| {cfg.optimizer} | {ours} | {last['effective_epoch']:.1f} | {minutes} | {tail}"
        )
    sides = {_side(cfg): i for i, cfg in enumerate(cfgs)}
    for seed in seeds:
        if {"base", "entropy"} <= sides.keys():
            b, e = sides["base"], sides["entropy"]
            lines += _equal_cost_line(
                cfgs[b].optimizer,
                logs.get((b, seed)),
                cfgs[e].optimizer,
                logs.get((e, seed)),
                f"seed {seed}, " if len(seeds) > 1 else "",
            )
    for cfg in cfgs:
        if cfg.name.endswith("-tuned"):  # say what the search chose, and where it is listed
            lines += [
                "",
                f"{cfg.optimizer} (tuned; see search-{experiment}.md beside this table): "
                f"{cfg.epochs} outer epochs, milestones {cfg.milestones}, model "
                f"{json.dumps(cfg.model_kwargs, sort_keys=True)}, optimizer "
                f"{json.dumps(cfg.optimizer_kwargs, sort_keys=True)}.",
            ]
    runs_text = "one run each" if len(seeds) == 1 else "mean +/- standard deviation over seeds"
    lines += [
        "",
        f"Metric: {paper['metric']} (ours: test error in %, or exp(cross-entropy) "
        f"per token with the cross-entropy in nats); {runs_text} (the paper averages "
        "4-5 runs).",
    ]
    if experiment == "char-lstm":
        lines.append(
            "The paper's char-LSTM 'perplexity' (1.22) can only be a cross-entropy in "
            "nats (exp of it would mean 0.2 nats/char); compare it with our CE."
        )
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def _equal_cost_line(
    base_name: str,
    base: list[dict[str, Any]] | None,
    ent_name: str,
    ent: list[dict[str, Any]] | None,
    label: str = "",
) -> list[str]:
    """The baseline's metric at the local-entropy run's last effective epoch (the paper's
    claim is about equal cost: Figs. 4-6 share the effective-epoch axis); nothing until
    both runs exist and the baseline has got that far."""
    if not base or not ent:
        return []
    cost = ent[-1]["effective_epoch"]
    if base[-1]["effective_epoch"] < cost - 1e-9:
        return []
    earlier = [row for row in base if row["effective_epoch"] <= cost + 1e-9]
    if not earlier:
        return []
    row = earlier[-1]
    return [
        "",
        f"At equal cost ({label}{row['effective_epoch']:.1f} vs {cost:.1f} effective "
        f"epochs): {base_name} {_metric_text(row)}, {ent_name} {_metric_text(ent[-1])}.",
    ]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``python -m figures table1`` (besides the shared ones of
    :mod:`figures.cli`)."""
    p.add_argument("experiment", choices=sorted(RECIPES))
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="1 outer epoch on a data subset")
    mode.add_argument("--reduced", action="store_true", help="the CPU-sized variant (REDUCED)")
    mode.add_argument(
        "--tuned",
        action="store_true",
        help="the full recipes with the winners of `python -m figures search` "
        "(read from --search-runs); runs and table get a -tuned suffix",
    )
    p.add_argument(
        "--search-runs",
        default="runs/search",
        help="the search's run directories (the committed logs of finished trials are in "
        "figures/out/search-runs)",
    )
    p.add_argument("--search-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--search-fraction", type=float, default=0.2)
    p.add_argument("--only", help="run just this optimizer of the pair")
    p.add_argument("--runs", default=None, help="run directories (default <out>/table1/runs)")
    p.add_argument("--table-only", action="store_true", help="rebuild the table from logs")
    p.add_argument(
        "--max-effective-epochs",
        type=float,
        default=None,
        help="stop (resumably) at this many effective epochs, e.g. 25 to run the "
        "first half of the 50-epoch char-LSTM baseline",
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="train / tabulate these seeds (default 0); several give mean +/- std",
    )
    p.add_argument(
        "--conventions",
        choices=("paper", "authors"),
        default="paper",
        help="run Entropy-SGD/-Adam as Algorithm 1 says (paper) or as the authors' "
        "code does (authors: runs and table get an -authors suffix)",
    )


def run_command(args: argparse.Namespace) -> int:
    """``python -m figures table1``: train the pair (resumably) and print the table; tables
    go to ``<out>/table1-<experiment>[-<mode>][-authors].md``."""
    mode_name = (
        "quick" if args.quick else "reduced" if args.reduced else "tuned" if args.tuned else "full"
    )
    try:
        cfgs = configs(
            args.experiment,
            mode_name,
            args.conventions,
            args.search_runs,
            tuple(args.search_seeds),
            args.search_fraction,
        )
    except ValueError as exc:  # an unfinished search: say so before any training
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    runs = Path(args.runs) if args.runs else out / "table1" / "runs"
    if not args.table_only:
        for cfg in (c.replace(seed=seed) for seed in dict.fromkeys(args.seeds) for c in cfgs):
            if args.only and cfg.optimizer != args.only:
                continue
            train(
                cfg,
                runs,
                device=args.device,
                progress=not args.no_progress,
                max_effective_epochs=args.max_effective_epochs,
            )
    suffix = "" if mode_name == "full" else f"-{mode_name}"
    suffix += "-authors" if args.conventions == "authors" else ""
    print(
        table(
            args.experiment,
            cfgs,
            out / f"table1-{args.experiment}{suffix}.md",
            runs,
            tuple(args.seeds),
        )
    )
    return 0
