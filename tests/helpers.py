"""Shared by the figure tests (imported as ``from helpers import ...``, as ``synthetic`` is)."""

from __future__ import annotations

#: What every spectrum-like figure records per run.
SPECTRUM_KEYS = {
    "fraction_near_zero",
    "top",
    "bottom",
    "trace",
    "n_params",
    "n_samples",
    "test_error",
    "train_loss",
    "grad_norm",
}
