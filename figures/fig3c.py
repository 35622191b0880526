"""Fig 3c: the Fisher-information diagonal of All-CNN-BN, read from Adam's moments.

Paper (Sec 5.1 (iv), Fig 3c): All-CNN-BN trained with Adam on CIFAR-10 (11.2% test
error), diag(I) = E[g^2] - (E g)^2 ~ v_hat - m_hat^2 from the optimizer's moments, 4 runs,
~95% of the entries with |lambda| <= 1e-5; negative and positive values in two panels.

Data: CIFAR-10 when :func:`figures.data.load_cifar10` finds it, otherwise Fashion-MNIST
(28 x 28, the grey channel repeated to 3; All-CNN-BN's global average pool takes any
size), named as such in the caption and JSON.  Adam's estimate is of the variance of a
*minibatch* gradient (train mode, moving weights; see :mod:`spectra.fisher_diagonal`),
taken as the paper writes it (``unbiased=False``) unless the preset says otherwise.

The steps shared with :mod:`figures.fig_fisher_compare` (data, train-with-Adam-or-load,
moments -> spectrum) are :func:`load_image_data` and :func:`train_adam_or_load`.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import spectra
from spectra.fisher_diagonal import fisher_diagonal_from_adam

from . import data as fdata
from . import models, presets, report
from .cache import Cache, code_version
from .harness import build_optimizer
from .loop import evaluate_error, evaluate_loss, fit
from .pipeline import (
    _TRAIN_CODE_FILES,
    FigureData,
    _grad_norm,
    _synthetic_images,
    _tensor_digest,
    make_optimizer,
)

__all__ = ["NAME", "TITLE", "run", "plan", "load_image_data", "train_adam_or_load",
           "CIFAR_MISSING"]

NAME = "fig3c"
TITLE = "Fig 3c: Fisher diagonal of All-CNN-BN from Adam's moments"
#: The data set's name when CIFAR-10 is absent (caption and JSON).
CIFAR_MISSING = "Fashion-MNIST (CIFAR-10 not found: set HS_CIFAR10_DIR)"
_TOLS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3)
_ROOT = Path(__file__).resolve().parent.parent
_FISHER_CODE = _ROOT / "spectra" / "fisher_diagonal.py"


# ------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------


def _three_channels(x: Tensor) -> Tensor:
    """(N, 1, H, W) grey images -> (N, 3, H, W), the channel repeated."""
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def _images(source: str, seed: int, n_train: int, n_test: int
            ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], str]:
    if source == "cifar10":
        try:
            (x, y), (xt, yt) = fdata.load_cifar10(split="train"), fdata.load_cifar10(split="test")
            name = "CIFAR-10"
        except fdata.MissingDataError:
            x, y = fdata.load_fashion_mnist(split="train")
            xt, yt = fdata.load_fashion_mnist(split="test")
            name = CIFAR_MISSING
    elif source == "mnist":
        (x, y), (xt, yt), name = fdata.load_mnist(split="train"), fdata.load_mnist(split="test"), \
            "MNIST"
    elif source == "synthetic-images":
        x, y = _synthetic_images(max(n_train, 1), seed)
        xt, yt = _synthetic_images(n_test, seed + 1)
        name = "synthetic images (tests)"
    else:
        raise ValueError(f"unknown data source {source!r}; choose cifar10, mnist or "
                         "synthetic-images")
    if n_train and n_train < len(x):
        x, y = fdata.subsample(x, y, n_train, seed=seed)
    return (x, y), (xt[:n_test], yt[:n_test]), name


def load_image_data(cfg: presets.DataConfig, channels: int = 1) -> FigureData:
    """A seeded subset of ``n_train`` training images, the first ``n_test`` test images,
    the first ``n_hessian`` training images as one list of batches; grey images get
    ``channels`` channels (3 for All-CNN-BN)."""
    (x, y), (xt, yt), name = _images(cfg.source, cfg.seed, cfg.n_train, cfg.n_test)
    if channels == 3:
        x, xt = _three_channels(x), _three_channels(xt)
    n_h = min(cfg.n_hessian, len(x))
    hessian = [(x[i : min(i + cfg.hessian_batch, n_h)], y[i : min(i + cfg.hessian_batch, n_h)])
               for i in range(0, n_h, cfg.hessian_batch)]
    return FigureData((x, y), (xt, yt), hessian, name, _tensor_digest(x, y, xt, yt))


# ------------------------------------------------------------------------------------
# Train with Adam, keep the moments' diagonal (cached)
# ------------------------------------------------------------------------------------


def _build(cfg: Any, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return models.build(cfg.model, **cfg.model_kwargs)


def train_adam_or_load(
    figure: str, preset: str, cfg: Any, seed: int, data: FigureData, device: str,
    cache: Cache, unbiased: bool = False, progress: bool = True,
) -> tuple[nn.Module, dict[str, Any], np.ndarray, bool]:
    """Train one run with Adam (or load it) and read diag(I) from its moments.

    Returns ``(model, record, diagonal, cache hit)``: the diagonal is float64 in
    ``model.named_parameters()`` order (the layout of :func:`spectra.hessian_diagonal`
    and :func:`spectra.empirical_fisher_diagonal`); the record holds the losses,
    train/test error, steps and the diagonal's negative counts.
    """
    if cfg.optim.name != "adam":
        raise ValueError(f"{figure} reads Adam's moments: optim.name must be 'adam', "
                         f"got {cfg.optim.name!r}")
    config = {
        "kind": "adam-fisher-diagonal", "figure": figure, "preset": preset, "seed": seed,
        "model": cfg.model, "model_kwargs": cfg.model_kwargs,
        "data": presets.as_dict(cfg.data), "data_identity": data.identity,
        "optim": presets.as_dict(cfg.optim), "unbiased": unbiased,
        "code": code_version([*_TRAIN_CODE_FILES, _FISHER_CODE, _images, load_image_data,
                              _three_channels, make_optimizer, build_optimizer, _build,
                              train_adam_or_load]),
        "torch": torch.__version__,
    }
    loss_fn = nn.CrossEntropyLoss()

    def compute() -> tuple[dict[str, Tensor], dict[str, Any], np.ndarray]:
        model = _build(cfg, seed).to(device)
        opt, sched = make_optimizer(cfg.optim, model.parameters())
        result = fit(model, loss_fn, data.train, opt, cfg.optim.epochs, cfg.optim.batch_size,
                       seed, device, scheduler=sched, progress=progress,
                       desc=f"{figure} run seed={seed}")
        diag = fisher_diagonal_from_adam(opt, model=model, unbiased=unbiased)
        if diag.skipped:
            raise RuntimeError(f"{figure}: Adam never stepped {diag.skipped}")
        record = {
            **result.as_dict(),
            "train_loss": evaluate_loss(model, loss_fn, data.train, device=device),
            "train_error": evaluate_error(model, data.train, device=device),
            "test_error": evaluate_error(model, data.test, device=device),
            "adam_steps": sorted(set(diag.steps)),
            "adam_betas": sorted({tuple(b) for b in diag.betas}),
            "n_negative": diag.n_negative,
            "n_negative_rounding": diag.n_negative_rounding,
        }
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return state, record, diag.values.detach().cpu().numpy()

    def save(value: tuple, folder: Path) -> None:
        torch.save(value[0], folder / "model.pt")
        (folder / "train.json").write_text(json.dumps(value[1], indent=1))
        np.save(folder / "adam_diagonal.npy", value[2])

    def read(folder: Path) -> tuple:
        state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
        return (state, json.loads((folder / "train.json").read_text()),
                np.load(folder / "adam_diagonal.npy"))

    (state, record, values), hit = cache.get_or_compute(config, compute, save, read)
    model = _build(cfg, seed)
    model.load_state_dict(state)
    model.to(device).eval()
    return model, record, values, hit


def diagonal_stats(s: spectra.Spectrum, tol: float) -> dict[str, Any]:
    """Headline statistics of a diagonal (the keys of the spectrum figures' runs)."""
    ev = s.eigenvalues
    return {
        "n_params": s.n_params,
        "n_samples": s.n_samples,
        "fraction_near_zero": s.fraction_near_zero(tol),
        "fraction_near_zero_at": {f"{t:g}": s.fraction_near_zero(t) for t in _TOLS},
        "fraction_negative": s.fraction_negative(),
        "top": float(ev[-1]),
        "bottom": float(ev[0]),
        "median_abs": float(np.median(np.abs(ev))),
        "trace": s.trace(),
    }


# ------------------------------------------------------------------------------------
# The figure
# ------------------------------------------------------------------------------------


def _horizon_note(runs: list[dict[str, Any]]) -> str:
    """Whether Adam's steps exceed v's averaging horizon 1/(1 - beta2)."""
    steps = min(min(r["adam_steps"]) for r in runs)
    beta2 = max(b[1] for r in runs for b in r["adam_betas"])
    horizon = 1.0 / (1.0 - beta2)
    if steps >= 3 * horizon:
        return f"{steps} Adam steps >> 1/(1-beta2) = {horizon:.0f}: v_hat forgets early training"
    return (f"only {steps} Adam steps vs 1/(1-beta2) = {horizon:.0f}: v_hat (bias-corrected) "
            "averages over all of training, early large gradients included, which inflates "
            "the estimate (the drift term in spectra.fisher_diagonal)")


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


def run(preset: str = "default", out_dir: str | Path = "figures/out", device: str = "cpu",
        use_cache: bool = True, progress: bool = True) -> dict[str, Any]:
    """Make fig3c.png/.pdf/.json under ``out_dir`` and return the statistics."""
    t0 = time.perf_counter()
    cfg: presets.FisherFigure = presets.get(preset, NAME)
    out_dir = Path(out_dir)
    cache = Cache(out_dir / "cache", enabled=use_cache)
    data = load_image_data(cfg.data, channels=3)
    loss_fn = nn.CrossEntropyLoss()
    grad_batch = [(data.train[0][:1000], data.train[1][:1000])]
    runs, diagonals = [], []
    for i in range(cfg.runs):
        seed = cfg.seed + i
        model, record, values, hit = train_adam_or_load(NAME, preset, cfg, seed, data, device,
                                                        cache, cfg.unbiased, progress)
        s = spectra.Spectrum.from_diagonal(values, name=f"run {i + 1}",
                                           n_samples=len(data.train[0]))
        diagonals.append(s)
        runs.append({"seed": seed, **record, "cached": hit, "weights_cached": hit,
                     "grad_norm": _grad_norm(model, loss_fn, grad_batch, device),
                     **diagonal_stats(s, cfg.near_zero_tol)})
    mean_keys = ("fraction_near_zero", "top", "bottom", "trace", "test_error", "train_loss",
                 "fraction_negative", "n_negative")
    stats: dict[str, Any] = {
        "figure": NAME,
        "preset": preset,
        "dataset": data.dataset,
        "model": cfg.model,
        "model_kwargs": cfg.model_kwargs,
        "optimizer": "adam",
        "estimator": "Adam moments: v_hat - m_hat^2 (spectra.fisher_diagonal_from_adam); the "
                     "variance of a minibatch gradient in train mode over the last ~1/(1-beta2) "
                     "steps, not the per-sample Fisher (x batch size to compare; see "
                     "fisher-compare)",
        "unbiased": cfg.unbiased,
        "horizon_note": _horizon_note(runs),
        "batch_size": cfg.optim.batch_size,
        "n_params": runs[0]["n_params"],
        "n_samples": runs[0]["n_samples"],
        "n_train": len(data.train[0]),
        "n_test": len(data.test[0]),
        "near_zero_tol": cfg.near_zero_tol,
        "n_runs": cfg.runs,
        "test_error_per_run": [r["test_error"] for r in runs],
        "mean": {k: float(np.mean([r[k] for r in runs])) for k in mean_keys},
        "fraction_near_zero_at": {k: float(np.mean([r["fraction_near_zero_at"][k]
                                                    for r in runs]))
                                  for k in runs[0]["fraction_near_zero_at"]},
        "runs": runs,
        "paper": cfg.paper,
        "note": cfg.note,
        "config": presets.as_dict(cfg),
        "data_identity": data.identity,
    }
    stats["caption"] = _caption(stats)
    labels = [f"run {i + 1}: test err {100 * r['test_error']:.1f}%" for i, r in enumerate(runs)]
    with warnings.catch_warnings():  # a side with no entries has nothing to log-scale
        warnings.simplefilter("ignore", UserWarning)
        fig = spectra.plot.signed_panels(diagonals, labels=labels,
                                         near_zero_tol=cfg.near_zero_tol, figsize=(10.0, 4.2))
    for ax in fig.axes[:2]:  # room above the curves for the near-zero fractions
        ax.set_ylim(top=ax.get_ylim()[1] * 20)
    report.add_caption(fig, stats["caption"], title=TITLE)
    stats["seconds"] = time.perf_counter() - t0
    report.write_outputs(out_dir, NAME, fig, stats)
    return stats


def plan(preset: str = "default", device: str = "cpu") -> dict[str, Any]:
    """Sizes and runs of this figure in ``preset``, without data or training."""
    cfg: presets.FisherFigure = presets.get(preset, NAME)
    n = models.count_parameters(_build(cfg, cfg.seed))
    return {
        "figure": NAME, "preset": preset, "model": cfg.model, "model_kwargs": cfg.model_kwargs,
        "n_params": n, "runs": cfg.runs, "n_train": cfg.data.n_train or "all",
        "epochs": cfg.optim.epochs, "batch_size": cfg.optim.batch_size,
        "data": ("CIFAR-10 if found, else " + CIFAR_MISSING) if cfg.data.source == "cifar10"
        else cfg.data.source,
        "device": device, "unbiased": cfg.unbiased,
        "note": "no Hessian: the diagonal is read from Adam's moments (free after training)",
    }

