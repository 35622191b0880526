"""The empirical Fisher F = c sum_i g_i g_i^T from per-sample gradients."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.nn.utils.rnn import PackedSequence, pack_sequence, pad_packed_sequence
from torch.utils._pytree import tree_leaves, tree_map

from .batches import Batch
from .curvature import CurvatureOperator, path_tolerance
from .reduction import LossReduction, per_sample_sizes

__all__ = ["EmpiricalFisherOperator", "empirical_fisher_operator"]

#: Samples of the first batch on which the vectorised and the looped per-sample
#: gradients are compared when the operator is first used.
PROBE_SAMPLES = 4


class EmpiricalFisherOperator(CurvatureOperator):
    """F = c sum_i g_i g_i^T over all samples i, g_i the gradient of sample i's summed loss.

    Convention (curvlinops'): for a loss L = c sum_i l_i, where l_i is sample i's
    loss summed over its counted terms, c = 1/T for a mean over T counted terms
    and c = 1 for a sum.  With one term per sample (classification, a plain
    per-sample mean) this is (1/N) sum_i g_i g_i^T.  It is **per sample, not per
    term**: a sequence's gradient sums over its tokens before the outer
    product, so cross-token products are included (a per-token Fisher would
    drop them); ignored tokens (``ignore_index``) contribute nothing.

    Per-sample gradients come from ``vmap(grad)`` over ``batch_dim`` (each sample
    is run as a batch of one, so BatchNorm must be in eval mode, the default),
    or, for models ``vmap`` cannot trace (BERT's masks, multi-layer or time-major
    LSTMs), from a loop over samples with autograd (``backend="autograd"``, or
    automatically with ``"auto"``).  A product costs one per-sample-gradient
    pass; ``chunk_size`` also bounds how many samples' gradients are held at once
    (default: the whole batch, m x n).  Targets must have the sample dimension.
    """

    uses_loss_curvature = False

    def _check_batch_statistics(self, model: torch.nn.Module) -> None:
        """Refuse BatchNorm on batch statistics: each sample runs as a batch of one, so it
        would be normalised by its own statistics (not the batch's, as in the loss and in
        the Hessian and GGN of the same model and mode): another function's gradients."""
        batch_norms, why = self.batch_statistics_norms()
        if batch_norms:
            raise ValueError(
                f"the empirical Fisher runs each sample as a batch of one, and "
                f"{type(batch_norms[0]).__name__} with {why} would normalise it by its own "
                "statistics: the per-sample gradients would be those of another function "
                "than the loss. Use eval mode with running statistics (train_mode=False, "
                "the default), or the Hessian or GGN operator"
            )

    def _check_rule(self, rule: LossReduction, batch: Batch) -> None:
        """Refuse the rule where the Fisher's scale would be a guess.

        A plain function's mean counts one term per sample, so a sample's "summed" loss
        is its own mean.  If the targets hold several elements per sample (a mean over
        elements or tokens), the Fisher is off by that count against the torch.nn
        loss's (each gradient 1/D of the summed one, and c = 1/N rather than 1/(N D)),
        while the Hessian is not: which one is meant cannot be read off the function.
        """
        if rule.kind == "mean" and rule.terms_rule is None:
            per = per_sample_sizes(batch.targets, self.batch_dim, batch.size)
            if any(k > 1 for k in per):
                raise ValueError(
                    f"loss_fn is a plain function's mean and its targets hold {max(per)} "
                    "elements per sample: the empirical Fisher sums each sample's terms "
                    "before the outer product, and whether this mean is over samples or over "
                    "those elements changes it by a factor of "
                    f"{max(per)}. Pass loss_terms=lambda outputs, targets: targets.numel() "
                    "(a mean over elements or tokens, as torch.nn's losses count) or "
                    "len(targets) (a mean over samples), or use the torch.nn loss"
                )

    def _check_samples_alone(self, first: Batch) -> None:
        """Refuse a model whose output for a sample depends on the rest of its batch.

        Each sample's gradient is taken with the sample run alone; that is its share of
        the loss only if its outputs alone equal its outputs in the batch.  A model that
        pads to the batch's longest sequence (``pad_packed_sequence`` without
        ``total_length=``) or mixes samples (attention or an RNN over the wrong axis)
        would give the per-sample gradients of another function, or a raw shape error in
        the loss.  Compared on the probe samples (:data:`PROBE_SAMPLES`) of the first
        batch, output tensor by output tensor: the outputs' own layout is not known (a
        time-major tagger may return (time, classes, batch)), so the sample dimension is
        the one dimension in which the batch's m and the sample's 1 differ, and the values
        there must agree to :func:`~spectra.curvature.path_tolerance`.  Shapes that
        differ in any other dimension are refused; outputs that cannot be lined up
        (another rank, flattened samples, an equal shape) are not compared."""
        batch = self._probe_batch(first)
        if batch.size < 2:
            return
        in_x, _ = self._sample_dims(batch)
        with torch.no_grad():
            together = tree_leaves(self.outputs(self.theta, batch.inputs))
            for i in range(batch.size):
                x = _select_where(batch.inputs, in_x, self.batch_dim, i)
                alone = tree_leaves(self.outputs(self.theta, x))
                for whole, own in zip(together, alone, strict=False):
                    self._compare_sample_outputs(first, i, batch.size, whole, own)

    def _compare_sample_outputs(self, first: Batch, i: int, m: int, whole: Any, alone: Any) -> None:
        tensors = isinstance(whole, torch.Tensor) and isinstance(alone, torch.Tensor)
        if not tensors or whole.ndim != alone.ndim:
            return
        differ = [j for j in range(whole.ndim) if whole.shape[j] != alone.shape[j]]
        if not differ:
            return
        if len(differ) == 1:
            j = differ[0]
            if whole.shape[j] != m or alone.shape[j] != 1:
                return  # samples flattened into one dimension: no row to compare with
            row = whole.narrow(j, i, 1)
            scale = float(row.abs().max()) if row.numel() else 0.0
            gap = float((alone - row).abs().max()) if row.numel() else 0.0
            if not gap > path_tolerance(self.internal_eps) * max(scale, 1e-30):
                return
            how = f"outputs {gap / max(scale, 1e-300):.1e} (relative) away from those in the batch"
        else:
            how = (
                f"outputs of shape {tuple(alone.shape)}, against {tuple(whole.shape)} for the batch"
            )
        raise ValueError(
            f"the empirical Fisher takes each sample's gradient with the sample alone, but "
            f"sample {i} of batch {first.index} alone gives {how}: "
            "the model's output for a sample depends on the rest of its batch, so those "
            "gradients would be another function's. pad_packed_sequence pads to the batch's "
            "longest sequence (pass total_length= to it); attention or an RNN over the wrong "
            "axis mixes samples (check batch_first and batch_dim=). Fix the model, or use the "
            "Hessian or GGN operator, which take each batch as a whole"
        )

    def per_sample_gradients(self, batch: Batch) -> torch.Tensor:
        """(m, n) gradients of each sample's summed loss at the point."""
        if self.backend != "autograd" and not _has_packed(batch.inputs):
            try:
                return self._per_sample_vmap(batch)
            except (RuntimeError, NotImplementedError) as exc:
                if self.backend == "func":
                    raise
                warnings.warn(
                    f"torch.func cannot vectorise per-sample gradients of this model "
                    f"({type(exc).__name__}: {str(exc)[:120]}); looping over samples instead",
                    stacklevel=3,
                )
                self.backend = "autograd"
        return self._per_sample_loop(batch)

    def _sample_dims(self, batch: Batch) -> tuple[Any, Any]:
        """in_dims for ``vmap`` over samples: ``batch_dim`` where a tensor has the samples."""
        d, m = self.batch_dim, batch.size

        def dim(t: Any) -> int | None:
            if isinstance(t, PackedSequence):  # its sequences are the samples
                return d
            ok = isinstance(t, torch.Tensor) and t.ndim > d and t.shape[d] == m
            return d if ok else None

        target_dims = tree_map(dim, batch.targets, is_leaf=_is_packed)
        if batch.targets is not None and all(
            x is None for x in torch.utils._pytree.tree_leaves(target_dims)
        ):
            raise ValueError(
                f"the empirical Fisher needs each sample's targets, but no target tensor has "
                f"{m} entries along batch_dim={d} (shapes "
                f"{[tuple(t.shape) for t in torch.utils._pytree.tree_leaves(batch.targets)]}); "
                "give the targets the inputs' sample dimension (e.g. (batch, time) labels "
                "rather than flattened ones), or pass the batch_dim= along which they hold "
                "the samples (a PackedSequence input counts its sequences whatever batch_dim)"
            )
        return tree_map(dim, batch.inputs, is_leaf=_is_packed), target_dims

    def _sample_loss(self, theta: torch.Tensor, x: Any, y: Any) -> torch.Tensor:
        return self.reduction.summed(self.loss_fn, self.outputs(theta, x), y)

    def _per_sample_vmap(self, batch: Batch) -> torch.Tensor:
        in_x, in_y = self._sample_dims(batch)
        d = self.batch_dim

        def one(theta: torch.Tensor, x: Any, y: Any) -> torch.Tensor:
            y1 = _unsqueeze_where(y, in_y, d)
            x1 = _unsqueeze_where(x, in_x, d)
            return self._sample_loss(theta, x1, y1)

        return torch.func.vmap(
            torch.func.grad(one), in_dims=(None, in_x, in_y), chunk_size=self.chunk_size
        )(self.theta, batch.inputs, batch.targets)

    def _per_sample_loop(self, batch: Batch) -> torch.Tensor:
        in_x, in_y = self._sample_dims(batch)
        d = self.batch_dim
        theta = self.theta.detach().requires_grad_(True)
        rows = []
        with torch.enable_grad():
            for i in range(batch.size):
                x = _select_where(batch.inputs, in_x, d, i)
                y = _select_where(batch.targets, in_y, d, i)
                (g,) = torch.autograd.grad(
                    self._sample_loss(theta, x, y), theta, allow_unused=True, materialize_grads=True
                )
                rows.append(g.detach())
        return torch.stack(rows)

    def _probe_batch(self, batch: Batch) -> Batch:
        """The first few samples of ``batch``: a loop over all of them would be slow."""
        m = min(batch.size, PROBE_SAMPLES)
        in_x, in_y = self._sample_dims(batch)
        d = self.batch_dim

        def head(obj: Any, dims: Any) -> Any:
            return (
                tree_map(
                    lambda t, k: _take(t, d, range(m)) if k is not None else t,
                    obj,
                    dims,
                    is_leaf=_none_or_packed,
                )
                if obj is not None
                else None
            )

        return Batch(
            batch.index,
            head(batch.inputs, in_x),
            head(batch.targets, in_y),
            m,
            batch.weight,
            batch.terms,
        )

    def _batch_matmat(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        if _has_packed(batch.inputs):  # vmap cannot split one; the loop can
            G = self._per_sample_loop(batch)
        else:
            G = self._per_sample_vmap(batch)
        return G.T @ (G @ V) / batch.terms

    def _batch_matmat_autograd(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        G = self._per_sample_loop(batch)
        return G.T @ (G @ V) / batch.terms

    def diagonal(self) -> torch.Tensor:
        """diag(F) as an (n,) tensor: c sum_i g_i^2, exact, one data pass."""
        diag = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        with self.evaluation_mode():
            for k, batch in enumerate(self.batches()):
                if k == 0:  # no product runs the first-use checks here
                    self._check_samples_alone(batch)
                G = self.per_sample_gradients(batch)
                diag.add_((G * G).sum(dim=0), alpha=batch.weight / batch.terms)
        return self._sum_over_ranks(diag)


def _unsqueeze_where(obj: Any, dims: Any, d: int) -> Any:
    if obj is None:
        return None
    return tree_map(
        lambda t, k: t.unsqueeze(d) if k is not None else t, obj, dims, is_leaf=lambda t: t is None
    )


def _select_where(obj: Any, dims: Any, d: int, i: int) -> Any:
    if obj is None:
        return None
    return tree_map(
        lambda t, k: _take(t, d, range(i, i + 1)) if k is not None else t,
        obj,
        dims,
        is_leaf=_none_or_packed,
    )


def _is_packed(t: Any) -> bool:
    return isinstance(t, PackedSequence)


def _none_or_packed(t: Any) -> bool:
    return t is None or isinstance(t, PackedSequence)


def _has_packed(obj: Any) -> bool:
    return any(_is_packed(t) for t in tree_leaves(obj, is_leaf=_is_packed))


def _take(t: Any, d: int, rows: range) -> Any:
    """Samples ``rows`` of a tensor (along ``d``) or of a PackedSequence (its sequences,
    in the order the batch gives them, which is how the targets are ordered)."""
    if not isinstance(t, PackedSequence):
        return t.narrow(d, rows.start, len(rows))
    padded, lengths = pad_packed_sequence(t, batch_first=True)
    return pack_sequence([padded[j, : lengths[j]] for j in rows], enforce_sorted=False)


#: The function-style name of :class:`EmpiricalFisherOperator` (arguments as for
#: :data:`spectra.hessian_operator`).
empirical_fisher_operator = EmpiricalFisherOperator
