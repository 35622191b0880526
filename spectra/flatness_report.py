"""Flatness of one minimum: every curvature measure worth knowing, with its uncertainty.

:func:`flatness` builds one Hessian operator over (model, loss, data) and reads
from it, side by side:

* **spectrum-based** measures, which are what the paper and the peers report
  and which *change under reparametrisations that leave the function alone*
  (Dinh et al. 2017: rescale a ReLU network's layers by a and 1/a and the
  Hessian becomes as sharp or flat as you like): the top eigenvalue(s) with
  their residuals, lambda_min, the negative mass, the trace (exact, or Hutch++
  with its standard error), the fraction of |lambda| below tolerances, and the
  Laplace local entropy F(x, gamma) of Sec. 3 of the paper (eigenvalues
  <= -gamma excluded and counted);
* **reparametrisation-invariant** measures: adaptive sharpness (worst and
  average case over an elementwise |w|-scaled ball, Kwon et al. 2021) and, for
  a named feature layer, relative flatness (Petzka et al. 2021).

Exact or matrix-free is chosen by size: n <= :data:`EXACT_THRESHOLD` builds
and diagonalises the Hessian (every spectrum measure exact); above it the
Hessian is never built (Lanczos for the extremes, Hutch++ for the trace, SLQ
for the near-zero fraction and the local entropy, which are then coarse at
SLQ's resolution; a near-zero fraction's interval comes from each probe's
Chebyshev-Markov-Stieltjes bounds, so it says how coarse).  The report says which.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._checks import check_real, user_stacklevel
from ._precision import ieee_float32
from .checkpoint import atomic_write_json
from .curvature import CurvatureOperator
from .density import gauss_mass_bounds, gauss_rule_prefix
from .hessian import hessian_operator
from .laplace import laplace_table
from .spectrum import Spectrum
from .trace import confidence_interval

__all__ = ["EXACT_THRESHOLD", "FlatnessReport", "Measure", "flatness", "FlatnessFileError"]

#: Largest n solved exactly by default: a float64 matrix of 200 MB at n = 5,000,
#: built in n products and diagonalised in well under a minute on 2 cores.
EXACT_THRESHOLD = 5000

_FORMAT = "hessian-spectra/flatness-report/1"


class FlatnessFileError(ValueError):
    """A file that is not a readable flatness report."""


@dataclass(frozen=True)
class Measure:
    """One measure: its value, its uncertainty, and how it was computed.

    Attributes:
        value: the estimate, in the measure's units (eigenvalue units = loss per
            squared parameter unit; fractions; nats for the local entropy; loss
            units for sharpness).
        stderr: standard error of a stochastic estimate (Hutch++, Monte Carlo), or None.
        error_bound: a deterministic bound on |value - exact| (a Lanczos residual),
            or None.
        method: "exact", "lanczos", "hutch++", "slq", "ascent", "monte-carlo", ...
        details: matvecs or gradient evaluations, samples, seeds, converged flags,
            seconds, and measure-specific extras (JSON-ready).
        bracket: [lower, upper], the probes' mean of per-probe bounds that hold for each
            probe's exact value (SLQ's near-zero fractions: the Gauss rule's
            Chebyshev-Markov-Stieltjes bounds, :func:`spectra.density.gauss_mass_bounds`),
            or None.  ``value`` is the rule's own estimate, inside the bracket.
        bracket_stderr: [se of lower, se of upper] over the probes, or None.
    """

    value: float
    stderr: float | None = None
    error_bound: float | None = None
    method: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    bracket: list[float] | None = None
    bracket_stderr: list[float] | None = None

    @property
    def uncertainty(self) -> float | None:
        """The error bar to print: for a bracketed measure the larger distance from
        ``value`` to an end of its 95% :meth:`interval`; else the standard error, else
        the deterministic bound."""
        if self.bracket is not None:
            if self.bracket_stderr is None:  # one probe: no error for the exact value
                return None
            lo, hi = self.interval(0.95)
            return max(self.value - lo, hi - self.value)
        return self.stderr if self.stderr is not None else self.error_bound

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """A two-sided interval for the exact value.

        A stochastic estimate: ``stderr`` times Student's t with k - 1 degrees of
        freedom, k the draws behind it (``details["probes"]`` for SLQ,
        ``details["samples"]`` for Hutch++'s residual probes; a normal quantile where
        neither is recorded).  With SLQ's default 10 probes, 3 standard errors are
        too narrow (a probe saw errors up to 4 of them), t's 99.7% is 4.1.  A
        deterministic bound: ``value +- error_bound`` whatever ``confidence``.  A
        bracketed measure: the lower end of the bracket less t standard errors of it,
        to the upper end plus t of its own (each probe's exact value lies in its
        bracket, so this covers the exact value with at least ``confidence``).
        """
        if self.bracket is not None:
            draws = self.details.get("probes")
            se = self.bracket_stderr
            if se is None:
                raise ValueError(
                    "one probe's bracket holds that probe's value, not the exact one: "
                    "an interval needs slq_probes >= 2"
                )
            lo = confidence_interval(self.bracket[0], se[0], draws, confidence)[0]
            hi = confidence_interval(self.bracket[1], se[1], draws, confidence)[1]
            return max(lo, 0.0), min(hi, 1.0)  # brackets are of fractions of the spectrum
        if self.stderr is not None:
            draws = self.details.get("probes", self.details.get("samples"))
            return confidence_interval(self.value, self.stderr, draws, confidence)
        if not 0 < confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        if self.error_bound is not None:
            return self.value - self.error_bound, self.value + self.error_bound
        raise ValueError(f"{self.method or 'this'} measure carries no uncertainty")


class FlatnessReport(Mapping[str, float]):
    """What :func:`flatness` measured at one point; reads as ``{measure name: value}``.

    ``report["top_eigenvalue"]`` is a float; :meth:`measure` gives the full
    :class:`Measure` (uncertainty, method, details).  ``info`` records how the
    report was computed (exact or matrix-free and the threshold, dtype, n,
    samples, loss terms, eval/train mode, precision, wall time per measure).
    ``spectrum`` is the exact spectrum or the SLQ density.
    """

    def __init__(
        self,
        measures: Mapping[str, Measure],
        info: Mapping[str, Any],
        spectrum: Spectrum | None = None,
        name: str | None = None,
    ) -> None:
        self._measures = dict(measures)
        self.info = dict(info)
        self.spectrum = spectrum
        self.name = name

    def __getitem__(self, key: str) -> float:
        try:
            return self._measures[key].value
        except KeyError:
            raise KeyError(
                f"no measure {key!r} in this report; it has: {', '.join(self._measures)}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._measures)

    def __len__(self) -> int:
        return len(self._measures)

    def measure(self, key: str) -> Measure:
        """The :class:`Measure` behind ``report[key]``."""
        self[key]  # raises the KeyError that names what exists
        return self._measures[key]

    def summary(self) -> str:
        """A plain-text table: measure, value, +/- uncertainty, method."""
        width = max(len(k) for k in self._measures)
        lines = [
            f"{self.name or 'flatness'}: n = {self.info.get('n_params'):,}, "
            f"{self.info.get('method')}, {self.info.get('dtype')}"
        ]
        for key, m in self._measures.items():
            if m.bracket is not None and m.bracket_stderr is not None:
                lo, hi = m.interval(0.95)
                err = f" in [{lo:.2g}, {hi:.2g}]"
            else:
                err = "" if m.uncertainty is None else f" +/- {m.uncertainty:.2g}"
            lines.append(f"  {key:<{width}}  {m.value:>12.6g}{err:<12}  {m.method}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: measures (each as a dict), info, name and the spectrum's arrays."""
        out: dict[str, Any] = {
            "format": _FORMAT,
            "name": self.name,
            "measures": {k: asdict(m) for k, m in self._measures.items()},
            "info": self.info,
        }
        if self.spectrum is not None:
            s = self.spectrum
            out["spectrum"] = {
                "eigenvalues": s.eigenvalues.tolist(),
                "weights": s.weights.tolist(),
                "n_params": s.n_params,
                "kind": s.kind,
                "n_samples": s.n_samples,
                "dtype": s.dtype,
                "loss": s.loss,
                "name": s.name,
                "info": s.info,
                "created": s.created,
                "versions": s.versions,
            }
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the report as one JSON file, atomically (temp file, then rename)."""
        path = Path(path)
        if path.suffix != ".json":
            path = path.with_name(path.name + ".json")
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FlatnessReport:
        """Read a report written by :meth:`save`; anything else raises :class:`FlatnessFileError`."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no flatness report at {path}")
        try:
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict) or raw.get("format") != _FORMAT:
                raise ValueError(
                    f"not a flatness report (format {raw.get('format')!r})"
                    if isinstance(raw, dict)
                    else "not a JSON object"
                )
            measures = {k: Measure(**m) for k, m in raw["measures"].items()}
            spec = raw.get("spectrum")
            spectrum = Spectrum(**spec) if spec is not None else None
            return cls(measures, raw["info"], spectrum, raw.get("name"))
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:
            raise FlatnessFileError(f"{path} is not a readable flatness report: {exc}") from None

    def __repr__(self) -> str:
        head = ", ".join(f"{k}={v:.4g}" for k, v in list(self.items())[:4])
        return f"FlatnessReport({self.name!r}, {head}, ... {len(self)} measures)"


@ieee_float32()
def flatness(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    data: Any,
    *,
    method: str = "auto",
    exact_threshold: int = EXACT_THRESHOLD,
    top_k: int = 5,
    near_zero_tols: Sequence[float] = (1e-4, 1e-3, 1e-2),
    gammas: Sequence[float] = (1e-3, 1e-2, 1e-1, 1.0),
    rhos: Sequence[float] = (0.01, 0.05, 0.1),
    sharpness: Sequence[str] = ("worst", "average"),
    feature_layer: str | None = None,
    feature_layout: str = "auto",
    slq_probes: int = 10,
    slq_steps: int = 80,
    trace_matvecs: int = 99,
    seed: int = 0,
    name: str | None = None,
    progress: bool | None = None,
    **options: Any,
) -> FlatnessReport:
    """Every flatness measure at the model's current weights, with uncertainties.

    Args:
        model, loss_fn, data: as for :func:`spectra.hessian_operator` (the model is not
            changed; eval mode unless ``train_mode=True``).
        method: ``"exact"`` (build and diagonalise the Hessian), ``"matrix-free"``
            (never build it), or ``"auto"``: exact when n <= ``exact_threshold``.
        exact_threshold: default :data:`EXACT_THRESHOLD` (5,000 parameters).
        top_k: top eigenvalues reported (``top_eigenvalue`` is the largest; all k
            with residuals in its details).
        near_zero_tols: tolerances for ``near_zero_fraction@tol``, the weighted
            fraction of |lambda| <= tol (Fig. 1's 1e-4 first).
        gammas: scopes for ``local_entropy@gamma``, the Laplace local entropy
            -f - 1/2 sum log(1 + lambda/gamma) (nats; higher = flatter; eigenvalues
            <= -gamma excluded, their number in the details).
        rhos: radii for the adaptive sharpness measures (relative: a fraction of
            each weight's magnitude); empty to skip them.
        sharpness: which adaptive sharpness kinds, ``"worst"`` (projected
            gradient ascent, ``adaptive_sharpness@rho``) and/or ``"average"``
            (Monte Carlo, ``average_sharpness@rho``).
        feature_layer: a 2-D weight's parameter name (e.g. ``"fc2.weight"``) for
            ``relative_flatness``; None skips it.
        feature_layout: how that weight multiplies the features, ``"auto"`` (read from
            its module), ``"out_in"`` (``nn.Linear``) or ``"in_out"`` (Hugging Face
            ``Conv1D``); see :func:`spectra.relative_flatness.relative_flatness`.
        slq_probes, slq_steps, trace_matvecs: matrix-free settings.
        seed: seeds every stochastic estimate (recorded).
        name: a label for tables and plots.
        progress: progress bars of the long steps (default: on a terminal).
        options: the options of :func:`spectra.hessian_operator` (``params=``,
            ``dtype=``, ``forward=``, ``batch_dim=``, ``train_mode=``, ...).

    Returns:
        :class:`FlatnessReport`.  Wall time per measure group is in ``info["seconds"]``.
    """
    if method not in ("auto", "exact", "matrix-free"):
        raise ValueError(f"method must be 'auto', 'exact' or 'matrix-free', got {method!r}")
    _check_positive_floats("near_zero_tols", near_zero_tols, allow_zero=True)
    _check_positive_floats("gammas", gammas)
    _check_positive_floats("rhos", rhos)
    for kind in sharpness:
        if kind not in ("worst", "average"):
            raise ValueError(f"sharpness kinds are 'worst' and 'average', got {kind!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    op = hessian_operator(model, loss_fn, data, **options)
    if feature_layer is not None and feature_layer not in op.view.names:
        raise ValueError(
            f"feature_layer={feature_layer!r} is not among the operator's parameters: "
            f"{', '.join(op.view.names)}"
        )
    if feature_layer is not None:
        from .relative_flatness import resolve_layout

        feature_layout = resolve_layout(op, feature_layer, feature_layout)
    exact = op.shape[0] <= exact_threshold if method == "auto" else method == "exact"
    seconds: dict[str, float] = {}
    measures: dict[str, Measure] = {"loss": Measure(op.loss, method="exact")}
    t0 = time.perf_counter()
    if exact:
        spectrum, per_probe = _exact_measures(op, measures, top_k, name, progress), None
    else:
        spectrum, per_probe = _matrix_free_measures(
            op, measures, top_k, slq_probes, slq_steps, trace_matvecs, seed, name, progress
        )
    seconds["spectrum"] = time.perf_counter() - t0
    gradient_norm = float(torch.linalg.vector_norm(op.gradient(), dtype=torch.float64))
    _spectrum_measures(spectrum, per_probe, measures, near_zero_tols, gammas, op.loss)
    _gradient_terms(measures, gammas, gradient_norm)
    if rhos and sharpness:
        t0 = time.perf_counter()
        _sharpness_measures(op, measures, rhos, sharpness, seed)
        seconds["sharpness"] = time.perf_counter() - t0
    if feature_layer is not None:
        t0 = time.perf_counter()
        _relative_flatness_measure(op, measures, feature_layer, feature_layout, seed)
        seconds["relative_flatness"] = time.perf_counter() - t0
    info = {
        "method": "exact" if exact else "matrix-free",
        "exact_threshold": exact_threshold,
        "n_params": op.shape[0],
        "n_samples": op.num_samples,
        "loss_terms": op.num_terms,
        "reduction": op.reduction.kind,
        "dtype": str(op.dtype).replace("torch.", ""),
        "device": str(op.device),
        "mode": "train" if op.train_mode else "eval",
        "precision": op.precision,
        "gradient_norm": gradient_norm,
        "seed": seed,
        "seconds": seconds,
        "matvecs": op.matvecs,
    }
    return FlatnessReport(measures, info, spectrum, name)


def _check_positive_floats(label: str, values: Sequence[float], allow_zero: bool = False) -> None:
    if isinstance(values, np.ndarray):
        values = values.reshape(-1).tolist()
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise TypeError(f"{label} must be a sequence of numbers, got {values!r}")
    for v in values:
        try:
            x = check_real(label, v)
        except ValueError:
            x = math.nan
        if not (x > 0 or (allow_zero and x == 0)):
            raise ValueError(f"{label} must hold positive finite numbers, got {v!r}")


def _exact_measures(
    op: CurvatureOperator,
    measures: dict[str, Measure],
    top_k: int,
    name: str | None,
    progress: bool | None,
) -> Spectrum:
    from .exact import spectrum_of

    spectrum = spectrum_of(op, name=name, progress=progress)
    ev = spectrum.eigenvalues
    # Weyl: each computed eigenvalue is within ~ n eps ||H|| of the exact one, eps of the
    # precision the matrix is solved in (the operator's: float32 stays float32)
    eps = float(torch.finfo(op.dtype).eps)
    bound = float(ev.size * eps * max(abs(ev[0]), abs(ev[-1])))
    bound = max(bound, float(op.precision) * max(abs(ev[0]), abs(ev[-1])))
    top = ev[::-1][:top_k]
    measures["top_eigenvalue"] = Measure(
        float(top[0]), error_bound=bound, method="exact", details={"top_k": top.tolist()}
    )
    measures["lambda_min"] = Measure(float(ev[0]), error_bound=bound, method="exact")
    measures["trace"] = Measure(spectrum.trace(), error_bound=bound * ev.size, method="exact")
    return spectrum


def _matrix_free_measures(
    op: CurvatureOperator,
    measures: dict[str, Measure],
    top_k: int,
    probes: int,
    steps: int,
    trace_matvecs: int,
    seed: int,
    name: str | None,
    progress: bool | None,
) -> tuple[Spectrum, list[Spectrum]]:
    from .density import spectral_density
    from .lanczos import lanczos
    from .trace import trace

    top = lanczos(op, top_k, which="LA", seed=seed, return_eigenvectors=False, progress=progress)
    measures["top_eigenvalue"] = Measure(
        float(top.eigenvalues[0]),
        error_bound=float(top.residuals[0]),
        method="lanczos",
        details={
            "top_k": top.eigenvalues.tolist(),
            "residuals": top.residuals.tolist(),
            "converged": top.converged.tolist(),
            "matvecs": top.matvecs,
            "seed": seed,
        },
    )
    bottom = lanczos(op, 1, which="SA", seed=seed, return_eigenvectors=False, progress=progress)
    measures["lambda_min"] = Measure(
        float(bottom.eigenvalues[0]),
        error_bound=float(bottom.residuals[0]),
        method="lanczos",
        details={"converged": bool(bottom.converged[0]), "matvecs": bottom.matvecs, "seed": seed},
    )
    tr = trace(op, method="hutch++", num_matvecs=trace_matvecs, seed=seed, progress=progress)
    measures["trace"] = Measure(
        float(tr.estimate),
        stderr=float(tr.stderr),
        method=tr.method,  # "exact" where the budget reached n
        details={
            "matvecs": tr.matvecs,  # spent: at most the budget (fewer at a low numerical rank)
            "budget": trace_matvecs,
            "seed": seed,
            "samples": tr.samples,
        },
    )
    # one probe at a time (same matvecs), so every SLQ measure gets a probe-to-probe error
    per_probe = [
        spectral_density(
            op,
            num_probes=1,
            num_steps=steps,
            seed=seed + i,
            check_symmetry=i == 0,
            progress=progress,
        )
        for i in range(probes)
    ]
    nodes = np.concatenate([s.eigenvalues for s in per_probe])
    weights = np.concatenate([s.weights for s in per_probe]) / probes
    info = {
        **per_probe[0].info,
        "num_probes": probes,
        "seed": seed,
        "seeds": [seed + i for i in range(probes)],
        "matvecs": sum(s.info["matvecs"] for s in per_probe),
    }
    spectrum = Spectrum.from_quadrature(
        nodes,
        weights,
        op.shape[0],
        n_samples=op.num_samples,
        dtype=per_probe[0].dtype,
        loss=op.loss,
        name=name,
        info=info,
    )
    return spectrum, per_probe


def _spectrum_measures(
    spectrum: Spectrum,
    per_probe: list[Spectrum] | None,
    measures: dict[str, Measure],
    tols: Sequence[float],
    gammas: Sequence[float],
    loss: float,
) -> None:
    """Measures read off the spectrum; for SLQ, each with its probe-to-probe standard
    error (they are linear in the quadrature weights, so the value is the probes' mean)."""
    scheme = None
    if per_probe is None:
        how, details = "exact", {}
    else:
        how = "slq"
        schemes = {s.info.get("reorthogonalization") for s in per_probe}
        scheme = "local" if "local" in schemes else per_probe[0].info.get("reorthogonalization")
        details = {
            "probes": len(per_probe),
            "steps": spectrum.info.get("num_steps"),
            "reorthogonalization": scheme,
            "note": "quadrature-node weights: coarse at SLQ's resolution"
            + ("; no bracket: local reorthogonalisation" if scheme == "local" else ""),
        }

    def probe_stderr(values: list[float]) -> float | None:
        if len(values) < 2:
            return None
        return float(np.std(values, ddof=1) / math.sqrt(len(values)))

    def add(key: str, read: Callable[[Spectrum], float], **extra: Any) -> None:
        stderr = None if per_probe is None else probe_stderr([read(s) for s in per_probe])
        measures[key] = Measure(
            read(spectrum), stderr=stderr, method=how, details={**details, **extra}
        )

    add("negative_mass", Spectrum.negative_mass)
    for tol in tols:
        key = f"near_zero_fraction@{tol:g}"
        add(key, lambda s, tol=tol: s.fraction_near_zero(tol))
        if per_probe is not None and scheme != "local":
            # the rule's value can be far off below its resolution; its bounds need a
            # Gauss rule, which "local" reorthogonalisation (ghost nodes) does not give
            bounds = np.array(
                [gauss_mass_bounds(s.eigenvalues, s.weights, -tol, tol) for s in per_probe]
            )
            errors = [probe_stderr(list(bounds[:, j])) for j in (0, 1)]
            measures[key] = replace(
                measures[key],
                details={
                    **measures[key].details,
                    "bracket": "Chebyshev-Markov-Stieltjes, per probe",
                },
                bracket=[float(bounds[:, 0].mean()), float(bounds[:, 1].mean())],
                bracket_stderr=None if None in errors else errors,
            )
    # the half-length rules of the same probes (no products): log(1 + lambda / gamma)
    # is steep at small gamma, and Gauss rules overestimate its sum there (every even
    # derivative is negative); the half rule's difference estimates that bias
    halves = None
    if per_probe is not None and scheme != "local":
        halves = [
            Spectrum.from_quadrature(
                *gauss_rule_prefix(s.eigenvalues, s.weights, max(1, s.eigenvalues.size // 2)),
                s.n_params,
            )
            for s in per_probe
        ]
    for gamma, le in laplace_table(spectrum, gammas, loss).items():
        key = f"local_entropy@{gamma:g}"

        def entropy(s: Spectrum, gamma: float = gamma) -> float:
            return laplace_table(s, (gamma,), loss)[gamma].value

        add(key, entropy, excluded=le.excluded, log_volume=le.log_volume, constant=le.constant)
        if halves is not None:
            bias = abs(
                float(
                    np.mean(
                        [entropy(s) - entropy(h) for s, h in zip(per_probe, halves, strict=True)]
                    )
                )
            )
            m = measures[key]
            measures[key] = replace(
                m,
                stderr=None if m.stderr is None else math.hypot(m.stderr, bias),
                details={**m.details, "quadrature_error": bias},
            )


#: ``1/2 ||g||^2 / gamma`` (nats) above which, and above ``GRADIENT_TERM_RELATIVE`` of
#: the value, the local entropy warns that the point is too far from a critical point
#: for its formula.
GRADIENT_TERM_WARN = 0.1
GRADIENT_TERM_RELATIVE = 1e-3


def _gradient_terms(
    measures: dict[str, Measure], gammas: Sequence[float], gradient_norm: float
) -> None:
    """The Laplace local entropy is the formula at a critical point; with a gradient g the
    Gaussian integral has the further term ``1/2 g^T (H + gamma I)^-1 g`` (nats), of the
    size ``1/2 ||g||^2 / gamma`` along flat directions.  That scale goes into each
    measure's details, and a warning where it is not small, in nats and next to the value
    (a trained net's gradient norm of 0.03 makes 0.45 nats at gamma = 1e-3, against a
    local entropy of ~-1e4 at 50k parameters)."""
    worst = None
    for gamma in gammas:
        key = f"local_entropy@{gamma:g}"
        scale = 0.5 * gradient_norm**2 / float(gamma)
        measures[key] = replace(
            measures[key], details={**measures[key].details, "gradient_term_scale": scale}
        )
        large = scale > max(GRADIENT_TERM_WARN, GRADIENT_TERM_RELATIVE * abs(measures[key].value))
        if large and (worst is None or scale > worst[1]):
            worst = (float(gamma), scale)
    if worst is not None:
        warnings.warn(
            f"the gradient norm at this point is {gradient_norm:.3g}: local_entropy@gamma is "
            "the formula at a critical point and leaves out 1/2 g^T (H + gamma I)^-1 g, "
            f"which is up to ~{worst[1]:.3g} nats at gamma={worst[0]:g} (1/2 ||g||^2 / gamma "
            "along flat directions); train closer to a minimum, or compare local entropies "
            "only at larger gamma",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )


def _sharpness_measures(
    op: CurvatureOperator,
    measures: dict[str, Measure],
    rhos: Sequence[float],
    kinds: Sequence[str],
    seed: int,
) -> None:
    from .sharpness import adaptive_sharpness

    key = {"worst": "adaptive_sharpness", "average": "average_sharpness"}
    for kind in kinds:
        for rho in rhos:
            est = adaptive_sharpness(op, rho, kind=kind, seed=seed)
            m = _measure_from(est)
            if kind == "worst":  # the best ascent value: a lower bound, not a random estimate
                m = Measure(m.value, method=m.method, details={**m.details, "lower_bound": True})
            measures[f"{key[kind]}@{rho:g}"] = m


def _relative_flatness_measure(
    op: CurvatureOperator, measures: dict[str, Measure], layer: str, layout: str, seed: int
) -> None:
    from .relative_flatness import relative_flatness

    measures["relative_flatness"] = _measure_from(
        relative_flatness(op, layer, seed=seed, layout=layout)
    )


def _measure_from(estimate: Any) -> Measure:
    """A :class:`Measure` from a result dataclass with ``value``/``stderr``/``method``."""
    fields = {
        k: v
        for k, v in asdict(estimate).items()
        if k not in ("value", "stderr", "method") and _json_ready(v)
    }
    stderr = getattr(estimate, "stderr", None)
    return Measure(
        float(estimate.value),
        stderr=None if stderr is None else float(stderr),
        method=str(getattr(estimate, "method", "")),
        details=fields,
    )


def _json_ready(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
