"""A small, stated hyper-parameter search for Table 1 at a reduced budget (issue 17).

    python -m figures search mnistfc --side entropy --threads 1 --runs runs/search
    python -m figures search char-lstm --side base --threads 1 --runs runs/search
    python -m figures search mnistfc --table-only        # rebuild the table from logs

What is searched and why.  Our copy of the paper lost some values (mnistfc's dropout for
both optimizers and Entropy-SGD's outer momentum; Entropy-Adam's learning rate) and states
others (gamma, L) that a reader would want to see varied.  :data:`SPACES` lists, per
experiment and optimizer, the factors in the order they are searched and the values tried;
the recipe's own value comes first.  The search is coordinate-wise: each factor in turn is
set to the value with the best mean *validation* metric over the seeds (test data are
never looked at), holding the factors already searched at their best values.

Budget.  Every run is the full recipe compressed to ``fraction`` (default 20%) of its
effective epochs: outer epochs ``= fraction x epochs x L_recipe / L`` (must be whole),
LR milestones scaled by the same factor (rounded; those that fall on epoch 0 or the end
are dropped) and, for exponential scoping, the rate raised so that gamma ends where the full
run's would (a variant with another L keeps the recipe's schedule in effective epochs at
full length, and is compressed from that).  The baseline is searched at the same fraction of its own budget, so neither
side gets more tuning than the other.  Runs resume like any :func:`figures.harness.train`
run; the table ``figures/out/search-<experiment>.md`` lists every run.  The logs of finished
trials are also kept (committed) under ``figures/out/search-runs/``: where the run folders
are gone, ``cp -r figures/out/search-runs/* runs/search/`` lets the search skip them.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .harness import RunConfig, run_dir, train
from .recipes import RECIPES

__all__ = [
    "SPACES",
    "Factor",
    "compress",
    "apply",
    "search",
    "table",
    "add_arguments",
    "run_command",
    "best_settings",
    "tuned_config",
    "grid_edges",
]


@dataclass(frozen=True)
class Factor:
    """One searched hyper-parameter: where it lives in a :class:`RunConfig` (``"model"``
    for ``model_kwargs``, ``"optimizer"`` for ``optimizer_kwargs``), its key, and the
    values tried (the recipe's value first)."""

    where: str
    key: str
    values: tuple[Any, ...]


#: experiment -> optimizer -> factors in search order.
SPACES: dict[str, dict[str, tuple[Factor, ...]]] = {
    "mnistfc": {
        "entropy-sgd": (
            Factor("model", "dropout", (0.15, 0.0, 0.3, 0.5)),  # lost in our copy
            Factor("optimizer", "momentum", (0.9, 0.5)),  # lost in our copy
            Factor("optimizer", "gamma", (1e-4, 3e-5, 3e-4)),  # stated: 1e-4
            Factor("optimizer", "L", (20, 10, 5)),  # stated: 20
        ),
        "adam": (
            Factor("model", "dropout", (0.5, 0.15, 0.3)),  # lost in our copy
            Factor("optimizer", "lr", (1e-3, 5e-4, 2e-3)),  # stated: 1e-3
        ),
    },
    "char-lstm": {
        "entropy-adam": (
            # lost in our copy; 4e-2 added when 2e-2 won at the edge
            Factor("optimizer", "lr", (2e-3, 5e-3, 1e-2, 2e-2, 4e-2)),
            Factor("optimizer", "gamma", (1e-2, 3e-3, 3e-2)),  # stated: 0.01
        ),
        "adam": (
            # stated: 2e-3; 8e-3, 1.6e-2 and 3.2e-2 added while the winner sat at the edge
            Factor("optimizer", "lr", (2e-3, 1e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2)),
        ),
    },
}


def _calls(cfg: RunConfig) -> int:
    return int(cfg.optimizer_kwargs.get("L", 1)) if cfg.optimizer.startswith("entropy") else 1


def apply(cfg: RunConfig, settings: dict[tuple[str, str], Any]) -> RunConfig:
    """``cfg`` with ``{(where, key): value}`` set in its model or optimizer kwargs."""
    model_kwargs, opt_kwargs = dict(cfg.model_kwargs), dict(cfg.optimizer_kwargs)
    for (where, key), value in settings.items():
        target = model_kwargs if where == "model" else opt_kwargs
        if where not in ("model", "optimizer"):
            raise ValueError(f"a factor lives in 'model' or 'optimizer', not {where!r}")
        target[key] = value
    return cfg.replace(model_kwargs=model_kwargs, optimizer_kwargs=opt_kwargs)


def compress(full: RunConfig, cfg: RunConfig, fraction: float) -> RunConfig:
    """``cfg`` (a variant of the recipe ``full``) at ``fraction`` of ``full``'s effective
    epochs, its schedule compressed to match (module docstring); named ``<name>-search``."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    budget = fraction * full.epochs * _calls(full)
    epochs = budget / _calls(cfg)
    if abs(epochs - round(epochs)) > 1e-9 or round(epochs) < 1:
        raise ValueError(
            f"{fraction:g} of {full.name}'s {full.epochs * _calls(full)} effective "
            f"epochs is {epochs:g} outer epochs at L={_calls(cfg)}; choose a "
            "fraction or L that makes it a whole number"
        )
    epochs = round(epochs)
    scale = epochs / full.epochs
    milestones = sorted({round(m * scale) for m in full.milestones} - {0})
    kw = dict(cfg.optimizer_kwargs)
    if kw.get("scoping") == "exponential" and kw.get("scoping_rate") and fraction != 1:
        # the variant's full-length run makes 1/fraction times as many steps
        kw["scoping_rate"] = (1 + kw["scoping_rate"]) ** (1 / fraction) - 1
    return cfg.replace(
        name=cfg.name + "-search",
        epochs=epochs,
        milestones=[m for m in milestones if m < epochs],
        optimizer_kwargs=kw,
    )


def _val_metric(row: dict[str, Any]) -> float:
    """Validation error (images) or cross-entropy in nats (text): lower is better."""
    return row["val_loss"] if "val_perplexity" in row else row["val_error"]


def _test_metric(row: dict[str, Any]) -> float:
    return row["test_loss"] if "test_perplexity" in row else 100 * row["test_error"]


def _log(cfg: RunConfig, runs: Path) -> list[dict[str, Any]] | None:
    path = run_dir(cfg, runs) / "log.json"
    if not path.exists():
        return None
    log = json.loads(path.read_text())["log"]
    return log if log and log[-1]["epoch"] >= cfg.epochs - 1e-9 else None


@dataclass
class Trial:
    """One setting of the search and its finished runs (seed -> log)."""

    factor: str
    settings: dict[tuple[str, str], Any]
    config: RunConfig
    logs: dict[int, list[dict[str, Any]]]

    @property
    def val(self) -> float:
        return statistics.mean(_val_metric(log[-1]) for log in self.logs.values())


def search(
    experiment: str,
    optimizer: str,
    runs: str | Path,
    seeds: Sequence[int] = (0, 1),
    fraction: float = 0.2,
    run: bool = True,
    device: str = "cpu",
    progress: bool = True,
    on_trial: Callable[[list[Trial]], None] | None = None,
) -> list[Trial]:
    """Run (or, with ``run=False``, read) the coordinate search of ``SPACES[experiment]
    [optimizer]``; returns every trial in order.  A trial whose runs are missing stops a
    read-only search at that factor (later factors depend on its outcome).  ``on_trial``
    is called with the trials so far after each new one (e.g. to rewrite the table)."""
    runs = Path(runs)
    full = RECIPES[experiment][optimizer]()
    best: dict[tuple[str, str], Any] = {}
    trials: list[Trial] = []
    seen: dict[str, Trial] = {}
    for factor in SPACES[experiment][optimizer]:
        candidates = []
        for value in factor.values:
            settings = {**best, (factor.where, factor.key): value}
            cfg = compress(full, apply(full, settings), fraction)
            digest = cfg.digest()
            if digest in seen:  # the incumbent, already run under an earlier factor
                candidates.append((value, seen[digest]))
                continue
            logs = {}
            for seed in seeds:
                c = cfg.replace(seed=seed)
                if run and _log(c, runs) is None:
                    train(c, runs, device=device, progress=progress)
                if (log := _log(c, runs)) is not None:
                    logs[seed] = log
            trial = Trial(f"{factor.where}.{factor.key}", settings, cfg, logs)
            trials.append(trial)
            seen[digest] = trial
            candidates.append((value, trial))
            if on_trial is not None:
                on_trial(trials)
        if any(len(t.logs) < len(seeds) for _, t in candidates):
            break
        # The value, not the trial's settings: an incumbent reused from an earlier factor
        # was run before this factor was set, so its settings do not name it.
        best[factor.where, factor.key] = min(candidates, key=lambda vt: vt[1].val)[0]
    return trials


def table(
    experiment: str,
    results: dict[str, list[Trial]],
    seeds: Sequence[int],
    fraction: float,
    path: Path,
) -> str:
    """Markdown: every trial with its settings, per-seed and mean validation metric, the
    test metric (reported, not used to choose) and the wall time; the best per optimizer."""
    lines = [
        f"## Hyper-parameter search, {experiment} ({fraction:.0%} of each recipe's "
        f"effective epochs, seeds {', '.join(map(str, seeds))})",
        "",
    ]
    for optimizer, trials in results.items():
        lines += [
            f"### {optimizer}",
            "",
            "| searched | setting | outer epochs | milestones | val (mean) | val per seed "
            "| test (mean) | min per run |",
            "|---|---|---|---|---|---|---|---|",
        ]
        finished = [t for t in trials if len(t.logs) == len(seeds)]
        for t in trials:
            setting = ", ".join(f"{k}={v:g}" for (_, k), v in t.settings.items())
            if not t.logs:
                lines.append(
                    f"| {t.factor} | {setting} | {t.config.epochs} | "
                    f"{t.config.milestones} | not run | | | |"
                )
                continue
            per_seed = ", ".join(f"{_val_metric(log[-1]):.4f}" for log in t.logs.values())
            test = statistics.mean(_test_metric(log[-1]) for log in t.logs.values())
            minutes = statistics.mean(log[-1]["seconds"] / 60 for log in t.logs.values())
            lines.append(
                f"| {t.factor} | {setting} | {t.config.epochs} | {t.config.milestones}"
                f" | {t.val:.4f} | {per_seed} | {test:.3f} | {minutes:.1f} |"
            )
        if finished:
            best = min(finished, key=lambda t: t.val)
            so_far = "" if len(finished) == len(trials) else " so far"
            setting = ", ".join(f"{k}={v:g}" for (_, k), v in best.settings.items())
            lines += [
                "",
                f"Best {optimizer}{so_far} by mean validation metric: {setting} "
                f"(val {best.val:.4f}).",
            ]
            edges = grid_edges(experiment, optimizer, best.settings)
            if edges:
                lines += [
                    "",
                    "At the edge of the values tried (the optimum may lie beyond): "
                    + "; ".join(edges)
                    + ".",
                ]
        lines.append("")
    metric = (
        "val: cross-entropy in nats/char; test: CE in nats/char"
        if experiment == "char-lstm"
        else "val: error (fraction); test: error in %"
    )
    lines.append(
        f"Metric: {metric}.  Coordinate search in the order listed (figures/search.py "
        "SPACES); the schedule is compressed to the budget (see the module)."
    )
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return text


def grid_edges(experiment: str, optimizer: str, settings: dict[tuple[str, str], Any]) -> list[str]:
    """The searched numeric factors whose chosen value is the smallest or largest tried
    (a factor the settings do not name is at the recipe's value, its first)."""
    edges = []
    for factor in SPACES[experiment][optimizer]:
        values = [v for v in factor.values if isinstance(v, int | float)]
        if len(values) < 3 or len(values) != len(factor.values):
            continue  # two values have no interior; categorical factors have no edge
        chosen = settings.get((factor.where, factor.key), factor.values[0])
        if chosen in (min(values), max(values)):
            which = "largest" if chosen == max(values) else "smallest"
            edges.append(f"{factor.key} = {chosen:g} is the {which} of {sorted(values)}")
    return edges


def best_settings(trials: list[Trial], seeds: Sequence[int]) -> dict[tuple[str, str], Any] | None:
    """The winning settings of a finished search, None while any trial is missing."""
    if not trials or any(len(t.logs) < len(seeds) for t in trials):
        return None
    return min(trials, key=lambda t: t.val).settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``python -m figures search`` (besides the shared ones of
    :mod:`figures.cli`)."""
    p.add_argument("experiment", choices=sorted(SPACES))
    p.add_argument(
        "--side",
        choices=("entropy", "base", "both"),
        default="both",
        help="search the local-entropy optimizer, the baseline, or both",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--fraction", type=float, default=0.2)
    p.add_argument("--runs", default="runs/search")
    p.add_argument("--table-only", action="store_true")


def run_command(args: argparse.Namespace) -> int:
    """``python -m figures search``: run the search (resumably) and print its table,
    ``<out>/search-<experiment>.md``, rewritten after every trial."""
    path = Path(args.out) / f"search-{args.experiment}.md"
    names = list(SPACES[args.experiment])
    results: dict[str, list[Trial]] = {}
    for optimizer in names:  # read everything first so the table is complete
        results[optimizer] = search(
            args.experiment, optimizer, args.runs, args.seeds, args.fraction, run=False
        )
    for optimizer in names:
        side = "entropy" if optimizer.startswith("entropy") else "base"
        if args.table_only or args.side not in (side, "both"):
            continue

        def rewrite(trials: list[Trial], optimizer: str = optimizer) -> None:
            table(args.experiment, {**results, optimizer: trials}, args.seeds, args.fraction, path)

        results[optimizer] = search(
            args.experiment,
            optimizer,
            args.runs,
            args.seeds,
            args.fraction,
            run=True,
            device=args.device,
            progress=not args.no_progress,
            on_trial=rewrite,
        )
    print(table(args.experiment, results, args.seeds, args.fraction, path))
    return 0


def tuned_config(
    experiment: str,
    optimizer: str,
    runs: str | Path,
    seeds: Sequence[int] = (0, 1),
    fraction: float = 0.2,
) -> RunConfig:
    """The full-length recipe of ``optimizer`` with the search's winning settings, named
    ``<recipe name>-tuned``.

    A winning ``L`` keeps the recipe's effective epochs (outer epochs and LR milestones
    rescaled as in :func:`compress` at fraction 1).  The search must be finished (every
    trial's runs, read from ``runs`` with the search's ``seeds`` and ``fraction``);
    otherwise ``ValueError`` names the command that finishes it, since a half-searched
    setting would be reported as tuned.
    """
    trials = search(experiment, optimizer, runs, seeds, fraction, run=False)
    settings = best_settings(trials, seeds)
    if settings is None:
        done = sum(len(t.logs) == len(seeds) for t in trials)
        raise ValueError(
            f"the {optimizer} search of {experiment} in {runs} is not finished ({done} of "
            f"the {len(trials)} trials read so far have all of seeds {list(seeds)}); run "
            f"`python -m figures search {experiment} --runs {runs} --seeds "
            f"{' '.join(map(str, seeds))} --fraction {fraction:g}` first (the committed logs "
            "of finished trials are in figures/out/search-runs: copy them into the runs "
            "folder, or pass it as the runs folder)"
        )
    full = RECIPES[experiment][optimizer]()
    return compress(full, apply(full, settings), 1.0).replace(name=full.name + "-tuned")
