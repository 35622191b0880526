"""What every figure's ``run`` is asked to do: one frozen request instead of five arguments."""

from __future__ import annotations

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
        only_runs: compute only these runs (numbered from 1, as the progress bars and
            the JSON's ``runs`` list them) into the cache and write no figure; empty (the
            default): every run, then the figure.  For the spectrum figures, whose runs
            cost an hour each at the paper's size: several processes (or machines sharing
            the output folder) can take different runs, and a last plain call finds every
            run in the cache and writes the figure.
        runs_dir: spectrum figures: a folder of finished runs
            (:class:`figures.run_store.RunStore`): a run stored there for the same
            problem is read instead of computed, and each run computed is stored there,
            so that runs made on other machines (a lent GPU) make the figure here.
            None (the default): the cache alone.
    """

    preset: str = "default"
    out_dir: str | Path = "figures/out"
    device: str = "cpu"
    use_cache: bool = True
    progress: bool = True
    only_runs: tuple[int, ...] = ()
    runs_dir: str | Path | None = None

    def astuple(self) -> tuple[str, str | Path, str, bool, bool]:
        """``(preset, out_dir, device, use_cache, progress)``."""
        return self.preset, self.out_dir, self.device, self.use_cache, self.progress
