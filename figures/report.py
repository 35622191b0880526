"""Writing a figure's outputs: ``<name>.png``, ``<name>.pdf`` and ``<name>.json``, each
atomically (temporary file in the same folder, then ``os.replace``), plus the caption
strip under a plot and the summary table of ``python -m figures all``."""

from __future__ import annotations

import io
import json
import math
import textwrap
import time
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .cache import write_atomic

__all__ = ["add_caption", "write_outputs", "publish", "summary_table"]


def add_caption(fig: Figure, text: str, fontsize: float = 8.0, title: str | None = None) -> None:
    """Grow ``fig`` by a strip at the bottom holding ``text`` (wrapped to the figure's
    width) and, with ``title``, a strip at the top holding it; every axes keeps its size
    and relative place (the axes are remapped into the old canvas's part)."""
    width, height = fig.get_size_inches()
    chars = max(int(width * 72 / (fontsize * 0.52)), 20)
    wrapped = "\n".join(textwrap.fill(line, chars) for line in text.splitlines())
    line_h = fontsize * 1.4 / 72.0
    bottom = (wrapped.count("\n") + 1) * line_h + 0.2  # inches
    top = 0.4 if title else 0.0
    new_height = height + bottom + top
    for ax in fig.axes:
        pos = ax.get_position()
        y0 = (bottom + pos.y0 * height) / new_height
        ax.set_position((pos.x0, y0, pos.width, pos.height * height / new_height))
    fig.set_size_inches(width, new_height)
    fig.text(0.02, (bottom - 0.1) / new_height, wrapped, ha="left", va="top", fontsize=fontsize)
    if title:
        fig.suptitle(title, y=1 - 0.08 / new_height, va="top", fontsize=11)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _finite(obj: Any) -> Any:
    """Replace NaN/Inf floats by None so the JSON is strict."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def write_outputs(
    out_dir: str | Path, name: str, fig: Figure | None, stats: dict[str, Any], dpi: int = 150
) -> dict[str, Path]:
    """Write ``<out_dir>/<name>.png``, ``.pdf`` (if ``fig``) and ``.json``, atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if fig is not None:
        for fmt in ("png", "pdf"):
            buf = io.BytesIO()
            fig.savefig(buf, format=fmt, dpi=dpi)
            paths[fmt] = out / f"{name}.{fmt}"
            write_atomic(paths[fmt], buf.getvalue())
    paths["json"] = out / f"{name}.json"
    text = json.dumps(_finite(stats), indent=1, default=_json_default, allow_nan=False)
    write_atomic(paths["json"], (text + "\n").encode())
    return paths


def publish(
    out_dir: str | Path, name: str, fig: Figure, stats: dict[str, Any], title: str, started: float
) -> dict[str, Any]:
    """Caption ``fig`` with ``stats["caption"]`` under ``title``, record the seconds since
    ``started`` (a ``time.perf_counter()``) and write the figure's outputs; returns
    ``stats``."""
    add_caption(fig, stats["caption"], title=title)
    stats["seconds"] = time.perf_counter() - started
    write_outputs(out_dir, name, fig, stats)
    return stats


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _pct(value: float | None, spec: str) -> str:
    width = int(spec.split(".")[0]) + 1
    return "-".rjust(width) if value is None else format(100 * value, spec) + "%"


def summary_table(results: dict[str, dict[str, Any]]) -> str:
    """A plain-text table of the headline numbers of each figure, ours beside the paper's."""
    head = (
        f"{'figure':7} {'params':>7} {'runs':>4} {'tol':>6} {'near0':>7} {'paper':>6} "
        f"{'top':>9} {'bottom':>10} {'test err':>8} {'paper':>6} {'secs':>6}"
    )
    rows = [head, "-" * len(head)]
    for name, s in results.items():
        if "mean" not in s:  # fig2
            rows.append(f"{name:7} {s.get('summary', ''):<80} {_fmt(s.get('seconds'), '6.1f')}")
            continue
        m, p = s["mean"], s["paper"]
        rows.append(
            f"{name:7} {s['n_params']:7d} {s['n_runs']:4d} {s['near_zero_tol']:6.0e} "
            f"{100 * m['fraction_near_zero']:6.1f}% "
            f"{_pct(p.get('fraction_near_zero'), '5.0f')} "
            f"{m['top']:9.3g} {m['bottom']:10.3g} {100 * m['test_error']:7.2f}% "
            f"{_pct(p.get('test_error'), '5.1f')} "
            f"{s['seconds']:6.1f}"
        )
    return "\n".join(rows)
