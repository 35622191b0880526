"""Compare the flatness of several minima on the same data: one table, one figure.

:func:`compare_minima` runs :func:`spectra.flatness` on every model with the
same data and settings and returns a :class:`FlatnessTable` (rows per model,
columns per measure).  With ``subsets=k`` the data are also cut into k disjoint
parts and every measure is recomputed on each, so the table carries the spread
over data as well: a difference between two optimizers smaller than that spread
is not one the data can tell.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .batches import batch_size, is_pair
from .flatness_report import FlatnessReport, flatness
from .reduction import resolve_reduction

__all__ = ["FlatnessTable", "compare_minima", "split_data"]


class FlatnessTable:
    """Flatness reports of several minima, measured on the same data.

    Attributes:
        reports: name -> :class:`~spectra.FlatnessReport` on all the data.
        subset_reports: name -> the reports on each disjoint data subset (empty
            without ``subsets=``).
        columns: the measures every report has, in the first report's order.
    """

    def __init__(
        self,
        reports: Mapping[str, FlatnessReport],
        subset_reports: Mapping[str, Sequence[FlatnessReport]] | None = None,
    ) -> None:
        if not reports:
            raise ValueError("a FlatnessTable needs at least one report")
        self.reports = dict(reports)
        self.subset_reports = {k: list(v) for k, v in (subset_reports or {}).items()}
        first = next(iter(self.reports.values()))
        self.columns = [c for c in first if all(c in r for r in self.reports.values())]

    def value(self, name: str, measure: str) -> float:
        """The measure of one minimum on all the data."""
        return self.reports[name][measure]

    def uncertainty(self, name: str, measure: str) -> float | None:
        """The estimate's own error bar (standard error or residual bound), or None."""
        return self.reports[name].measure(measure).uncertainty

    def spread(self, name: str, measure: str) -> float | None:
        """Sample standard deviation of the measure over the data subsets (None without)."""
        values = [r[measure] for r in self.subset_reports.get(name, ()) if measure in r]
        return float(np.std(values, ddof=1)) if len(values) > 1 else None

    def rows(self) -> list[dict[str, Any]]:
        """One dict per minimum: ``name`` and, per measure, value, uncertainty, spread."""
        out = []
        for name in self.reports:
            row: dict[str, Any] = {"name": name}
            for c in self.columns:
                row[c] = self.value(name, c)
                row[f"{c} uncertainty"] = self.uncertainty(name, c)
                row[f"{c} subset std"] = self.spread(name, c)
            out.append(row)
        return out

    def to_markdown(self, columns: Sequence[str] | None = None, digits: int = 4) -> str:
        """A markdown table: ``value +/- error`` per cell, where the error is the
        spread over data subsets when there are subsets, else the estimate's own."""
        columns = self._pick(columns)
        head = ["minimum", *columns]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name in self.reports:
            cells = [name]
            for c in columns:
                err = self.spread(name, c)
                if err is None:
                    err = self.uncertainty(name, c)
                cell = f"{self.value(name, c):.{digits}g}"
                cells.append(cell if err is None else f"{cell} +/- {err:.2g}")
            lines.append("| " + " | ".join(cells) + " |")
        note = "\n" + self.provenance()
        if self.subset_reports:
            k = len(next(iter(self.subset_reports.values())))
            note += f"; +/- is the std over {k} disjoint data subsets"
        else:
            note += "; +/- is each estimate's standard error or residual bound"
        return "\n".join(lines) + note + "\n"

    def provenance(self) -> str:
        """How the reports were computed, read from the first one: ``"<method> (<dtype>,
        n = <parameters>, <samples> samples, <mode> mode)"`` (every report of a
        :func:`compare_minima` table shares these)."""
        info = next(iter(self.reports.values())).info
        return (
            f"{info['method']} ({info['dtype']}, n = {info['n_params']:,}, "
            f"{info['n_samples']:,} samples, {info['mode']} mode)"
        )

    def to_csv(self, path: str | None = None) -> str:
        """The rows as CSV (and written to ``path`` when given); empty cells for None."""
        rows = self.rows()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
        text = buf.getvalue()
        if path is not None:
            from pathlib import Path

            from .checkpoint import atomic_write_bytes

            atomic_write_bytes(Path(path), text.encode())
        return text

    def plot(self, measures: Sequence[str] | None = None) -> Figure:
        """Overlaid spectra (densities on a shared grid) and one bar chart per measure,
        with error bars (subset spread, else the estimates' own)."""
        measures = self._pick(measures or [c for c in self.columns if c != "loss"][:7])
        panels = len(measures) + 1
        cols = min(4, panels)
        rows = math.ceil(panels / cols)
        fig = Figure(figsize=(3.6 * cols, 3.0 * rows), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
        spectra_ = {n: r.spectrum for n, r in self.reports.items() if r.spectrum is not None}
        ax = axes[0]
        if spectra_:
            lo = min(float(s.eigenvalues[0]) for s in spectra_.values())
            hi = max(float(s.eigenvalues[-1]) for s in spectra_.values())
            grid = np.linspace(lo, hi, 400) if hi > lo else np.linspace(lo - 1, hi + 1, 400)
            sigma = (grid[-1] - grid[0]) / 200
            for n, s in spectra_.items():
                ax.semilogy(grid, np.maximum(s.density(grid, sigma), 1e-12), label=n)
            ax.set_xlabel("eigenvalue")
            ax.set_ylabel("density")
            ax.legend(fontsize=7)
        ax.set_title("Hessian spectra", fontsize=9)
        names = list(self.reports)
        x = np.arange(len(names))
        for ax, m in zip(axes[1:], measures, strict=False):
            vals = [self.value(n, m) for n in names]
            errs = [
                self.spread(n, m)
                if self.spread(n, m) is not None
                else (self.uncertainty(n, m) or 0.0)
                for n in names
            ]
            ax.bar(x, vals, yerr=errs, color=[f"C{i}" for i in range(len(names))], capsize=3)
            ax.set_xticks(x, names, rotation=30, fontsize=7)
            ax.set_title(m, fontsize=9)
        for ax in axes[panels:]:
            ax.set_visible(False)
        return fig

    def _pick(self, columns: Sequence[str] | None) -> list[str]:
        if columns is None:
            return list(self.columns)
        missing = [c for c in columns if c not in self.columns]
        if missing:
            raise KeyError(f"no measure {missing} in every report; available: {self.columns}")
        return list(columns)

    def __repr__(self) -> str:
        return f"FlatnessTable({list(self.reports)}, {len(self.columns)} measures)"


def split_data(data: Any, k: int, batch_dim: int = 0) -> list[Any]:
    """``data`` cut into ``k`` disjoint parts of (nearly) equal size.

    One ``(inputs, targets)`` pair is cut along ``batch_dim`` of every tensor with
    the batch's sample count there; a list of batches is dealt out batch by batch
    (it needs at least k batches).  Raises ``ValueError`` when it cannot be cut.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"subsets must be an int >= 2, got {k!r}")
    if is_pair(data):  # one batch, by the operators' rule
        inputs, targets = data
        m = batch_size(inputs, targets, batch_dim)
        if m < k:
            raise ValueError(f"cannot cut {m} samples into {k} subsets")
        bounds = np.linspace(0, m, k + 1).round().astype(int)
        return [
            (_narrow(inputs, batch_dim, m, a, b), _narrow(targets, batch_dim, m, a, b))
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]
    batches = list(data)
    if len(batches) < k:
        raise ValueError(
            f"cannot deal {len(batches)} batches into {k} subsets; pass one (inputs, targets) "
            "pair (cut by samples) or at least as many batches as subsets"
        )
    return [batches[i::k] for i in range(k)]


def _narrow(obj: Any, dim: int, m: int, a: int, b: int) -> Any:
    """Samples a:b of every tensor or array in ``obj`` with m along ``dim``."""
    if isinstance(obj, PackedSequence):
        raise ValueError(
            "cannot cut a PackedSequence into subsets by samples; pass a list of at least "
            "`subsets` (inputs, targets) batches instead, which are dealt out whole"
        )
    if isinstance(obj, torch.Tensor | np.ndarray):
        if obj.ndim > dim and obj.shape[dim] == m:
            return obj[(slice(None),) * dim + (slice(a, b),)]
        return obj
    if isinstance(obj, Mapping):
        return {key: _narrow(v, dim, m, a, b) for key, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(_narrow(v, dim, m, a, b) for v in obj)
    return obj


def compare_minima(
    models: Mapping[str, nn.Module | Mapping[str, torch.Tensor]],
    loss_fn: Callable[..., torch.Tensor],
    data: Any,
    *,
    factory: Callable[[], nn.Module] | None = None,
    subsets: int | None = None,
    **flatness_options: Any,
) -> FlatnessTable:
    """:func:`spectra.flatness` of every minimum on the same data, as one table.

    Args:
        models: name -> a model, or name -> a ``state_dict`` (then ``factory``
            builds the architecture it is loaded into; the models are never changed).
        loss_fn, data: as for :func:`spectra.flatness`; every model sees exactly the
            same data (a fixed subset: pass a list or a pair, not a shuffling loader).
        factory: ``() -> nn.Module`` for state-dict entries.
        subsets: also measure on this many disjoint parts of the data (see
            :func:`split_data`) to report the spread over data; costs k more runs.
            Needs a loss that averages over samples (a summed loss is refused: each
            part would have 1/k of the curvature).
        flatness_options: passed to :func:`spectra.flatness` (``rhos=``,
            ``feature_layer=``, ``method=``, operator options, ...).

    Returns:
        :class:`FlatnessTable`.
    """
    if not isinstance(models, Mapping) or not models:
        raise TypeError("models must be a non-empty mapping from name to model or state_dict")
    built = {name: _build(name, m, factory) for name, m in models.items()}
    parts = None
    if subsets is not None:
        kind = resolve_reduction(loss_fn, flatness_options.get("reduction"))[0]
        if kind == "sum":
            raise ValueError(_SUMMED_SUBSETS)
        parts = split_data(data, subsets, flatness_options.get("batch_dim") or 0)
    reports, per_subset = {}, {}
    for name, model in built.items():
        reports[name] = flatness(model, loss_fn, data, name=name, **flatness_options)
        if parts is not None and reports[name].info.get("reduction") == "sum":
            raise ValueError(_SUMMED_SUBSETS)  # a plain function, found to sum on the data
        if parts is not None:
            per_subset[name] = [
                flatness(model, loss_fn, part, name=name, **flatness_options) for part in parts
            ]
    return FlatnessTable(reports, per_subset)


_SUMMED_SUBSETS = (
    "subsets= measures each minimum again on k disjoint parts of the data, but the loss "
    "sums over samples: each part then has about 1/k of the curvature, so the spread of "
    "the parts' values is not the spread of the full data's value. Use a loss that "
    "averages (reduction='mean', torch's default) or leave subsets out"
)


def _build(name: str, entry: Any, factory: Callable[[], nn.Module] | None) -> nn.Module:
    if isinstance(entry, nn.Module):
        return entry
    if isinstance(entry, Mapping):
        if factory is None:
            raise ValueError(f"models[{name!r}] is a state_dict: pass factory= to build the model")
        model = factory()
        model.load_state_dict(entry)
        return model
    raise TypeError(f"models[{name!r}] is a {type(entry).__name__}; expected a model or state_dict")
