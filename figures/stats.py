"""Headline statistics of a spectrum or a curvature diagonal, the keys every figure's
``runs`` entries share."""

from __future__ import annotations

from typing import Any

import numpy as np

import spectra

__all__ = [
    "spectrum_stats",
    "diagonal_stats",
    "sample_rank_bound",
    "MEAN_KEYS",
    "SPECTRUM_TOLS",
    "DIAGONAL_TOLS",
]

#: Per-run statistics every figure averages over its runs (the JSON's ``mean``).
MEAN_KEYS = (
    "fraction_near_zero",
    "top",
    "bottom",
    "trace",
    "test_error",
    "train_loss",
    "fraction_negative",
)

#: Thresholds of ``fraction_near_zero_at`` for Hessian spectra and for diagonals.
SPECTRUM_TOLS = (1e-5, 1e-4, 1e-3, 1e-2)
DIAGONAL_TOLS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3)


def _near_zero(s: spectra.Spectrum, tol: float, tols: tuple[float, ...]) -> dict[str, Any]:
    return {
        "fraction_near_zero": s.fraction_near_zero(tol),
        "fraction_near_zero_at": {f"{t:g}": s.fraction_near_zero(t) for t in tols},
        "fraction_negative": s.fraction_negative(),
    }


def spectrum_stats(s: spectra.Spectrum, tol: float) -> dict[str, Any]:
    """Size, loss, near-zero fractions (at ``tol`` and at :data:`SPECTRUM_TOLS`), extremes,
    trace and build/solve seconds of an exact Hessian spectrum."""
    return {
        "n_params": s.n_params,
        "n_samples": s.n_samples,
        "loss_at_point": s.loss,
        **_near_zero(s, tol, SPECTRUM_TOLS),
        "top": float(s.top(1)[0]),
        "bottom": float(s.bottom(1)[0]),
        "trace": s.trace(),
        "build_seconds": s.info.get("build_seconds"),
        "solve_seconds": s.info.get("solve_seconds"),
    }


def diagonal_stats(s: spectra.Spectrum, tol: float) -> dict[str, Any]:
    """The same for a diagonal (:meth:`spectra.Spectrum.from_diagonal`), at
    :data:`DIAGONAL_TOLS`, with the median magnitude instead of loss and timings."""
    ev = s.eigenvalues
    return {
        "n_params": s.n_params,
        "n_samples": s.n_samples,
        **_near_zero(s, tol, DIAGONAL_TOLS),
        "top": float(ev[-1]),
        "bottom": float(ev[0]),
        "median_abs": float(np.median(np.abs(ev))),
        "trace": s.trace(),
    }


def sample_rank_bound(n_params: int, loss_terms: int, classes: int) -> dict[str, Any]:
    """What the sample count alone forces to zero (issue 15).

    The Gauss-Newton part of a cross-entropy Hessian is a sum over the ``loss_terms``
    targets of ``J^T (diag(p) - p p^T) J``, each of rank <= ``classes - 1``, so its rank is
    at most ``loss_terms x (classes - 1)``; at least ``1 - that / n_params`` of its
    eigenvalues are exactly zero whatever the network learnt.  (The Hessian adds the
    residual term, which is small near a minimum, so the bound is for the GGN part.)
    """
    bound = min(n_params, loss_terms * max(classes - 1, 0))
    return {
        "loss_terms": loss_terms,
        "classes": classes,
        "ggn_rank_bound": bound,
        "fraction_forced_zero_by_samples": 1.0 - bound / n_params,
    }
