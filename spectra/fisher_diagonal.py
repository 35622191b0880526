"""The diagonal of the Fisher information, read from Adam's moments or computed directly.

The paper (Sec. 5.1 (iv)) reads the curvature of All-CNN-BN, too large for an
exact Hessian, from what Adam already keeps:

    diag(I) = E[g^2] - (E g)^2  ~  v_hat - m_hat^2,
    m_hat = exp_avg / (1 - beta1^t),   v_hat = exp_avg_sq / (1 - beta2^t),

with t each parameter's own step count.  :func:`fisher_diagonal_from_adam` does
exactly that and costs no forward or backward pass; :func:`empirical_fisher_diagonal`
is the direct estimate from per-sample gradients, for cross-checks.

What the Adam estimate is, exactly
----------------------------------
Write the bias-corrected moments as weighted averages of the gradients g_1..g_t
that the optimizer saw::

    m_hat = sum_k w_k g_k,   w_k = (1 - b1) b1^(t-k) / (1 - b1^t)
    v_hat = sum_k u_k g_k^2, u_k = (1 - b2) b2^(t-k) / (1 - b2^t)

Both weight vectors sum to 1, but they average over different horizons: about
1 / (1 - b1) = 10 steps for m and 1 / (1 - b2) = 1000 steps for v at the default
betas.  If the g_k are independent with means mu_k and variance s^2 (per
coordinate), then exactly::

    E[v_hat - m_hat^2] = s^2 (1 - sum_k w_k^2)                      (noise term)
                         + sum_k u_k mu_k^2 - (sum_k w_k mu_k)^2     (drift term)

* Noise term: ``sum_k w_k^2 = (1-b1)/(1+b1) * (1+b1^t)/(1-b1^t)``, so for a
  stationary stream the estimate converges to ``s^2 * 2 b1 / (1 + b1)`` (0.947 s^2
  at b1 = 0.9, 0.667 s^2 at Entropy-Adam's b1 = 0.5), not to s^2: m_hat is itself
  noisy and its variance is subtracted.  At t = 1 the estimate is 0 (g^2 - g^2).
  ``unbiased=True`` divides by ``1 - sum_k w_k^2`` (per parameter, with its own t),
  which makes it unbiased for a stationary stream; it needs b1 > 0 and t >= 2.
  The paper uses v_hat - m_hat^2 as it stands, which is the default.
* Drift term: zero for a constant mean; otherwise of either sign.  It is
  **negative** when the recent mean (over ~1/(1-b1) steps) is larger in
  magnitude than the root-mean-square of the mean over the ~1/(1-b2) horizon,
  e.g. a gradient mean that grows or switches on; it is positive (inflating the
  estimate) when the mean shrinks or changes sign, as it does during training.

Why entries can be negative (the three ways, and only these)
------------------------------------------------------------
1. **Drift**: the drift term above, when the gradient mean grows within v's horizon.
2. **Fluctuation at high signal-to-noise**: even for a stationary stream,
   v_hat - m_hat^2 is a random variable.  To leading order in |mu| / s its
   standard deviation is ``2 |mu| s rho``, ``rho^2 = sum_k (u_k - w_k)^2`` (steady
   state: (1-b2)/(1+b2) + (1-b1)/(1+b1) - 2 (1-b1)(1-b2)/(1-b1 b2); rho = 0.226 at
   the default betas), against a mean of ``s^2 2 b1/(1+b1)``.  So a coordinate whose
   gradient mean is large compared with its noise is negative with probability
   about ``Phi(-(2 b1/(1+b1)) s / (2 |mu| rho))``: 15% at |mu| = 2 s, 30% at 4 s,
   -> 50% as |mu| / s -> infinity.  Below |mu| ~ 2 s the quadratic noise terms
   add to this; measured (Gaussian stream, default betas, t = 3000, 20,000
   coordinates): 3.4% at |mu| = s, 0.3% at 0.5 s, 0.015% at 0.25 s, none at
   mu = 0 (there m_hat^2 must exceed v_hat ~ 0.95 s^2, a 4-sigma event for m_hat).
   With m_hat and v_hat over the *same* weights the estimate would be a weighted
   variance and never negative (Jensen); the mismatch of horizons is what allows it.
3. **Rounding**: v_hat - m_hat^2 cancels where |m_hat| ~ sqrt(v_hat) (t = 1, or
   very high SNR).  The moments are stored in the parameters' dtype (float32
   usually), so entries with ``|value| <= 4 eps v_hat`` are rounding noise;
   :attr:`~spectra.CurvatureDiagonal.n_negative_rounding` counts negatives of that size.

Negative entries are kept, counted (:attr:`~spectra.CurvatureDiagonal.n_negative`) and plotted
on the negative side of :func:`spectra.plot.signed_panels`, never clipped.

What it estimates, and how it relates to the per-sample Fisher
--------------------------------------------------------------
Adam's g_k are *minibatch* gradients, in train mode (dropout, BatchNorm batch
statistics), at weights that move between steps.  Near a minimum where the
weights barely move, v_hat - m_hat^2 estimates the variance of a minibatch
gradient, about ``(E_i[g_i^2] - (E_i g_i)^2) / B`` for batch size B: the
*centered* per-sample second moment divided by B (sampling with replacement).
:func:`empirical_fisher_diagonal` (``centered=True``) computes that per-sample
quantity exactly at fixed weights; multiply the Adam estimate by B to compare.
The paper plots the Adam estimate itself, so no rescaling is done here.

Further choices: ``amsgrad``'s ``max_exp_avg_sq`` is a running maximum, not a
moment, so ``exp_avg_sq`` is used for it too.  ``torch.optim.Adam(weight_decay=l)``
folds ``l * theta`` into the gradient the moments see (AdamW does not); that
shifts the mean, not the variance, while theta is nearly constant.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .diagonal import CurvatureDiagonal
from .fisher import EmpiricalFisherOperator

__all__ = [
    "fisher_diagonal_from_adam",
    "empirical_fisher_diagonal",
    "adam_noise_factor",
    "REQUIRED_STATE",
]

#: Per-parameter state keys an optimizer must keep (besides ``betas`` in each group).
REQUIRED_STATE = ("exp_avg", "exp_avg_sq", "step")


def adam_noise_factor(beta1: float, t: int) -> float:
    """``1 - sum_k w_k^2``: E[v_hat - m_hat^2] / s^2 for a stationary stream after t steps.

    ``sum_k w_k^2 = (1 - b1)/(1 + b1) * (1 + b1^t)/(1 - b1^t)`` (1 at t = 1; b1 = 0
    gives 1 for every t, so the factor is 0: m_hat is the last gradient itself).
    Tends to ``2 b1 / (1 + b1)`` as t grows.
    """
    if t < 1:
        raise ValueError(f"t must be >= 1, got {t}")
    if beta1 == 0.0:
        return 0.0
    b1t = beta1**t
    return 1.0 - (1.0 - beta1) / (1.0 + beta1) * (1.0 + b1t) / (1.0 - b1t)


# --- selecting the parameters -----------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    name: str
    param: torch.Tensor
    group: dict[str, Any]


def _check_adam_like(optimizer: Any) -> None:
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, list) or not hasattr(optimizer, "state"):
        raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    missing = [i for i, g in enumerate(groups) if "betas" not in g]
    if missing:
        raise TypeError(
            f"{type(optimizer).__name__} keeps no Adam moments: its param groups have no "
            f"'betas' (groups {missing}), and the Fisher diagonal needs per-parameter state "
            f"{', '.join(REQUIRED_STATE)} with each group's betas (torch.optim.Adam, AdamW, "
            "or Entropy-Adam)"
        )


def _check_state(entries: list[_Entry], optimizer: Any) -> None:
    """Every stepped parameter's state must hold the moments (Adamax, say, does not)."""
    for e in entries:
        st = optimizer.state.get(e.param)
        lacking = [k for k in REQUIRED_STATE if k not in st] if st else []
        if lacking:
            raise TypeError(
                f"{type(optimizer).__name__} state for {e.name} lacks {lacking}; the Fisher "
                f"diagonal needs {', '.join(REQUIRED_STATE)} per parameter"
            )


def _held(optimizer: Any, model: nn.Module | None) -> list[_Entry]:
    """Every parameter the optimizer holds, labelled by model name where possible."""
    model_names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    entries, seen = [], set()
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            if id(p) in seen:
                continue
            seen.add(id(p))
            entries.append(_Entry(model_names.get(id(p), f"group{g}.param{i}"), p, group))
    if model is not None:
        order = {id(p): k for k, (_, p) in enumerate(model.named_parameters())}
        entries.sort(key=lambda e: order.get(id(e.param), len(order)))
    return entries


def _select(
    entries: list[_Entry],
    params: Iterable[torch.Tensor | str] | None,
    optimizer: Any,
    has_model: bool,
) -> list[_Entry]:
    if params is None:
        return entries
    if isinstance(params, str | torch.Tensor):
        params = [params]
    params = list(params)
    by_id = {id(e.param): e for e in entries}
    by_name = {e.name: e for e in entries}
    chosen, foreign = [], []
    for k, p in enumerate(params):
        entry = by_name.get(p) if isinstance(p, str) else by_id.get(id(p))
        if entry is None:
            foreign.append(repr(p) if isinstance(p, str) else f"params[{k}] {tuple(p.shape)}")
        elif entry not in chosen:
            chosen.append(entry)
    if foreign:
        named = any(isinstance(p, str) for p in params)
        hint = "; names are resolved only with model=" if named and not has_model else ""
        raise ValueError(
            f"{type(optimizer).__name__} does not hold {', '.join(foreign)}: pass parameters "
            f"(or, with model=, their names) that are in its param_groups{hint}"
        )
    if not chosen:
        raise ValueError("params selects no parameter")
    return chosen


def _with_state(
    selected: list[_Entry], optimizer: Any, explicit: bool
) -> tuple[list[_Entry], tuple[str, ...]]:
    """Drop parameters never stepped if all were asked for; else insist on state."""
    fresh = [e for e in selected if not optimizer.state.get(e.param)]
    if len(fresh) == len(selected):
        raise RuntimeError(
            f"{type(optimizer).__name__} has taken no step for "
            f"{'these parameters' if explicit else 'any parameter'}: the moments exp_avg and "
            "exp_avg_sq exist only after optimizer.step() with a gradient"
        )
    if fresh and explicit:
        raise RuntimeError(
            f"{type(optimizer).__name__} has no state yet (never stepped with a gradient) for "
            f"{', '.join(e.name for e in fresh)}"
        )
    ids = {id(e.param) for e in fresh}
    return [e for e in selected if id(e.param) not in ids], tuple(e.name for e in fresh)


# --- the estimate -------------------------------------------------------------------


def _step_count(step: Any) -> int:
    t = int(round(float(step.item() if isinstance(step, torch.Tensor) else step)))
    if t < 1:
        raise RuntimeError(f"Adam state has step {t}; the moments are defined after step 1")
    return t


def _entry_diagonal(
    entry: _Entry, state: dict[str, Any], unbiased: bool, out: torch.Tensor
) -> tuple[int, tuple[float, float], int]:
    """Write one parameter's flattened entries into ``out``.

    Returns (t, betas, negatives within rounding).  Works in place on
    ``out`` (no full-size temporaries besides m_hat), since on a 1.4M-parameter
    network fresh allocations, not arithmetic, dominate the cost.
    """
    beta1, beta2 = (float(b) for b in entry.group["betas"])
    t = _step_count(state["step"])
    v = state["exp_avg_sq"].detach().reshape(-1)
    out.copy_(v).mul_(1.0 / (1.0 - beta2**t))  # v_hat
    # not in place: .to() returns the state tensor itself when the dtypes agree
    m_hat = state["exp_avg"].detach().reshape(-1).to(out.dtype) * (1.0 / (1.0 - beta1**t))
    out.addcmul_(m_hat, m_hat, value=-1.0)
    negative = out < 0
    n_round = 0
    if bool(negative.any()):
        v_hat = v[negative].to(out.dtype) / (1.0 - beta2**t)
        n_round = int((out[negative].abs() <= 4.0 * torch.finfo(v.dtype).eps * v_hat).sum())
    if unbiased:
        factor = adam_noise_factor(beta1, t)
        if factor <= 0.0:
            raise ValueError(
                f"unbiased=True needs beta1 > 0 and at least 2 steps; {entry.name} has "
                f"beta1={beta1}, t={t} (the estimate's expectation is 0 there)"
            )
        out.div_(factor)
    return t, (beta1, beta2), n_round


def fisher_diagonal_from_adam(
    optimizer: torch.optim.Optimizer,
    params: Iterable[torch.Tensor | str] | None = None,
    *,
    model: nn.Module | None = None,
    unbiased: bool = False,
    dtype: torch.dtype = torch.float64,
) -> CurvatureDiagonal:
    """diag(I) = E[g^2] - (E g)^2 from Adam's moments (paper Sec. 5.1 (iv)); no backward pass.

    Args:
        optimizer: ``torch.optim.Adam``, ``AdamW``, ``entropy_opt.EntropyAdam`` or any
            optimizer whose per-parameter state has ``exp_avg``, ``exp_avg_sq`` and
            ``step`` (int, float or tensor) and whose param groups have ``betas``.
        params: a subset: parameter tensors, or names when ``model`` is given.
            Default: every parameter the optimizer holds; those it never stepped
            (no gradient yet) are then skipped and listed in ``skipped``.  An
            explicit subset must be held by the optimizer (else ``ValueError``)
            and stepped (else ``RuntimeError``).
        model: labels entries with ``model.named_parameters()`` names and orders
            them as the model does (the layout of :func:`empirical_fisher_diagonal`
            over the same parameters).  Without it: optimizer order,
            ``"group{g}.param{i}"`` labels.
        unbiased: divide each parameter's entries by ``1 - sum_k w_k^2`` (see the
            module docstring) so the estimate is unbiased for a stationary stream.
            Default False: the paper's ``v_hat - m_hat^2`` as it stands.
        dtype: dtype of the subtraction and the result (default float64, so no
            rounding is added to that of the stored moments).

    Each parameter uses its own step count t in ``1 - beta1^t`` and ``1 - beta2^t``.
    Negative entries are kept; the module docstring says exactly when they occur.

    Returns:
        :class:`~spectra.CurvatureDiagonal` with ``method="adam_moments"``, the
        optimizer's class as ``source``, each parameter's ``steps`` and ``betas``,
        ``unbiased``, ``n_negative_rounding`` and ``skipped``; no operator products.

    Raises:
        TypeError: the optimizer keeps no Adam moments (e.g. SGD).
        RuntimeError: no step taken yet (for the selected parameters).
        ValueError: ``params`` names something the optimizer does not hold.
    """
    _check_adam_like(optimizer)
    entries = _select(_held(optimizer, model), params, optimizer, model is not None)
    _check_state(entries, optimizer)
    entries, skipped = _with_state(entries, optimizer, explicit=params is not None)
    flat = torch.empty(
        sum(e.param.numel() for e in entries), dtype=dtype, device=entries[0].param.device
    )
    steps, betas, n_round, start = [], [], 0, 0
    for e in entries:
        stop = start + e.param.numel()
        t, b, rnd = _entry_diagonal(e, optimizer.state[e.param], unbiased, flat[start:stop])
        steps.append(t)
        betas.append(b)
        n_round, start = n_round + rnd, stop
    return CurvatureDiagonal(
        values=flat,
        method="adam_moments",
        source=type(optimizer).__name__,
        names=tuple(e.name for e in entries),
        shapes=tuple(e.param.shape for e in entries),
        steps=tuple(steps),
        betas=tuple(betas),
        unbiased=unbiased,
        n_negative_rounding=n_round,
        skipped=skipped,
    )


def empirical_fisher_diagonal(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    data: Any,
    *,
    centered: bool = False,
    **options: Any,
) -> CurvatureDiagonal:
    """diag of the empirical Fisher, ``c sum_i g_i^2``, from per-sample gradients.

    ``c`` is 1/T for a mean over T loss terms (1/N with one term per sample),
    1 for a sum; see :class:`spectra.EmpiricalFisherOperator` for the convention.
    A thin wrapper over :meth:`spectra.EmpiricalFisherOperator.diagonal`
    (``vmap(grad)`` per batch, eval mode by default): exact at the model's
    current weights, one per-sample-gradient pass.

    Args:
        model, loss_fn, data: as for :func:`spectra.hessian_operator`.
        centered: subtract the mean per-sample gradient, giving
            ``c sum_i (g_i - gbar)^2`` with ``gbar = (1/N) sum_i g_i``; with one term
            per sample and a mean, the per-sample variance
            ``(1/N) sum_i g_i^2 - ((1/N) sum_i g_i)^2``: the quantity the Adam
            estimate approximates (divided by the batch size; see the module
            docstring).  Costs one more gradient pass.
        options: the options of :func:`spectra.empirical_fisher_operator`: ``params``,
            ``dtype``, ``train_mode``, ``forward``, ``chunk_size`` (to bound memory: a
            batch's per-sample gradients take m x n scalars), ...

    Returns:
        :class:`~spectra.CurvatureDiagonal` with ``method="per_sample"``,
        ``info["centered"]``, values in the operator's dtype and the layout of
        :class:`~spectra.ParameterView` (trainable parameters in
        ``model.named_parameters()`` order).
    """
    op = EmpiricalFisherOperator(model, loss_fn, data, **options)
    diag = op.diagonal()
    if centered:
        grad = op.gradient()  # = c sum_i g_i = c N gbar
        c = 1.0 / op.num_terms if op.reduction.kind == "mean" else 1.0
        diag = diag - grad * grad / (c * op.num_samples)
    return CurvatureDiagonal(
        values=diag,
        method="per_sample",
        source=type(op).__name__,
        names=op.view.names,
        shapes=op.view.shapes,
        info={"centered": bool(centered)},
    )
