"""Finished spectrum-figure runs as two small files each, to carry between machines.

A paper-size Fig 1 run is an hour-scale build; a lent GPU does one in minutes but
keeps nothing, and the cache is keyed by code and torch versions that differ between
machines.  ``--runs-dir DIR`` writes each finished run there, and a later call on any
machine reads it instead of training and building again:

* ``<figure>-run<k>.npz``: the run's :class:`spectra.Spectrum` (eigenvalues, build and solve
  seconds), written first;
* ``<figure>-run<k>.json``: what identifies the problem (figure, preset, run configuration, the
  data's digest, Hessian samples, dtype, forward, backend), the training record, the
  gradient norm, the SHA-256 of the ``.npz`` and the provenance (device, torch, code
  versions), written last and atomically, so a present JSON means a complete run.

A stored run whose problem differs from the one asked for is refused, naming the
fields, never used; provenance is reported, not compared (a GPU run of the same
problem is the same run computed elsewhere).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import spectra
from spectra.checkpoint import atomic_write_json

from .cache import file_sha256

__all__ = ["RunStore", "StoredRunMismatch"]


class StoredRunMismatch(ValueError):
    """A stored run is of another problem, or its files do not belong together."""


def _plain(value: dict[str, Any]) -> dict[str, Any]:
    """``value`` as it reads back from JSON (tuples become lists), for comparing."""
    return json.loads(json.dumps(value))


class RunStore:
    """The finished runs of one figure in a folder (see the module docstring)."""

    def __init__(self, folder: str | Path, figure: str) -> None:
        self.folder = Path(folder)
        self.figure = figure
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"--runs-dir {self.folder} exists and is not a folder")

    def _paths(self, k: int) -> tuple[Path, Path]:
        stem = self.folder / f"{self.figure}-run{k}"
        return stem.with_suffix(".json"), stem.with_suffix(".npz")

    def read(
        self, k: int, problem: dict[str, Any]
    ) -> tuple[dict[str, Any], spectra.Spectrum] | None:
        """``(record, spectrum)`` of run ``k`` (numbered from 1), or None if it is not
        stored.  Raises :class:`StoredRunMismatch` if it is stored for another problem
        or its spectrum file is not the one its JSON names."""
        meta_path, npz_path = self._paths(k)
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if not isinstance(meta, dict) or not {"problem", "record", "provenance"} <= set(meta):
                raise ValueError("it lacks problem, record or provenance")
        except (ValueError, UnicodeDecodeError) as exc:
            raise StoredRunMismatch(
                f"{meta_path} is not a stored run ({exc}); delete it (and its .npz) to "
                "compute the run again"
            ) from None
        stored, problem = meta["problem"], _plain(problem)
        differ = sorted(
            key for key in set(stored) | set(problem) if stored.get(key) != problem.get(key)
        )
        if differ:
            raise StoredRunMismatch(
                f"{meta_path} is run {k} of another problem (differs in {', '.join(differ)}); "
                "move it away, or pass another --runs-dir, to compute this one"
            )
        if not npz_path.exists() or file_sha256(npz_path) != meta.get("spectrum_sha256"):
            raise StoredRunMismatch(
                f"{npz_path} is missing or is not the spectrum {meta_path.name} was written "
                "with; delete both files to compute the run again"
            )
        record = {**meta["record"], "stored_in": str(meta_path), "provenance": meta["provenance"]}
        return record, spectra.Spectrum.load(npz_path)

    def write(
        self,
        k: int,
        problem: dict[str, Any],
        record: dict[str, Any],
        spectrum: spectra.Spectrum,
        provenance: dict[str, Any],
    ) -> Path:
        """Store run ``k``: the spectrum, then the JSON that names it (both atomic)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        meta_path, npz_path = self._paths(k)
        spectrum.save(npz_path)
        atomic_write_json(
            meta_path,
            {
                "figure": self.figure,
                "run": k,
                "problem": _plain(problem),
                "record": record,
                "spectrum_sha256": file_sha256(npz_path),
                "provenance": provenance,
            },
        )
        return meta_path
