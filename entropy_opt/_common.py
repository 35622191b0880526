"""Helpers shared by every optimizer here: argument checks, gradient collection, noise,
state dicts that carry their optimizer's name and are checked on load."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

Closure = Callable[[], Tensor]


def _is_finite(value: Any) -> bool:
    try:
        return not isinstance(value, bool | str) and math.isfinite(value)
    except (TypeError, ValueError, RuntimeError):  # not a number, or a tensor of several
        return False


def check_nonneg(name: str, value: float, hint: str = "") -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number ``>= 0``.

    Infinite or NaN hyper-parameters are refused: they never mean anything and
    turn every weight into NaN at the first step.
    """
    if not (_is_finite(value) and value >= 0.0):
        raise ValueError(
            f"{name} must be >= 0 and finite, got {value!r}{'; ' + hint if hint else ''}"
        )


def check_finite_group(group: dict[str, Any], who: str) -> None:
    """Raise ``ValueError`` naming the first non-finite number among ``group``'s entries.

    Covers hyper-parameters this package does not know individually, e.g. those a
    base optimizer of :class:`~entropy_opt.SAM` takes (``lr``, ``momentum``,
    ``betas``), which ``torch.optim`` accepts as ``inf`` or ``nan``.
    """
    for key, value in group.items():
        if key == "params":
            continue
        items = value if isinstance(value, tuple | list) else (value,)
        for item in items:
            numeric = isinstance(item, numbers.Real | Tensor) and not isinstance(item, bool)
            if numeric and not _is_finite(item):
                raise ValueError(f"{who}: hyper-parameter {key} must be finite, got {value!r}")


def check_fraction(name: str, value: float, hint: str = "") -> None:
    """Raise ``ValueError`` unless ``0 < value <= 1``."""
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must lie in (0, 1], got {value!r}{'; ' + hint if hint else ''}")


def check_momentum(momentum: float, nesterov: bool, prefix: str = "") -> None:
    """Momentum in [0, 1); Nesterov needs a positive momentum (as in ``torch.optim.SGD``)."""
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"{prefix}momentum must lie in [0, 1), got {momentum!r}")
    if nesterov and momentum <= 0.0:
        raise ValueError(f"{prefix}nesterov=True requires {prefix}momentum > 0, got {momentum!r}")


def is_state_init_probe(
    closure: Closure | None, groups: Sequence[dict[str, Any]], state: Mapping[Any, Any]
) -> bool:
    """Whether ``step(closure)`` is the probe ``torch.distributed.checkpoint`` runs to
    create an optimizer's state before loading into it: no closure, no state yet, every
    gradient zero (or None) and every ``lr`` 0, so the step can move nothing.  The
    optimizers here then create the state a first step would (zero moments and
    buffers) without evaluating anything, and the load fills it."""
    if closure is not None or state:
        return False
    if any(float(g.get("lr", 1.0)) != 0.0 for g in groups):
        return False
    return all(p.grad is None or not bool(p.grad.any()) for g in groups for p in g["params"])


def require_closure(closure: Closure | None, who: str) -> Closure:
    """Return ``closure`` wrapped in ``enable_grad``, or explain why one is needed."""
    if closure is None:
        raise ValueError(
            f"{who}.step() needs a closure: it evaluates the loss several times per step "
            "(at other points than the current weights). Pass "
            "`def closure(): opt.zero_grad(); loss = loss_fn(model(next_batch())); "
            "loss.backward(); return loss` and call `opt.step(closure)`."
        )
    return torch.enable_grad()(closure)


#: torch.optim hyper-parameters with the values that mean "off" (empty: every value means
#: something).  In a param group of an optimizer here that does not implement one (a group
#: copied from a torch config, say), torch would ignore it silently, so any other value
#: is refused.  Other keys (a scheduler's ``initial_lr``, a user's own) pass as in torch.
TORCH_OPTIONS_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "maximize": (False,),
    "amsgrad": (False,),
    "dampening": (0, 0.0),
    "momentum": (0, 0.0),
    "nesterov": (False,),
    "capturable": (False,),
    "differentiable": (False,),
    "fused": (None, False),
    "decoupled_weight_decay": (False,),
    "centered": (False,),
    "lr_decay": (0, 0.0),
    "initial_accumulator_value": (0, 0.0),
    "betas": (),
    "eps": (),
    "momentum_decay": (),
}


def check_group_keys(group: dict[str, Any], supported: Any, who: str) -> None:
    """Refuse torch.optim options ``who`` does not implement, set in a param group."""
    found = sorted(
        k
        for k, neutral in TORCH_OPTIONS_NEUTRAL.items()
        if k in group and k not in supported and group[k] not in neutral
    )
    if found:
        settings = ", ".join(f"{k}={group[k]!r}" for k in found)
        raise ValueError(
            f"{who} does not implement {settings} (a param group entry torch.optim would "
            f"ignore silently); remove it from the group"
        )


def check_real_params(params: Any, who: str) -> None:
    """Refuse complex parameters: the noise and Adam's second moment here treat a tensor's
    elements as real numbers (a complex normal draw has half the variance per real part).
    ``params`` may hold tensors or ``(name, tensor)`` pairs (``named_parameters()``)."""
    for p in params:
        if isinstance(p, tuple) and len(p) == 2:
            p = p[1]
        if isinstance(p, Tensor) and p.is_complex():
            raise ValueError(
                f"{who} does not support complex parameters (one of shape {tuple(p.shape)}, "
                f"{p.dtype}); optimise the real pairs instead, e.g. a real nn.Parameter r "
                "with torch.view_as_complex(r) in the forward"
            )


def checked_group(param_group: dict[str, Any], defaults: Any, who: str) -> dict[str, Any]:
    """``param_group`` with its ``params`` read once into a list (they may be a
    generator), after the checks every optimizer here makes on a new group: no complex
    parameters, no torch option the optimizer lacks."""
    param_group = group_params(param_group)
    check_real_params(param_group["params"], who)
    check_group_keys(param_group, defaults, who)
    return param_group


def group_params(param_group: dict[str, Any]) -> dict[str, Any]:
    """``param_group`` with its ``params`` as a list (read once: it may be a generator),
    as torch's ``add_param_group`` normalises it."""
    params = param_group["params"]
    if isinstance(params, Tensor):
        params = [params]
    elif not isinstance(params, set):  # torch refuses a set with its own message
        params = list(params)
    return {**param_group, "params": params}


def params_with_grad(group: dict, who: str) -> list[Tensor]:
    """Parameters of ``group`` that received a gradient and are trained; sparse gradients
    are refused.  A frozen parameter (``requires_grad=False``) that still holds a
    ``.grad`` (zeroed with ``set_to_none=False`` before it was frozen) is left alone: the
    noisy inner loops here would otherwise move it (torch.optim.SGD only holds it still
    because its step is the zero gradient)."""
    out = []
    for p in group["params"]:
        if p.grad is None or not p.requires_grad:
            continue
        if p.grad.is_sparse:
            raise ValueError(
                f"{who} does not support sparse gradients (parameter of shape "
                f"{tuple(p.shape)}); use dense gradients, e.g. nn.Embedding(sparse=False)"
            )
        out.append(p)
    return out


#: Key of a state dict under which the optimizers here record their class name.
OPTIMIZER_KEY = "optimizer"


def _source_name(state_dict: dict[str, Any], group_keys: set[str]) -> str:
    """Which optimizer a state dict comes from: its recorded name, else the ``torch.optim``
    classes whose param groups have exactly its keys (a fresh instance of each is built
    on a dummy parameter, only on this error path)."""
    if OPTIMIZER_KEY in state_dict:
        return str(state_dict[OPTIMIZER_KEY])
    names = []
    for name in sorted(dir(torch.optim)):
        cls = getattr(torch.optim, name)
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer):
            try:
                keys = set(cls([torch.zeros(1, requires_grad=True)]).defaults)
            except Exception:  # noqa: BLE001 - the base class, or needs arguments
                continue
            if keys == group_keys:
                names.append(name)
    return "/".join(names) if names else "another optimizer"


def check_state_dict(
    opt: torch.optim.Optimizer,
    state_dict: dict[str, Any],
    state_keys: Collection[str] | None = None,
    extra_state: Collection[str] = (),
) -> None:
    """Refuse, before anything is loaded, a state dict ``opt`` could not step with.

    ``torch.optim`` replaces the param groups by the saved ones and keeps the saved
    per-parameter state, so a state dict of another optimizer loads without complaint
    and the next step dies with ``KeyError``.  Here every saved group must hold every
    hyper-parameter of ``opt.defaults`` (extra keys, e.g. a scheduler's
    ``initial_lr``, are fine), a recorded optimizer name must be ``opt``'s, and, when
    ``state_keys`` is given, per-parameter state may only hold those keys (and
    non-parameter state only ``extra_state``).  The error names both optimizers.
    """
    who = type(opt).__name__
    groups = state_dict.get("param_groups")
    state = state_dict.get("state")
    if (
        not isinstance(groups, list)
        or not isinstance(state, dict)
        or not all(isinstance(g, dict) for g in groups)
    ):
        raise ValueError(
            f"{who}.load_state_dict: not an optimizer state dict (it needs 'state' "
            f"and 'param_groups', got keys {sorted(state_dict)})"
        )
    problems = []
    recorded = state_dict.get(OPTIMIZER_KEY)
    if recorded is not None and recorded != who:
        problems.append(f"it records optimizer {recorded!r}")
    for i, group in enumerate(groups):
        missing = sorted(set(opt.defaults) - set(group))
        if missing:
            problems.append(f"param group {i} lacks {who}'s hyper-parameters {missing}")
            break
    if state_keys is not None:
        # parameter state is keyed by the ids the groups list (ints from state_dict(),
        # parameter names from torch.distributed.checkpoint / FSDP)
        param_keys = {k for g in groups for k in g.get("params", ()) if isinstance(k, (int, str))}
        for key, entry in state.items():
            is_param = isinstance(key, int) or key in param_keys
            allowed = state_keys if is_param else ()
            if not is_param and key in extra_state:
                continue
            unknown = sorted(set(entry) - set(allowed)) if isinstance(entry, dict) else [key]
            if unknown:
                problems.append(f"state {key!r} holds {unknown}, which {who} does not keep")
                break
    if problems:
        group_keys = set(groups[0]) - {"params"} if groups else set()
        source = _source_name(state_dict, group_keys)
        raise ValueError(
            f"{who}.load_state_dict: this state dict comes from {source}, not {who} ("
            + "; ".join(problems)
            + f"). Load it into the optimizer that wrote it, or start "
            f"{who} afresh"
        )


class StateDictMixin:
    """State dicts that record the optimizer's class and carry its private ``generator``
    (if any, so a resumed run draws the same noise as an uninterrupted one); loading
    refuses another optimizer's (:func:`check_state_dict`) before touching anything.
    Subclasses list their per-parameter state keys in ``STATE_KEYS`` and their
    non-parameter state entries in ``EXTRA_STATE``.  Mix in before ``Optimizer``."""

    generator: torch.Generator | None
    STATE_KEYS: frozenset[str] = frozenset()
    EXTRA_STATE: frozenset[str] = frozenset()

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()  # type: ignore[misc]
        sd[OPTIMIZER_KEY] = type(self).__name__
        if self.generator is not None:
            sd["generator_state"] = self.generator.get_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_dict(self, state_dict, self.STATE_KEYS, self.EXTRA_STATE)  # type: ignore[arg-type]
        state_dict = dict(state_dict)
        state_dict.pop(OPTIMIZER_KEY, None)
        gen_state = state_dict.pop("generator_state", None)
        super().load_state_dict(state_dict)  # type: ignore[misc]
        if gen_state is not None and self.generator is not None:
            self.generator.set_state(gen_state)


class NoiseBuffers:
    """Standard-normal noise for a list of tensors, drawn as one flat vector per (device, dtype).

    One ``normal_`` call per bucket instead of one per tensor keeps models with many small
    tensors cheap, and makes the for-loop and foreach paths consume the RNG identically.
    The flat buffers and their views are cached while the parameter list is unchanged.
    """

    def __init__(self) -> None:
        self._key: tuple = ()
        self._flats: list[Tensor] = []
        self._views: list[Tensor] = []

    def draw(self, tensors: Sequence[Tensor], generator: torch.Generator | None) -> list[Tensor]:
        """Fresh N(0, 1) samples shaped like ``tensors`` (views into cached buffers)."""
        key = tuple((id(t), t.shape) for t in tensors)
        if key != self._key:
            self._build(tensors)
            self._key = key
        for flat in self._flats:
            flat.normal_(generator=generator)
        return self._views

    def _build(self, tensors: Sequence[Tensor]) -> None:
        buckets: dict[tuple, list[int]] = {}
        for i, t in enumerate(tensors):
            buckets.setdefault((t.device, t.dtype), []).append(i)
        self._flats, views = [], [None] * len(tensors)
        for (device, dtype), idx in buckets.items():
            flat = torch.empty(sum(tensors[i].numel() for i in idx), device=device, dtype=dtype)
            for i, v in zip(idx, split_views(flat, [tensors[i] for i in idx]), strict=True):
                views[i] = v
            self._flats.append(flat)
        self._views = views  # type: ignore[assignment]


def split_views(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Consecutive views of the 1-D ``flat`` shaped like the tensors in ``like``."""
    views, offset = [], 0
    for t in like:
        n = t.numel()
        views.append(flat[offset : offset + n].view_as(t))
        offset += n
    return views


def _foreach_devices() -> frozenset[str]:
    """Device types on which ``foreach=None`` takes the foreach path: torch.optim's own list
    (CUDA-like devices) plus the CPU, where it measured as fast or faster (see
    :func:`resolve_foreach`)."""
    try:
        from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices
    except ImportError:  # private torch API; its list as of torch 2.13
        return frozenset({"cpu", "cuda", "xpu", "mtia"})
    return frozenset({"cpu", *_get_foreach_kernels_supported_devices()})


def resolve_foreach(foreach: bool | None, tensors: Sequence[Tensor]) -> bool:
    """Whether an update of ``tensors`` runs through the ``torch._foreach_*`` kernels.

    An explicit ``True`` or ``False`` is honoured.  ``None`` follows torch.optim's rule
    (``torch.optim.optimizer._default_to_fused_or_foreach``: foreach when every tensor is a
    plain ``Tensor``/``Parameter`` on a device with foreach kernels, the CUDA-like ones)
    with the CPU added, because there it pays too, and only the foreach path reaches the
    fused momentum and Adam kernels.  Measured on this project's 2-core Xeon (torch 2.13,
    one thread, L = 10, process CPU time of one step with ``foreach=True`` over the same
    step with ``foreach=False``, median of 9 and of 15 interleaved rounds): on mnistfc
    (1.86M weights in 6 tensors) Entropy-SGD 0.98-0.99, Nesterov momentum in both loops
    0.90, Entropy-Adam 0.95-0.98, SGLD 0.98-0.99; on 200 ``Linear(32, 32)`` layers (400
    tensors) 0.92 (one run 1.06, at load 6), 0.82-0.84, 0.86-0.92 and 0.91-0.98.  Tensor
    subclasses and other devices (``mps``, ``meta``) take the for-loop, as in torch.optim.
    """
    if foreach is not None:
        return bool(foreach)
    devices = _foreach_devices()
    plain = (Tensor, torch.nn.Parameter)
    return all(type(t) in plain and t.device.type in devices for t in tensors)


def one_device_dtype(tensors: Sequence[Tensor]) -> tuple[torch.device, torch.dtype] | None:
    """The common ``(device, dtype)`` of ``tensors``, or None if they are mixed (or empty)."""
    if not tensors:
        return None
    key = {(t.device, t.dtype) for t in tensors}
    return next(iter(key)) if len(key) == 1 else None


#: Lengths the fused-kernel check runs: a short tail, one and several vector widths plus a
#: remainder.  torch 2.13's CPU ``_fused_sgd_`` is right on 3 bfloat16 numbers and wrong
#: (by O(1) in the momentum buffer) from about 16 on, so a short probe alone is not enough.
FUSED_CHECK_LENGTHS = (3, 67, 1031)


@functools.cache
def fused_ok(kind: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._fused_sgd_`` (``kind="sgd"``) or ``torch._fused_adam_`` (``"adam"``)
    runs on ``device``/``dtype`` in this torch build and computes the textbook update.

    The fused kernels are private torch API whose device and dtype coverage (and
    correctness: see :data:`FUSED_CHECK_LENGTHS`) changed across releases, so instead of
    a version table this runs each one once on random tensors of several lengths and
    compares with the update computed in float64 from the same (rounded) inputs, to a few
    units of ``dtype``'s rounding; any error means no.
    """
    fn = getattr(torch, f"_fused_{kind}_", None)
    if fn is None or not dtype.is_floating_point or kind not in ("sgd", "adam"):
        return False
    gen = torch.Generator().manual_seed(0)
    tol = 16 * torch.finfo(dtype).eps
    try:
        for n in FUSED_CHECK_LENGTHS:
            p, g, b, v = (torch.rand(n, generator=gen) + 0.5 for _ in range(4))
            p, g, b, v = (t.to(device=device, dtype=dtype) for t in (p, g, b, v))
            p0, g0, b0, v0 = (t.to("cpu", torch.float64, copy=True) for t in (p, g, b, v))
            if kind == "sgd":
                fn(
                    [p],
                    [g],
                    [b],
                    weight_decay=0.5,
                    momentum=0.5,
                    lr=0.25,
                    dampening=0.0,
                    nesterov=True,
                    maximize=False,
                    is_first_step=False,
                )
                g1 = g0 + 0.5 * p0
                b1 = 0.5 * b0 + g1
                want = {"p": (p, p0 - 0.25 * (g1 + 0.5 * b1)), "b": (b, b1)}
            else:
                fn(
                    [p],
                    [g],
                    [b],
                    [v],
                    [],
                    [torch.tensor(1.0, device=device)],
                    amsgrad=False,
                    lr=0.25,
                    beta1=0.5,
                    beta2=0.5,
                    weight_decay=0.0,
                    eps=1.0,
                    maximize=False,
                )
                m1, v1 = 0.5 * b0 + 0.5 * g0, 0.5 * v0 + 0.5 * g0 * g0  # bias corrections 0.5
                step = 0.5 * m1 / ((v1 / 0.5).sqrt() + 1.0)
                want = {"p": (p, p0 - step), "b": (b, m1), "v": (v, v1)}
            # and g untouched: Entropy-SGD's outer step hands it p.grad, which must keep G
            want["g"] = (g, g0)
            for got, ref in want.values():
                if not torch.allclose(got.double().cpu(), ref, rtol=tol, atol=tol):
                    return False
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False
    return True
