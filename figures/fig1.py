"""Fig 1: Hessian eigenspectrum of small-LeNet trained with Adam on MNIST.

Paper: 2 runs, 94% of eigenvalues with magnitude below 1e-4, largest ~40, most
negative -0.46, test error 2.4%.

The pipeline (data, cached training and spectra, plot, outputs) is
:func:`figures.pipeline.run_spectrum_figure`; this module names the figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .pipeline import plan_spectrum_figure, run_spectrum_figure

__all__ = ["NAME", "TITLE", "run", "plan"]

NAME = "fig1"
TITLE = "Fig 1: small-LeNet on MNIST (Adam)"


def run(preset: str = "default", out_dir: str | Path = "figures/out", device: str = "cpu",
        use_cache: bool = True) -> dict[str, Any]:
    """Make fig1.png/.pdf/.json under ``out_dir`` and return the statistics."""
    return run_spectrum_figure(NAME, preset, out_dir, device, use_cache, title=TITLE)


def plan(preset: str = "default", device: str = "cpu") -> dict[str, Any]:
    """Sizes, runs and memory of this figure in ``preset``, without computing anything."""
    return plan_spectrum_figure(NAME, preset, device)
