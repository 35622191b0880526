"""The figures of ``python -m figures all``, in order, and how to make or plan each one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from . import fig2, fig3c, fig_fisher_compare, spectrum_figure
from .request import FigureRequest

__all__ = ["Figure", "FIGURES", "run", "plan"]


@dataclass(frozen=True)
class Figure:
    """How to make one figure: ``make(request)`` (a :class:`FigureRequest`) writes it and
    returns its statistics; ``plan(preset, device)`` describes the work without
    doing it (None: nothing worth planning)."""

    make: Callable[..., dict[str, Any]]
    plan: Callable[..., dict[str, Any]] | None = None


def _spectrum(name: str) -> Figure:
    return Figure(partial(spectrum_figure.run, name), partial(spectrum_figure.plan, name))


#: Figure name -> :class:`Figure`, in the order of :data:`figures.presets.FIGURES`.
FIGURES: dict[str, Figure] = {
    "fig1": _spectrum("fig1"),
    "fig2": Figure(fig2.run),
    "fig3a": _spectrum("fig3a"),
    "fig3b": _spectrum("fig3b"),
    "fig3c": Figure(fig3c.run, fig3c.plan),
    "fisher-compare": Figure(fig_fisher_compare.run, fig_fisher_compare.plan),
}


def run(name: str, request: FigureRequest = FigureRequest()) -> dict[str, Any]:
    """Make figure ``name`` as ``request`` says; returns its statistics.  Raises
    ``ValueError`` for ``request.only_runs`` on a figure that is not a spectrum figure
    (those have no runs to share out)."""
    if request.only_runs and name not in spectrum_figure.TITLES:
        raise ValueError(
            f"--only-runs applies to the spectrum figures ({', '.join(spectrum_figure.TITLES)}), "
            f"not to {name}"
        )
    return FIGURES[name].make(request)


def plan(name: str, preset: str = "default", device: str = "cpu") -> dict[str, Any]:
    """What figure ``name`` of ``preset`` will compute, without data or training."""
    figure = FIGURES[name]
    if figure.plan is None:
        return {"figure": name, "preset": preset, "note": "quadrature only, < 1 s"}
    return figure.plan(preset, device)
