"""One result type for every curvature diagonal: :class:`CurvatureDiagonal`.

:func:`spectra.hessian_diagonal` (exact or Hutchinson, of any operator),
:func:`spectra.empirical_fisher_diagonal` (per-sample gradients) and
:func:`spectra.fisher_diagonal_from_adam` (Adam's moments) all return it, so a diagonal is
read, compared, split per parameter and plotted the same way whichever way it was made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from .spectrum import Spectrum

__all__ = ["CurvatureDiagonal"]

#: ``method`` values, by estimator.
METHODS = ("exact", "hutchinson", "per_sample", "adam_moments")


@dataclass(frozen=True, eq=False)
class CurvatureDiagonal:
    """The diagonal of a curvature matrix, its parameter layout and how it was obtained.

    Attributes:
        values: (n,) the diagonal entries, parameters concatenated in :attr:`names` order,
            each flattened in row-major order (the layout of :class:`~spectra.ParameterView`
            for operators).  Dtype and device: the operator's (``hessian_diagonal``,
            ``empirical_fisher_diagonal``), or the requested dtype on the parameters'
            device (``fisher_diagonal_from_adam``, float64 by default).
        method: ``"exact"`` (identity columns), ``"hutchinson"`` (Rademacher probes),
            ``"per_sample"`` (per-sample gradients) or ``"adam_moments"``.
        source: the class name of the operator or optimizer it was read from.
        names: one label per parameter; empty when the operator has no parameter layout
            (a matrix or a plain callable).
        shapes: each parameter's shape (empty with ``names``).
        stderr: (n,) per-entry standard errors for ``"hutchinson"`` (sample std over the
            probes / sqrt(probes)); None for the other methods.
        matvecs: operator-vector products spent (n for ``"exact"``, the probes for
            ``"hutchinson"``, 0 for the others).
        num_samples: Hutchinson probes; None for the other methods.
        steps: ``"adam_moments"``: each parameter's Adam step count t (else empty).
        betas: ``"adam_moments"``: each parameter's (beta1, beta2) (else empty).
        unbiased: ``"adam_moments"``: whether the stationary-noise factor was divided out.
        n_negative_rounding: ``"adam_moments"``: entries < 0 with ``|value| <= 4 eps
            v_hat``, rounding noise of the stored moments (0 for the other methods).
        skipped: ``"adam_moments"``: parameters the optimizer holds but never stepped,
            left out when all parameters were asked for.
        info: anything else the estimator records (e.g. ``centered`` for
            ``"per_sample"``); copied into :meth:`to_spectrum`'s info.
    """

    values: torch.Tensor
    method: str
    source: str = ""
    names: tuple[str, ...] = ()
    shapes: tuple[torch.Size, ...] = ()
    stderr: torch.Tensor | None = None
    matvecs: int = 0
    num_samples: int | None = None
    steps: tuple[int, ...] = ()
    betas: tuple[tuple[float, float], ...] = ()
    unbiased: bool = False
    n_negative_rounding: int = 0
    skipped: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.values.ndim != 1:
            raise ValueError(f"values must be 1-D, got shape {tuple(self.values.shape)}")
        if self.stderr is not None and self.stderr.shape != self.values.shape:
            raise ValueError(
                f"stderr has shape {tuple(self.stderr.shape)}, values {tuple(self.values.shape)}"
            )
        if len(self.names) != len(self.shapes):
            raise ValueError(f"{len(self.names)} names for {len(self.shapes)} shapes")
        if self.shapes and sum(math.prod(s) for s in self.shapes) != self.values.numel():
            raise ValueError(
                f"the shapes hold {sum(math.prod(s) for s in self.shapes)} entries, "
                f"values {self.values.numel()}"
            )

    @property
    def n(self) -> int:
        """Number of entries."""
        return int(self.values.numel())

    @property
    def n_negative(self) -> int:
        """Entries < 0 (kept, never clipped: :mod:`spectra.fisher_diagonal` says why the
        Adam estimate has them; a Hessian's diagonal may be negative away from a minimum)."""
        return int((self.values < 0).sum())

    @property
    def per_parameter(self) -> dict[str, torch.Tensor]:
        """``{name: view of values shaped like the parameter}`` (views, no copies).

        Raises ``ValueError`` when the diagonal has no parameter layout (it was taken of a
        matrix or a plain callable).
        """
        if not self.names:
            raise ValueError(
                f"this diagonal ({self.method} of a {self.source or 'matrix'}) has no "
                "parameter layout; build the operator from a model to get one"
            )
        pieces = torch.split(self.values, [math.prod(s) for s in self.shapes])
        return {
            name: piece.view(shape)
            for name, piece, shape in zip(self.names, pieces, self.shapes, strict=True)
        }

    # Tensor-like reading, so code written when some of these functions returned the
    # bare (n,) tensor keeps working: d.numel(), d.detach().cpu().numpy().
    def numel(self) -> int:
        """Number of entries (as ``Tensor.numel``)."""
        return self.n

    def detach(self) -> CurvatureDiagonal:
        """The same diagonal with ``values`` (and ``stderr``) detached from autograd."""
        return self._map(torch.Tensor.detach)

    def cpu(self) -> CurvatureDiagonal:
        """The same diagonal with ``values`` (and ``stderr``) on the CPU."""
        return self._map(torch.Tensor.cpu)

    def numpy(self) -> np.ndarray:
        """``values`` as a NumPy array (detached, on the CPU; shares memory when it can)."""
        return self.values.detach().cpu().numpy()

    def _map(self, fn: Any) -> CurvatureDiagonal:
        stderr = None if self.stderr is None else fn(self.stderr)
        return replace(self, values=fn(self.values), stderr=stderr)

    def to_spectrum(self, name: str | None = None, **metadata: Any) -> Spectrum:
        """The entries as a ``kind="diagonal"`` :class:`~spectra.spectrum.Spectrum`.

        So :func:`spectra.plot.spectrum` and :func:`spectra.plot.signed_panels` (the
        paper's Fig. 3c) plot it; negative entries stay negative.  Its info records the
        method, source and counts, the Adam provenance where there is one, :attr:`info`
        and any ``info=`` passed here (which wins).
        """
        info: dict[str, Any] = {
            "estimator": self.method,
            "source": self.source,
            "n_negative": self.n_negative,
        }
        if self.method == "adam_moments":
            info.update(
                unbiased=self.unbiased,
                steps=sorted(set(self.steps)),
                betas=sorted({tuple(b) for b in self.betas}),
                n_negative_rounding=self.n_negative_rounding,
            )
        else:
            info["matvecs"] = self.matvecs
        if self.num_samples is not None:
            info["num_samples"] = self.num_samples
        info.update(self.info)
        info.update(metadata.pop("info", {}))
        metadata.setdefault("dtype", str(self.values.dtype).replace("torch.", ""))
        return Spectrum.from_diagonal(self.numpy(), name=name, info=info, **metadata)

    def __repr__(self) -> str:
        extra = (
            f", steps={sorted(set(self.steps))}, unbiased={self.unbiased}"
            if self.method == "adam_moments"
            else f", matvecs={self.matvecs}"
        )
        return (
            f"CurvatureDiagonal({self.method}, n={self.n}, tensors={len(self.names)}, "
            f"n_negative={self.n_negative}{extra}, source={self.source!r})"
        )
