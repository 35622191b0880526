"""Base class for curvature operators over (model, loss, data).

Holds everything the Hessian, GGN and empirical Fisher share: the parameter
layout, the data source and the loss's reduction rule (which together weight
the batches), a pure function theta -> loss built on
``torch.func.functional_call`` (the model is never mutated), the context every
product runs in (eval/train mode, the attention kernel, constant padding rows,
dense embedding gradients), dtype resolution, the non-finite checks and the check
that the vectorised and the single-vector paths agree.  Subclasses implement
:meth:`CurvatureOperator._batch_matmat` (vectorised) and
:meth:`CurvatureOperator._batch_matmat_autograd` (double backward).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils.rnn import PackedSequence
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten

from ._checks import all_finite, resolve_dtype, user_stacklevel
from ._precision import ieee_float32
from .batches import Batch, CountSamples, DataSource, batch_leaves
from .gradient_check import directional_check
from .linear_operator import LinearOperator
from .parameters import ParameterView, ParamSelector
from .reduction import (
    LossReduction,
    LossTerms,
    PlainMeanAnchor,
    check_loss_arguments,
    check_plain_mean,
    detect_kind,
    per_sample_sizes,
    resolve_reduction,
)

__all__ = ["CurvatureOperator", "default_forward", "jvp_with_targets"]

ForwardFn = Callable[[nn.Module, Any], Any]

#: Memory one block of tangents may take by default (:meth:`CurvatureOperator.block_size`).
BLOCK_MEMORY_BUDGET = 1 << 30

#: Bytes of a vectorised block product per column, in units of the bytes the forward
#: pass saves for backward (:meth:`CurvatureOperator.column_workspace_bytes`): measured
#: 4-7 on five networks, so 6, which errs on the side of smaller blocks on most.
TANGENT_COPIES = 6


def default_forward(model: nn.Module, inputs: Any) -> Any:
    """``model(x)`` for a tensor (or a ``PackedSequence``), ``model(*x)`` for a tuple/list,
    ``model(**x)`` for a mapping."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple | list) and not isinstance(inputs, PackedSequence):
        return model(*inputs)
    return model(inputs)


class _Forward(nn.Module):
    """Wraps ``model`` so that a user's forward function runs under functional_call."""

    def __init__(self, model: nn.Module, forward: ForwardFn) -> None:
        super().__init__()
        self.model = model
        self._fn = forward

    def forward(self, inputs: Any) -> Any:
        return self._fn(self.model, inputs)


def computation_dtype(requested: Any, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype curvature is computed in: ``requested`` (a dtype or its name, e.g.
    ``"float64"``) or the model's; half precisions are promoted to float32.

    Eigenvalues near zero (|lambda| ~ 1e-4 and below, the paper's bulk) are lost
    in float16/bfloat16 rounding, so those are never used for curvature.
    """
    dtype = resolve_dtype(model_dtype if requested is None else requested)
    if dtype in (torch.float16, torch.bfloat16):
        warnings.warn(
            f"computing curvature in float32 instead of {dtype}: half precision cannot "
            "resolve small eigenvalues; pass dtype=torch.float64 for the most accurate result",
            stacklevel=3,
        )
        return torch.float32
    return dtype


def _loss_in(loss_fn: Any, dtype: torch.dtype, device: torch.device) -> Any:
    """A module loss whose floating tensors (class ``weight=``, ``pos_weight=``) are in
    the operator's dtype and device: a converted copy; the user's loss is not changed."""
    if not isinstance(loss_fn, nn.Module):
        return loss_fn
    tensors = list(loss_fn.parameters()) + list(loss_fn.buffers())
    if all(t.dtype == dtype and t.device == device for t in tensors if t.is_floating_point()):
        return loss_fn
    return copy.deepcopy(loss_fn).to(device=device, dtype=dtype)


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The eager module under a ``torch.compile`` wrapper (products run eagerly on it).

    torch.compile traces neither double backward nor ``torch.func`` transforms
    of its graphs, so curvature is computed on the original module, which holds
    the same parameters.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def resolve_batch_dim(
    model: nn.Module, batch_dim: int | None, count_samples: CountSamples | None
) -> int:
    """``batch_dim``, defaulting to 0 unless the model declares a time-major layout.

    A module with ``batch_first=False`` (``nn.LSTM``/``GRU``/``RNN``,
    ``nn.MultiheadAttention``, ``nn.Transformer*`` by default) reads its inputs as
    (time, batch, ...); whether the model's own inputs are laid out that way only
    the user knows, so the operator refuses to guess.
    """
    if batch_dim is not None or count_samples is not None:
        return 0 if batch_dim is None else batch_dim
    time_major = [
        name or type(m).__name__
        for name, m in model.named_modules()
        if getattr(m, "batch_first", None) is False
    ]
    if time_major:
        shown = ", ".join(time_major[:3]) + (", ..." if len(time_major) > 3 else "")
        raise ValueError(
            f"the model has modules with batch_first=False ({shown}), so its samples may run "
            "along dimension 1 of the inputs; say which: batch_dim=1 for (time, batch, ...) "
            "inputs, batch_dim=0 if the inputs are batch-major (e.g. the model transposes "
            "them), or count_samples=lambda inputs, targets: <number of samples>"
        )
    return 0


_EMBEDDING_CALLS = {
    f: inspect.signature(f)
    for f in (torch.nn.functional.embedding, torch.nn.functional.embedding_bag)
}


class _DenseConstantPaddingEmbeddings(TorchFunctionMode):
    """Every ``F.embedding``/``F.embedding_bag`` call made dense, and ``F.embedding``'s
    padding row read as a constant.

    ``sparse=True`` only changes how the weight's gradient is stored, but a sparse
    gradient cannot be reshaped, flattened or differentiated again (every product
    failed: "reshape is not implemented for sparse tensors"); the dense gradient is the
    same numbers.  PyTorch never sends gradient into the padding row (its backward
    drops the positions that read it), but forward-mode AD does carry a tangent through
    it, so ``jvp``-of-``grad`` and double backward would disagree (a wrong,
    non-symmetric block product).  Making the row a constant makes every path compute
    the same thing: the curvature with that row held fixed.  A mode at the functional
    level covers ``nn.Embedding``, ``nn.EmbeddingBag`` and subclasses with their own
    forward (scaled embeddings) alike.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        signature = _EMBEDDING_CALLS.get(func)
        if signature is None:
            return func(*args, **(kwargs or {}))
        call = signature.bind(*args, **(kwargs or {})).arguments
        call["sparse"] = False
        pad, w = call.get("padding_idx"), call["weight"]
        if func is torch.nn.functional.embedding and pad is not None:
            rows = torch.zeros(w.shape[0], 1, dtype=torch.bool, device=w.device)
            rows[pad] = True  # a negative index counts from the end, as in F.embedding
            call["weight"] = torch.where(rows, w.detach(), w)
        return func(**call)


def _detached(x: Any) -> Any:
    return x.detach() if isinstance(x, torch.Tensor) else x


def _has_padding_rows(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Embedding) and m.padding_idx is not None for m in model.modules())


DISTRIBUTED_PLAIN_MEAN = (
    "loss_fn is a plain function's mean (or a model's own .loss) over data sharded across "
    "ranks, and such a mean's batches are weighted by their samples: right only for an "
    "unweighted mean over samples with as many terms in each, which can be checked across "
    "one rank's batches but not against other ranks' (sequences of other lengths or class "
    "weights on another rank were weighted wrong, without an error). Pass loss_terms="
    "lambda outputs, targets: <the count the mean divides by> (the number of samples, of "
    "counted tokens, or of class weights), or use a torch.nn loss module, which is counted "
    "automatically"
)

_COUNT_THE_LABELS = (
    "Yield (batch, batch['labels']) pairs instead, with loss_fn=lambda loss, labels: loss, "
    "reduction='mean' and loss_terms=lambda loss, labels: (labels[:, 1:] != -100).sum() "
    "for a causal LM (shifted labels; (labels != -100).sum() for a masked LM or token "
    "classifier), or return the logits and use nn.CrossEntropyLoss(ignore_index=-100), "
    "which is counted automatically"
)


def _counted_labels(batch: Batch) -> tuple[Any, str]:
    """What a plain mean can be checked against, and its name for messages: the targets,
    or, where they are None, the ``labels`` of mapping inputs (Hugging Face's
    ``forward=lambda m, b: m(**b).loss`` idiom, where the model counts them itself)."""
    if batch.targets is not None:
        return batch.targets, "targets"
    if isinstance(batch.inputs, Mapping) and "labels" in batch.inputs:
        return batch.inputs["labels"], 'inputs["labels"]'
    return None, "targets"


def _warn_tied_padding_rows(model: nn.Module) -> None:
    """Warn where an ``nn.Embedding(padding_idx=p)``'s weight is also used by another
    module (tied input and output embeddings): PyTorch leaves row p out of the lookup's
    gradient only, and trains it through the other use; every path here holds the row
    constant in the lookup and differentiates it through the other use, which is the
    loss's Hessian in that row only where token p never enters as a real input."""
    users: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module.named_parameters(recurse=False, remove_duplicate=False):
            users.setdefault(id(p), []).append(f"{name}.{attr}" if name else attr)
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            own = f"{name}.weight" if name else "weight"
            others = [u for u in dict.fromkeys(users.get(id(module.weight), [])) if u != own]
            if others:
                warnings.warn(
                    f"{name or 'the embedding'} has padding_idx={module.padding_idx} and its "
                    f"weight is also {', '.join(others)} (tied embeddings): PyTorch trains that "
                    "row through the tied use only, and the curvature here does the same (the "
                    "row is constant in the lookup). That is the loss's Hessian in the row "
                    f"only if token {module.padding_idx} never enters as a real input (it pads "
                    "masked positions alone); otherwise leave the row out, e.g. params= "
                    "without the embedding, or untie the weights",
                    stacklevel=user_stacklevel(),
                )


def _needs_embedding_rewrite(model: nn.Module) -> bool:
    """Padding rows or sparse gradients: a Python mode on every op costs time, so only then."""
    sparse = any(
        isinstance(m, nn.Embedding | nn.EmbeddingBag) and m.sparse for m in model.modules()
    )
    return sparse or _has_padding_rows(model)


@contextmanager
def _no_attention_fastpath() -> Iterator[None]:
    """Keep ``nn.MultiheadAttention``/``nn.TransformerEncoder`` off their fused inference
    path (native MHA kernels, nested tensors), which has no derivatives and which
    torch.func transforms do not stop them from taking; the setting is restored."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def jvp_with_targets(
    fn: Callable[[torch.Tensor, Any], torch.Tensor], x: torch.Tensor, v: torch.Tensor, targets: Any
) -> torch.Tensor:
    """The directional derivative of ``fn(x, targets)`` in ``x`` along ``v``, targets fixed.

    ``x`` and ``v``: tensors of one shape; returns the tangent of ``fn``'s output.  The
    floating-point tensors among ``targets`` (any pytree; labels and None pass as they
    are) enter as primals with materialised zero tangents.  Why: a tensor without a tangent
    gets an immutable ZeroTensor as its tangent inside forward-mode AD, and some losses'
    forward-mode formulas write into it in place (``F.mse_loss``'s backward in torch 2.13:
    "ZeroTensors are immutable"), which would send every MSE model to the slower
    double-backward path.  A real zero tangent gives the same derivative.
    """
    leaves, spec = tree_flatten(targets)
    where = [
        i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.is_floating_point()
    ]
    if not where:
        return torch.func.jvp(lambda y: fn(y, targets), (x,), (v,))[1]

    def of_floats(y: torch.Tensor, *floats: torch.Tensor) -> torch.Tensor:
        rebuilt = list(leaves)
        for i, t in zip(where, floats, strict=True):
            rebuilt[i] = t
        return fn(y, tree_unflatten(rebuilt, spec))

    primals = tuple(leaves[i] for i in where)
    zeros = tuple(torch.zeros_like(t) for t in primals)
    return torch.func.jvp(of_floats, (x, *primals), (v, *zeros))[1]


def _refuse_renormalising_embeddings(model: nn.Module, selected: Sequence[str]) -> None:
    """``nn.Embedding(max_norm=...)`` rescales rows of its weight in place inside the
    forward pass: the loss is then no function of the weights that can be differentiated
    (the operator's own copy of them moved, and every product failed on a view error).
    A frozen or unselected embedding is left alone: its copy is a constant."""
    for name, m in model.named_modules():
        weight = f"{name}.weight" if name else "weight"
        if (
            isinstance(m, nn.Embedding | nn.EmbeddingBag)
            and m.max_norm is not None
            and weight in selected
        ):
            raise ValueError(
                f"{name or 'the model'} is an {type(m).__name__} with max_norm={m.max_norm}: it "
                "renormalises its weight in place during the forward pass, so the loss is not "
                "a differentiable function of the weights. For the curvature at the current "
                f"weights set {name or 'it'}.max_norm = None (the rows a forward has renormed "
                "stay renormed), or renormalise in the forward without in-place writes"
            )


def gradient_with_graph(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d loss / d x with its graph, for double backward.

    The backward is seeded with a 1 that requires grad, so the gradient always carries a
    graph (through the seed) even where it has none in ``x`` (a loss linear in ``x``, a
    hand-written backward): differentiating it with ``allow_unused=True`` then returns
    None there, for :func:`graphless_gradient_is_smooth` to judge, instead of failing
    with "element 0 of tensors does not require grad".
    """
    seed = torch.ones_like(loss).requires_grad_(True)
    (g,) = torch.autograd.grad(loss, x, seed, create_graph=True)
    return g


def autograd_gradient(
    f: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> d f / d x by plain autograd (torch.func refuses old-style autograd.Functions)."""

    def gradient_at(x: torch.Tensor) -> torch.Tensor:
        leaf = x.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(f(leaf), leaf, allow_unused=True, materialize_grads=True)
        return g

    return gradient_at


GRAPHLESS_GRADIENT = (
    "the gradient of this loss changes smoothly with {what}, but PyTorch's backward of it is "
    "not differentiable (a custom autograd.Function or a fused kernel computed outside "
    "autograd), so double backward would drop its curvature. For the Hessian, "
    "backend='finite_difference' needs first derivatives only; or write the loss in "
    "differentiable tensor operations"
)


def graphless_gradient_is_smooth(
    gradient_at: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, g: torch.Tensor
) -> bool:
    """Whether a gradient with no autograd graph in ``x`` still varies smoothly with ``x``.

    ``gradient_at`` maps a point to the gradient there (by plain autograd, so that custom
    autograd.Functions work); ``g`` is the gradient at ``x``.  No graph means one of three
    things: a function linear in ``x`` (the gradient does not move), a piecewise-linear one
    (clamp, max, a hinge: the gradient jumps where a kink is crossed, and its curvature is
    zero almost everywhere), or a backward that is not differentiable (a fused kernel: the
    gradient moves in proportion to the step).  Steps of +h, -h and +h/4 along one random
    direction tell them apart: only the last gives changes d(h) ~ -d(-h) ~ 4 d(h/4).
    """
    x = x.detach()
    gen = torch.Generator(device=x.device).manual_seed(4321)
    r = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    eps = torch.finfo(x.dtype).eps
    h = math.sqrt(eps) * (1.0 + float(x.norm())) / max(float(r.norm()), 1e-30)
    g = g.detach()

    def change(step: float) -> torch.Tensor:
        return (gradient_at(x + step * r).detach() - g).double()

    forward = change(h)
    size = float(forward.norm())
    if size <= 100 * eps * max(float(g.norm()), 1e-30):
        return False  # constant: linear
    backward, quarter = change(-h), change(h / 4)
    odd = float((forward + backward).norm()) <= 0.1 * size
    linear = float((forward - 4 * quarter).norm()) <= 0.1 * size
    return odd and linear


def require_curvature_operator(op: Any, who: str) -> None:
    """Refuse anything but a :class:`CurvatureOperator` for algorithms that move the
    weights (they need the loss away from the point, not only products)."""
    if not isinstance(op, CurvatureOperator):
        raise TypeError(
            f"{who} needs the problem as a CurvatureOperator (e.g. "
            f"spectra.hessian_operator(model, loss_fn, data)), got {type(op).__name__}"
        )


def path_tolerance(eps: float) -> float:
    """Largest relative difference two exact product paths may show when the
    computation rounds at ``eps`` (the lowest precision it runs in).

    Round-off in float64 is ~1e-15 and float32 internals of a float64 model
    (Hugging Face's RMSNorm) ~1e-7; a path computing something else is off by
    O(1e-2..1).
    """
    return max(1e-6, 1e4 * eps)


#: Asymmetry ||A - A^T||_F / ||A||_F (estimated on four probes) of the one product that
#: runs, above which a float32 (or narrower) operator is refused rather than taken as
#: round-off: float32 products near an interpolating minimum measured up to ~2e-2, torch's
#: wrong weight_norm kernel 0.13-0.58, a backward 50% off in one factor 0.08.  In float64
#: the bar is the path tolerance.
ASYMMETRY_REFUSED = 0.03


class _LowestPrecision(TorchDispatchMode):
    """Records the largest machine epsilon among the floating results of every op."""

    def __init__(self) -> None:
        super().__init__()
        self.eps = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.eps = max(self.eps, torch.finfo(t.dtype).eps)
        return out


ACTIVATION_CHECKPOINTING = (
    "the model uses activation checkpointing (torch.utils.checkpoint, or a Hugging Face "
    "model with gradient checkpointing enabled, in train mode), which recomputes the "
    "forward pass during backward outside the operator's parameter substitution: with "
    "use_reentrant=True the parameters inside a segment get no gradient (their curvature "
    "reads as zero), with use_reentrant=False gradients away from the current weights are "
    "those of the current weights. It saves only memory; turn it off for the analysis "
    "(Hugging Face: model.gradient_checkpointing_disable(), activation_checkpointing_"
    "disable() in transformers 5; otherwise call the function "
    "directly instead of through checkpoint)"
)
# what torch.utils.checkpoint(use_reentrant=True) warns when no input of a segment
# requires grad, and the autograd node it leaves where one does
_REENTRANT_WARNING = "None of the inputs have requires_grad=True"
_REENTRANT_NODE = "CheckpointFunctionBackward"


class _RefuseActivationCheckpointing:
    """Around a forward pass: refuses non-reentrant checkpointing as it starts (it needs
    saved-tensor hooks), and records whether a reentrant segment ran where no input
    required grad (``seen``); every other warning is passed on unchanged."""

    def __enter__(self) -> _RefuseActivationCheckpointing:
        self._catcher = warnings.catch_warnings(record=True)
        self._caught = self._catcher.__enter__()
        warnings.simplefilter("always")
        self._hooks = torch.autograd.graph.disable_saved_tensors_hooks(ACTIVATION_CHECKPOINTING)
        self._hooks.__enter__()
        self.seen = False
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, tb: object) -> None:
        self._hooks.__exit__(kind, error, tb)
        self._catcher.__exit__(kind, error, tb)
        for w in self._caught:
            if str(w.message).startswith(_REENTRANT_WARNING):
                self.seen = True
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
        if isinstance(error, RuntimeError) and str(error) == ACTIVATION_CHECKPOINTING:
            raise ValueError(ACTIVATION_CHECKPOINTING) from None  # bad input, as reentrant's


def _graph_has_reentrant_checkpoint(t: torch.Tensor) -> bool:
    """Whether the autograd graph of ``t`` holds a reentrant checkpoint segment."""
    stack, seen = [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == _REENTRANT_NODE:
            return True
        stack.extend(n for n, _ in node.next_functions)
    return False


class CurvatureOperator(LinearOperator):
    """Curvature of the loss ``loss_fn`` gives over all of ``data``, at the model's current weights.

    Args:
        model: the network; its parameters are read once (a snapshot), never changed.
            A ``torch.compile`` wrapper is unwrapped (products run eagerly).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, e.g. ``nn.CrossEntropyLoss()``.
            The operator is the curvature of that loss over the whole data: a mean
            stays the mean over every counted loss term (``ignore_index`` targets
            excluded), a sum stays the sum (see :mod:`spectra.reduction`).
        data: an ``(inputs, targets)`` pair or an iterable of pairs (a DataLoader);
            inputs may be a tensor, a tuple or a mapping of tensors; targets may
            be None.  Every pass must see the same data (checked).
        params: which parameters span the operator (see :class:`ParameterView`);
            default all trainable ones.  The others are held fixed.
        dtype: computation dtype; default the parameters' (half precisions become
            float32).  Use float64 to resolve eigenvalues near zero.
        train_mode: evaluate in train mode (dropout on, BatchNorm on batch
            statistics).  Default False (eval mode), because curvature of a
            stochastic function is not defined; with True, the first product is
            computed twice and must agree.
        forward: ``forward(model, inputs) -> outputs``; default calls the model on
            a tensor, unpacks a tuple, or passes a mapping as keyword arguments.
        backend: ``"func"`` (torch.func transforms, vectorised over columns),
            ``"autograd"`` (double backward, a loop over columns), or ``"auto"``
            (func, falling back to autograd where torch.func cannot trace the model
            or where the two disagree).
        chunk_size: columns vectorised at once by ``torch.func.vmap``; default all
            (bounded by the caller's block).  Lower it to cap memory.
        process_group: a ``torch.distributed`` process group (or ``True`` for the
            default group).  Each rank passes its own shard of the data; products,
            gradient and loss are all-reduced with the same weighting over the
            union of shards (shards may differ in size).  Every rank must call
            every product, with the same vector, as in any collective.
        batch_dim: the inputs' sample dimension (default 0; a model with a
            ``batch_first=False`` module must say it, e.g. 1 for time-major inputs).
        count_samples: ``(inputs, targets) -> int`` for layouts ``batch_dim`` cannot
            describe.
        reduction: ``"mean"`` or ``"sum"`` for a plain-function loss (torch.nn losses
            carry their own); default: detected from the loss on duplicated data.
        loss_terms: ``(outputs, targets) -> count``: how many terms a batch's mean
            divides by, for a plain function that averages over anything but
            samples (e.g. unmasked tokens).  Default: torch.nn losses by their rule,
            plain functions by samples.

    Attention: every product runs with PyTorch's math kernel for
    ``scaled_dot_product_attention`` (the fused CPU/CUDA kernels have no second
    derivatives); the user's kernel choice is restored after each product.
    ``nn.Embedding(padding_idx=p)`` rows ``p`` are constants (PyTorch never trains
    them), so their rows and columns of the operator are zero on every path.

    Backends, and why: ``"func"`` is the fastest (one vectorised pass carries all
    k tangents); ``"autograd"`` works wherever double backward does;
    ``"finite_difference"`` (Hessian only) needs first derivatives alone, for
    models whose double backward is unavailable (some fused kernels and sharded
    wrappers): H v ~ (g(theta + h v) - g(theta - h v)) / 2h with
    h = eps^(1/3) (1 + ||theta||) / ||v||.  Its error is O(h^2) truncation (third
    derivatives) plus O(eps ||g|| / h) rounding; with this h both are of order
    eps^(2/3) times problem-dependent constants: ~1e-10 relative in float64
    (5e-11 measured on a tanh MLP in tests/test_hostile_inputs.py), ~1e-4 in
    float32, so use it in float64.

    Checked on first use: the vectorised and the double-backward product of one
    random probe on the first batch must agree to :func:`path_tolerance` of
    :attr:`internal_eps`; with
    ``backend="auto"`` a disagreement switches to double backward (the
    derivative of the gradient PyTorch trains with) with a warning, with
    ``"func"`` it raises.  The measured difference is :attr:`precision`.
    """

    #: Whether the operator differentiates the loss twice in the model's outputs (the
    #: Hessian and the GGN do; the empirical Fisher needs first derivatives only).
    uses_loss_curvature = True

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        data: Any,
        *,
        params: ParamSelector = None,
        dtype: torch.dtype | None = None,
        train_mode: bool = False,
        forward: ForwardFn | None = None,
        backend: str = "auto",
        chunk_size: int | None = None,
        process_group: Any = None,
        batch_dim: int | None = None,
        count_samples: CountSamples | None = None,
        reduction: str | None = None,
        loss_terms: LossTerms | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not callable(loss_fn):
            raise TypeError(
                f"loss_fn must be callable (outputs, targets) -> scalar, got {loss_fn!r}"
            )
        model = unwrap_compiled(model)
        self.view = ParameterView(model, params)
        _refuse_renormalising_embeddings(model, self.view.names)
        dtype = computation_dtype(dtype, self.view.dtype)
        super().__init__(self.view.n, dtype, self.view.device)
        self.model = model
        self.loss_fn = loss_fn = _loss_in(loss_fn, dtype, self.device)
        kind, terms_rule, sum_loss, how = resolve_reduction(loss_fn, reduction, loss_terms)
        self.train_mode = bool(train_mode)
        self.backend = backend
        self.chunk_size = chunk_size
        self.batch_dim = resolve_batch_dim(model, batch_dim, count_samples)
        self._module = _Forward(model, forward or default_forward)
        self._padding_rows = _has_padding_rows(model)
        if self._padding_rows:
            _warn_tied_padding_rows(model)
        self._embedding_rewrite = _needs_embedding_rewrite(model)
        self._column_bytes: int | None = None
        self.process_group = _resolve_group(process_group)
        self.source = DataSource(
            data, self.device, dtype, batch_dim=self.batch_dim, count_samples=count_samples
        )
        self.source.count(self._sum_over_ranks_int if self.process_group is not None else None)
        self._check_batch_statistics(model)
        self.theta = self.view.flat_params(dtype)
        fixed = self.view.with_aliases(self.view.fixed_state(dtype))
        self._fixed = {f"model.{k}": v for k, v in fixed.items()}
        self._paths_checked = backend == "finite_difference"
        #: batches whose gradient has no graph and was judged not smooth (zero curvature)
        self._graphless_batches: set[int] = set()
        self._precision = torch.finfo(dtype).eps
        #: machine epsilon of the lowest precision the forward pass computes in (float32
        #: internals of a float64 model, e.g. Hugging Face's RMSNorm, show here)
        self.internal_eps = self._precision
        #: reduction: how the loss reduces; num_terms: T, the count a mean divides by
        #: (1.0 for a sum); loss: the loss over all data at the point
        self.reduction, self.num_terms, self.loss = self._scan(
            kind, terms_rule, sum_loss, how, loss_terms is not None
        )

    def batch_statistics_norms(self) -> tuple[list[nn.Module], str]:
        """The BatchNorm layers that normalise by the batch's own statistics here (all of
        them in train mode, those without running statistics in eval mode too), and the
        setting that makes them do so."""
        norms = [
            m
            for m in self.model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and (self.train_mode or m.running_mean is None)
        ]
        return norms, "train_mode=True" if self.train_mode else "track_running_stats=False"

    def _check_batch_statistics(self, model: nn.Module) -> None:
        """Over several batches (or ranks) such layers make the operator depend on how the
        data are split: a warning says so."""
        batch_norms, why = self.batch_statistics_norms()
        if not batch_norms or (self.source.num_batches == 1 and self.process_group is None):
            return
        eval_hint = "; for the model as evaluated use train_mode=False" if self.train_mode else ""
        warnings.warn(
            f"{type(batch_norms[0]).__name__} with {why}: each batch is normalised by its own "
            "statistics, so this is the curvature of the loss with this batching "
            f"({self.source.num_batches} batches here); another split of the same data gives "
            f"another operator. For the loss of all data at once pass them as one batch{eval_hint}",
            stacklevel=4,
        )

    # --- what the algorithms may ask ----------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """What identifies this curvature problem in a checkpoint.

        The generic fields (:meth:`LinearOperator.fingerprint`: class, n, dtype) plus
        ``weights_sha256`` (the SHA-256 of the point's weights), ``num_samples``,
        ``loss`` (at the point) and ``params`` (a hash of the selected parameters'
        names): another model, other data or other weights give another fingerprint.
        """
        theta = self.theta.detach().to("cpu").contiguous()
        weights = hashlib.sha256(theta.view(torch.uint8).numpy().tobytes()).hexdigest()
        names = hashlib.sha256("\n".join(self.view.names).encode()).hexdigest()[:16]
        return {
            **super().fingerprint(),
            "weights_sha256": weights,
            "num_samples": int(self.num_samples),
            "loss": float(self.loss),
            "params": names,
        }

    def block_size(self, memory_budget_bytes: int | None = None) -> int:
        """Columns per block product so that one block's tangents fit the budget.

        The budget divided by :meth:`column_workspace_bytes`, within [16, 2048]
        columns (and at most n): the cost per column falls steeply with the block
        size, since each block re-runs the forward and backward passes over all data
        (see benchmarks/bench_exact.py).  Default budget :data:`BLOCK_MEMORY_BUDGET`
        (1 GiB).
        """
        budget = BLOCK_MEMORY_BUDGET if memory_budget_bytes is None else memory_budget_bytes
        per_column = self.column_workspace_bytes()
        return int(min(max(budget // max(per_column, 1), 16), 2048, self.shape[0]))

    def column_workspace_bytes(self) -> int:
        """Memory of one column of a block product: :data:`TANGENT_COPIES` copies of
        what the forward pass of the largest batch saves for its backward, plus 4
        length-n vectors.

        The saved activations are counted with autograd's saved-tensor hooks on one
        forward pass (made on the first call and remembered: the operator's data and
        point are fixed), each storage once, only those that depend on the parameters
        (the inputs carry no tangent).  The count holds that pass's graph until it
        returns, the memory of one gradient of the batch.  The hooks see every operation,
        including functional code outside modules (an unrolled LSTM cell, attention's
        matrix products), which forward hooks on modules missed (8x low on the unrolled
        char-LSTM).  Against the measured growth of resident memory per column of a
        vectorised block (``python -m benchmarks build``; ``bench_large`` for GPT-2)
        the estimate is 1.2-1.5x high for small-mnistfc, small-LeNet and the char-LSTM,
        1.25x high for GPT-2 at 10M (0.91 against 0.73 GiB) and 16% low at 124M (5.61
        against 6.7 GiB).
        """
        if self._column_bytes is None:
            largest = max(self.source, key=lambda b: b.size)
            theta = self.theta.detach().requires_grad_(True)
            own = theta.untyped_storage().data_ptr()
            saved: dict[int, int] = {}

            def count(t: torch.Tensor) -> torch.Tensor:
                # kept alive until the pass ends, so no two live storages share an address
                if not t.requires_grad:
                    return t
                try:
                    storage = t.untyped_storage()
                    ptr, nbytes = storage.data_ptr(), storage.nbytes()
                except (RuntimeError, NotImplementedError):  # sparse, nested: no storage
                    ptr, nbytes = id(t), t.numel() * t.element_size()
                if ptr != own:
                    saved[ptr] = max(saved.get(ptr, 0), nbytes)
                return t

            with (
                torch.enable_grad(),
                torch.autograd.graph.saved_tensors_hooks(count, lambda t: t),
                self.evaluation_mode(),
            ):
                self.batch_loss(theta, largest)
            itemsize = torch.empty((), dtype=self.dtype).element_size()
            self._column_bytes = TANGENT_COPIES * sum(saved.values()) + 4 * itemsize * self.shape[0]
        return self._column_bytes

    def weight_layout(self, name: str) -> str | None:
        """How the module holding the 2-D parameter ``name`` applies it to features.

        ``"out_in"``: ``y = x W^T``, W of shape (d_out, d_in) (``nn.Linear``, the input
        projections of ``nn.MultiheadAttention``); ``"in_out"``: ``y = x W``, W of shape
        (d_in, d_out) (Hugging Face's ``Conv1D`` in GPT-2 and its kin).  None when the
        module is neither, so the layout cannot be told from the model.
        """
        module_name, _, attr = name.rpartition(".")
        try:
            module = self.model.get_submodule(module_name)
        except AttributeError:
            return None
        if isinstance(module, nn.Linear) and attr == "weight":
            return "out_in"
        if isinstance(module, nn.MultiheadAttention) and attr.endswith("proj_weight"):
            return "out_in"
        if type(module).__name__ == "Conv1D" and attr == "weight" and hasattr(module, "nf"):
            return "in_out"
        return None

    # --- the model as a pure function of theta ---------------------------------
    @property
    def num_samples(self) -> int:
        """N, the number of samples in the data (all ranks)."""
        return self.source.num_samples

    def outputs(self, theta: torch.Tensor, inputs: Any) -> Any:
        """Model outputs with the selected parameters set to ``theta`` (shape (n,))."""
        named = {
            f"model.{k}": v for k, v in self.view.with_aliases(self.view.unflatten(theta)).items()
        }
        return torch.func.functional_call(
            self._module, (named, self._fixed), (inputs,), tie_weights=False
        )

    def batch_loss(self, theta: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The loss of ``batch`` at ``theta``, reduced as ``loss_fn`` reduces it."""
        return self.loss_of_outputs(self.outputs(theta, batch.inputs), batch.targets)

    def loss_of_outputs(self, outputs: Any, targets: Any) -> torch.Tensor:
        """``loss_fn(outputs, targets)``, checked to be a scalar tensor."""
        loss = self.loss_fn(outputs, targets)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return a scalar tensor, got {shape}")
        return loss

    def batches(self) -> Iterator[Batch]:
        """The batches that carry weight (a mean's batches with no counted term are skipped)."""
        return (b for b in self.source if b.weight != 0.0)

    @contextmanager
    def evaluation_mode(self) -> Iterator[None]:
        """The context of every evaluation: the model in eval (or, if asked, train)
        mode with every module's flag restored after, the math attention kernel,
        embeddings with constant padding rows and dense gradients, and IEEE float32
        (no TF32 convolutions, cuDNN's default on GPUs; see :mod:`spectra._precision`)."""
        flags = [(m, m.training) for m in self.model.modules()]
        self.model.train(self.train_mode)
        try:
            with ExitStack() as stack:
                stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
                stack.enter_context(_no_attention_fastpath())
                stack.enter_context(ieee_float32())
                if self._embedding_rewrite:
                    stack.enter_context(_DenseConstantPaddingEmbeddings())
                yield
        finally:
            for m, flag in flags:
                m.training = flag

    def _scan(
        self,
        kind: str | None,
        terms_rule: LossTerms | None,
        sum_loss: Callable[..., torch.Tensor] | None,
        how: str,
        terms_given: bool,
    ) -> tuple[LossReduction, float, float]:
        """One pass at the point: each batch's loss and term count, the weights, the loss."""
        losses, terms = [], []
        rule: LossReduction | None = None
        sizes: tuple[int, ...] = ()
        anchor: PlainMeanAnchor | None = None
        several = self.source.num_batches > 1 or self.process_group is not None
        failure: Exception | None = None
        try:
            with torch.no_grad(), self.evaluation_mode():
                for batch in self.source:
                    if rule is None:  # the first batch: which precision does the model run in?
                        # with grad on, so that a loss reading the real parameters shows (theta
                        # and the fixed state do not require grad: no graph is built otherwise)
                        with torch.enable_grad(), _LowestPrecision() as lowest:
                            with _RefuseActivationCheckpointing() as reentrant:
                                out = self.outputs(self.theta, batch.inputs)
                            check_loss_arguments(self.loss_fn, out, batch.targets)
                            loss = self.loss_of_outputs(out, batch.targets)
                        if reentrant.seen or _graph_has_reentrant_checkpoint(loss):
                            raise ValueError(ACTIVATION_CHECKPOINTING)
                        self._check_reads_only_theta(loss)
                        out, loss = tree_map(_detached, out), loss.detach()
                        self.internal_eps = max(torch.finfo(self.dtype).eps, lowest.eps)
                        self._precision = self.internal_eps
                        self._check_deterministic(batch, loss)
                        rule = self._first_batch_rule(
                            kind, how, terms_rule, sum_loss, out, batch, loss, terms_given
                        )
                        plain_mean = several and rule.kind == "mean" and rule.terms_rule is None
                        self._check_ignored_labels(rule, batch)
                        if plain_mean:
                            anchor = self._check_plain_mean(out, batch, loss, None)
                            labels = _counted_labels(batch)[0]
                            sizes = per_sample_sizes((out, labels), self.batch_dim, batch.size)
                    else:
                        out = self.outputs(self.theta, batch.inputs)
                        loss = self.loss_of_outputs(out, batch.targets)
                        self._check_ignored_labels(rule, batch)
                        if not terms_given:
                            self._check_terms(rule, out, batch, loss)
                        else:
                            rule = self._sum_copy_if_it_agrees(rule, out, batch, loss)
                        if plain_mean:
                            self._check_same_terms_per_sample(sizes, out, batch)
                            self._check_plain_mean(out, batch, loss, anchor)
                    count = rule.terms(out, batch.targets, batch.size)
                    if count > 0 and not torch.isfinite(loss):
                        raise ValueError(
                            f"loss is {loss.item()} on batch {batch.index} at the current weights; "
                            "curvature is undefined there (check the inputs and weights for NaN/Inf)"
                        )
                    losses.append(float(loss) if count > 0 else 0.0)
                    terms.append(count)
            if rule is None:  # an empty shard of distributed data: the other ranks hold the terms
                rule = LossReduction(
                    kind or "mean", how or "assumed (empty shard)", terms_rule, sum_loss
                )
            if self.process_group is not None and rule.kind == "mean" and rule.terms_rule is None:
                raise ValueError(DISTRIBUTED_PLAIN_MEAN)
        except (ValueError, TypeError, RuntimeError) as exc:
            if self.process_group is None:
                raise
            failure = exc
        self._agree_on_failure(failure)
        assert rule is not None
        if rule.kind == "mean":
            total_terms = float(
                self._sum_over_ranks(torch.tensor([sum(terms)], dtype=torch.float64))[0]
            )
            if total_terms <= 0:
                raise ValueError(
                    "the loss counts no terms in the data (every target ignored?); there is "
                    "no curvature to average"
                )
            weights = [t / total_terms for t in terms]
        else:
            total_terms, weights = 1.0, [1.0] * len(terms)
        self.source.set_weights(weights, terms)
        if self.process_group is not None:  # one precision for all ranks
            self.internal_eps = float(
                self._max_over_ranks(torch.tensor([self.internal_eps], dtype=torch.float64))[0]
            )
            self._precision = self.internal_eps
        loss = sum(w * v for w, v in zip(weights, losses, strict=True))
        loss = float(self._sum_over_ranks(torch.tensor([loss], dtype=torch.float64))[0])
        return rule, total_terms, loss

    def _first_batch_rule(
        self,
        kind: str | None,
        how: str,
        terms_rule: LossTerms | None,
        sum_loss: Callable[..., torch.Tensor] | None,
        out: Any,
        batch: Batch,
        loss: torch.Tensor,
        terms_given: bool,
    ) -> LossReduction:
        """The loss's reduction, detected on the first batch where the loss does not say."""
        if kind is None:
            kind, how = detect_kind(self.loss_fn, out, batch.targets, loss), "detected"
        if kind is None:
            if self.source.num_batches > 1 or self.process_group is not None:
                raise ValueError(
                    "cannot tell whether loss_fn averages or sums over the batch (its outputs "
                    "or targets cannot be duplicated to test it), and with several batches the "
                    "weighting depends on it: pass reduction='mean' or 'sum' (and loss_terms= "
                    "for a mean over anything but samples)"
                )
            kind, how = "mean", "assumed (one batch)"
        rule = LossReduction(kind, how, terms_rule, sum_loss)
        if not terms_given:
            self._check_terms(rule, out, batch, loss)
        else:
            rule = self._sum_copy_if_it_agrees(rule, out, batch, loss)
        self._check_rule(rule, batch)
        return rule

    def _check_rule(self, rule: LossReduction, batch: Batch) -> None:
        """A subclass's refusal of a reduction it cannot use (the first batch at hand)."""

    def _check_terms(self, rule: LossReduction, out: Any, batch: Batch, loss: torch.Tensor) -> None:
        """Refuse term counts that cannot be right: a module loss whose mean is not its sum
        over the counted terms (a subclass averaging over a mask).  One more loss evaluation
        per batch, on every batch: a mask may appear in a later batch only."""
        disagreement = self._sum_copy_disagreement(rule, out, batch, loss)
        if disagreement is not None:
            count, total = disagreement
            raise ValueError(
                f"{type(self.loss_fn).__name__}'s mean is not its sum over {count:g} "
                f"terms on batch {batch.index} (mean {float(loss):.6g}, sum "
                f"{total:.6g}); pass loss_terms=lambda outputs, targets: <count>"
            )

    def _sum_copy_if_it_agrees(
        self, rule: LossReduction, out: Any, batch: Batch, loss: torch.Tensor
    ) -> LossReduction:
        """With ``loss_terms`` given, the module's ``reduction="sum"`` copy is this loss's
        sum over the given terms only where it equals mean x count.  Where it does not (a
        mean of per-sample means such as nn.CTCLoss's: the copy drops the division by each
        target's length) a sample's summed loss is its mean times its count instead, else
        the empirical Fisher's per-sample gradients would be those of another loss.
        Checked on every batch: one disagreeing batch drops the copy for all."""
        if self._sum_copy_disagreement(rule, out, batch, loss) is None:
            return rule
        return dataclasses.replace(rule, sum_loss=None)

    def _sum_copy_disagreement(
        self, rule: LossReduction, out: Any, batch: Batch, loss: torch.Tensor
    ) -> tuple[float, float] | None:
        """``(count, sum)`` where a module mean's ``reduction="sum"`` copy is not its mean
        times its term count on this batch (beyond round-off); None where it is, or where
        nothing can be compared (a sum, a plain function, no counted term)."""
        if rule.kind != "mean" or rule.sum_loss is None:
            return None
        total = float(rule.sum_loss(out, batch.targets))
        count = rule.terms(out, batch.targets, batch.size)
        if count > 0 and math.isfinite(total):
            tol = 1e3 * torch.finfo(self.dtype).eps * max(abs(total), 1e-30)
            if abs(float(loss) * count - total) > tol:
                return count, total
        return None

    def _check_plain_mean(
        self, out: Any, batch: Batch, loss: torch.Tensor, anchor: PlainMeanAnchor | None
    ) -> PlainMeanAnchor | None:
        """A plain mean weighted by samples: refused on any batch (or pair of batches)
        where it is not a mean over samples; the first batch's anchor for the others."""
        return check_plain_mean(
            self.loss_fn,
            out,
            batch.targets,
            loss,
            self.batch_dim,
            self.internal_eps,
            f"batch {batch.index}",
            anchor,
        )

    def _check_ignored_labels(self, rule: LossReduction, batch: Batch) -> None:
        """A plain mean weighted by samples is wrong if it skips labels: refuse to guess."""
        if rule.kind != "mean" or rule.terms_rule is not None or rule.sum_loss is not None:
            return
        if self.source.num_batches == 1 and self.process_group is None:
            return  # one batch: its weight is 1 whatever the loss averages over
        labels, where = _counted_labels(batch)
        negative = [
            t
            for t in batch_leaves(labels)
            if not t.is_floating_point() and t.numel() and int(t.min()) < 0
        ]
        if negative and where != "targets":
            raise ValueError(
                f"{where} of batch {batch.index} hold negative labels "
                f"({int(negative[0].min())}: ignored positions) and "
                "the model returns its own loss, a mean over the labels it counts; with the "
                "targets None nothing counts them, so the batches would be weighted by "
                f"samples: wrong. {_COUNT_THE_LABELS}"
            )
        if negative:
            raise ValueError(
                f"the targets of batch {batch.index} hold negative labels "
                f"({int(negative[0].min())}: ignored positions, as Hugging Face's -100?) but "
                "loss_fn is a plain function, so the batches are weighted by samples, which is "
                "wrong if it skips them. Use nn.CrossEntropyLoss(ignore_index=...) (counted "
                "automatically) or pass loss_terms=lambda outputs, targets: (targets != -100).sum() "
                "(or, if the negative values are real labels, loss_terms=lambda outputs, "
                "targets: len(targets))"
            )

    def _check_same_terms_per_sample(self, sizes: tuple[int, ...], out: Any, batch: Batch) -> None:
        """A plain mean weighted by samples needs as many terms per sample in every batch."""
        labels, where = _counted_labels(batch)
        now = per_sample_sizes((out, labels), self.batch_dim, batch.size)
        if now != sizes and where != "targets":
            raise ValueError(
                f"the model returns its own loss, a mean over its labels' elements or tokens, "
                f"and {where} of batch {batch.index} has {list(now)} elements per sample where "
                f"the first batch has {list(sizes)} (sequences of another length): with the "
                "targets None nothing counts them, so the batches would be weighted by "
                f"samples: wrong. {_COUNT_THE_LABELS}"
            )
        if now != sizes and not (now and sizes):
            shapes = [tuple(t.shape) for t in batch_leaves((out, labels))]
            which = (
                f"batch {batch.index} (shapes {shapes}; {batch.size} samples)"
                if not now
                else "the first batch"
            )
            raise ValueError(
                "loss_fn is a plain function's mean and the batches are weighted by samples, "
                f"but the outputs and targets of {which} do not hold the samples along "
                f"batch_dim={self.batch_dim}: the samples are counted from the inputs (a "
                "PackedSequence counts its sequences), and which output or target elements "
                "belong to a sample cannot be told. Pass the batch_dim= along which the "
                "outputs and targets hold the samples (batch_dim=0 for (batch, ...) outputs), "
                "or loss_terms=lambda outputs, targets: <count>"
            )
        if now != sizes:
            raise ValueError(
                f"loss_fn is a plain function's mean and the batches are weighted by samples, "
                f"but batch {batch.index} has {list(now)} output/target elements per sample "
                f"where the first batch has {list(sizes)} (sequences of another length?): if "
                "the loss averages over elements or tokens, that weighting is wrong. Pass "
                "loss_terms=lambda outputs, targets: <count> (e.g. targets.numel() for a mean "
                "over every target, or len(targets) if it really averages over samples)"
            )

    def _check_reads_only_theta(self, loss: torch.Tensor) -> None:
        """Refuse a loss that depends on the model's real parameters.

        The operator puts theta into the model through ``functional_call``; a term that
        reaches the parameters another way (a weight-decay term over
        ``model.parameters()`` inside ``loss_fn``, a parameter kept in a plain list and
        used in ``forward``) would be a constant to it and its curvature silently missing.
        """
        if not loss.requires_grad:
            return
        named = [(k, p) for k, p in self.model.named_parameters() if p.requires_grad]
        if not named:
            return
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        read = [k for (k, _), g in zip(named, grads, strict=True) if g is not None]
        if read:
            shown = ", ".join(read[:3]) + (f" and {len(read) - 3} more" if len(read) > 3 else "")
            raise ValueError(
                f"the loss depends on the model's parameters other than through its forward "
                f"pass ({shown}): a term in loss_fn over model.parameters() (weight decay?), "
                "or a parameter the forward reaches outside its module attributes. The "
                "operator substitutes the parameters in the forward pass only, so that term's "
                "curvature would be missing. Leave it out of loss_fn and add its curvature "
                "yourself (lam * ||theta||^2 adds 2 * lam to every eigenvalue), or compute it "
                "inside the model's forward from its own attributes"
            )

    def _check_deterministic(self, batch: Batch, loss: torch.Tensor) -> None:
        """The forward pass must give the same loss twice on the first batch: one more
        forward pass.  Eval mode does not make every model deterministic
        (``F.dropout(x, p)`` defaults to ``training=True``; a VAE's ``randn_like``
        noise), and a random loss has a different curvature at every product."""
        if not math.isfinite(float(loss)):
            return  # refused below, with the batch named
        again = self.loss_of_outputs(self.outputs(self.theta, batch.inputs), batch.targets)
        tol = 100 * self.internal_eps * max(abs(float(loss)), 1e-30)
        if not abs(float(again) - float(loss)) <= tol:
            mode = "train" if self.train_mode else "eval"
            fix = (
                "Use the default eval mode (train_mode=False) or make the forward pass "
                "deterministic."
                if self.train_mode
                else "Make the forward pass deterministic in eval mode: pass "
                "training=self.training to functional dropout (F.dropout's default is "
                "training=True), and fix or remove random noise (torch.randn_like, "
                "sampling), e.g. by a forward= that calls the model deterministically."
            )
            raise RuntimeError(
                f"two identical forward passes give different losses in {mode} mode "
                f"({float(loss):.9g} and {float(again):.9g} on batch {batch.index}): the model "
                "is stochastic or keeps state across calls (dropout, random noise or "
                "augmentation, spectral_norm's power iteration, ...), so every curvature "
                f"product, gradient and diagonal would be a different function's. {fix}"
            )

    # --- distributed reduction ----------------------------------------------------
    def _agree_on_failure(self, failure: Exception | None) -> None:
        """With a process group, every rank learns whether any rank refused its data
        (one object all-gather), and all raise: a refusal on one rank alone left the
        others waiting in the next collective until the process group's timeout.
        Without one, ``failure`` is raised as it is."""
        if self.process_group is None:
            if failure is not None:
                raise failure
            return
        mine = None if failure is None else f"{type(failure).__name__}: {failure}"
        world = torch.distributed.get_world_size(self.process_group)
        verdicts: list[str | None] = [None] * world
        torch.distributed.all_gather_object(verdicts, mine, group=self.process_group)
        if failure is not None:
            raise failure
        for rank, verdict in enumerate(verdicts):
            if verdict is not None:
                raise RuntimeError(f"rank {rank} refused its data, so every rank does: {verdict}")

    def _sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) ``t`` in place over the process group; identity without one."""
        if self.process_group is not None:
            torch.distributed.all_reduce(t, group=self.process_group)
        return t

    def _max_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce (max) ``t`` in place over the process group; identity without one."""
        if self.process_group is not None:
            torch.distributed.all_reduce(
                t, op=torch.distributed.ReduceOp.MAX, group=self.process_group
            )
        return t

    def _sum_over_ranks_int(self, value: int) -> int:
        return int(self._sum_over_ranks(torch.tensor([value], dtype=torch.int64))[0])

    def gradient(self) -> torch.Tensor:
        """The gradient (n,) of the loss over all data at the point, with the same weighting."""
        return self.loss_and_gradient()[1]

    def loss_and_gradient(self, theta: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
        """The loss over all data and its gradient (n,) at ``theta`` (default: the point).

        The same function the operator is the curvature of (same batches, weights,
        mode and kernels), for algorithms that move away from the point (sharpness
        by gradient ascent, perturbations); one forward and backward pass per batch.
        """
        if theta is None:
            theta = self.theta
        elif not (isinstance(theta, torch.Tensor) and theta.shape == self.theta.shape):
            raise ValueError(f"theta must be a tensor of shape {tuple(self.theta.shape)}")
        theta = theta.to(dtype=self.dtype, device=self.device)
        grad = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        value = torch.zeros((), dtype=torch.float64, device=self.device)
        with self.evaluation_mode():
            for batch in self.batches():
                # plain autograd, not torch.func: BatchNorm in train mode updates its
                # (copied) buffers in place, which torch.func refuses
                leaf = theta.detach().requires_grad_(True)
                with torch.enable_grad():
                    loss = self.batch_loss(leaf, batch)
                    (g,) = torch.autograd.grad(loss, leaf)
                grad.add_(g, alpha=batch.weight)
                value += batch.weight * loss.detach().double()
        self._sum_over_ranks(grad)
        return float(self._sum_over_ranks(value.reshape(1))[0]), grad

    def loss_at(self, theta: torch.Tensor) -> float:
        """The loss over all data at ``theta`` (forward passes only)."""
        if not (isinstance(theta, torch.Tensor) and theta.shape == self.theta.shape):
            raise ValueError(f"theta must be a tensor of shape {tuple(self.theta.shape)}")
        theta = theta.to(dtype=self.dtype, device=self.device)
        value = torch.zeros(1, dtype=torch.float64, device=self.device)
        with torch.no_grad(), self.evaluation_mode():
            for batch in self.batches():
                value += batch.weight * self.batch_loss(theta, batch).double()
        return float(self._sum_over_ranks(value)[0])

    # --- products -------------------------------------------------------------------
    @property
    def precision(self) -> float:
        """Relative accuracy of this operator's products: the largest of the dtype's
        epsilon, the epsilon of the lowest precision the forward pass computes in
        (:attr:`internal_eps`, seen on the first batch) and the measured
        disagreement of two exact paths on one probe.  Algorithms set their
        tolerances from it."""
        if not self._paths_checked:
            with self.evaluation_mode():
                self._check_paths()
        return self._precision

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        with self.evaluation_mode():
            if not self._paths_checked:
                self._check_paths()
            return self._accumulate(V)

    def _check_paths(self) -> None:
        """Compare the vectorised and the double-backward product on one probe; where
        only one of them runs (or ``backend="autograd"``), check that one for symmetry.

        With a process group every rank measures on its own first batch and the
        largest disagreement decides for all, so ranks keep one backend and one
        precision (Lanczos tolerances depend on it) and all refuse together."""
        self._paths_checked = True
        first = next(self.batches(), None)  # None: an empty shard of distributed data
        failure: Exception | None = None
        try:
            if first is not None:
                self._check_gradient_is_the_derivative(first)
                self._check_samples_alone(first)
            graphless = self._graphless_loss_curvature(first)
            paths, asymmetry, where = self._path_difference(first)
        except (ValueError, TypeError, RuntimeError) as exc:
            if self.process_group is None:
                raise
            failure = exc
        self._agree_on_failure(failure)
        if self.process_group is not None:  # every rank decides on the same numbers
            local = (paths, asymmetry)
            verdicts = torch.tensor([paths, asymmetry, graphless is not None], dtype=torch.float64)
            paths, asymmetry, refused = (float(x) for x in self._max_over_ranks(verdicts))
            if (paths, asymmetry) != local:  # the deciding number is another rank's
                where = " on another rank's first batch"
            if refused and graphless is None:
                graphless = "another rank's data: " + GRAPHLESS_GRADIENT.format(
                    what="the model's outputs"
                )
        if graphless is not None:
            raise RuntimeError(f"{type(self).__name__}: {graphless}")
        self._precision = max(self._precision, paths, asymmetry)
        tol = path_tolerance(self.internal_eps)
        # float32 products near an interpolating minimum are legitimately this inexact;
        # in float64 anything beyond round-off is a wrong derivative
        refused_above = ASYMMETRY_REFUSED if self.internal_eps >= 1e-7 else tol
        if asymmetry > refused_above:
            hint = (
                "; backend='finite_difference' needs first derivatives only"
                if self._has_finite_differences()
                else "; replace that operation (or write it out in plain tensor operations)"
            )
            raise RuntimeError(
                f"{type(self).__name__}: the only product PyTorch computes for this model is "
                f"not symmetric: u_i^T A u_j and u_j^T A u_i differ by {asymmetry:.2e} of their "
                f"size{where}, so it is no curvature matrix. Some operation's double backward "
                "is wrong (torch.nn.utils.parametrizations.weight_norm's fused kernel is one: "
                "weight_norm(module, ...) can be written as g * v / v.norm())" + hint
            )
        if asymmetry > tol:
            warnings.warn(
                f"{type(self).__name__}: the product is asymmetric by {asymmetry:.2e} of its "
                f"size{where} (round-off at this dtype would be below {tol:.1e}): its precision "
                "is taken as that, and algorithms' tolerances follow; dtype=torch.float64 "
                "computes it more exactly",
                stacklevel=user_stacklevel(),
            )
        if paths <= tol:
            return
        message = (
            f"{type(self).__name__}: the vectorised (torch.func) and the double-backward "
            f"products of one probe differ by {paths:.2e} relative (tolerance {tol:.1e}){where}: "
            "some operation of the model has a backward that is not the derivative of its "
            "forward (a custom autograd.Function, scale_grad_by_freq, a straight-through "
            "estimator, ...)"
            + (
                ", or, in float32, round-off where the curvature is tiny next to the loss's "
                "rounding (near an interpolating minimum; dtype=torch.float64 tells which)"
                if self.internal_eps >= 1e-7
                else ""
            )
            + f"; op.precision is now {max(self._precision, paths):.1e}"
        )
        if self.backend == "func":
            raise RuntimeError(message + "; use backend='autograd'")
        warnings.warn(
            message + "; using double backward for every product", stacklevel=user_stacklevel()
        )
        self.backend = "autograd"

    def _graphless_loss_curvature(self, first: Batch | None) -> str | None:
        """Why the loss cannot be differentiated twice, or None: a loss whose gradient in
        the model's outputs varies smoothly but has no graph (a custom autograd.Function
        or a fused kernel with a hand-written backward) would lose its curvature, J^T H_z
        J, without an error.  Checked on the first batch, where the forward returns one
        tensor."""
        if first is None or not self.uses_loss_curvature:
            return None
        with torch.no_grad():
            z = self.outputs(self.theta, first.inputs)
        if not isinstance(z, torch.Tensor) or not z.is_floating_point() or z.ndim == 0:
            return None
        zd = z.detach().requires_grad_(True)
        del z
        try:
            with torch.enable_grad():
                gz = gradient_with_graph(self.loss_of_outputs(zd, first.targets), zd)
                (hz,) = torch.autograd.grad(gz, zd, torch.ones_like(gz), allow_unused=True)
        except RuntimeError as exc:
            raise self._no_second_derivative(exc) from exc
        if hz is not None:
            return None
        gradient = autograd_gradient(lambda o: self.loss_of_outputs(o, first.targets))
        if graphless_gradient_is_smooth(gradient, zd, gz):
            return GRAPHLESS_GRADIENT.format(what="the model's outputs")
        return None

    def _check_gradient_is_the_derivative(self, first: Batch) -> None:
        """Warn where autograd's gradient on the first batch is not the loss's derivative
        along a random direction (:mod:`spectra.gradient_check`): every product
        differentiates that gradient, so they would be the curvature of something else.
        Five forward passes and one gradient."""
        gen = torch.Generator(device="cpu").manual_seed(4321)
        u = torch.randn(self.shape[0], generator=gen, dtype=torch.float64)
        u = self._off_padding_rows(u.to(dtype=self.dtype, device=self.device))
        leaf = self.theta.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self.batch_loss(leaf, first)
            if not loss.requires_grad:
                raise ValueError(
                    f"the loss on batch {first.index} does not depend on any selected "
                    f"parameter ({', '.join(self.view.names[:3])}"
                    f"{', ...' if len(self.view.names) > 3 else ''}): the forward pass never "
                    "uses them, so there is no curvature to compute; select parameters it "
                    "uses (params=)"
                )
            (g,) = torch.autograd.grad(loss, leaf, allow_unused=True, materialize_grads=True)
        with torch.no_grad():
            check = directional_check(
                lambda t: float(self.batch_loss(t, first)), self.theta, g, u, self.internal_eps
            )
        if check.disagrees:
            warnings.warn(
                f"{type(self).__name__}: autograd's gradient is not the loss's derivative on "
                f"batch {first.index}: along a random direction it gives "
                f"{check.autograd:.6g}, the loss changes at {check.finite_difference:.6g} "
                f"(finite differences, +- {check.error:.1e}). Some operation's backward is not "
                "the derivative of its forward (a parameter read through .data or .detach() "
                "in forward, a straight-through estimator, a custom autograd.Function), and "
                "the curvature computed is that of autograd's gradient, not of the loss",
                stacklevel=user_stacklevel(),
            )

    def _check_samples_alone(self, first: Batch) -> None:
        """A subclass's check, on the first batch, that it may take samples one at a time."""

    def _off_padding_rows(self, u: torch.Tensor) -> torch.Tensor:
        """A copy of ``u`` (n,) with the embeddings' padding rows, which every path holds
        constant, set to zero."""
        u = u.clone()
        if not self._padding_rows:
            return u
        modules = dict(self.model.named_modules())
        for name, part in self.view.unflatten(u).items():  # views into u
            for slot in (name, *self.view.aliases.get(name, ())):
                owner, _, attr = slot.rpartition(".")
                module = modules.get(owner)
                if isinstance(module, nn.Embedding) and attr == "weight":
                    if module.padding_idx is not None:
                        part[module.padding_idx] = 0
        return u

    def _path_difference(self, first: Batch | None) -> tuple[float, float, str]:
        """On this rank's first batch: the relative difference of the two paths on one
        probe, or, where only one runs, that one's asymmetry on four (the RMS of
        u_i^T A u_j - u_j^T A u_i over the pairs relative to the RMS of the forms, which
        estimates ||A - A^T||_F / ||A||_F); 0 for what was not measured.  Also where.
        Products are taken one column at a time, as the largest models need."""
        if first is None:
            return 0.0, 0.0, ""  # an empty shard of distributed data
        batch = self._probe_batch(first)
        gen = torch.Generator(device="cpu").manual_seed(1234)
        probe = torch.randn((self.shape[0], 4), generator=gen, dtype=torch.float64)
        probe = probe.to(dtype=self.dtype, device=self.device)
        paths = (
            (self._batch_matmat_autograd,)
            if self.backend == "autograd"
            else (self._batch_matmat, self._batch_matmat_autograd)
        )
        ran = []
        for path in paths:
            try:
                ran.append((path, path(batch, probe[:, :1])))
            except (RuntimeError, NotImplementedError):
                pass  # _batch_product falls back (or raises) as documented
        where = f" on batch {batch.index}"
        if len(ran) == 2:
            (_, block), (_, single) = ran
            scale = max(float(single.norm()), float(block.norm()), 1e-300)
            return float((block - single).norm()) / scale, 0.0, where
        if not ran:
            return 0.0, 0.0, ""
        path, column = ran[0]
        try:
            columns = [column] + [path(batch, probe[:, j : j + 1]) for j in range(1, 4)]
        except (RuntimeError, NotImplementedError):
            return 0.0, 0.0, ""  # the products' own errors surface where they are used
        forms = probe.double().T @ torch.cat(columns, dim=1).double()  # u_i^T A u_j
        upper = torch.triu_indices(4, 4, offset=1)
        a, b = forms[upper[0], upper[1]], forms[upper[1], upper[0]]
        size = float(((a * a + b * b) / 2).mean().sqrt())
        return 0.0, float((a - b).pow(2).mean().sqrt()) / max(size, 1e-300), where

    def _probe_batch(self, batch: Batch) -> Batch:
        """The batch the path check runs on (subclasses may take a part of it)."""
        return batch

    def _accumulate(self, V: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(V)
        for batch in self.batches():
            try:
                prod = self._batch_product(batch, V)
            except RuntimeError as exc:
                raise self._no_second_derivative(exc) from exc
            if not all_finite(prod):
                raise FloatingPointError(
                    f"non-finite curvature product on batch {batch.index}; "
                    "the loss is finite there, so the curvature overflows: try dtype=torch.float64"
                )
            out.add_(prod, alpha=batch.weight)
        return self._sum_over_ranks(out)

    def _zero_curvature_if_graphless(
        self,
        batch: Batch,
        f: Callable[[torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        g: torch.Tensor,
        what: str,
    ) -> torch.Tensor:
        """Zeros like ``x``: the curvature of ``f`` on ``batch`` where its gradient ``g``
        has no graph in ``x`` and does not vary smoothly (linear or piecewise linear);
        raises where it does (a hand-written backward, whose curvature double backward
        cannot see).  Judged once per batch: later products reuse the verdict."""
        if batch.index not in self._graphless_batches:
            if graphless_gradient_is_smooth(autograd_gradient(f), x, g):
                raise RuntimeError(GRAPHLESS_GRADIENT.format(what=what))
            self._graphless_batches.add(batch.index)
        return torch.zeros_like(x)

    def _has_finite_differences(self) -> bool:
        """Whether this operator has a first-derivative-only path to point users to."""
        return (
            type(self)._batch_matmat_finite_difference
            is not CurvatureOperator._batch_matmat_finite_difference
        )

    def _no_second_derivative(self, exc: RuntimeError) -> RuntimeError:
        """PyTorch's error for an operation without a double backward, with what to do."""
        text = str(exc)
        if not ("derivative for" in text and "not implemented" in text):
            return exc
        hint = (
            "backend='finite_difference' approximates each product by central differences "
            "of gradients (relative error ~eps^(2/3))"
            if self._has_finite_differences()
            else "replace that operation (or the loss) by one PyTorch can differentiate twice"
        )
        return RuntimeError(
            f"PyTorch has no second derivative for an operation of this model or loss "
            f"({text.splitlines()[0]}), so {type(self).__name__} cannot be computed exactly: "
            + hint
        )

    def _batch_product(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        if self.backend == "autograd":
            return self._batch_matmat_autograd(batch, V)
        if self.backend == "finite_difference":
            return self._batch_matmat_finite_difference(batch, V)
        try:
            return self._batch_matmat(batch, V)
        except (RuntimeError, NotImplementedError) as exc:
            if self.backend == "func":
                raise
            warnings.warn(
                f"torch.func cannot trace this model ({type(exc).__name__}: {str(exc)[:120]}); "
                "using the torch.autograd path instead",
                stacklevel=4,
            )
            self.backend = "autograd"
            return self._batch_matmat_autograd(batch, V)

    def _vmap(self, fn: Callable[[torch.Tensor], torch.Tensor], V: torch.Tensor) -> torch.Tensor:
        """Apply a per-column map to the columns of V, vectorised with torch.func.vmap."""
        return torch.func.vmap(
            fn, in_dims=1, out_dims=1, randomness="same", chunk_size=self.chunk_size
        )(V)

    def _batch_matmat(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        """The batch's mean-loss curvature times V (n, k), with torch.func."""
        raise NotImplementedError

    def _batch_matmat_autograd(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        """The same product with torch.autograd (for models torch.func cannot trace)."""
        raise NotImplementedError(f"{type(self).__name__} has no autograd path")

    def _batch_matmat_finite_difference(self, batch: Batch, V: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} has no finite-difference path; it exists for the Hessian"
        )


BACKENDS = ("auto", "func", "autograd", "finite_difference")


def _resolve_group(process_group: Any) -> Any:
    if process_group is None or process_group is False:
        return None
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(
            "process_group was given but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group(...) first (e.g. under torchrun)"
        )
    return torch.distributed.group.WORLD if process_group is True else process_group
