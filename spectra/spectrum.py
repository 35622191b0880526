"""`Spectrum`: the one result type for eigenvalue distributions.

A spectrum is a discrete probability measure on the real line: nodes
``eigenvalues`` (sorted, float64, on the host) with ``weights`` summing to 1,
scaled by ``n_params`` when counts are wanted.  An exact spectrum has n nodes of
weight 1/n; a stochastic Lanczos quadrature has a few hundred nodes with
unequal weights; a curvature diagonal (Fisher from Adam's moments) has one node
per parameter.  Every statistic below is written once, for weighted nodes, so
all three kinds summarise, save, load and plot the same way.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import io
import json
import math
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._checks import check_int
from .checkpoint import atomic_write_bytes

__all__ = ["Spectrum", "SpectrumFileError", "library_versions", "default_sigma"]

_KINDS = ("exact", "quadrature", "diagonal")


class SpectrumFileError(ValueError):
    """A file that :meth:`Spectrum.load` cannot read: damaged, or not written by
    :meth:`Spectrum.save`."""


def library_versions() -> dict[str, str]:
    """Versions of the libraries a result depends on, for provenance."""
    import scipy
    import torch

    from . import __version__

    return {
        "hessian-spectra": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }


def default_sigma(eigenvalues: np.ndarray) -> float:
    """Default Gaussian broadening: 1/200 of the spectral range.

    Why: the peers' defaults differ by 1000x (PyHessian uses an absolute 1e-5 on
    a normalised axis, hessian-eigenthings a fixed kernel width), and any fixed
    absolute width is wrong for some network.  A width tied to the range resolves
    the bulk-vs-outlier structure on a linear axis at any scale; near-zero
    structure is what the log-scale histogram is for.  A zero range (e.g. the zero
    matrix), or one so small (below ~4e-306) that the density's peak 1/(sigma sqrt(2 pi))
    would overflow float64, falls back to 1e-3 so the density stays defined and finite.
    """
    span = float(np.max(eigenvalues) - np.min(eigenvalues)) if eigenvalues.size else 0.0
    sigma = span / 200.0
    return sigma if sigma >= np.finfo(np.float64).tiny else 1e-3


@dataclass(frozen=True, eq=False)
class Spectrum:
    """Eigenvalues (or quadrature nodes) with weights and provenance.

    Attributes:
        eigenvalues: (m,) float64, ascending.  Exact eigenvalues for ``kind ==
            "exact"``, quadrature nodes for ``"quadrature"``, diagonal entries for
            ``"diagonal"``.
        weights: (m,) float64, non-negative, summing to 1.
        n_params: dimension n of the operator (the number of eigenvalues the
            weights stand for).
        kind: ``"exact"``, ``"quadrature"`` or ``"diagonal"``.
        n_samples: data points the curvature was averaged over (None if unknown).
        dtype: the dtype the operator was evaluated in, as a string.
        loss: the loss at the point where the curvature was taken.
        name: a label used by plots.
        created: ISO-8601 UTC timestamp.
        versions: library versions (see :func:`library_versions`).
        info: anything else worth keeping (JSON-serialisable), e.g. the
            asymmetry of an exact Hessian or the broadening rule of a density.
    """

    eigenvalues: np.ndarray
    weights: np.ndarray
    n_params: int
    kind: str = "exact"
    n_samples: int | None = None
    dtype: str | None = None
    loss: float | None = None
    name: str | None = None
    created: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ev = _real_vector("eigenvalues", self.eigenvalues)
        w = _real_vector("weights", self.weights)
        if ev.shape != w.shape:
            raise ValueError(f"{ev.size} eigenvalues but {w.size} weights")
        if ev.size == 0:
            raise ValueError("a spectrum needs at least one eigenvalue")
        if not np.all(np.isfinite(ev)):
            raise ValueError("eigenvalues contain NaN or Inf")
        if np.any(w < 0) or not math.isclose(float(w.sum()), 1.0, rel_tol=0, abs_tol=1e-6):
            raise ValueError(
                f"weights must be >= 0 and sum to 1 within 1e-6 (sum = {w.sum()!r}); divide "
                "them by their sum"
            )
        if abs(float(w.sum()) - 1.0) > 1e-12:  # float32-normalised weights: off by ~1e-8
            w = w / w.sum()
        if not isinstance(self.info, dict):
            raise TypeError(f"info must be a dict, got {type(self.info).__name__}")
        if self.loss is not None and (
            isinstance(self.loss, bool) or not isinstance(self.loss, int | float | np.floating)
        ):
            raise TypeError(f"loss must be a number or None, got {type(self.loss).__name__}")
        if self.loss is not None:  # NumPy scalars as plain floats: what save writes
            object.__setattr__(self, "loss", float(self.loss))
        if self.n_samples is not None:
            object.__setattr__(self, "n_samples", check_int("n_samples", self.n_samples, 0))
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {self.kind!r}")
        order = np.argsort(ev, kind="stable")
        if np.any(order != np.arange(ev.size)):
            ev, w = ev[order], w[order]
        ev.setflags(write=False)
        w.setflags(write=False)
        object.__setattr__(self, "eigenvalues", ev)
        object.__setattr__(self, "weights", w)
        n = check_int("n_params", self.n_params)
        if self.kind in ("exact", "diagonal") and n != ev.size:
            raise ValueError(
                f"an {self.kind} spectrum has one value per parameter: {ev.size} values but "
                f"n_params={n} (statistics would disagree: trace sums the values, histograms "
                "scale weights by n_params); use Spectrum.from_quadrature for a measure"
            )
        object.__setattr__(self, "n_params", n)
        if not self.created:
            now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            object.__setattr__(self, "created", now)
        if not self.versions:
            object.__setattr__(self, "versions", library_versions())

    # --- constructors -------------------------------------------------------------
    @classmethod
    def from_eigenvalues(cls, eigenvalues: Any, **metadata: Any) -> Spectrum:
        """An exact spectrum: every eigenvalue has weight 1/n."""
        ev = _real_vector("eigenvalues", eigenvalues)
        weights = np.full(ev.size, 1.0 / max(ev.size, 1))
        metadata.setdefault("n_params", ev.size)
        return cls(ev, weights, kind="exact", **metadata)

    @classmethod
    def from_quadrature(cls, nodes: Any, weights: Any, n_params: int, **metadata: Any) -> Spectrum:
        """A quadrature measure (e.g. stochastic Lanczos quadrature) on ``nodes``."""
        return cls(nodes, weights, n_params=n_params, kind="quadrature", **metadata)

    @classmethod
    def from_diagonal(cls, values: Any, **metadata: Any) -> Spectrum:
        """A curvature diagonal treated as an eigenvalue proxy (weight 1/n each)."""
        v = _real_vector("values", values)
        metadata.setdefault("n_params", v.size)
        return cls(v, np.full(v.size, 1.0 / max(v.size, 1)), kind="diagonal", **metadata)

    # --- statistics ---------------------------------------------------------------
    def top(self, k: int = 1) -> np.ndarray:
        """The k largest nodes, largest first: (k,) float64."""
        return self.eigenvalues[::-1][: check_int("k", k)].copy()

    def bottom(self, k: int = 1) -> np.ndarray:
        """The k smallest nodes, smallest first: (k,) float64."""
        return self.eigenvalues[: check_int("k", k)].copy()

    def fraction_near_zero(self, tol: float) -> float:
        """Fraction (weighted) of eigenvalues with |lambda| <= tol."""
        if not tol >= 0:
            raise ValueError(f"tol must be >= 0, got {tol}")
        return min(1.0, float(self.weights[np.abs(self.eigenvalues) <= tol].sum()))

    def fraction_negative(self) -> float:
        """Fraction (weighted) of eigenvalues < 0."""
        return float(self.weights[self.eigenvalues < 0].sum())

    def negative_mass(self) -> float:
        """Sum of |lambda| over negative eigenvalues, in eigenvalue units (x n_params)."""
        neg = self.eigenvalues < 0
        return float(-self.n_params * (self.weights[neg] * self.eigenvalues[neg]).sum()) + 0.0

    def trace(self) -> float:
        """Sum of eigenvalues (n_params x the weighted mean for non-exact kinds)."""
        if self.kind == "exact":
            return float(self.eigenvalues.sum())
        return float(self.n_params * (self.weights * self.eigenvalues).sum())

    def histogram(
        self, bins: int | np.ndarray = 100, range: tuple[float, float] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Counts per bin, in numbers of eigenvalues (weights x n_params), and edges.

        The one histogram routine of the library: plots call it, so a quadrature
        and an exact spectrum of the same operator give comparable bars.
        """
        counts, edges = np.histogram(
            self.eigenvalues, bins=bins, range=range, weights=self.weights * self.n_params
        )
        return counts, edges

    def density(self, grid: Any, sigma: float | None = None) -> np.ndarray:
        """Gaussian-broadened density on ``grid`` (per unit eigenvalue; integrates to 1).

        ``sigma`` defaults to :func:`default_sigma` (1/200 of the spectral range);
        the value used is what the caller passes or that rule, and
        :meth:`density_sigma` reports it.
        """
        x = np.asarray(grid, dtype=np.float64)
        s = self.density_sigma(sigma)
        z = (x[..., None] - self.eigenvalues) / s
        return (np.exp(-0.5 * z * z) @ self.weights) / (s * math.sqrt(2 * math.pi))

    def density_sigma(self, sigma: float | None = None) -> float:
        """The broadening width :meth:`density` uses for this ``sigma`` argument."""
        if sigma is None:
            sigma = float(self.info.get("sigma", default_sigma(self.eigenvalues)))
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        return float(sigma)

    def summary(self, near_zero_tol: float = 1e-4) -> dict[str, Any]:
        """A JSON-ready dict of the headline statistics."""
        return {
            "name": self.name,
            "kind": self.kind,
            "n_params": self.n_params,
            "n_samples": self.n_samples,
            "dtype": self.dtype,
            "loss": self.loss,
            "top": float(self.eigenvalues[-1]),
            "bottom": float(self.eigenvalues[0]),
            "trace": self.trace(),
            "near_zero_tol": near_zero_tol,
            "fraction_near_zero": self.fraction_near_zero(near_zero_tol),
            "fraction_negative": self.fraction_negative(),
            "negative_mass": self.negative_mass(),
        }

    # --- persistence --------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write one ``.npz`` atomically (temp file in the same folder, then rename)."""
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder; give a file name for the spectrum")
        if path.suffix.lower() != ".npz":
            path = (
                path.with_suffix(path.suffix + ".npz") if path.suffix else path.with_suffix(".npz")
            )
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder; give a file name for the spectrum")
        meta = {
            "n_params": self.n_params,
            "kind": self.kind,
            "n_samples": self.n_samples,
            "dtype": self.dtype,
            "loss": self.loss,
            "name": self.name,
            "created": self.created,
            "versions": self.versions,
            "info": self.info,
        }
        try:
            meta_json = json.dumps(meta, allow_nan=True)
        except TypeError as exc:
            raise ValueError(f"Spectrum.info must be JSON-serialisable: {exc}") from None
        buf = io.BytesIO()
        np.savez(buf, eigenvalues=self.eigenvalues, weights=self.weights, meta=np.array(meta_json))
        atomic_write_bytes(path, buf.getvalue())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Spectrum:
        """Read a spectrum written by :meth:`save`.

        A missing file raises ``FileNotFoundError``; anything else that is not a
        readable spectrum file (truncated or corrupt bytes, another ``.npz``, a JSON
        or text file, a folder, contents that do not form a valid spectrum) raises
        :class:`SpectrumFileError` naming the path and what is wrong.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no spectrum file at {path}")
        try:
            return cls(**_read_npz(path))
        # a corrupt zip directory can also name a zip feature this reader lacks
        # (NotImplementedError) or break the deflate stream (zlib.error)
        except (
            OSError,
            EOFError,
            ValueError,
            TypeError,
            KeyError,
            NotImplementedError,
            zlib.error,
            zipfile.BadZipFile,
        ) as exc:
            raise SpectrumFileError(
                f"{path} is not a spectrum file written by Spectrum.save "
                f"({type(exc).__name__}: {exc})"
            ) from None

    def __repr__(self) -> str:
        label = f"{self.name!r}, " if self.name else ""
        return (
            f"Spectrum({label}{self.kind}, n_params={self.n_params}, nodes={self.eigenvalues.size}, "
            f"range=[{self.eigenvalues[0]:.4g}, {self.eigenvalues[-1]:.4g}], "
            f"trace={self.trace():.4g}, near_zero(1e-4)={self.fraction_near_zero(1e-4):.3f})"
        )


_FIELDS = {f.name for f in dataclasses.fields(Spectrum)} - {"eigenvalues", "weights"}


def _real_vector(name: str, values: Any) -> np.ndarray:
    """``values`` as a 1-D float64 array: a scalar or a vector of real numbers.  Complex
    numbers (their imaginary parts would be dropped) and matrices (flattened into
    "eigenvalues") are refused."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        if values.is_complex():
            raise TypeError(f"{name} are complex ({values.dtype}); a spectrum holds real numbers")
        values = values.to(torch.float64).numpy()
    array = np.asarray(values)
    if np.iscomplexobj(array):
        raise TypeError(
            f"{name} are complex ({array.dtype}); a spectrum holds real numbers (a symmetric "
            "matrix has real eigenvalues: use eigvalsh, not eig)"
        )
    if array.ndim > 1:
        raise ValueError(
            f"{name} must be a vector, got an array of shape {array.shape} (for a matrix, "
            "pass its eigenvalues: numpy.linalg.eigvalsh(matrix))"
        )
    return np.array(array, dtype=np.float64).reshape(-1)


def _read_npz(path: Path) -> dict[str, Any]:
    """The constructor arguments stored by :meth:`Spectrum.save`; raises on anything else."""
    with open(path, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":
            raise ValueError("not an .npz archive")
    with np.load(path, allow_pickle=False) as z:
        missing = {"eigenvalues", "weights", "meta"} - set(z.files)
        if missing:
            raise KeyError(f"no {sorted(missing)} in the archive (it holds {sorted(z.files)})")
        ev, w, meta = z["eigenvalues"], z["weights"], z["meta"]
    if meta.dtype.kind != "U" or meta.shape != ():
        raise ValueError("'meta' is not a JSON string")
    meta = json.loads(str(meta))
    if not isinstance(meta, dict) or "n_params" not in meta:
        raise ValueError(f"'meta' must be a JSON object with n_params, got {str(meta)[:200]}")
    if not set(meta) <= _FIELDS:
        raise ValueError(
            f"its metadata has keys this version does not know ({sorted(set(meta) - _FIELDS)}): "
            "written by a newer version of hessian-spectra? Load it with that version"
        )
    # a file without provenance keeps none, rather than this session's clock and versions
    if not meta.get("created"):
        meta["created"] = "unknown (not recorded in the file)"
    if not meta.get("versions"):
        meta["versions"] = {"unknown": "not recorded in the file"}
    for name, array in (("eigenvalues", ev), ("weights", w)):
        if array.dtype.kind not in "fiu":
            raise ValueError(f"{name} are {array.dtype}, not numbers")
    return {"eigenvalues": ev, "weights": w, **meta}
