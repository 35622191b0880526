"""Fig 3b: Hessian eigenspectrum of a char-LSTM trained with Adam on 256 lines x 32
characters of text.

Paper: War and Peace, 5 runs, almost 95% of eigenvalues with magnitude below 1e-5.
Here: Jane Austen's novels (janeaustenr).

The pipeline (data, cached training and spectra, plot, outputs) is
:func:`figures.pipeline.run_spectrum_figure`; this module names the figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .pipeline import plan_spectrum_figure, run_spectrum_figure

__all__ = ["NAME", "TITLE", "run", "plan"]

NAME = "fig3b"
TITLE = "Fig 3b: char-LSTM on 256 lines x 32 characters (Adam)"


def run(preset: str = "default", out_dir: str | Path = "figures/out", device: str = "cpu",
        use_cache: bool = True) -> dict[str, Any]:
    """Make fig3b.png/.pdf/.json under ``out_dir`` and return the statistics."""
    return run_spectrum_figure(NAME, preset, out_dir, device, use_cache, title=TITLE)


def plan(preset: str = "default", device: str = "cpu") -> dict[str, Any]:
    """Sizes, runs and memory of this figure in ``preset``, without computing anything."""
    return plan_spectrum_figure(NAME, preset, device)
