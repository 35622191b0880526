"""Fig 3c: the Fisher-information diagonal of All-CNN-BN, read from Adam's moments.

Paper (Sec 5.1 (iv), Fig 3c): All-CNN-BN trained with Adam on CIFAR-10 (11.2% test
error), diag(I) = E[g^2] - (E g)^2 ~ v_hat - m_hat^2 from the optimizer's moments, 4 runs,
~95% of the entries with |lambda| <= 1e-5; negative and positive values in two panels.

Data: CIFAR-10 when :func:`figures.datasets.load_cifar10` finds it, otherwise Fashion-MNIST
(28 x 28, the grey channel repeated to 3; All-CNN-BN's global average pool takes any
size), named as such in the caption and JSON.  Adam's estimate is of the variance of a
*minibatch* gradient (train mode, moving weights; see :mod:`spectra.fisher_diagonal`),
taken as the paper writes it (``unbiased=False``) unless the preset says otherwise.

The step shared with :mod:`figures.fig_fisher_compare` (train with Adam or load, read the
moments) is :func:`figures.adam_moments.trained_adam_run`.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
from torch import nn

import spectra

from . import presets, report
from .adam_moments import data_options, trained_adam_run
from .figure_runs import figure_setup, grad_norm, plan_head, stats_head, stats_tail
from .request import FigureRequest
from .stats import MEAN_KEYS, diagonal_stats
from .tasks import CIFAR_MISSING

__all__ = ["NAME", "TITLE", "run", "plan", "CIFAR_MISSING"]

NAME = "fig3c"
TITLE = "Fig 3c: Fisher diagonal of All-CNN-BN from Adam's moments"


def _horizon_note(runs: list[dict[str, Any]]) -> str:
    """Whether Adam's steps exceed v's averaging horizon 1/(1 - beta2)."""
    steps = min(min(r["adam_steps"]) for r in runs)
    beta2 = max(b[1] for r in runs for b in r["adam_betas"])
    horizon = 1.0 / (1.0 - beta2)
    if steps >= 3 * horizon:
        return f"{steps} Adam steps >> 1/(1-beta2) = {horizon:.0f}: v_hat forgets early training"
    return (
        f"only {steps} Adam steps vs 1/(1-beta2) = {horizon:.0f}: v_hat (bias-corrected) "
        "averages over all of training, early large gradients included, which inflates "
        "the estimate (the drift term in spectra.fisher_diagonal)"
    )


def _caption(stats: dict[str, Any]) -> str:
    m, p, tol = stats["mean"], stats["paper"], stats["near_zero_tol"]
    errs = ", ".join(f"{100 * r['test_error']:.1f}%" for r in stats["runs"])
    fr = ", ".join(f"{100 * r['fraction_near_zero']:.1f}%" for r in stats["runs"])
    return (
        f"{stats['model']} width {stats['model_kwargs'].get('width', 1.0):g} "
        f"({stats['n_params']:,} params), Adam, {stats['n_runs']} runs, data: "
        f"{stats['dataset']}, {stats['n_train']:,} training images, preset "
        f"'{stats['preset']}'. diag(I) = v̂ − m̂² from Adam's moments: the variance of a "
        f"minibatch gradient (B = {stats['batch_size']}) over training, "
        f"{'with' if stats['unbiased'] else 'without'} the stationary-noise correction "
        f"(unbiased={stats['unbiased']}).\n"
        f"ours: |λ| ≤ {tol:g}: {fr} (mean {100 * m['fraction_near_zero']:.1f}%); "
        f"{m['n_negative']:.0f} negative entries per run on average; λ ∈ "
        f"[{m['bottom']:.3g}, {m['top']:.3g}]; test error per run {errs}.\n"
        f"paper: ~{100 * p['fraction_near_zero']:.0f}% of |λ| ≤ {p['near_zero_tol']:g}, "
        f"test error {100 * p['test_error']:.1f}% on {p['dataset']}, ~1.6M params, "
        f"{p['runs']} runs. Note: {stats['horizon_note']}."
    )


def run(request: FigureRequest = FigureRequest()) -> dict[str, Any]:
    """Make fig3c.png/.pdf/.json under ``out_dir`` and return the statistics."""
    preset, out_dir, device, use_cache, progress = request.astuple()
    t0 = time.perf_counter()
    cfg, cache, task = figure_setup(NAME, preset, out_dir, use_cache, data_options)
    x, y = task.splits["train"]
    loss_fn = nn.CrossEntropyLoss()
    grad_batch = [(x[:1000], y[:1000])]
    runs, diagonals = [], []
    for i in range(cfg.runs):
        seed = cfg.seed + i
        trained = trained_adam_run(
            NAME, preset, cfg, seed, task, device, cache, cfg.unbiased, progress
        )
        s = spectra.Spectrum.from_diagonal(
            trained.arrays["adam_diagonal"], name=f"run {i + 1}", n_samples=len(x)
        )
        diagonals.append(s)
        runs.append(
            {
                "seed": seed,
                **trained.record,
                "cached": trained.cached,
                "weights_cached": trained.cached,
                "grad_norm": grad_norm(trained.model, loss_fn, grad_batch, device),
                **diagonal_stats(s, cfg.near_zero_tol),
            }
        )
    mean_keys = (*MEAN_KEYS, "n_negative")
    stats: dict[str, Any] = {
        **stats_head(NAME, preset, task, cfg),
        "estimator": "Adam moments: v_hat - m_hat^2 (spectra.fisher_diagonal_from_adam); the "
        "variance of a minibatch gradient in train mode over the last ~1/(1-beta2) "
        "steps, not the per-sample Fisher (x batch size to compare; see "
        "fisher-compare)",
        "unbiased": cfg.unbiased,
        "horizon_note": _horizon_note(runs),
        "batch_size": cfg.optim.batch_size,
        "n_params": runs[0]["n_params"],
        "n_samples": runs[0]["n_samples"],
        "n_train": len(x),
        "n_test": len(task.splits["test"][0]),
        "near_zero_tol": cfg.near_zero_tol,
        "n_runs": cfg.runs,
        "test_error_per_run": [r["test_error"] for r in runs],
        "mean": {k: float(np.mean([r[k] for r in runs])) for k in mean_keys},
        "fraction_near_zero_at": {
            k: float(np.mean([r["fraction_near_zero_at"][k] for r in runs]))
            for k in runs[0]["fraction_near_zero_at"]
        },
        "runs": runs,
        **stats_tail(task, cfg),
    }
    stats["caption"] = _caption(stats)
    labels = [f"run {i + 1}: test err {100 * r['test_error']:.1f}%" for i, r in enumerate(runs)]
    with warnings.catch_warnings():  # a side with no entries has nothing to log-scale
        warnings.simplefilter("ignore", UserWarning)
        fig = spectra.plot.signed_panels(
            diagonals, labels=labels, near_zero_tol=cfg.near_zero_tol, figsize=(10.0, 4.2)
        )
    for ax in fig.axes[:2]:  # room above the curves for the near-zero fractions
        ax.set_ylim(top=ax.get_ylim()[1] * 20)
    return report.publish(out_dir, NAME, fig, stats, TITLE, t0)


def plan(preset: str = "default", device: str = "cpu") -> dict[str, Any]:
    """Sizes and runs of this figure in ``preset``, without data or training."""
    cfg: presets.FisherFigure = presets.get(preset, NAME)
    return {
        **plan_head(NAME, preset, cfg),
        "runs": cfg.runs,
        "epochs": cfg.optim.epochs,
        "batch_size": cfg.optim.batch_size,
        "data": ("CIFAR-10 if found, else " + CIFAR_MISSING)
        if cfg.data.source == "cifar10"
        else cfg.data.source,
        "device": device,
        "unbiased": cfg.unbiased,
        "note": "no Hessian: the diagonal is read from Adam's moments (free after training)",
    }
