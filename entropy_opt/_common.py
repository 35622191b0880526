"""Helpers shared by every optimizer here: argument checks, gradient collection, noise,
state dicts that carry their optimizer's name and are checked on load."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Collection, Sequence
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


def params_with_grad(group: dict, who: str) -> list[Tensor]:
    """Parameters of ``group`` that received a gradient; sparse gradients are refused."""
    out = []
    for p in group["params"]:
        if p.grad is None:
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
        for key, entry in state.items():
            allowed = state_keys if isinstance(key, int) else ()
            if not isinstance(key, int) and key in extra_state:
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


@functools.cache
def fused_ok(kind: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._fused_sgd_`` (``kind="sgd"``) or ``torch._fused_adam_`` (``"adam"``)
    runs on ``device``/``dtype`` in this torch build and computes the textbook update.

    The fused kernels are private torch API whose device and dtype coverage changed across
    releases (CPU support came in torch 2.4), so instead of a version table this runs each
    one once on three numbers and compares with the closed form; any error means no.
    """
    fn = getattr(torch, f"_fused_{kind}_", None)
    if fn is None or not dtype.is_floating_point:
        return False
    try:
        kw = dict(device=device, dtype=dtype)
        p, g, b = torch.ones(3, **kw), torch.full((3,), 2.0, **kw), torch.ones(3, **kw)
        if kind == "sgd":
            # g' = g + 0.5 p = 2.5; b = 0.5 b + g' = 3; nesterov: d = g' + 0.5 b = 4
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
            # and g untouched: Entropy-SGD's outer step hands it p.grad, which must keep G
            return bool((p == 0.0).all() and (b == 3.0).all() and (g == 2.0).all())
        if kind == "adam":
            v, step = torch.ones(3, **kw), torch.tensor(1.0)
            # m = lerp(1, 2, 0.5) = 1.5; v = 0.5 + 0.5 * 4 = 2.5; bias corrections 0.5, 0.5
            # p = 1 - (0.25 / 0.5) * 1.5 / (sqrt(2.5) / sqrt(0.5) + 1)
            fn(
                [p],
                [g],
                [b],
                [v],
                [],
                [step],
                amsgrad=False,
                lr=0.25,
                beta1=0.5,
                beta2=0.5,
                weight_decay=0.0,
                eps=1.0,
                maximize=False,
            )
            want = 1.0 - 0.5 * 1.5 / (math.sqrt(5.0) + 1.0)
            return bool(
                torch.allclose(
                    p.double(), torch.full((3,), want, dtype=torch.float64), rtol=1e-2, atol=0.0
                )
                and (b == 1.5).all()
                and (v == 2.5).all()
                and (g == 2.0).all()
            )
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False
    return False
