"""Relative flatness (Petzka, Kamp, Adilova, Sminchisescu & Boley, NeurIPS 2021).

For a feature layer with weight ``W`` of shape (d, m) = (d_out, d_in), the PyTorch
``nn.Linear`` layout, whose row ``w_s`` (length m) holds the weights into output
neuron s, the paper's Definition 3 is

    kappa_Tr(w) = sum_{s, s' = 1..d} <w_s, w_s'> Tr(H_{s,s'}),

where ``H_{s,s'}`` is the (m, m) block of the Hessian of the empirical loss between
rows s and s' (``H_{s,s'}[t, t'] = d^2 L / dW[s, t] dW[s', t']``) and ``Tr`` the plain
trace of that block.  (The authors' experiment code divides each block trace by m,
the "neuronwise" normalised variant; that is ``value / d_in``.)

Matrix-free form: with G = W W^T and the layer's block ``H_W`` of the Hessian
(d m x d m, row-major index s m + t as ``op.view`` flattens W),
``kappa = Tr(H_W (G kron I_m))``, because ``(G kron I_m)[(s',t'), (s,t)] = G_{s' s}
delta_{t t'}``.  For any factor F (d x r) with ``F F^T = G``,
``kappa = Tr(B^T H_W B)`` with ``B = F kron I_m``: the trace of a *symmetric*
operator of size r m (positive semi-definite where ``H_W`` is), each product one
curvature product, estimated by Hutch++ or computed exactly from r m unit vectors
(:func:`spectra.trace`).  F = W (r = m) when m <= d, needing no decomposition;
otherwise F = U sqrt(Lambda) from ``G = U Lambda U^T`` (r = d), so the operator is
never larger than ``min(d, m) m``.

Invariance: rescaling the layer below by a and this layer by 1/a (ReLU networks) maps
G to G / a^2 and H_W to a^2 H_W, so kappa is unchanged while the Hessian's
eigenvalues are not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import check_int, check_seed
from ._precision import ieee_float32
from .curvature import CurvatureOperator, require_curvature_operator
from .linear_operator import CallableOperator
from .trace import trace

__all__ = ["RelativeFlatness", "relative_flatness"]

_METHODS = ("auto", "exact", "hutch++")
LAYOUTS = ("auto", "out_in", "in_out")


@dataclass(frozen=True)
class RelativeFlatness:
    """Relative flatness of one layer, with its uncertainty and how it was computed.

    Attributes:
        value: kappa_Tr (Petzka et al. 2021, Def. 3), in loss units (weights squared
            times second derivatives of the loss in those weights).
        stderr: standard error of ``value`` (0.0 when exact).
        method: ``"exact"`` or ``"hutch++"`` (what was run; ``"auto"`` resolved).
        matvecs: curvature-operator products spent (columns).
        layer: the parameter name (e.g. ``"2.weight"``).
        shape: (d_out, d_in) of the layer's weight as a map on features (the stored
            tensor's shape reversed for ``layout="in_out"``).
        size: r * d_in, the size of the operator whose trace was taken.
        curvature: the operator's class (``"HessianOperator"`` is the paper's definition;
            a GGN or Fisher operator gives the same contraction of that matrix).
        seed: seed of the Hutch++ probes.
        samples: the Hutchinson probes ``stderr`` is the spread of (0 when exact), for
            a t interval.
    """

    value: float
    stderr: float
    method: str
    matvecs: int
    layer: str
    shape: tuple[int, int]
    size: int
    curvature: str
    seed: int
    samples: int = 0

    def __repr__(self) -> str:
        return (
            f"RelativeFlatness({self.layer} {self.shape[0]}x{self.shape[1]}: {self.value:.6g} "
            f"+- {self.stderr:.2g}, method={self.method!r}, matvecs={self.matvecs})"
        )


@ieee_float32()
def relative_flatness(
    op: CurvatureOperator,
    layer: str,
    *,
    method: str = "auto",
    num_matvecs: int = 99,
    seed: int = 0,
    block_size: int = 64,
    layout: str = "auto",
    progress: bool | None = None,
) -> RelativeFlatness:
    """Relative flatness kappa_Tr of the layer ``layer`` (see the module doc for the definition).

    Args:
        op: the problem, a :class:`~spectra.curvature.CurvatureOperator` (the Hessian
            from :func:`spectra.hessian_operator` is the paper's definition) built over
            this layer's weight alone (``params="2.weight"``: cheapest) or over more
            parameters (the layer's block is sliced out; each product still costs a
            full product of ``op``).  W is read from ``op.theta``.
        layer: a parameter name of ``op.view`` (e.g. ``"2.weight"``) holding a 2-D
            weight (d_out, d_in) that multiplies the features, as ``nn.Linear``'s does.
        method: ``"exact"`` (r * d_in products, no sampling error), ``"hutch++"``
            (:func:`spectra.trace` with ``num_matvecs`` products; it is exact anyway when
            ``num_matvecs >= r * d_in``), or ``"auto"`` (default): exact when
            ``r * d_in <= num_matvecs`` (then it costs no more than the estimate),
            Hutch++ otherwise.  r = min(d_out, d_in).
        num_matvecs: Hutch++ budget (default 99, spectra.trace's; >= 4).
        seed: seeds the Hutch++ probes; an int in ``[0, 2**63)``.
        block_size: probes per block product (memory ``block_size x n``).
        layout: how the stored weight multiplies the features: ``"out_in"`` (``y = x
            W^T``, stored (d_out, d_in), ``nn.Linear``), ``"in_out"`` (``y = x W``,
            stored (d_in, d_out), Hugging Face ``Conv1D``), or ``"auto"`` (default): read
            from the module holding it (:meth:`CurvatureOperator.weight_layout`), and
            refused when that module is neither kind.  Why: the measure pairs the
            weights into each output neuron; read in the wrong layout it is a different
            number (2.6x off on a GPT-2 MLP), with no error.
        progress: tqdm progress bar (default: only on a terminal).

    Known failure modes: away from a minimum H_W is indefinite and kappa may be
    negative (or an estimate's sign uncertain); the standard error of Hutch++ is that
    of its residual part and is unreliable with few probes.  Convolutional weights
    (4-D) are refused: the paper's measure needs the layer as a matrix acting on
    features.

    Raises:
        TypeError: ``op`` is not a CurvatureOperator.
        ValueError: an unknown ``layer`` (the message lists the 2-D parameters of
            ``op``), a parameter that is not 2-D, a layout that cannot be told (pass
            ``layout=``), a bad ``method``, ``num_matvecs`` or ``seed``, all before any
            product.
    """
    require_curvature_operator(op, "relative_flatness")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    budget = check_int("num_matvecs", num_matvecs, minimum=4)
    block_size = check_int("block_size", block_size)
    seed = check_seed(seed)
    start, W = _layer_weight(op, layer)
    transposed = resolve_layout(op, layer, layout) == "in_out"
    if transposed:
        W = W.T
    d, m = W.shape
    F = _gram_factor(W)
    r = F.shape[1]
    size = r * m
    stop = start + d * m
    n = op.shape[0]

    def products(U: torch.Tensor) -> torch.Tensor:
        """(F kron I_m)^T H_W (F kron I_m) U for U (r m, k): embed, multiply, slice."""
        k = U.shape[1]
        full = torch.zeros((n, k), dtype=op.dtype, device=op.device)
        block = torch.einsum("dr,rmk->dmk", F, U.reshape(r, m, k))
        if transposed:  # stored as (m, d): W[t, s] is the weight from feature t to unit s
            full[start:stop] = block.transpose(0, 1).reshape(d * m, k)
            HV = (op @ full)[start:stop].reshape(m, d, k).transpose(0, 1)
        else:
            full[start:stop] = block.reshape(d * m, k)
            HV = (op @ full)[start:stop].reshape(d, m, k)
        return torch.einsum("dr,dmk->rmk", F, HV).reshape(size, k)

    exact = method == "exact" or (method == "auto" and size <= budget)
    before = op.matvecs
    est = trace(
        CallableOperator(products, size, op.dtype, op.device),
        "hutch++",
        num_matvecs=size if exact else budget,
        seed=seed,
        block_size=block_size,
        progress=progress,
    )
    return RelativeFlatness(
        value=est.estimate,
        stderr=est.stderr,
        method=est.method,
        matvecs=op.matvecs - before,
        layer=layer,
        shape=(d, m),
        size=size,
        curvature=type(op).__name__,
        seed=seed,
        samples=est.samples,
    )


def _layer_weight(op: CurvatureOperator, layer: str) -> tuple[int, torch.Tensor]:
    """(offset of ``layer`` in theta, its weight W (d, m) at the point); names checked."""
    view = op.view
    matrices = [
        name for name, shape in zip(view.names, view.shapes, strict=True) if len(shape) == 2
    ]
    if not isinstance(layer, str) or layer not in view.names:
        held = ""
        if layer in view.fixed_names:
            held = (
                " (it is held fixed in this operator: build it with params=None or "
                f"params=[{layer!r}])"
            )
        raise ValueError(
            f"layer={layer!r} is not a parameter of the operator{held}; 2-D parameters "
            f"available: {', '.join(matrices) or '(none)'}"
        )
    index = view.names.index(layer)
    shape = view.shapes[index]
    if len(shape) != 2:
        raise ValueError(
            f"relative flatness needs a 2-D weight (d_out, d_in) acting on features; "
            f"{layer!r} has shape {tuple(shape)}"
            + (" (a convolution kernel: unfold it into its matrix first)" if len(shape) > 2 else "")
            + f". 2-D parameters available: {', '.join(matrices) or '(none)'}"
        )
    start = sum(view.numels[:index])
    return start, view.unflatten(op.theta)[layer]


def resolve_layout(op: CurvatureOperator, layer: str, layout: str) -> str:
    """``layout`` checked, and ``"auto"`` read from the module holding ``layer``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout != "auto":
        return layout
    found = op.weight_layout(layer)
    if found is None:
        module = layer.rpartition(".")[0] or "(the model)"
        raise ValueError(
            f"cannot tell how {layer!r} multiplies the features: its module {module!r} is "
            "neither an nn.Linear nor a Hugging Face Conv1D.  Pass layout='out_in' if the "
            "forward computes x @ W.T (W stored (d_out, d_in), as F.linear does) or "
            "layout='in_out' if it computes x @ W (W stored (d_in, d_out))"
        )
    return found


def _gram_factor(W: torch.Tensor) -> torch.Tensor:
    """F (d, r) with F F^T = W W^T and r = min(d, m): W itself when m <= d, else the
    eigen-factor of the (d, d) Gram matrix (in float64; rounding-negative
    eigenvalues clamped to 0)."""
    d, m = W.shape
    if m <= d:
        return W
    lam, U = torch.linalg.eigh(W.double() @ W.double().T)
    return (U * lam.clamp_min(0).sqrt()).to(W.dtype)
