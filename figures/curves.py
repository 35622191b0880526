"""Figs. 4-6: validation error (or perplexity) against effective epochs, from harness logs.

    python -m figures.curves                                   # every pair found
    python -m figures.curves --runs figures/out/table1/runs --out figures/out

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

__all__ = ["FIGURE", "load_logs", "pick_runs", "plot_pair", "main"]

#: the paper's panel for each experiment
FIGURE = {"mnistfc": "fig4a", "lenet": "fig4b", "allcnn": "fig5", "ptb": "fig6a",
          "char-lstm": "fig6b"}


def load_logs(runs: Path, prefix: str) -> dict[str, list[dict[str, Any]]]:
    """Logs of runs whose directory name starts with ``prefix``, keyed by directory name."""
    out = {}
    for d in sorted(runs.glob(prefix + "*"), key=lambda p: p.stat().st_mtime):
        f = d / "log.json"
        if f.exists():
            out[d.name] = json.loads(f.read_text())["log"]
    return out


def _label(directory_name: str) -> str:
    return directory_name.rsplit("-", 1)[0]  # drop the config digest


def pick_runs(runs: Path, name: str) -> dict[str, list[dict[str, Any]]]:
    """The logs to plot for recipe run ``name``, keyed by label: the full run if there is
    one (else the newest ``-reduced`` / ``-quick`` one), plus every other variant
    ``<name>-<suffix>`` (e.g. an ablation ``-lr1e-2`` made through the Python API)."""
    found = load_logs(runs, name)
    by_label: dict[str, list[dict[str, Any]]] = {}
    for directory, log in found.items():  # oldest first: the newest of a label wins
        if log:
            label = _label(directory)
            by_label.pop(label, None)  # re-insert, so the order is oldest to newest
            by_label[label] = log
    shortened = [k for k in by_label if k.endswith(("-quick", "-reduced"))]
    keep = [] if name in by_label or not shortened else shortened[-1:]
    return {k: v for k, v in by_label.items() if k not in shortened or k in keep}


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
        ax.plot(x, [scale * r[f"test_{key}"] for r in log], color=color, ls="--", alpha=0.6,
                label=f"{label} (test)")
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


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(prog="python -m figures.curves", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="figures/out/table1/runs")
    p.add_argument("--out", default="figures/out")
    a = p.parse_args(argv)
    runs, out = Path(a.runs), Path(a.out)
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


if __name__ == "__main__":
    main()
