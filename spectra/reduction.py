"""What the user's loss reduces over: the rule that turns batch losses into one loss.

An operator is the curvature of the loss the user wrote, over the whole data
(curvlinops' convention):

* a **mean** stays the mean over all loss terms the loss counts, over all
  batches: L = (sum_b S_b) / T, where S_b is batch b's summed loss and T the
  total number of counted terms.  A batch's mean loss Lbar_b = S_b / T_b is
  therefore weighted by T_b / T.  What a "term" is follows the loss:
  ``nn.CrossEntropyLoss``/``nn.NLLLoss`` count the targets that are not
  ``ignore_index`` (the sum of their class weights with ``weight=``);
  element-wise losses (MSE, L1, BCE, ...) count the elements; any other
  module loss with a ``reduction`` attribute is measured (its ``"sum"`` copy
  divided by its mean); a plain function counts samples unless
  ``loss_terms=`` says otherwise.
* a **sum** stays the sum: L = sum_b S_b, every batch weighted 1.

Nothing is guessed where it matters: a plain function's reduction is detected
by evaluating it on its outputs and targets duplicated (a mean is unchanged,
a sum doubles), and an ambiguous case raises with the option to pass.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from .batches import batch_leaves

__all__ = [
    "LossReduction",
    "PlainMeanAnchor",
    "resolve_reduction",
    "check_loss_arguments",
    "check_plain_mean",
    "per_sample_sizes",
]

LossTerms = Callable[[Any, Any], Any]

#: Module losses whose mean divides by the number of elements of the (broadcast)
#: outputs and targets.
_ELEMENTWISE = (
    nn.MSELoss,
    nn.L1Loss,
    nn.SmoothL1Loss,
    nn.HuberLoss,
    nn.BCELoss,
    nn.BCEWithLogitsLoss,
    nn.SoftMarginLoss,
    nn.PoissonNLLLoss,
    nn.KLDivLoss,
)

#: Module losses whose mean divides by the number of samples (dimension 0 of the outputs).
_PER_SAMPLE = (nn.MultiMarginLoss, nn.MultiLabelMarginLoss, nn.MultiLabelSoftMarginLoss)


@dataclass(frozen=True)
class LossReduction:
    """How one loss reduces, resolved once per operator.

    Attributes:
        kind: ``"mean"`` or ``"sum"``.
        how: where ``kind`` came from (``"reduction attribute"``, ``"given"``,
            ``"detected"``, ``"assumed (one batch)"``), for reports.
        terms_rule: ``(outputs, targets) -> count`` for a mean: the number of
            terms it divides by.  None: count samples (plain functions without
            ``loss_terms=``).
        sum_loss: the same loss with ``reduction="sum"`` for module losses (None
            for plain functions), used to check the term rule and for per-sample
            losses that must not divide by a count that can be zero.
    """

    kind: str
    how: str
    terms_rule: LossTerms | None
    sum_loss: Callable[..., torch.Tensor] | None

    def summed(self, loss_fn: Callable[..., torch.Tensor], outputs: Any, targets: Any) -> Any:
        """The loss summed over its terms, not divided by their count (traceable).

        For one sample this is its contribution to the total up to the common
        factor 1/T, and stays finite when the sample has no counted term.
        """
        if self.kind == "sum":
            return loss_fn(outputs, targets)
        if self.sum_loss is not None:
            return self.sum_loss(outputs, targets)
        if self.terms_rule is None:  # a plain mean over samples
            return loss_fn(outputs, targets)
        return loss_fn(outputs, targets) * self.terms_rule(outputs, targets)

    def terms(self, outputs: Any, targets: Any, samples: int) -> float:
        """The number of loss terms a batch's mean divides by (1.0 for a sum)."""
        if self.kind == "sum":
            return 1.0
        if self.terms_rule is None:
            return float(samples)
        count = self.terms_rule(outputs, targets)
        count = float(count.detach().sum()) if isinstance(count, torch.Tensor) else float(count)
        if not (math.isfinite(count) and count >= 0):
            raise ValueError(f"loss_terms returned {count}; it must be a finite count >= 0")
        return count


def resolve_reduction(
    loss_fn: Callable[..., torch.Tensor],
    reduction: str | None = None,
    loss_terms: LossTerms | None = None,
) -> tuple[str | None, LossTerms | None, Callable[..., torch.Tensor] | None, str]:
    """What can be known about ``loss_fn`` before seeing data.

    Returns ``(kind or None, terms_rule, sum_loss, how)``; ``kind`` is None for a
    plain function without ``reduction=``, to be detected on the first batch by
    :func:`detect_kind`.  Raises for ``reduction="none"`` and for a ``reduction=``
    that contradicts the module's own attribute.
    """
    if reduction is not None and reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    attr = getattr(loss_fn, "reduction", None) if isinstance(loss_fn, nn.Module) else None
    if attr is None:
        return reduction, loss_terms, None, "given" if reduction else ""
    if attr not in ("mean", "sum", "batchmean"):
        raise ValueError(
            f"{type(loss_fn).__name__} has reduction={attr!r}; curvature needs a scalar "
            "loss per batch: use reduction='mean' or 'sum'"
        )
    kind = "sum" if attr == "sum" else "mean"
    if reduction is not None and reduction != kind:
        raise ValueError(
            f"reduction={reduction!r} was given but {type(loss_fn).__name__} has "
            f"reduction={attr!r}; leave reduction= out for torch.nn losses"
        )
    summed = copy.copy(loss_fn)
    summed.reduction = "sum"
    return kind, loss_terms or _module_terms(loss_fn), summed, "reduction attribute"


def check_loss_arguments(loss_fn: Callable[..., torch.Tensor], outputs: Any, targets: Any) -> None:
    """Refuse, on the first batch, what a ``torch.nn`` loss would take silently or with
    an unhelpful error: outputs that are not a tensor (a Hugging Face ``ModelOutput``,
    a tuple), and an elementwise loss (``nn.MSELoss``, ...) that broadcasts the
    outputs against targets of another shape: outputs (N, 1) against targets (N,)
    compare every output with every target, (N, N) terms, and the curvature then
    depends on how the data is split into batches."""
    if not isinstance(loss_fn, nn.modules.loss._Loss):
        return
    if not isinstance(outputs, torch.Tensor):
        hint = (
            "forward=lambda model, inputs: model(**inputs).logits"
            if hasattr(outputs, "keys")
            else "forward=lambda model, inputs: model(inputs)[0]"
        )
        raise TypeError(
            f"the model returns a {type(outputs).__name__}, but {type(loss_fn).__name__} takes "
            f"a tensor: pass forward= to select it (e.g. {hint}), or a loss_fn that takes "
            "the model's output as it is"
        )
    if not (isinstance(loss_fn, _ELEMENTWISE) and isinstance(targets, torch.Tensor)):
        return
    try:
        shape = torch.broadcast_shapes(outputs.shape, targets.shape)
    except RuntimeError:
        return  # the loss raises its own error
    if shape != outputs.shape:
        raise ValueError(
            f"{type(loss_fn).__name__} broadcasts outputs of shape {tuple(outputs.shape)} "
            f"against targets of shape {tuple(targets.shape)} to {tuple(shape)}: every output "
            "would be compared with targets of other samples (PyTorch only warns). Give "
            f"targets of the outputs' shape {tuple(outputs.shape)} (e.g. targets.unsqueeze(-1) "
            "in the data, or forward= returning outputs.squeeze(-1))"
        )


def _module_terms(loss_fn: nn.Module) -> LossTerms:
    if isinstance(loss_fn, nn.CrossEntropyLoss | nn.NLLLoss):
        return lambda outputs, targets: _class_terms(targets, loss_fn.ignore_index, loss_fn.weight)
    if isinstance(loss_fn, nn.KLDivLoss) and loss_fn.reduction == "batchmean":
        return lambda outputs, targets: outputs.shape[0] if outputs.ndim else 1
    if isinstance(loss_fn, _ELEMENTWISE):
        return lambda outputs, targets: math.prod(
            torch.broadcast_shapes(outputs.shape, targets.shape)
        )
    if isinstance(loss_fn, _PER_SAMPLE):
        return lambda outputs, targets: outputs.shape[0] if outputs.ndim > 1 else 1
    summed = copy.copy(loss_fn)
    summed.reduction = "sum"
    return lambda outputs, targets: _measured_terms(loss_fn, summed, outputs, targets)


def _class_terms(targets: torch.Tensor, ignore_index: int, weight: torch.Tensor | None) -> Any:
    if targets.is_floating_point():  # class probabilities: one term per position
        return targets.numel() // targets.shape[1] if targets.ndim > 1 else 1
    counted = targets != ignore_index
    if weight is None:
        return counted.sum()
    return (weight[targets.masked_fill(~counted, 0)] * counted).sum()


def _measured_terms(loss_fn: nn.Module, summed: nn.Module, outputs: Any, targets: Any) -> float:
    with torch.no_grad():
        mean, total = float(loss_fn(outputs, targets)), float(summed(outputs, targets))
    if mean == 0.0 or not math.isfinite(mean):
        raise ValueError(
            f"cannot tell how many terms {type(loss_fn).__name__} averages over (its mean is "
            f"{mean} on this batch); pass loss_terms=lambda outputs, targets: <count>"
        )
    ratio = total / mean
    if abs(ratio - round(ratio)) > max(1e-3, 1e-5 * abs(ratio)):
        # a mean of per-sample means (nn.CTCLoss divides each by its target length): the
        # ratio depends on the loss values and weighting batches by it would be wrong
        raise ValueError(
            f"{type(loss_fn).__name__}'s mean is not its sum over a whole number of terms "
            f"(sum / mean = {ratio:.6g} on this batch: a mean of per-sample means, as "
            "nn.CTCLoss's?); pass loss_terms=lambda outputs, targets: <what the mean divides "
            "by> (the number of samples for a mean of per-sample means)"
        )
    return ratio


def detect_kind(
    loss_fn: Callable[..., torch.Tensor], outputs: Any, targets: Any, loss: torch.Tensor
) -> str | None:
    """``"mean"`` or ``"sum"`` for a plain function, from its value on duplicated data.

    A mean over samples (or terms) is unchanged when every sample appears twice;
    a sum doubles.  Returns None when the outputs or targets cannot be duplicated
    (not tensors, or no common leading dimension); raises when the loss does
    neither, naming ``reduction=``.
    """
    if not (isinstance(outputs, torch.Tensor) and outputs.ndim >= 1):
        return None
    if isinstance(targets, torch.Tensor):
        if targets.ndim < 1 or targets.shape[0] != outputs.shape[0]:
            return None
        targets2 = torch.cat([targets, targets])
    elif targets is None:
        targets2 = None
    else:
        return None
    with torch.no_grad():
        twice = float(loss_fn(torch.cat([outputs, outputs]), targets2))
    once = float(loss)
    scale = max(abs(once), 1e-30)
    tol = 1e-4 * scale
    if abs(twice - once) <= tol:
        return "mean"
    if abs(twice - 2 * once) <= 2 * tol:
        return "sum"
    raise ValueError(
        f"loss_fn is neither a mean nor a sum over samples (value {once:.6g} on a batch, "
        f"{twice:.6g} on the batch duplicated); pass reduction='mean' or 'sum' and, for a "
        "mean over anything but samples, loss_terms=lambda outputs, targets: <count>"
    )


def per_sample_sizes(obj: Any, batch_dim: int, samples: int) -> tuple[int, ...]:
    """Elements per sample of every tensor in ``obj`` that has the samples along
    ``batch_dim`` (others, e.g. an RNN's (layers, B, H) state, are skipped).

    A plain mean weighted by samples is a mean over its terms only if every batch has
    as many terms per sample; these sizes are how that is checked between batches.
    """
    return tuple(
        t.numel() // samples
        for t in batch_leaves(obj)
        if samples > 0 and t.ndim > batch_dim and t.shape[batch_dim] == samples
    )


PlainMeanAnchor = tuple[Any, Any, float]
"""The first batch's first sample (outputs, targets) and its loss, kept to test later
batches against (:func:`check_plain_mean`)."""

_NOT_A_MEAN_OVER_SAMPLES = (
    "it weights its terms (class weights?) or divides by a count that depends on the data "
    "(padding, a mask), and batches weighted by samples would be wrong. Use the torch.nn "
    "loss (nn.CrossEntropyLoss(weight=..., ignore_index=...) is counted automatically) or "
    "pass loss_terms=lambda outputs, targets: <what the mean divides by>"
)


def check_plain_mean(
    loss_fn: Callable[..., torch.Tensor],
    outputs: Any,
    targets: Any,
    loss: torch.Tensor,
    batch_dim: int,
    eps: float,
    where: str,
    anchor: PlainMeanAnchor | None = None,
) -> PlainMeanAnchor | None:
    """Refuse a plain function's mean that is not an unweighted mean over samples.

    Batches of a plain function are weighted by their samples, which is right only if
    the loss of a batch is the sample-weighted average of the losses of its parts.  That
    is tested on one uneven split of the batch (up to its first sample with a defined
    loss, the rest; tuple or dict outputs and targets are split leaf by leaf) and, given
    ``anchor`` (the first batch's first sample), on that sample joined to this batch's
    first: a mean with class weights, or over a data-dependent count (non-negative
    padding labels, a mask), fails one of them, also where every batch holds one class.
    Skipped where the outputs and targets cannot be split along ``batch_dim`` or the
    loss cannot be evaluated on a part (then the documented rule applies).

    Returns this batch's first sample and its loss (the anchor for later batches), or
    None where it cannot be split.
    """
    out_leaves = [t for t in tree_leaves(outputs) if isinstance(t, torch.Tensor)]
    if not (out_leaves and out_leaves[0].ndim > batch_dim):
        return None
    m = out_leaves[0].shape[batch_dim]
    if m < 1:
        return None

    def per_sample(t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t.ndim > batch_dim and t.shape[batch_dim] == m

    if isinstance(targets, torch.Tensor) and not per_sample(targets):
        return None
    if targets is not None and not any(per_sample(t) for t in tree_leaves(targets)):
        return None  # no per-sample target to split with the outputs
    leaves, spec = tree_flatten((outputs, targets))
    split = [per_sample(t) for t in leaves]

    def part(start: int, length: int) -> tuple[Any, Any]:
        cut = [
            t.narrow(batch_dim, start, length) if s else t
            for t, s in zip(leaves, split, strict=True)
        ]
        return tree_unflatten(cut, spec)

    def value(o: Any, t: Any) -> float | None:
        try:
            with torch.no_grad():
                return float(loss_fn(o, t))
        except Exception:  # noqa: BLE001 -- a loss that needs the whole batch cannot be split
            return None

    def refuse_if_apart(joint: float, combined: float, parts: tuple[float, ...], said: str):
        scale = max(abs(joint), *(abs(p) for p in parts), 1e-30)
        if math.isfinite(combined) and abs(joint - combined) > 1e3 * eps * scale:
            raise ValueError(
                f"loss_fn is a plain function whose mean is not a mean over samples {said}, "
                f"whose sample-weighted mean is {combined:.6g}): {_NOT_A_MEAN_OVER_SAMPLES}"
            )

    # the first of the leading rows whose loss is defined: a row whose every target is
    # ignored (left padding) has a NaN mean and would hide the split
    for row in range(min(m, 8)):
        first = part(row, 1)
        first_loss = value(*first)
        if first_loss is not None and math.isfinite(first_loss):
            break
    else:
        return None
    k = row + 1  # rows 0..row: the undefined rows add nothing to a mean over counted terms
    if k < m:
        head, rest = value(*part(0, k)), value(*part(k, m - k))
        if head is not None and rest is not None:
            whole = float(loss)
            refuse_if_apart(
                whole,
                (k * head + (m - k) * rest) / m,
                (head, rest),
                f"on {where} (loss {whole:.6g}, but its first {k} and the other {m - k} "
                f"samples give {head:.6g} and {rest:.6g}",
            )
    if anchor is not None:
        a_out, a_targets, a_loss = anchor
        a_leaves, a_spec = tree_flatten((a_out, a_targets))
        f_leaves = tree_flatten(first)[0]
        joined = None
        if a_spec == spec:
            try:
                cat = [
                    torch.cat([x, y], batch_dim) if s else y
                    for x, y, s in zip(a_leaves, f_leaves, split, strict=True)
                ]
                joined = tree_unflatten(cat, spec)
            except (RuntimeError, TypeError):  # another shape: nothing to join
                joined = None
        joint = None if joined is None else value(*joined)
        if joint is not None:
            refuse_if_apart(
                joint,
                (a_loss + first_loss) / 2,
                (a_loss, first_loss),
                f"across batches (the first batch's first sample and the first of {where} "
                f"give {a_loss:.6g} and {first_loss:.6g} apart but {joint:.6g} together",
            )
    return first[0], first[1], first_loss
