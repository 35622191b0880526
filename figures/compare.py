"""The flatness comparison: SGD, Adam, Entropy-SGD and SAM from one initialisation.

    python -m figures.compare                       # small-mnistfc (hidden 4), exact spectra
    python -m figures.compare --hidden 16           # wider; exact spectra take minutes
    python -m figures.compare --model mnistfc       # Lanczos (top) + SLQ (density) + Hutch++
    python -m figures.compare --model small-lenet --width 0.25

Python API: ``compare(CompareConfig(...))`` returns a :class:`Comparison` (rows, spectra,
markdown table, figure paths).

Every optimizer trains through :func:`figures.harness.train` from the same seeded
initialisation for the same budget of *effective epochs* (gradient evaluations / batches
per pass: SAM gets half the steps, Entropy-SGD ``1/L`` of them).  At each minimum the
Hessian of the mean training loss on ``spectrum_samples`` fixed training images is
diagonalised exactly (small models) or probed matrix-free (``--model mnistfc``), in eval
mode.  Reported side by side: test error, the loss f at the minimum on those samples, top
eigenvalue, trace, fraction of |lambda| <= ``near_zero_tol``, negative mass and the
Laplace local entropy ``-f - 1/2 sum log(1 + lambda / gamma)`` for each gamma (see
:mod:`spectra.local_entropy`; eigenvalues <= -gamma are excluded and counted).
Outputs (``<out>`` defaults to ``figures/out``): ``compare-<model>.md`` (the table),
``compare-<model>.json`` (all numbers and the config), ``compare-<model>-spectra.png``
(overlaid spectra at the minima), ``compare-<model>-before-after.png`` (initialisation vs
minimum per optimizer); the runs and each spectrum (``.npz``) under
``<out>/compare/<model>/``.

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
from spectra.local_entropy import laplace_table

from . import data as D
from .harness import RunConfig, build_task, setup_run, train

__all__ = ["CompareConfig", "Comparison", "compare", "main", "DEFAULT_OPTIMIZERS"]

DEFAULT_OPTIMIZERS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 0.1, "momentum": 0.9, "nesterov": True},
    "adam": {"lr": 1e-3},
    "entropy-sgd": {"lr": 1.0, "momentum": 0.9, "nesterov": True, "L": 5, "sgld_lr": 0.1,
                    "noise": 1e-4, "gamma": 0.03, "scoping": "exponential",
                    "scoping_rate": 1e-3},
    "sam": {"lr": 0.1, "momentum": 0.9, "nesterov": True, "rho": 0.05},
}


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
        effective_epochs: budget per optimizer (default 10).
        batch_size: mini-batch size (default 128).
        spectrum_samples: training images the Hessian averages over (default 500).
        optimizers: name -> keyword arguments (default :data:`DEFAULT_OPTIMIZERS`).
        gammas: scopes for the Laplace local entropy.
        near_zero_tol: |lambda| below this counts as zero (default 1e-4, Fig. 1's).
        lanczos_k / slq_probes / slq_steps / trace_matvecs: matrix-free settings.
        seed: one initialisation and data order for all.
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
    optimizers: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        k: dict(v) for k, v in DEFAULT_OPTIMIZERS.items()})
    gammas: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)
    near_zero_tol: float = 1e-4
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
        raise ValueError(f"compare supports small-mnistfc, small-lenet, mnistfc; got {self.model!r}")

    def run_config(self, optimizer: str, data: str) -> RunConfig:
        """The harness config of one optimizer: same seed, model, data, budget."""
        kw = dict(self.optimizers[optimizer])
        per_step = kw.get("L", 1) if optimizer.startswith("entropy") else 2 if optimizer == "sam" else 1
        if self.effective_epochs % per_step:
            raise ValueError(f"effective_epochs={self.effective_epochs} is not a multiple of "
                             f"{optimizer}'s {per_step} gradient evaluations per step")
        data_kwargs: dict[str, Any] = {"val_size": 1000}
        if data == "mnist":
            data_kwargs.update(train_size=self.train_size, test_size=self.test_size)
        else:
            data_kwargs.update(n=self.train_size + 1000 + self.test_size,
                               test_size=self.test_size)
        return RunConfig(
            name=f"compare-{self.model}-{optimizer}", model=self.model,
            model_kwargs=self.model_kwargs(), data=data, data_kwargs=data_kwargs,
            optimizer=optimizer, optimizer_kwargs=kw,
            epochs=self.effective_epochs // per_step, batch_size=self.batch_size,
            seed=self.seed)


@dataclass
class Comparison:
    """Result of :func:`compare`: one row per optimizer (plus the initialisation), the
    spectra by label, the markdown table and the output paths."""

    rows: list[dict[str, Any]]
    spectra: dict[str, spectra.Spectrum]
    table: str
    paths: dict[str, Path]
    data: str
    seconds: float


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, y)


def measure(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], cfg: CompareConfig,
            name: str) -> tuple[spectra.Spectrum, dict[str, Any]]:
    """The spectrum at the model's weights and its statistics (eval mode)."""
    model.eval()
    if cfg.exact:
        s = spectra.exact_spectrum(model, _loss, data, name=name, progress=False)
        stats = {"top": float(s.top(1)[0]), "trace": s.trace(), "method": "exact"}
    else:
        from spectra.density import spectral_density
        from spectra.lanczos import lanczos
        from spectra.trace import trace

        op = spectra.hessian_operator(model, _loss, data)
        top = lanczos(op, cfg.lanczos_k, which="LA", tol=1e-4, max_matvecs=400,
                      return_eigenvectors=False, progress=False)
        s = spectral_density(op, num_probes=cfg.slq_probes, num_steps=cfg.slq_steps,
                             name=name, progress=False)
        tr = trace(op, num_matvecs=cfg.trace_matvecs, progress=False)
        with torch.no_grad():
            loss = float(_loss(model(data[0]), data[1]))
        s = spectra.Spectrum(s.eigenvalues, s.weights, n_params=s.n_params, kind=s.kind,
                             loss=loss, name=name, info=s.info)
        stats = {"top": float(top.eigenvalues.max()), "trace": float(tr.estimate),
                 "trace_stderr": float(tr.stderr), "method": "lanczos+slq+hutch++",
                 # |theta - lambda| <= residual for some eigenvalue: the top's error bar
                 "top_residual": float(top.residuals[0]),
                 "top_converged": bool(top.converged[0])}
    stats.update(
        loss=s.loss, n_params=s.n_params,
        fraction_near_zero=s.fraction_near_zero(cfg.near_zero_tol),
        fraction_negative=s.fraction_negative(), negative_mass=s.negative_mass())
    for g, le in laplace_table(s, cfg.gammas).items():
        stats[f"F_laplace@{g:g}"] = le.value
        stats[f"excluded@{g:g}"] = le.excluded
    return s, stats


def _markdown(rows: list[dict[str, Any]], cfg: CompareConfig, data: str) -> str:
    g_cols = [f"F@{g:g} (excl.)" for g in cfg.gammas]
    head = ["optimizer", "test error (%)", "f at x", "top eig", "trace",
            f"frac abs<={cfg.near_zero_tol:g}", "neg. mass", *g_cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        err = "" if r.get("test_error") is None else f"{100 * r['test_error']:.2f}"
        cells = [r["optimizer"], err, f"{r['loss']:.4f}", f"{r['top']:.4g}",
                 f"{r['trace']:.4g}", f"{r['fraction_near_zero']:.3f}",
                 f"{r['negative_mass']:.3g}"]
        cells += [f"{r[f'F_laplace@{g:g}']:.1f} ({r[f'excluded@{g:g}']:.0f})" for g in cfg.gammas]
        lines.append("| " + " | ".join(cells) + " |")
    n = rows[0]["n_params"]
    note = (f"\n{cfg.model} {cfg.model_kwargs()} (n = {n:,} parameters), data: {data} "
            f"({cfg.train_size} training images), {cfg.effective_epochs} effective epochs "
            f"each, one initialisation (seed {cfg.seed}); Hessian of the mean training "
            f"loss on {cfg.spectrum_samples} training images, {rows[0]['method']}. "
            "F@gamma = -f - 1/2 sum log(1 + lambda/gamma) (Laplace local entropy without "
            "the constant n/2 log(2 pi/gamma); higher = flatter), eigenvalues <= -gamma "
            "excluded (count in parentheses).\n")
    if not cfg.exact:
        note += ("Matrix-free: top eigenvalue from Lanczos, trace from Hutch++, the rest from "
                 "the SLQ quadrature (Gauss nodes and weights): the near-zero fraction is "
                 "the weight of nodes within the tolerance and the excluded counts are "
                 "node weights x n, both coarse at SLQ's resolution; sum log(1 + lambda/"
                 "gamma) is the SLQ estimate of tr log(I + H/gamma).\n")
    return "\n".join(lines) + "\n" + note


def _figures(spec: dict[str, spectra.Spectrum], stem: Path, cfg: CompareConfig
             ) -> dict[str, Path]:
    labels = [k for k in spec if k != "init"]
    paths = {}
    if cfg.exact:
        fig = spectra.plot.spectrum([spec[k] for k in labels], labels=labels,
                                    near_zero_tol=cfg.near_zero_tol,
                                    title=f"Hessian spectra at the minima ({cfg.model})")
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
        for key, color in (("init", "0.6"), (k, "C0")):
            counts, _ = spec[key].histogram(bins=edges)
            ax.stairs(counts, edges, color=color,
                      label="initialisation" if key == "init" else "minimum")
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.8)
        ax.set_title(k)
        ax.set_xlabel("eigenvalue")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("count")
    paths["before_after"] = stem.with_name(stem.name + "-before-after.png")
    fig.savefig(paths["before_after"], dpi=120, bbox_inches="tight")
    return paths


def compare(cfg: CompareConfig | None = None, out_dir: str | Path = "figures/out",
            *, device: str = "cpu", progress: bool = True) -> Comparison:
    """Train each optimizer of ``cfg`` from one initialisation and compare the minima."""
    cfg = cfg or CompareConfig()
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
    first = cfg.run_config(next(iter(cfg.optimizers)), data)
    x, y = build_task(first).splits["train"]
    sample = (x[: cfg.spectrum_samples], y[: cfg.spectrum_samples])
    spec: dict[str, spectra.Spectrum] = {}
    rows: list[dict[str, Any]] = []
    for opt in cfg.optimizers:
        rc = cfg.run_config(opt, data)
        res = train(rc, out / "runs", device=device, progress=progress)
        model = res.model.cpu()
        if not spec:  # the shared initialisation, rebuilt from the seed
            init_model, _ = setup_run(rc)
            s, stats = measure(init_model, sample, cfg, "init")
            spec["init"] = s
            rows.append({"optimizer": "(initialisation)", "test_error": None, **stats})
        s, stats = measure(model, sample, cfg, opt)
        spec[opt] = s
        rows.append({"optimizer": opt, "test_error": res.final["test_error"],
                     "effective_epochs": res.final["effective_epoch"],
                     "train_seconds": res.final["seconds"], **stats})
    for k, s in spec.items():
        s.save(out / f"spectrum-{k}.npz")
    table = _markdown(rows, cfg, data)
    paths = {"table": stem.with_suffix(".md"), "results": stem.with_suffix(".json")}
    paths["table"].write_text(table)
    paths["results"].write_text(json.dumps(
        {"config": asdict(cfg), "data": data, "rows": rows}, indent=1, default=str))
    paths.update(_figures(spec, stem, cfg))
    return Comparison(rows, spec, table, paths, data, time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> Comparison:
    p = argparse.ArgumentParser(prog="python -m figures.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = CompareConfig()
    p.add_argument("--model", default=d.model, choices=["small-mnistfc", "small-lenet", "mnistfc"])
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--width", type=float, default=d.width)
    p.add_argument("--train-size", type=int, default=d.train_size)
    p.add_argument("--effective-epochs", type=int, default=d.effective_epochs)
    p.add_argument("--spectrum-samples", type=int, default=d.spectrum_samples)
    p.add_argument("--optimizers", default=",".join(d.optimizers),
                   help="comma-separated subset of " + ",".join(DEFAULT_OPTIMIZERS))
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", default="figures/out")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    names = [o for o in a.optimizers.split(",") if o]
    unknown = set(names) - set(DEFAULT_OPTIMIZERS)
    if unknown:
        p.error(f"unknown optimizers {sorted(unknown)}")
    cfg = CompareConfig(
        model=a.model, hidden=a.hidden, width=a.width, train_size=a.train_size,
        effective_epochs=a.effective_epochs, spectrum_samples=a.spectrum_samples,
        optimizers={k: dict(DEFAULT_OPTIMIZERS[k]) for k in names}, seed=a.seed,
        synthetic=a.synthetic)
    result = compare(cfg, a.out, device=a.device, progress=not a.no_progress)
    print(result.table)
    print(f"wrote {', '.join(str(v) for v in result.paths.values())} in {result.seconds:.0f} s")
    return result


if __name__ == "__main__":
    main()
