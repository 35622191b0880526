"""The flatness comparison: SGD, Adam, Entropy-SGD and SAM from one initialisation.

    python -m figures compare                       # small-mnistfc (hidden 4), exact spectra
    python -m figures compare --hidden 16           # wider; exact spectra take minutes
    python -m figures compare --model mnistfc       # Lanczos (top) + SLQ (density) + Hutch++
    python -m figures compare --model small-lenet --width 0.25

Python API: ``compare(CompareConfig(...))`` returns a :class:`Comparison` (rows, spectra,
markdown table, the :class:`spectra.FlatnessTable`, figure paths).

Training.  Every optimizer trains through :func:`figures.harness.train` from the same
seeded initialisation for the same budget of *effective epochs* (gradient evaluations /
batches per pass).  The budget of each is read from the optimizer itself: it is built
from its keyword arguments and asked for ``gradient_evaluations_per_step`` (SAM 2,
Entropy-SGD ``L``, its default ``L = 20`` when the kwargs leave ``L`` out), and it gets
``effective_epochs / that`` outer epochs.

Measurement.  This script is a client of :func:`spectra.compare_minima`: the
initialisation and every minimum are measured by :func:`spectra.flatness` with the same
settings on ``spectrum_samples`` fixed training images (the Hessian of their mean loss, in
eval mode): exactly (``method="exact"``) for the small models, matrix-free
(``"matrix-free"``: Lanczos for the extremes, Hutch++ for the trace, SLQ for the rest)
for ``--model mnistfc``.  The table shows the report's measures: test error, the loss f
at the minimum on those samples, top eigenvalue, trace, fraction of |lambda| <=
``near_zero_tol``, negative mass, the Laplace local entropy
``-f - 1/2 sum log(1 + lambda / gamma)`` for each gamma (see :mod:`spectra.local_entropy`;
eigenvalues <= -gamma are excluded and counted), and two measures that do not change when
a ReLU layer is scaled by a and the next by 1/a (which the spectrum ones do): the
adaptive sharpness at ``sharpness_rho`` (:mod:`spectra.sharpness`) and the relative
flatness of the last linear layer (:mod:`spectra.relative_flatness`).  Matrix-free
values carry their error bars (Lanczos residuals, Hutch++ and probe-to-probe SLQ
standard errors).

Outputs (``<out>`` defaults to ``figures/out``): ``compare-<model>.md`` (the table),
``compare-<model>.json`` (config, rows and every report's measures with their
uncertainties and details), ``compare-<model>-spectra.png`` (overlaid spectra at the
minima), ``compare-<model>-before-after.png`` (initialisation vs minimum per optimizer);
under ``<out>/compare/<model>/``: the runs (``runs/``), each spectrum
(``spectrum-<label>.npz``) and each flatness report (``flatness-<label>.json``,
:meth:`spectra.FlatnessReport.load` reads it).

Without MNIST in ``data/`` the comparison falls back to synthetic images (and says so).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

import spectra

from . import datasets as D
from .harness import RunConfig, RunResult, setup_run, train
from .loop import calls_per_step, cross_entropy
from .optimizers import build_optimizer

__all__ = [
    "CompareConfig",
    "Comparison",
    "compare",
    "measure",
    "DEFAULT_OPTIMIZERS",
    "add_arguments",
    "run_command",
]

DEFAULT_OPTIMIZERS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 0.1, "momentum": 0.9, "nesterov": True},
    "adam": {"lr": 1e-3},
    "entropy-sgd": {
        "lr": 1.0,
        "momentum": 0.9,
        "nesterov": True,
        "L": 5,
        "sgld_lr": 0.1,
        "noise": 1e-4,
        "gamma": 0.03,
        "scoping": "exponential",
        "scoping_rate": 1e-3,
    },
    "sam": {"lr": 0.1, "momentum": 0.9, "nesterov": True, "rho": 0.05},
}

#: Label of the shared initialisation among the measured points (spectra, reports).
INIT = "init"


@dataclass
class CompareConfig:
    """What to compare.

    Attributes:
        model: ``"small-mnistfc"`` (default), ``"small-lenet"`` or ``"mnistfc"``.
        hidden / width: model size: hidden units of small-mnistfc (default 4, so the five
            exact spectra of n = 3,190 take about a minute on 2 busy cores) or mnistfc
            (default 1024); small-lenet's width (default 0.25).
        train_size: training images (default 5000; plus 1000 held out for validation).
        test_size: test images (default 2000).
        effective_epochs: budget per optimizer (default 10); a multiple of every
            optimizer's gradient evaluations per step.
        batch_size: mini-batch size (default 128).
        spectrum_samples: training images the Hessian averages over (default 500).
        optimizers: name -> keyword arguments (default :data:`DEFAULT_OPTIMIZERS`).
        gammas: scopes for the Laplace local entropy.
        near_zero_tol: |lambda| below this counts as zero (default 1e-4, Fig. 1's).
        sharpness_rho: radius of the adaptive sharpness (relative to |w|; default 0.05);
            None leaves the sharpness out.
        sharpness: its kinds, ``"worst"`` (20 ascent steps, a lower bound; default)
            and/or ``"average"`` (Monte Carlo over the |w|-scaled Gaussian).
        relative_flatness: measure the relative flatness of the last linear layer
            (default True).
        lanczos_k / slq_probes / slq_steps / trace_matvecs: matrix-free settings
            (``lanczos_k`` is also how many top eigenvalues the exact reports list).
        seed: one initialisation and data order for all; also seeds the stochastic
            estimates.
        synthetic: use synthetic images even if MNIST is present.
    """

    model: str = "small-mnistfc"
    hidden: int | None = None
    width: float = 0.25
    train_size: int = 5000
    test_size: int = 2000
    effective_epochs: int = 10
    batch_size: int = 128
    spectrum_samples: int = 500
    optimizers: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {k: dict(v) for k, v in DEFAULT_OPTIMIZERS.items()}
    )
    gammas: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)
    near_zero_tol: float = 1e-4
    sharpness_rho: float | None = 0.05
    sharpness: tuple[str, ...] = ("worst",)
    relative_flatness: bool = True
    lanczos_k: int = 5
    slq_probes: int = 4
    slq_steps: int = 60
    trace_matvecs: int = 60
    seed: int = 0
    synthetic: bool = False

    @property
    def exact(self) -> bool:
        return self.model != "mnistfc"

    def model_kwargs(self) -> dict[str, Any]:
        if self.model == "small-mnistfc":
            return {"hidden": self.hidden or 4}
        if self.model == "small-lenet":
            return {"width": self.width}
        if self.model == "mnistfc":
            return {"hidden": self.hidden or 1024}
        raise ValueError(
            f"compare supports small-mnistfc, small-lenet, mnistfc; got {self.model!r}"
        )

    def gradient_evaluations_per_step(self, optimizer: str) -> int:
        """What the optimizer, built from its keyword arguments (on a stand-in parameter),
        says one step costs: its ``gradient_evaluations_per_step``, 1 if it says nothing."""
        probe = [nn.Parameter(torch.zeros(1))]
        return calls_per_step(build_optimizer(optimizer, probe, self.optimizers[optimizer]))

    def run_config(self, optimizer: str, data: str) -> RunConfig:
        """The harness config of one optimizer: same seed, model, data, budget."""
        kw = dict(self.optimizers[optimizer])
        per_step = self.gradient_evaluations_per_step(optimizer)
        if self.effective_epochs % per_step:
            raise ValueError(
                f"effective_epochs={self.effective_epochs} is not a multiple of "
                f"{optimizer}'s {per_step} gradient evaluations per step"
            )
        data_kwargs: dict[str, Any] = {"val_size": 1000}
        if data == "mnist":
            data_kwargs.update(train_size=self.train_size, test_size=self.test_size)
        else:
            data_kwargs.update(n=self.train_size + 1000 + self.test_size, test_size=self.test_size)
        return RunConfig(
            name=f"compare-{self.model}-{optimizer}",
            model=self.model,
            model_kwargs=self.model_kwargs(),
            data=data,
            data_kwargs=data_kwargs,
            optimizer=optimizer,
            optimizer_kwargs=kw,
            epochs=self.effective_epochs // per_step,
            batch_size=self.batch_size,
            seed=self.seed,
        )

    def flatness_options(self, model: nn.Module | None = None) -> dict[str, Any]:
        """The keyword arguments of :func:`spectra.flatness` / :func:`spectra.compare_minima`
        for this config (``model`` names the last linear layer for the relative flatness)."""
        opts: dict[str, Any] = dict(
            method="exact" if self.exact else "matrix-free",
            top_k=self.lanczos_k,
            near_zero_tols=(self.near_zero_tol,),
            gammas=tuple(self.gammas),
            rhos=() if self.sharpness_rho is None else (self.sharpness_rho,),
            sharpness=tuple(self.sharpness),
            slq_probes=self.slq_probes,
            slq_steps=self.slq_steps,
            trace_matvecs=self.trace_matvecs,
            seed=self.seed,
        )
        layer = last_linear_weight(model) if self.relative_flatness and model else None
        if layer is not None:
            opts["feature_layer"] = layer
        return opts


@dataclass
class Comparison:
    """Result of :func:`compare`: one row per optimizer (plus the initialisation), the
    spectra by label, the markdown table, the output paths, and the
    :class:`spectra.FlatnessTable` behind them (``flatness.reports[label]``)."""

    rows: list[dict[str, Any]]
    spectra: dict[str, spectra.Spectrum]
    table: str
    paths: dict[str, Path]
    data: str
    seconds: float
    flatness: spectra.FlatnessTable


def last_linear_weight(model: nn.Module) -> str | None:
    """Parameter name of the last ``nn.Linear``'s weight (the relative-flatness layer)."""
    names = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


def measure(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    cfg: CompareConfig,
    name: str,
    progress: bool = False,
) -> spectra.FlatnessReport:
    """:func:`spectra.flatness` of one point with ``cfg``'s settings (eval mode)."""
    return spectra.flatness(
        model, cross_entropy, data, name=name, progress=progress, **cfg.flatness_options(model)
    )


def _row(
    label: str, report: spectra.FlatnessReport, cfg: CompareConfig, run: RunResult | None
) -> dict[str, Any]:
    row: dict[str, Any] = {"optimizer": label, "test_error": None}
    if run is not None:
        last = run.final
        row.update(
            test_error=last["test_error"],
            effective_epochs=last["effective_epoch"],
            gradient_evaluations_per_step=last["L"],
            steps=last["steps"],
            train_seconds=last["seconds"],
        )
    row.update(n_params=report.info["n_params"], method=report.info["method"])
    row.update(report)
    for g in cfg.gammas:
        row[f"excluded@{g:g}"] = report.measure(f"local_entropy@{g:g}").details["excluded"]
    return row


def _cell(report: spectra.FlatnessReport, key: str, spec: str) -> str:
    """``value`` or, for an estimate (not exact) with an error bar, ``value +/- error``."""
    m = report.measure(key)
    text = format(m.value, spec)
    err = m.uncertainty
    if m.method != "exact" and err:
        text += f" +/- {err:.2g}"
    return text


def _markdown(
    rows: list[dict[str, Any]], table: spectra.FlatnessTable, cfg: CompareConfig, data: str
) -> str:
    tol = f"near_zero_fraction@{cfg.near_zero_tol:g}"
    extra = [
        c for c in table.columns if c.startswith(("adaptive_sharpness@", "average_sharpness@"))
    ]
    names = {
        c: c.replace("adaptive_sharpness", "adapt. sharpness").replace(
            "average_sharpness", "avg. sharpness"
        )
        for c in extra
    }
    if "relative_flatness" in table.columns:
        extra.append("relative_flatness")
        names["relative_flatness"] = "rel. flatness"
    g_cols = [f"F@{g:g} (excl.)" for g in cfg.gammas]
    head = [
        "optimizer",
        "test error (%)",
        "f at x",
        "top eig",
        "trace",
        f"frac abs<={cfg.near_zero_tol:g}",
        "neg. mass",
        *g_cols,
        *(names[c] for c in extra),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r, report in zip(rows, table.reports.values(), strict=True):
        err = "" if r.get("test_error") is None else f"{100 * r['test_error']:.2f}"
        cells = [
            r["optimizer"],
            err,
            _cell(report, "loss", ".4f"),
            _cell(report, "top_eigenvalue", ".4g"),
            _cell(report, "trace", ".4g"),
            _cell(report, tol, ".3f"),
            _cell(report, "negative_mass", ".3g"),
        ]
        cells += [
            f"{_cell(report, f'local_entropy@{g:g}', '.1f')} ({r[f'excluded@{g:g}']:.0f})"
            for g in cfg.gammas
        ]
        cells += [_cell(report, c, ".3g") for c in extra]
        lines.append("| " + " | ".join(cells) + " |")
    first = next(iter(table.reports.values()))
    note = (
        f"\n{cfg.model} {cfg.model_kwargs()}, data: {data} ({cfg.train_size} training "
        f"images), {cfg.effective_epochs} effective epochs each, one initialisation (seed "
        f"{cfg.seed}); measured by spectra.compare_minima on the Hessian of the mean "
        f"training loss on the first training images: {table.provenance()}. "
        "F@gamma = -f - 1/2 sum log(1 + lambda/gamma) (Laplace local entropy without "
        "the constant n/2 log(2 pi/gamma); higher = flatter), eigenvalues <= -gamma "
        "excluded (count in parentheses)."
    )
    kinds = []
    if any(c.startswith("adaptive_sharpness@") for c in extra):
        kinds.append("adapt. = the worst case, the best of 20 ascent steps (a lower bound)")
    if any(c.startswith("average_sharpness@") for c in extra):
        kinds.append("avg. = the average over Gaussian perturbations (Monte Carlo)")
    if kinds:
        note += (
            " Sharpness@rho: the rise of the loss under perturbations of relative size "
            f"rho (|eps_i| scaled by |w_i|, Kwon et al. 2021); {'; '.join(kinds)}."
        )
    if "relative_flatness" in extra:
        layer = first.measure("relative_flatness").details.get("layer")
        note += f" Rel. flatness: Petzka et al.'s kappa_Tr of {layer} (the last linear layer)."
    if extra:
        note += (
            " These are unchanged when a ReLU layer is scaled by a and the next by 1/a; "
            "the spectrum measures are not."
        )
    note += "\n"
    if not cfg.exact:
        note += (
            "Matrix-free: top eigenvalue from Lanczos (+/- its residual), trace from "
            "Hutch++ (+/- its standard error), the rest from the SLQ quadrature (Gauss "
            "nodes and weights; +/- the probe-to-probe standard error): the near-zero "
            "fraction is the weight of nodes within the tolerance and the excluded "
            "counts are node weights x n, both coarse at SLQ's resolution; sum log(1 + "
            "lambda/gamma) is the SLQ estimate of tr log(I + H/gamma).\n"
        )
    return "\n".join(lines) + "\n" + note


def _figures(spec: dict[str, spectra.Spectrum], stem: Path, cfg: CompareConfig) -> dict[str, Path]:
    labels = [k for k in spec if k != INIT]
    paths = {}
    if cfg.exact:
        fig = spectra.plot.spectrum(
            [spec[k] for k in labels],
            labels=labels,
            near_zero_tol=cfg.near_zero_tol,
            title=f"Hessian spectra at the minima ({cfg.model})",
        )
    else:
        fig = spectra.plot.density([spec[k] for k in labels], labels=labels)
    paths["spectra"] = stem.with_name(stem.name + "-spectra.png")
    fig.savefig(paths["spectra"], dpi=120, bbox_inches="tight")
    fig = Figure(figsize=(4 * len(labels), 3.4))
    axes = fig.subplots(1, len(labels), squeeze=False)[0]
    lo = min(float(s.eigenvalues[0]) for s in spec.values())
    hi = max(float(s.eigenvalues[-1]) for s in spec.values())
    edges = np.linspace(lo, hi, 61)
    for ax, k in zip(axes, labels, strict=True):
        for key, color in ((INIT, "0.6"), (k, "C0")):
            counts, _ = spec[key].histogram(bins=edges)
            ax.stairs(
                counts, edges, color=color, label="initialisation" if key == INIT else "minimum"
            )
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.8)
        ax.set_title(k)
        ax.set_xlabel("eigenvalue")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("count")
    paths["before_after"] = stem.with_name(stem.name + "-before-after.png")
    fig.savefig(paths["before_after"], dpi=120, bbox_inches="tight")
    return paths


def compare(
    cfg: CompareConfig | None = None,
    out_dir: str | Path = "figures/out",
    *,
    device: str = "cpu",
    progress: bool = True,
) -> Comparison:
    """Train each optimizer of ``cfg`` from one initialisation and compare the minima."""
    cfg = cfg or CompareConfig()
    if not cfg.optimizers:
        raise ValueError("CompareConfig.optimizers is empty: nothing to compare")
    t0 = time.perf_counter()
    out = Path(out_dir) / "compare" / cfg.model
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(out_dir) / f"compare-{cfg.model}"
    data = "synthetic-images" if cfg.synthetic else "mnist"
    if data == "mnist":
        try:
            D.load_mnist(split="test")
        except D.MissingDataError:
            data = "synthetic-images"
    configs = {opt: cfg.run_config(opt, data) for opt in cfg.optimizers}  # all checked first
    runs = {
        opt: train(rc, out / "runs", device=device, progress=progress)
        for opt, rc in configs.items()
    }
    first = next(iter(runs.values()))
    x, y = first.task.splits["train"]
    sample = (x[: cfg.spectrum_samples], y[: cfg.spectrum_samples])
    init_model, _ = setup_run(first.config)  # the shared initialisation, rebuilt from the seed
    models = {INIT: init_model, **{opt: r.model.cpu() for opt, r in runs.items()}}
    table = spectra.compare_minima(
        models, cross_entropy, sample, progress=progress, **cfg.flatness_options(init_model)
    )
    rows = [
        _row("(initialisation)" if k == INIT else k, report, cfg, runs.get(k))
        for k, report in table.reports.items()
    ]
    spec = {k: report.spectrum for k, report in table.reports.items()}
    for k, report in table.reports.items():
        report.spectrum.save(out / f"spectrum-{k}.npz")
        report.save(out / f"flatness-{k}.json")
    markdown = _markdown(rows, table, cfg, data)
    paths = {"table": stem.with_suffix(".md"), "results": stem.with_suffix(".json")}
    paths["table"].write_text(markdown)
    reports = {
        k: {key: v for key, v in r.to_dict().items() if key != "spectrum"}
        for k, r in table.reports.items()
    }
    paths["results"].write_text(
        json.dumps(
            {"config": asdict(cfg), "data": data, "rows": rows, "reports": reports},
            indent=1,
            default=str,
        )
    )
    paths.update(_figures(spec, stem, cfg))
    return Comparison(rows, spec, markdown, paths, data, time.perf_counter() - t0, table)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``python -m figures compare`` (besides the shared ones of
    :mod:`figures.cli`)."""
    d = CompareConfig()
    p.add_argument("--model", default=d.model, choices=["small-mnistfc", "small-lenet", "mnistfc"])
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--width", type=float, default=d.width)
    p.add_argument("--train-size", type=int, default=d.train_size)
    p.add_argument("--effective-epochs", type=int, default=d.effective_epochs)
    p.add_argument("--spectrum-samples", type=int, default=d.spectrum_samples)
    p.add_argument(
        "--optimizers",
        default=",".join(d.optimizers),
        help="comma-separated subset of " + ",".join(DEFAULT_OPTIMIZERS),
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--synthetic", action="store_true")


def run_command(a: argparse.Namespace) -> int:
    """``python -m figures compare``: run :func:`compare` and print the table."""
    names = [o for o in a.optimizers.split(",") if o]
    unknown = set(names) - set(DEFAULT_OPTIMIZERS)
    if unknown:
        raise SystemExit(f"error: unknown optimizers {sorted(unknown)}")
    cfg = CompareConfig(
        model=a.model,
        hidden=a.hidden,
        width=a.width,
        train_size=a.train_size,
        effective_epochs=a.effective_epochs,
        spectrum_samples=a.spectrum_samples,
        optimizers={k: dict(DEFAULT_OPTIMIZERS[k]) for k in names},
        seed=a.seed,
        synthetic=a.synthetic,
    )
    result = compare(cfg, a.out, device=a.device, progress=not a.no_progress)
    print(result.table)
    print(f"wrote {', '.join(str(v) for v in result.paths.values())} in {result.seconds:.0f} s")
    return 0
