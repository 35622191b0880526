"""``fisher-compare``: Adam-moment diagonal vs empirical Fisher diagonal vs exact Hessian
diagonal, on a network small enough that all three are computable.

Fig 3c (paper Sec 5.1 (iv)) rests on two proxies: Adam's ``v_hat - m_hat^2`` for the
Fisher diagonal, and the Fisher for the Hessian.  Here a small network is trained with
Adam (the same cached step as :mod:`figures.fig3c`) and, at its final weights, over the
first ``n_hessian`` training samples, in float64:

- **Adam x B**: :func:`spectra.fisher_diagonal_from_adam` times the batch size B.  Adam's
  moments see minibatch gradients, whose variance is the per-sample variance / B
  (see :mod:`spectra.fisher_diagonal`), so x B puts it on the per-sample scale;
- **empirical Fisher**: :func:`spectra.empirical_fisher_diagonal`, ``(1/N) sum_i g_i^2``
  from per-sample gradients (the centred variant, what Adam estimates, is in the JSON);
- **Hessian**: :func:`spectra.hessian_diagonal` with ``method="exact"`` (n Hessian-vector
  products).

The plot: log-log scatter plots of the magnitudes (negative entries in red), Pearson and
Spearman correlations of the signed values written on each, and the three diagonals'
histograms overlaid in the Fig 3c layout (negative and positive values, log axes).
"""

from __future__ import annotations

import importlib
import time
import warnings
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from scipy import stats as sstats
from torch import nn

import spectra
from spectra.fisher_diagonal import empirical_fisher_diagonal
from spectra.hessian_diagonal import hessian_diagonal

from . import figure_runs, presets, report
from .adam_moments import data_options, trained_adam_run
from .cache import Cache, code_version
from .request import FigureRequest
from .stats import diagonal_stats

__all__ = ["NAME", "TITLE", "run", "plan", "correlations"]

NAME = "fisher-compare"
TITLE = "Adam-moment vs empirical-Fisher vs exact-Hessian diagonal"
_DIAG_CODE = [
    importlib.import_module(f"spectra.{name}")
    for name in (
        "fisher",
        "fisher_diagonal",
        "hessian_diagonal",
        "diagonal",
        "hessian",
        "curvature",
        "batches",
        "parameters",
    )
]
_PAIRS = (
    ("adam_x_B", "empirical_fisher"),
    ("empirical_fisher", "hessian"),
    ("adam_x_B", "hessian"),
)
_LABELS = {
    "adam_x_B": "Adam (v̂ − m̂²) × B",
    "empirical_fisher": "empirical Fisher",
    "empirical_fisher_centered": "empirical Fisher, centred",
    "hessian": "exact Hessian",
}


def correlations(a: np.ndarray, b: np.ndarray) -> dict[str, float | int]:
    """Pearson and Spearman correlations of two diagonals (signed values, all entries),
    and Pearson of log10 magnitudes over entries nonzero in both."""
    both = (a != 0) & (b != 0)
    out: dict[str, float | int] = {
        "pearson": float(sstats.pearsonr(a, b).statistic),
        "spearman": float(sstats.spearmanr(a, b).statistic),
        "n_nonzero_both": int(both.sum()),
    }
    if both.sum() > 2:
        out["pearson_log_abs"] = float(
            sstats.pearsonr(np.log10(np.abs(a[both])), np.log10(np.abs(b[both]))).statistic
        )
    return out


def _diagonals_or_load(
    model: nn.Module, cfg: presets.CompareFigure, batches: list, cache: Cache
) -> tuple[dict[str, np.ndarray], bool]:
    """Empirical Fisher (plain and centred) and exact Hessian diagonals at the model's
    weights (cached by a digest of the weights and data)."""
    state = model.state_dict()
    config = {
        "kind": "fisher-compare-diagonals",
        "weights": figure_runs.tensor_digest(*(state[k] for k in sorted(state))),
        "data": figure_runs.tensor_digest(*(t for b in batches for t in b)),
        "dtype": cfg.dtype,
        "code": code_version([*_DIAG_CODE, _diagonals_or_load]),
    }
    dtype = getattr(torch, cfg.dtype)
    loss_fn = nn.CrossEntropyLoss()

    def compute() -> dict[str, np.ndarray]:
        fisher = empirical_fisher_diagonal(model, loss_fn, batches, dtype=dtype)
        centred = empirical_fisher_diagonal(model, loss_fn, batches, dtype=dtype, centered=True)
        hess = hessian_diagonal(model, loss_fn, batches, method="exact", dtype=dtype)
        return {
            "empirical_fisher": fisher.detach().cpu().numpy(),
            "empirical_fisher_centered": centred.detach().cpu().numpy(),
            "hessian": hess.values.detach().cpu().numpy(),
        }

    return cache.get_or_compute(
        config,
        compute,
        save=lambda d, folder: np.savez(folder / "diagonals.npz", **d),
        read=lambda folder: dict(np.load(folder / "diagonals.npz")),
    )


def _scatter(ax: Any, x: np.ndarray, y: np.ndarray, xl: str, yl: str, corr: dict) -> None:
    nz = (x != 0) & (y != 0)
    neg = nz & ((x < 0) | (y < 0))
    pos = nz & ~neg
    # (points, drawn even when empty, style): the positive pairs, then any negative ones
    for mask, always, style in (
        (pos, True, dict(s=3, alpha=0.35, color="C0", label="both > 0")),
        (neg, False, dict(s=5, alpha=0.8, color="C3", label="either < 0")),
    ):
        if always or mask.any():
            ax.scatter(np.abs(x[mask]), np.abs(y[mask]), lw=0, rasterized=True, **style)
    if nz.any():
        lo = float(min(np.abs(x[nz]).min(), np.abs(y[nz]).min()))
        hi = float(max(np.abs(x[nz]).max(), np.abs(y[nz]).max()))
        ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8, ls="--", label="y = x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"|{xl}|", fontsize=9)
    ax.set_ylabel(f"|{yl}|", fontsize=9)
    ax.tick_params(labelsize=7)
    text = (
        f"Pearson r = {corr['pearson']:.3f}\nSpearman ρ = {corr['spearman']:.3f}\n"
        f"r(log|·|) = {corr.get('pearson_log_abs', float('nan')):.3f}\n"
        f"{int((~nz).sum())} entries zero in either (not shown)"
    )
    ax.text(
        0.03,
        0.97,
        text,
        transform=ax.transAxes,
        fontsize=7,
        va="top",
        bbox={"facecolor": "white", "alpha": 0.8, "lw": 0},
    )
    ax.legend(fontsize=6, loc="lower right", markerscale=2)


def _histograms(
    axn: Any, axp: Any, items: list[spectra.Spectrum], labels: list[str], tol: float, floor: float
) -> None:
    """Fig 3c layout for several diagonals: |negative| and positive values above
    ``floor`` on log-spaced bins, log counts (counts from :meth:`Spectrum.histogram`)."""
    for ax, sign, side in ((axn, -1.0, "negative"), (axp, 1.0, "positive")):
        mags = [sign * s.eigenvalues[sign * s.eigenvalues > floor] for s in items]
        top = max((float(m.max()) for m in mags if m.size), default=floor * 10)
        edges = np.geomspace(floor, max(top, floor * 10) * 1.0001, 61)
        for i, (s, label) in enumerate(zip(items, labels, strict=True)):
            flipped = spectra.Spectrum(
                sign * s.eigenvalues, s.weights, n_params=s.n_params, kind=s.kind
            )
            counts, _ = flipped.histogram(bins=edges)
            n_side = int((sign * s.eigenvalues > 0).sum())
            ax.stairs(
                counts,
                edges,
                color=f"C{i}",
                lw=1.3,
                label=f"{label}: {n_side} {side}" if side == "negative" else label,
            )
        ax.axvline(tol, color="0.4", lw=0.8, ls=":")
        ax.set_xscale("log")
        with warnings.catch_warnings():  # an empty negative side has nothing to log-scale
            warnings.simplefilter("ignore", UserWarning)
            ax.set_yscale("log")
        ax.set_xlabel(
            f"{'−λ' if sign < 0 else 'λ'} ({side} entries > {floor:g}; dotted: {tol:g})", fontsize=9
        )
        ax.tick_params(labelsize=7)
    axn.invert_xaxis()
    axn.set_ylabel("count (log scale)", fontsize=9)
    axn.legend(fontsize=7, loc="upper left")
    near = "\n".join(
        f"{label}: {100 * s.fraction_near_zero(tol):.1f}% |λ| ≤ {tol:g}"
        for s, label in zip(items, labels, strict=True)
    )
    axp.set_ylim(0.7, axp.get_ylim()[1] * 30)  # room for the text above the curves
    axp.text(
        0.02,
        0.97,
        near,
        transform=axp.transAxes,
        fontsize=7,
        va="top",
        ha="left",
        bbox={"facecolor": "white", "alpha": 0.8, "lw": 0},
    )


def run(request: FigureRequest = FigureRequest()) -> dict[str, Any]:
    """Make fisher-compare.png/.pdf/.json under ``out_dir`` and return the statistics."""
    preset, out_dir, device, use_cache, progress = request.astuple()
    t0 = time.perf_counter()
    cfg, cache, task = figure_runs.figure_setup(NAME, preset, out_dir, use_cache, data_options)
    batches = figure_runs.hessian_batches(task, cfg.data.n_hessian, cfg.data.hessian_batch)
    trained = trained_adam_run(NAME, preset, cfg, cfg.seed, task, device, cache, False, progress)
    record, adam, hit = trained.record, trained.arrays["adam_diagonal"], trained.cached
    model = trained.model.cpu().eval()
    exact, diag_hit = _diagonals_or_load(model, cfg, batches, cache)
    B = cfg.optim.batch_size
    diags = {"adam_x_B": B * adam, **exact}
    n_samples = sum(len(y) for _, y in batches)
    spec = {
        k: spectra.Spectrum.from_diagonal(v, name=_LABELS[k], n_samples=n_samples)
        for k, v in diags.items()
    }
    corr = {f"{a} vs {b}": correlations(diags[a], diags[b]) for a, b in _PAIRS}
    corr["adam_x_B vs empirical_fisher_centered"] = correlations(
        diags["adam_x_B"], diags["empirical_fisher_centered"]
    )
    corr["empirical_fisher vs empirical_fisher_centered"] = correlations(
        diags["empirical_fisher"], diags["empirical_fisher_centered"]
    )
    tol = cfg.near_zero_tol
    per = {
        k: {
            **diagonal_stats(s, tol),
            "n_negative": int((s.eigenvalues < 0).sum()),
            "n_zero": int((s.eigenvalues == 0).sum()),
        }
        for k, s in spec.items()
    }
    adam_stats = diagonal_stats(spectra.Spectrum.from_diagonal(adam, n_samples=n_samples), tol)
    grad = figure_runs.grad_norm(model, nn.CrossEntropyLoss(), batches, "cpu")
    run_stats = {
        "seed": cfg.seed,
        **record,
        "weights_cached": hit,
        "diagonals_cached": diag_hit,
        "grad_norm": grad,
        **adam_stats,
    }
    ratio = float(
        np.median(
            diags["adam_x_B"][diags["empirical_fisher_centered"] > 0]
            / diags["empirical_fisher_centered"][diags["empirical_fisher_centered"] > 0]
        )
    )
    stats: dict[str, Any] = {
        **figure_runs.stats_head(NAME, preset, task, cfg),
        "batch_size": B,
        "n_params": len(adam),
        "n_samples": n_samples,
        "n_train": len(task.splits["train"][0]),
        "n_test": len(task.splits["test"][0]),
        "dtype": cfg.dtype,
        "near_zero_tol": tol,
        "n_runs": 1,
        "correlations": corr,
        "median_ratio_adam_x_B_to_centred_fisher": ratio,
        "diagonals": per,
        "mean": {
            k: float(run_stats[k])
            for k in ("fraction_near_zero", "top", "bottom", "trace", "test_error", "train_loss")
        },
        "mean_note": "'mean' and 'runs' describe the Adam-moment diagonal (unscaled, as in "
        "Fig 3c) of the one run; 'diagonals' has all four, Adam's x B",
        "runs": [run_stats],
        "definitions": {
            "adam_x_B": "B (v_hat - m_hat^2) from Adam's moments at the end of training: the "
            "variance of a minibatch gradient over Adam's ~1/(1-beta2) steps, x B "
            "to put it on the per-sample scale (train-mode, moving weights)",
            "empirical_fisher": "(1/N) sum_i g_i^2 over the first n_samples training images, "
            "per-sample gradients at the final weights",
            "empirical_fisher_centered": "the same minus (mean gradient)^2: the quantity "
            "Adam x B estimates",
            "hessian": "exact diag(H) of the mean loss over the same images (n HVPs)",
        },
        **figure_runs.stats_tail(task, cfg),
    }
    c = corr
    stats["caption"] = (
        f"{cfg.model} {cfg.model_kwargs} ({len(adam):,} params) trained with Adam (B = {B}) on "
        f"{stats['n_train']:,} {stats['dataset']} images\n(test error "
        f"{100 * record['test_error']:.1f}%), preset '{preset}'. Fisher and Hessian diagonals "
        f"over {n_samples:,} training images at the final weights, {cfg.dtype}. Adam's "
        f"v̂ − m̂² estimates the minibatch-gradient variance, so it is multiplied by B.\n"
        f"Spearman ρ: Adam×B vs Fisher {c['adam_x_B vs empirical_fisher']['spearman']:.3f}, "
        f"Fisher vs Hessian {c['empirical_fisher vs hessian']['spearman']:.3f}, Adam×B vs "
        f"Hessian {c['adam_x_B vs hessian']['spearman']:.3f}; median Adam×B / centred Fisher "
        f"= {ratio:.2f}. Not in the paper: a check of Fig 3c's two proxies."
    )
    fig = Figure(figsize=(12.0, 7.6))
    gs = fig.add_gridspec(
        2, 6, hspace=0.38, wspace=0.9, left=0.06, right=0.98, top=0.95, bottom=0.09
    )
    for j, (a, b) in enumerate(_PAIRS):
        _scatter(
            fig.add_subplot(gs[0, 2 * j : 2 * j + 2]),
            diags[a],
            diags[b],
            _LABELS[a],
            _LABELS[b],
            corr[f"{a} vs {b}"],
        )
    axn = fig.add_subplot(gs[1, :3])
    axp = fig.add_subplot(gs[1, 3:], sharey=axn)
    keys = ("adam_x_B", "empirical_fisher", "hessian")
    nonzero = np.concatenate([np.abs(diags[k][diags[k] != 0]) for k in keys])
    floor = float(10.0 ** np.floor(np.log10(nonzero.min()))) if nonzero.size else tol / 100
    floor = max(floor, 1e-12)
    _histograms(axn, axp, [spec[k] for k in keys], [_LABELS[k] for k in keys], tol, floor)
    stats["summary"] = (
        f"Spearman Adam×B~Fisher {c['adam_x_B vs empirical_fisher']['spearman']:.2f}"
        f", Fisher~Hessian {c['empirical_fisher vs hessian']['spearman']:.2f}"
    )
    return report.publish(out_dir, NAME, fig, stats, TITLE, t0)


def plan(preset: str = "default", device: str = "cpu") -> dict[str, Any]:
    """Sizes of this figure in ``preset``, without data or training."""
    cfg: presets.CompareFigure = presets.get(preset, NAME)
    head = figure_runs.plan_head(NAME, preset, cfg)
    return {
        **head,
        "runs": 1,
        "n_hessian": cfg.data.n_hessian,
        "dtype": cfg.dtype,
        "hessian_vector_products": head["n_params"],
        "device": device,
    }
