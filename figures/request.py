"""What every figure's ``run`` is asked to do: one frozen request instead of five arguments."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FigureRequest"]


@dataclass(frozen=True)
class FigureRequest:
    """The options shared by every figure (``python -m figures <name> ...``).

    Attributes:
        preset: which configuration (:func:`figures.presets.get`): ``"default"``, ``"paper"``
            or ``"smoke"``.
        out_dir: output folder; the cache lives in ``<out_dir>/cache``.
        device: ``"cpu"`` or ``"cuda"``.
        use_cache: read and write the cache (``--no-cache`` turns it off).
        progress: progress bars.
    """

    preset: str = "default"
    out_dir: str | Path = "figures/out"
    device: str = "cpu"
    use_cache: bool = True
    progress: bool = True

    def astuple(self) -> tuple[str, str | Path, str, bool, bool]:
        """``(preset, out_dir, device, use_cache, progress)``."""
        return dataclasses.astuple(self)
