"""Figure runs trained with Adam whose result is the Fisher diagonal read from Adam's
moments (Fig 3c and ``fisher-compare``): :func:`trained_adam_run`."""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from spectra.fisher_diagonal import fisher_diagonal_from_adam

from .cache import Cache, code_version
from .figure_runs import FigureRun, run_config, trained_run
from .harness import RunResult
from .tasks import Task

__all__ = ["trained_adam_run", "data_options", "DATA_OPTIONS"]

_FISHER_CODE = importlib.import_module("spectra.fisher_diagonal")
#: Task-builder options of the Adam-moment figures by model: All-CNN-BN takes three
#: channels, and a missing CIFAR-10 is replaced by Fashion-MNIST.
DATA_OPTIONS: dict[str, dict[str, Any]] = {
    "all-cnn-bn": {"channels": 3, "fallback": "fashion-mnist"}
}


def data_options(cfg: Any) -> dict[str, Any]:
    """:data:`DATA_OPTIONS` of a preset's model (none for others)."""
    return dict(DATA_OPTIONS.get(cfg.model, {}))


def trained_adam_run(
    figure: str,
    preset: str,
    cfg: Any,
    seed: int,
    task: Task,
    device: str,
    cache: Cache,
    unbiased: bool = False,
    progress: bool = True,
) -> FigureRun:
    """Train run ``seed`` of ``cfg`` with Adam (or load it) and read diag(I) from its moments.

    The run's ``arrays["adam_diagonal"]`` is float64 in ``model.named_parameters()`` order
    (the layout of :func:`spectra.hessian_diagonal` and
    :func:`spectra.empirical_fisher_diagonal`); its record adds Adam's step counts and
    betas and the diagonal's negative counts.
    """
    if cfg.optim.name != "adam":
        raise ValueError(
            f"{figure} reads Adam's moments: optim.name must be 'adam', got {cfg.optim.name!r}"
        )

    def finish(result: RunResult) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        diag = fisher_diagonal_from_adam(result.optimizer, model=result.model, unbiased=unbiased)
        if diag.skipped:
            raise RuntimeError(f"{figure}: Adam never stepped {diag.skipped}")
        record = {
            "adam_steps": sorted(set(diag.steps)),
            "adam_betas": sorted({tuple(b) for b in diag.betas}),
            "n_negative": diag.n_negative,
            "n_negative_rounding": diag.n_negative_rounding,
        }
        return record, {"adam_diagonal": diag.values.detach().cpu().numpy()}

    config = run_config(figure, cfg, seed, **data_options(cfg))
    return trained_run(
        figure,
        preset,
        config,
        task,
        device,
        cache,
        finish,
        key_extra={"unbiased": unbiased, "fisher_code": code_version([_FISHER_CODE])},
        progress=progress,
    )
