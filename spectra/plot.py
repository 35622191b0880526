"""Plots of spectra in the paper's layout (Chaudhari et al. 2017, Figs 1 and 3).

``spectrum`` draws a central histogram of the eigenvalues near zero (the peak
at zero clipped and its fraction written on the plot) with two insets holding
the whole negative and positive tails; ``signed_panels`` draws the Fig 3c
layout (negative and positive values in two panels).  Several runs overlay
with labels.  Counts come from :meth:`Spectrum.histogram`, so exact spectra,
quadratures and diagonals plot alike.  Every function returns a matplotlib
``Figure`` built without pyplot (no global state, no GUI backend needed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .spectrum import Spectrum

__all__ = ["spectrum", "signed_panels", "density"]


def _as_list(spectra: Spectrum | Sequence[Spectrum]) -> list[Spectrum]:
    items = [spectra] if isinstance(spectra, Spectrum) else list(spectra)
    if not items or not all(isinstance(s, Spectrum) for s in items):
        raise TypeError("expected a Spectrum or a non-empty sequence of Spectrum objects")
    return items


def _labels(items: list[Spectrum], labels: Sequence[str] | None) -> list[str]:
    if labels is not None:
        if len(labels) != len(items):
            raise ValueError(f"{len(labels)} labels for {len(items)} spectra")
        return list(labels)
    return [s.name or f"run {i + 1}" for i, s in enumerate(items)]


def _step(ax: Axes, s: Spectrum, edges: np.ndarray, label: str | None, color: str) -> np.ndarray:
    counts, _ = s.histogram(bins=edges)
    ax.stairs(counts, edges, label=label, color=color, linewidth=1.2)
    return counts


def spectrum(
    spectra: Spectrum | Sequence[Spectrum],
    *,
    labels: Sequence[str] | None = None,
    near_zero_tol: float = 1e-4,
    center: float | None = None,
    bins: int = 80,
    title: str | None = None,
    figsize: tuple[float, float] = (8.0, 5.0),
) -> Figure:
    """Histogram of one or more spectra: centre near zero, tails as insets.

    Args:
        spectra: a :class:`Spectrum` or a list (overlaid, one colour each).
        labels: legend entries; default each spectrum's ``name``.
        near_zero_tol: |lambda| <= tol counts as zero; the fraction is written on
            the plot (default 1e-4, the paper's Fig 1 threshold).
        center: half-width of the central window; default the magnitude of the
            most negative eigenvalue across runs (the whole negative tail, which
            the paper shows to be short), at least 100 x ``near_zero_tol``.
        bins: bins of the central histogram (the insets use ``bins // 2``).
        title: axes title.

    Counts are on a log scale.  The central bin holding zero is clipped at 10x
    the tallest other bin, so the tails stay readable; its true height is the
    annotated fraction.
    """
    items = _as_list(spectra)
    names = _labels(items, labels)
    colors = [f"C{i}" for i in range(len(items))]
    lo = min(float(s.eigenvalues[0]) for s in items)
    hi = max(float(s.eigenvalues[-1]) for s in items)
    half = center if center is not None else max(abs(min(lo, 0.0)), 100 * near_zero_tol)
    if not half > 0:
        raise ValueError(f"center must be > 0, got {center}")

    fig = Figure(figsize=figsize)
    ax = fig.add_axes((0.1, 0.1, 0.85, 0.55))
    # an odd bin count puts zero in the middle of one bin: the peak is one bar
    edges = np.linspace(-half, half, bins + (1 - bins % 2) + 1)
    peak_height, rest_height = 1.0, 1.0
    zero_bin = int(np.searchsorted(edges, 0.0, side="right") - 1)
    for s, name, color in zip(items, names, colors, strict=True):
        counts = _step(
            ax,
            s,
            edges,
            f"{name}: {100 * s.fraction_near_zero(near_zero_tol):.1f}% |λ|≤{near_zero_tol:g}",
            color,
        )
        peak_height = max(
            peak_height, float(counts[zero_bin]) if 0 <= zero_bin < counts.size else 0
        )
        others = np.delete(counts, zero_bin) if 0 <= zero_bin < counts.size else counts
        rest_height = max(rest_height, float(others.max()) if others.size else 1.0)
    ax.set_yscale("log")
    clip = 10 * rest_height
    ax.set_ylim(0.8, max(clip, 2.0))
    if peak_height > clip:
        fractions = ", ".join(f"{100 * s.fraction_near_zero(near_zero_tol):.1f}%" for s in items)
        ax.annotate(
            f"peak clipped: {fractions} of eigenvalues have |λ| ≤ {near_zero_tol:g}",
            xy=(0.0, clip),
            xytext=(0.5, 0.93),
            textcoords="axes fraction",
            ha="center",
            fontsize=9,
            arrowprops={"arrowstyle": "->", "lw": 0.8},
        )
    ax.set_xlabel("eigenvalue λ")
    ax.set_ylabel("count (log scale)")
    ax.set_xlim(-half, half)
    ax.legend(fontsize=8, loc="upper right")
    if title:
        fig.suptitle(title, fontsize=11)

    neg = fig.add_axes((0.1, 0.74, 0.38, 0.2))
    pos = fig.add_axes((0.57, 0.74, 0.38, 0.2))
    _tail(neg, items, colors, min(lo, -near_zero_tol), -near_zero_tol, bins // 2, "negative tail")
    _tail(pos, items, colors, near_zero_tol, max(hi, near_zero_tol * 2), bins // 2, "positive tail")
    return fig


def _tail(
    ax: Axes, items: list[Spectrum], colors: list[str], lo: float, hi: float, bins: int, label: str
) -> None:
    edges = np.linspace(lo, hi, max(bins, 2) + 1)
    for s, color in zip(items, colors, strict=True):
        _step(ax, s, edges, None, color)
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.8)
    ax.set_title(f"{label} [{lo:.3g}, {hi:.3g}]", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5))  # tick labels must not collide at any scale


def signed_panels(
    spectra: Spectrum | Sequence[Spectrum],
    *,
    labels: Sequence[str] | None = None,
    near_zero_tol: float = 1e-5,
    bins: int = 60,
    title: str | None = None,
    figsize: tuple[float, float] = (9.0, 3.6),
) -> Figure:
    """The Fig 3c layout: |negative| and positive values beyond ``near_zero_tol`` on log axes.

    Two panels with log-spaced bins of |lambda| (so values spanning many decades
    are all visible), log-scale counts, runs overlaid; the near-zero fraction
    (default tol 1e-5, the paper's) is written on each panel.  ``near_zero_tol`` must be
    > 0: it is the first edge of the log-spaced bins.
    """
    if not (isinstance(near_zero_tol, int | float) and math.isfinite(near_zero_tol)) or not (
        near_zero_tol > 0
    ):
        raise ValueError(
            f"near_zero_tol must be a finite number > 0 (the first edge of the log-spaced "
            f"bins), got {near_zero_tol!r}"
        )
    items = _as_list(spectra)
    names = _labels(items, labels)
    fig = Figure(figsize=figsize)
    axn, axp = fig.subplots(1, 2, sharey=True)
    for ax, sign, side in ((axn, -1.0, "negative"), (axp, 1.0, "positive")):
        mags = [s.eigenvalues[sign * s.eigenvalues > near_zero_tol] * sign for s in items]
        top = max((float(m.max()) for m in mags if m.size), default=near_zero_tol * 10)
        edges = np.geomspace(near_zero_tol, max(top, near_zero_tol * 10) * 1.0001, bins + 1)
        for s, name, i in zip(items, names, range(len(items)), strict=True):
            flipped = Spectrum(
                sign * s.eigenvalues,
                s.weights,
                n_params=s.n_params,
                kind=s.kind,
                versions=s.versions,
                created=s.created,
            )
            _step(ax, flipped, edges, name if side == "positive" else None, f"C{i}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"{'−λ' if sign < 0 else 'λ'} ({side} values > {near_zero_tol:g})")
        near = ", ".join(f"{100 * s.fraction_near_zero(near_zero_tol):.1f}%" for s in items)
        ax.text(
            0.02,
            0.96,
            f"|λ| ≤ {near_zero_tol:g}: {near}",
            transform=ax.transAxes,
            fontsize=8,
            va="top",
        )
    axn.invert_xaxis()
    axn.set_ylabel("count (log scale)")
    axp.legend(fontsize=8, loc="upper right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def density(
    spectra: Spectrum | Sequence[Spectrum],
    *,
    labels: Sequence[str] | None = None,
    grid: np.ndarray | None = None,
    sigma: float | None = None,
    title: str | None = None,
    figsize: tuple[float, float] = (7.0, 4.0),
) -> Figure:
    """Gaussian-broadened densities (:meth:`Spectrum.density`) on a log axis, overlaid."""
    items = _as_list(spectra)
    names = _labels(items, labels)
    lo = min(float(s.eigenvalues[0]) for s in items)
    hi = max(float(s.eigenvalues[-1]) for s in items)
    pad = 0.05 * (hi - lo) if hi > lo else 1.0
    x = grid if grid is not None else np.linspace(lo - pad, hi + pad, 2000)
    fig = Figure(figsize=figsize)
    ax = fig.subplots()
    peak = 0.0
    for s, name in zip(items, names, strict=True):
        rho = s.density(x, sigma)
        peak = max(peak, float(rho.max()))
        ax.plot(x, np.maximum(rho, 1e-300), label=f"{name} (σ={s.density_sigma(sigma):.2g})")
    ax.set_yscale("log")
    # explicit limits: autoscaling would reach down to the 1e-300 floor of empty gaps
    # and up to ~1e15 with it; eight decades below the peak show the tails
    peak = peak if np.isfinite(peak) and peak > 0 else 1.0
    ax.set_ylim(bottom=peak * 1e-8, top=peak * 2)
    ax.set_xlabel("eigenvalue λ")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
