"""Figs. 4-6: validation error (or perplexity) against effective epochs, from harness logs.

    python -m figures curves                                   # every pair found
    python -m figures curves --runs figures/out/table1/runs --out figures/out

Each experiment of :data:`figures.recipes.RECIPES` whose runs exist under ``--runs`` (the
full run of each recipe if there is one, else its newest reduced or quick run, plus any
variant ``<recipe name>-<suffix>`` such as an ablation; see :func:`pick_runs`) gets one
figure ``<out>/<fig>-<experiment>.png`` (``fig4a-mnistfc``, ``fig4b-lenet``,
``fig5-allcnn``, ``fig6a-ptb``, ``fig6b-char-lstm``): validation (solid) and test (dashed) error in %, or
perplexity for language models, against effective epochs (epochs x L, Sec. 5.2), one
colour per optimizer, plus the training loss in a second panel (Fig. 5a).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .recipes import RECIPES

__all__ = ["FIGURE", "pick_runs", "plot_pair", "write_curves", "add_arguments", "run_command"]

#: the paper's panel for each experiment
FIGURE = {
    "mnistfc": "fig4a",
    "lenet": "fig4b",
    "allcnn": "fig5",
    "ptb": "fig6a",
    "char-lstm": "fig6b",
}


def _label(directory_name: str, log_config: dict[str, Any]) -> str:
    label = directory_name.rsplit("-", 1)[0]  # drop the config digest
    seed = log_config.get("seed", 0)
    return label if not seed else f"{label} seed {seed}"


def _shortened(label: str) -> str | None:
    """The label without its ``-quick`` / ``-reduced`` suffix, None if it has none."""
    for suffix in ("-quick", "-reduced"):
        if suffix in label:
            return label.replace(suffix, "", 1)
    return None


def pick_runs(runs: Path, name: str) -> dict[str, list[dict[str, Any]]]:
    """The logs to plot for recipe run ``name``, keyed by label (the run name, plus the seed
    if not 0): every full run, i.e. the recipe's and its variants ``<name>-<suffix>`` (e.g.
    an ablation ``-lr1e-2`` made through the Python API), and for each of them that has no
    full run its newest ``-reduced`` / ``-quick`` run."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for d in sorted(runs.glob(name + "*"), key=lambda p: p.stat().st_mtime):  # oldest first
        f = d / "log.json"
        if not f.exists():
            continue
        content = json.loads(f.read_text())
        if content["log"]:
            label = _label(d.name, content.get("config", {}))
            by_label.pop(label, None)  # re-insert, so the order is oldest to newest
            by_label[label] = content["log"]
    out = {k: v for k, v in by_label.items() if _shortened(k) is None}
    newest_short: dict[str, str] = {}
    for k in by_label:
        full = _shortened(k)
        if full is not None and full not in out:
            newest_short[full] = k  # later = newer
    out.update({k: by_label[k] for k in newest_short.values()})
    return out


def plot_pair(logs: dict[str, list[dict[str, Any]]], title: str) -> Figure:
    """Validation/test metric and train loss against effective epochs, one line per log."""
    fig = Figure(figsize=(10, 3.8))
    ax, axl = fig.subplots(1, 2)
    for i, (label, log) in enumerate(logs.items()):
        x = [r["effective_epoch"] for r in log]
        lang = "val_perplexity" in log[0]
        key = "perplexity" if lang else "error"
        scale = 1 if lang else 100
        color = f"C{i}"
        ax.plot(x, [scale * r[f"val_{key}"] for r in log], color=color, label=f"{label} (val)")
        ax.plot(
            x,
            [scale * r[f"test_{key}"] for r in log],
            color=color,
            ls="--",
            alpha=0.6,
            label=f"{label} (test)",
        )
        axl.plot(x, [r["train_loss"] for r in log], color=color, label=label)
        ax.set_ylabel("perplexity" if lang else "error (%)")
    for a in (ax, axl):
        a.set_xlabel("effective epochs (epochs x L)")
        a.grid(alpha=0.3)
    ax.set_title(f"{title}: validation / test")
    axl.set_title(f"{title}: training loss")
    axl.set_yscale("log")
    ax.legend(fontsize=7)
    return fig


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``python -m figures curves`` (besides ``--out``)."""
    p.add_argument("--runs", default="figures/out/table1/runs")


def run_command(a: argparse.Namespace) -> int:
    """``python -m figures curves``: one figure per experiment with runs (:func:`write_curves`)."""
    write_curves(Path(a.runs), Path(a.out))
    return 0


def write_curves(runs: Path, out: Path) -> list[Path]:
    """``<out>/<fig>-<experiment>.png`` for every experiment with runs under ``runs``;
    returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for experiment, pair in RECIPES.items():
        logs: dict[str, list[dict[str, Any]]] = {}
        for make in pair.values():
            logs.update(pick_runs(runs, make().name))
        if logs:
            path = out / f"{FIGURE[experiment]}-{experiment}.png"
            plot_pair(logs, experiment).savefig(path, dpi=120, bbox_inches="tight")
            written.append(path)
            print(f"wrote {path} ({', '.join(logs)})")
    if not written:
        print(f"no runs found under {runs}")
    return written
