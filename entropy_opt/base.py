"""The base class of :class:`EntropySGD` and :class:`EntropyAdam`: Algorithm 1's inner loop.

One outer step of a local-entropy optimizer:

1. ``x', mu <- x``; for ``l = 1..L``: evaluate the closure at ``x'`` (a fresh mini-batch),
   ``dx' = grad f(x') + wd x' - gamma (x - x')`` (optionally through inner momentum),
   ``x' <- x' - sgld_lr dx' + sigma N(0, I)``, ``mu <- (1 - alpha) mu + alpha x'``.
2. The local-entropy gradient ``G = x - mu`` (or ``gamma (x - mu)``, Alg. 1 line 7) is
   written into ``p.grad`` and handed to the subclass's outer rule (SGD or Adam).

The first closure call is made at ``x' = x``, so its loss and gradient are those at ``x``:
the loss is what :meth:`step` returns and the gradient is both the first SGLD gradient and
the reference for the angle diagnostic (the authors' code computes it and throws it away;
``discard_first_grad=True`` restores that, at the price of one extra closure call).

Options that differ between the paper and the authors' public code, with the paper's value
as default (``AUTHORS_CODE`` collects the authors' values):

``alpha``               weight of the new sample in ``mu``: 0.75 (paper); 0.25 (code).
``noise_convention``    ``"paper"``: sigma = eps sqrt(sgld_lr);
                        ``"authors"``: sigma = eps sqrt(2 sgld_lr).
``advance_scoping``     True: gamma follows its schedule; False: the authors' counter that
                        never advances, so gamma stays gamma0.
``discard_first_grad``  False: the gradient at x is the first SGLD gradient (L closures);
                        True: it is thrown away (L + 1 closures).
``outer_weight_decay``  False: weight decay enters once, inside the SGLD gradient, so
                        ``x - mu`` already contains it; True: added again to ``G`` (code).
``scale_by_gamma``      False: ``G = x - mu`` (Sec. 4.3, what the paper's runs use once
                        gamma is scoped, so scoping does not fight LR annealing);
                        True: ``G = gamma (x - mu)`` (Alg. 1 line 7, the true gradient of
                        -F). The authors' code uses False.

``flat`` (default False) only changes the memory layout of the inner loop: the
parameters are pointed at views of one contiguous buffer, so each SGLD operation is one
kernel rather than one per tensor (a large saving for many small tensors, a small loss for
a few large ones, which pay one extra gather of the gradients per iteration).

The authors keep hyper-parameters in a private config (LR schedulers have no effect) and
crash on parameters without a gradient; those are bugs, not options, and are not copied.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._common import (
    TORCH_OPTIONS_NEUTRAL,
    Closure,
    NoiseBuffers,
    StateDictMixin,
    check_fraction,
    check_group_keys,
    check_momentum,
    check_nonneg,
    checked_group,
    fused_ok,
    is_state_init_probe,
    one_device_dtype,
    params_with_grad,
    require_closure,
    resolve_foreach,
    split_views,
)
from .scoping import check_scoping, scoped_gamma

NOISE_CONVENTIONS = ("paper", "authors")

#: Keyword arguments that make the optimizers behave like the authors' public PyTorch code
#: (github.com/ucla-vision/entropy-sgd, python/optim.py). Without momentum this reproduces
#: it exactly. With momentum their code also adds the coupling and noise after the inner
#: momentum (into its buffer when nesterov=False) and seeds the outer buffer with the first
#: gradient; those quirks are not reproduced (the tests' reference implementation,
#: ``tests/reference_entropy.py``, has them).
AUTHORS_CODE: dict[str, Any] = {
    "alpha": 0.25,
    "noise_convention": "authors",
    "advance_scoping": False,
    "discard_first_grad": True,
    "outer_weight_decay": True,
    "scale_by_gamma": False,
}


def inner_stability_limit(momentum: float, nesterov: bool) -> float:
    """The largest ``sgld_lr x curvature`` the inner loop's update is stable for on a
    quadratic: 2 plain, 2 (1 + m) heavy ball, (2 + 2m) / (1 + 2m) Nesterov (torch's
    momentum form, no dampening).  The coupling ``gamma (x - x')`` adds gamma to every
    curvature of f, so ``sgld_lr x gamma`` at or above it diverges whatever f is."""
    if not momentum:
        return 2.0
    return (2 + 2 * momentum) / (1 + 2 * momentum) if nesterov else 2 * (1 + momentum)


def check_inner_stability(group: dict[str, Any], gamma: float, step: int, name: str) -> None:
    """Raise before the step when the scoped ``gamma`` makes the inner SGLD loop diverge
    (x' - x grows by |1 - sgld_lr gamma| or more per inner iteration), naming the schedule."""
    limit = inner_stability_limit(group["sgld_momentum"], group["sgld_nesterov"])
    product = group["sgld_lr"] * gamma
    if product >= limit:
        raise ValueError(
            f"{name}: the inner SGLD loop diverges at outer step {step}: sgld_lr x gamma = "
            f"{group['sgld_lr']:g} x {gamma:.4g} = {product:.4g} >= {limit:.4g}, its stability "
            f"limit (sgld_momentum {group['sgld_momentum']:g}"
            f"{', nesterov' if group['sgld_nesterov'] else ''}); the coupling alone makes "
            "x' - x grow. "
            + (
                f"Scoping {group['scoping']!r} at rate {group['scoping_rate']:g} has raised "
                f"gamma from {group['gamma']:g}: lower scoping_rate, gamma or sgld_lr, or stop "
                "the run before this step"
                if gamma != group["gamma"]
                else "Lower gamma or sgld_lr"
            )
        )


def check_local_entropy_group(group: dict[str, Any]) -> None:
    """Raise ``ValueError`` with a remedy for any invalid common hyper-parameter."""
    check_nonneg("lr", group["lr"], "the learning rate is a step size")
    check_nonneg("weight_decay", group["weight_decay"])
    _check_L(group["L"])
    check_nonneg("sgld_lr", group["sgld_lr"], "the paper uses 0.1 to 1")
    check_nonneg("noise", group["noise"], "the paper uses 1e-4 to 1e-3")
    check_nonneg("gamma", group["gamma"], "gamma is the coupling strength (scope)")
    check_scoping(group["scoping"])
    check_nonneg("scoping_rate", group["scoping_rate"])
    check_fraction("alpha", group["alpha"], "the paper uses 0.75")
    check_momentum(group["sgld_momentum"], group["sgld_nesterov"], prefix="sgld_")
    check_inner_stability(group, group["gamma"], 0, "local-entropy optimizer")
    if group["noise_convention"] not in NOISE_CONVENTIONS:
        raise ValueError(
            f"noise_convention must be one of {NOISE_CONVENTIONS}, "
            f"got {group['noise_convention']!r}"
        )


def _check_L(L: Any) -> None:
    if isinstance(L, bool) or not isinstance(L, numbers.Integral) or L < 1:
        raise ValueError(f"L (SGLD iterations per step) must be an int >= 1, got {L!r}")


def _sgld_update(
    xp: list[Tensor],
    x: list[Tensor],
    g: list[Tensor],
    mu: list[Tensor],
    bufs: list[Tensor],
    noise: list[Tensor] | None,
    *,
    lr: float,
    gamma: float,
    wd: float,
    alpha: float,
    momentum: float,
    nesterov: bool,
    sigma: float,
    foreach: bool,
    fused: bool = False,
) -> None:
    """One SGLD iteration (Alg. 1 lines 5-7) in place on ``xp`` and ``mu``; ``g`` is scratch.

    ``dx' = g + wd x' + gamma (x' - x)`` (through the momentum buffer when ``momentum``),
    ``x' <- x' - lr dx' + sigma noise``, ``mu <- mu + alpha (x' - mu)``.

    Passes over the weights (each reads two tensors and writes one, except the fused one):
    without momentum 4 (coupling as one ``lerp``, gradient, noise, ``mu``; 5 with weight
    decay), the minimum for five inputs with binary kernels. With momentum the foreach path
    takes 7 (+1 for Nesterov, +1 for weight decay); ``fused=True`` (only with ``foreach``, see
    :func:`_fused_for`) folds weight decay, coupling, momentum and the step into one
    ``torch._fused_sgd_`` pass, leaving 4: ``g -= gamma x``, the fused step, noise, ``mu``.
    The two forms of ``gamma (x' - x)`` differ by rounding only.
    """
    if foreach:
        if momentum and fused:
            if gamma:
                torch._foreach_add_(g, x, alpha=-gamma)
            # g + (wd + gamma) x' = g + wd x' + gamma (x' - x)
            fused_sgd_step(
                xp, g, bufs, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=wd + gamma
            )
        elif momentum:
            if wd:
                torch._foreach_add_(g, xp, alpha=wd)
            if gamma:
                torch._foreach_add_(g, xp, alpha=gamma)
                torch._foreach_sub_(g, x, alpha=gamma)
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, g)
            if nesterov:
                torch._foreach_add_(g, bufs, alpha=momentum)
            torch._foreach_add_(xp, g if nesterov else bufs, alpha=-lr)
        else:
            if wd:
                torch._foreach_add_(g, xp, alpha=wd)
            if gamma:  # x' + lr gamma (x - x'): the coupling term as one fused pass
                torch._foreach_lerp_(xp, x, lr * gamma)
            torch._foreach_add_(xp, g, alpha=-lr)
        if sigma:
            torch._foreach_add_(xp, noise, alpha=sigma)
        torch._foreach_lerp_(mu, xp, alpha)
        return
    for i, (p, a, d, m) in enumerate(zip(xp, x, g, mu, strict=True)):
        if wd:
            d.add_(p, alpha=wd)
        if momentum:
            if gamma:
                d.add_(p, alpha=gamma).sub_(a, alpha=gamma)
            b = bufs[i].mul_(momentum).add_(d)
            if nesterov:
                d.add_(b, alpha=momentum)
            p.add_(d if nesterov else b, alpha=-lr)
        else:
            if gamma:
                p.lerp_(a, lr * gamma)
            p.add_(d, alpha=-lr)
        if sigma:
            p.add_(noise[i], alpha=sigma)
        m.lerp_(p, alpha)


#: Use the fused kernels (``torch._fused_sgd_`` for the inner momentum step and Entropy-SGD's
#: outer momentum step, ``torch._fused_adam_`` for Entropy-Adam's outer step) where the build
#: supports them; the benchmark switches them off to measure what they save.
USE_FUSED = True


def use_fused(kind: str, *lists: list[Tensor]) -> bool:
    """Whether ``torch._fused_<kind>_`` may update these tensors: :data:`USE_FUSED`, one
    device and dtype, every tensor contiguous (the CPU kernels walk the parameter, gradient
    and buffers as one flat array each and silently mix up elements when their layouts
    differ) and a kernel that passes :func:`~._common.fused_ok` on that device and dtype."""
    if not USE_FUSED:
        return False
    tensors = [t for ts in lists for t in ts]
    key = one_device_dtype(tensors)
    return key is not None and all(t.is_contiguous() for t in tensors) and fused_ok(kind, *key)


def fused_sgd_step(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float = 0.0,
) -> None:
    """One momentum-SGD step in a single ``torch._fused_sgd_`` pass, in place on ``params``
    and ``bufs``; ``grads`` are left as they are.

    ``g' = g + weight_decay p``, ``b <- momentum b + g'``, ``p <- p - lr (g' + momentum b)``
    (Nesterov) or ``p - lr b``; no dampening.  The buffers must start at zero: the kernel
    then runs with ``is_first_step=False`` throughout, which gives ``b = g'`` exactly at the
    first step.  Callers check :func:`use_fused` first.
    """
    torch._fused_sgd_(
        params,
        grads,
        bufs,
        weight_decay=weight_decay,
        momentum=momentum,
        lr=lr,
        dampening=0.0,
        nesterov=nesterov,
        maximize=False,
        is_first_step=False,
    )


def _fused_for(tensors: list[Tensor], momentum: float, foreach: bool) -> bool:
    """Whether the inner step of these tensors runs through ``torch._fused_sgd_``: only with
    inner momentum (without it the fused kernel saves no pass) and the foreach path; see
    :func:`use_fused` (the gradients are checked again at every iteration)."""
    return bool(momentum) and foreach and use_fused("sgd", tensors)


def _copy(dst: list[Tensor], src: list[Tensor], foreach: bool) -> None:
    if foreach and hasattr(torch, "_foreach_copy_"):  # added in torch 2.2
        torch._foreach_copy_(dst, src)
    else:
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)


#: Names in a subclass constructor's ``locals()`` that are not hyper-parameters.
_NOT_GROUP_ENTRIES = frozenset({"self", "params", "options", "__class__"})


#: The param-group entry counting a group's completed outer steps (the scoping ``t``).
OUTER_STEP = "outer_step"


class LocalEntropyOptimizer(StateDictMixin, Optimizer):
    """Base class: runs the SGLD inner loop, then calls :meth:`_outer_update`.

    A subclass declares its own hyper-parameters (``lr``, ``weight_decay``, ``L``,
    ``sgld_lr``, ``noise``, ``gamma``, ``scoping``, ``scoping_rate``, ``alpha``, whose
    defaults differ between the optimizers, and its outer rule's entries) as named
    constructor arguments, passes them on as ``arguments=locals()`` (first thing in its
    ``__init__``, so ``locals()`` holds its arguments only), hands the keyword options below
    through unchanged, and implements ``_check_outer(group)`` (validate the outer rule's
    entries) and ``_outer_update(group, params, grads, foreach)``.
    Every argument but ``generator`` and ``diagnostics`` becomes a param-group entry,
    re-read at every step.  Parameters without a gradient, or frozen
    (``requires_grad=False``) while holding one, are not moved.  The closure runs at the
    SGLD iterates, so a BatchNorm in train mode updates its running statistics there, L
    times a step; recompute them at ``x`` before evaluating
    (``torch.optim.swa_utils.update_bn``).

    Keyword options (the same for every local-entropy optimizer):
        sgld_momentum, sgld_nesterov: momentum of the inner loop (default off); its buffer
            restarts at zero every outer step.
        scale_by_gamma, noise_convention, advance_scoping, discard_first_grad,
        outer_weight_decay: choices where the authors' code departs from the paper (the
            paper's by default; see the module docstring and :data:`AUTHORS_CODE`).
        foreach: run the updates through the ``torch._foreach_*`` kernels. None (default):
            on CUDA-like devices, as torch.optim does, and on the CPU, where it measured
            as fast as the for-loop or faster (:func:`~._common.resolve_foreach` has the
            numbers); True/False force it.  With momentum (inner or outer) and Adam's
            outer step, the foreach path runs through torch's fused kernels where the build
            has them for the parameters' device and dtype (one pass over the weights
            instead of up to eight; same equations, rounding aside).
        flat: during the inner loop, point the parameters (``p.data``) at views of one
            contiguous buffer so each SGLD operation is one kernel instead of one per
            tensor (default False). Much cheaper for models with many small tensors;
            results are identical. Leave it off for modules that cache parameter storage
            (cuDNN RNNs).
        generator: ``torch.Generator`` for the SGLD noise (default: the global RNG, so
            ``torch.manual_seed`` makes runs reproducible).
        diagnostics: also record ``dist_x_mu`` and the gradient angle (default True; one
            extra gradient copy per step).

    After :meth:`step`, ``p.grad`` holds the local-entropy gradient used for the update and
    the dict :attr:`diagnostics` holds ``loss`` (at x), ``gamma`` (first group; ``gammas``
    per group) and, with ``diagnostics=True``, ``dist_x_mu`` = ||x - mu|| over all
    parameters, ``cos_angle`` and ``angle_deg`` between ``x - mu`` and the plain gradient
    at x (Sec. 5.4 monitors it).  Its values are 0-dim tensors so that recording them never
    forces a device sync; it is empty before the first step.  Diagnostics describe the last
    step only, so they are an attribute, not state: ``state_dict`` does not carry them (a
    state dict written when they lived in ``state["diagnostics"]`` loads, that entry
    dropped).  Each param group's ``"outer_step"`` counts its completed outer steps (the
    scoping ``t``, 0 from the group's creation; a group added later starts at 0, as a
    new parameter's Adam ``step`` does) and is saved with the groups: a resumed run
    scopes gamma as an uninterrupted one.  It lives in the groups, not in ``state``,
    because ``torch.distributed.checkpoint`` and FSDP take every key of ``state`` for a
    parameter (older state dicts' ``state["global"]`` is converted on load).

    The cost of a step is :attr:`gradient_evaluations_per_step` (``L``, ``L + 1`` with
    ``discard_first_grad``), read from the param groups, so a training loop can count
    effective epochs from the optimizer itself.

    Hyper-parameters must be finite (checked at construction and at every step), and
    ``load_state_dict`` refuses another optimizer's state dict; subclasses add their
    outer rule's per-parameter state keys to ``STATE_KEYS``.
    """

    STATE_KEYS = frozenset({"anchor", "mu", "sgld_buffer"})
    #: Per-parameter scratch that every step overwrites before reading (x, mu, the SGLD
    #: momentum): kept between steps to reuse the memory, left out of ``state_dict``
    #: (three model-sized tensors a checkpoint would carry for nothing; still accepted
    #: on load from older state dicts).
    SCRATCH_STATE = frozenset({"anchor", "mu", "sgld_buffer"})
    #: Non-parameter state entries of older versions, accepted on load: ``"diagnostics"``
    #: dropped, ``"global"`` (the outer-step counter) moved into the groups.
    LEGACY_STATE = frozenset({"diagnostics", "global"})

    def __init__(
        self,
        params: Any,
        arguments: dict[str, Any],
        *,
        sgld_momentum: float = 0.0,
        sgld_nesterov: bool = False,
        scale_by_gamma: bool = False,
        noise_convention: str = "paper",
        advance_scoping: bool = True,
        discard_first_grad: bool = False,
        outer_weight_decay: bool = False,
        foreach: bool | None = None,
        flat: bool = False,
        generator: torch.Generator | None = None,
        diagnostics: bool = True,
        **unknown: Any,
    ) -> None:
        if unknown:  # Python's own error would name this base class, not the user's
            torch_options = sorted(k for k in unknown if k in TORCH_OPTIONS_NEUTRAL)
            raise TypeError(
                f"{type(self).__name__} got unexpected keyword arguments {sorted(unknown)}"
                + (
                    f" ({', '.join(torch_options)}: torch.optim options it does not implement)"
                    if torch_options
                    else ""
                )
                + "; see help(entropy_opt."
                + type(self).__name__
                + ") for its options"
            )
        defaults = {k: v for k, v in arguments.items() if k not in _NOT_GROUP_ENTRIES}
        defaults.update(
            sgld_momentum=sgld_momentum,
            sgld_nesterov=sgld_nesterov,
            scale_by_gamma=scale_by_gamma,
            noise_convention=noise_convention,
            advance_scoping=advance_scoping,
            discard_first_grad=discard_first_grad,
            outer_weight_decay=outer_weight_decay,
            foreach=foreach,
            flat=flat,
        )
        self._check_group(defaults)  # before torch.optim looks at the parameters
        super().__init__(params, defaults)
        self.generator = generator
        self.record_diagnostics = bool(diagnostics)
        self.diagnostics: dict[str, Any] = {}
        self._noise = NoiseBuffers()
        self._flat_cache: dict[int, dict] = {}

    def state_dict(self) -> dict[str, Any]:
        """The state dict without :attr:`SCRATCH_STATE` (see
        :class:`~._common.StateDictMixin`)."""
        sd = super().state_dict()
        sd["state"] = {
            key: {k: v for k, v in entry.items() if k not in self.SCRATCH_STATE}
            for key, entry in sd["state"].items()
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this optimizer (see :class:`~._common.StateDictMixin`).

        Entries of :attr:`LEGACY_STATE` (the diagnostics older versions kept in the state)
        are dropped first; :attr:`diagnostics` starts empty again.
        """
        state = state_dict.get("state") if isinstance(state_dict, dict) else None
        if isinstance(state, dict) and self.LEGACY_STATE & set(state):
            kept = {k: v for k, v in state.items() if k not in self.LEGACY_STATE}
            state_dict = {**state_dict, "state": kept}
            legacy = state.get("global")
            old_step = legacy.get("step") if isinstance(legacy, dict) else None
            groups = state_dict.get("param_groups")
            if old_step is not None and isinstance(groups, list):
                state_dict["param_groups"] = [
                    {OUTER_STEP: int(old_step), **g} if isinstance(g, dict) else g for g in groups
                ]
        super().load_state_dict(state_dict)
        self.diagnostics = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its hyper-parameters are validated now (and again at every step).

        A refused group is not kept: the check runs on what the group would be before
        torch's ``add_param_group`` appends it."""
        param_group = checked_group(param_group, self.defaults, type(self).__name__)
        candidate = {**self.defaults, **param_group}
        self._check_group(candidate)
        # counted from creation, so that a fresh optimizer's state dict (what
        # torch.distributed.checkpoint loads into) holds the entry too
        param_group.setdefault(OUTER_STEP, 0)
        super().add_param_group(param_group)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_local_entropy_group(group)
        check_group_keys(group, getattr(self, "defaults", group), type(self).__name__)
        self._check_outer(group)

    # -- hooks for subclasses -------------------------------------------------------------
    def _check_outer(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` for an invalid entry of the outer rule (momentum, betas)."""
        raise NotImplementedError

    def _outer_update(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], foreach: bool
    ) -> None:
        raise NotImplementedError

    # -- the cost of a step -----------------------------------------------------------------
    def _inner_loop(self) -> tuple[int, bool]:
        """``(L, discard_first_grad)``, which every param group must share."""
        groups = self.param_groups
        L, discard = groups[0]["L"], groups[0]["discard_first_grad"]
        if any(g["L"] != L or g["discard_first_grad"] != discard for g in groups):
            found = sorted({(g["L"], bool(g["discard_first_grad"])) for g in groups})
            raise ValueError(
                "all param groups must share L and discard_first_grad: the closure "
                f"evaluates every parameter at once (the groups have (L, discard_first_grad) "
                f"= {', '.join(map(str, found))}); set the same values in every group"
            )
        _check_L(L)
        return int(L), bool(discard)

    @property
    def gradient_evaluations_per_step(self) -> int:
        """Closure calls (gradient evaluations) one :meth:`step` makes: ``L``, or ``L + 1``
        with ``discard_first_grad`` (the gradient at x is computed and thrown away).

        Read from the param groups at every access, so it follows edits of ``L`` or
        ``discard_first_grad`` between steps.  Effective epochs = calls / batches per
        pass = steps x this.  (A step in which no parameter receives a gradient stops
        after the first call; that degenerate case is not counted here.)

        Raises ``ValueError`` when the param groups disagree on ``L`` or
        ``discard_first_grad`` (:meth:`step` refuses such groups too) or ``L`` is not an
        int >= 1.
        """
        L, discard = self._inner_loop()
        return L + int(discard)

    # -- the step ----------------------------------------------------------------------------
    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        """One outer step: :attr:`gradient_evaluations_per_step` closure calls (``L``,
        ``L + 1`` with ``discard_first_grad``).

        ``closure`` must draw a fresh mini-batch, zero the gradients, run backward and
        return the loss. Returns the loss of the first call, i.e. at the current weights.
        """
        name = type(self).__name__
        if is_state_init_probe(closure, self.param_groups, self.state):
            with torch.no_grad():  # the outer rule's state, from a zero step at lr 0
                for group in self.param_groups:
                    params = [p for p in group["params"] if p.requires_grad]
                    if params:
                        zeros = [torch.zeros_like(p) for p in params]
                        self._outer_update(group, params, zeros, False)
            return None
        closure = require_closure(closure, name)
        groups = self.param_groups
        for group in groups:
            self._check_group(group)
        L, discard = self._inner_loop()
        steps = [int(group.setdefault(OUTER_STEP, 0)) for group in groups]

        loss = closure()
        work: list[_GroupWork] = []
        try:
            with torch.no_grad():
                for i, group in enumerate(groups):
                    w = self._prepare(i, group, steps[i], name)
                    if w is not None:
                        work.append(w)
                if not work:
                    return loss
                noisy = [x for w in work if w.sigma for x in w.xp]
            for it in range(L):
                if it > 0 or discard:
                    closure()
                with torch.no_grad():
                    noise = iter(self._noise.draw(noisy, self.generator)) if noisy else None
                    for w in work:
                        g = w.group
                        grads = w.grads()
                        _sgld_update(
                            w.xp,
                            w.x,
                            grads,
                            w.mu,
                            w.bufs,
                            [next(noise) for _ in w.xp] if w.sigma else None,  # type: ignore[arg-type]
                            lr=g["sgld_lr"],
                            gamma=w.gamma,
                            wd=g["weight_decay"],
                            alpha=g["alpha"],
                            momentum=g["sgld_momentum"],
                            nesterov=g["sgld_nesterov"],
                            sigma=w.sigma,
                            foreach=w.foreach,
                            # the fused kernel walks memory linearly: same layout needed
                            fused=w.fused and all(t.is_contiguous() for t in grads),
                        )
        finally:
            with torch.no_grad():
                for w in work:
                    w.restore()

        with torch.no_grad():
            sq: dict[str, list[Tensor]] = {"G": [], "g0": [], "sum": []}
            for w in work:
                group = w.group
                G = torch._foreach_sub(w.x, w.mu)
                if w.grad0 is not None:
                    sq["G"].extend(torch._foreach_norm(G))
                    sq["g0"].extend(torch._foreach_norm(w.grad0))
                    # grad0 is our own copy and is not needed after this: G + grad0 in place
                    # (no allocation of a third parameter-sized set of tensors)
                    torch._foreach_add_(w.grad0, G)
                    sq["sum"].extend(torch._foreach_norm(w.grad0))
                if group["scale_by_gamma"]:
                    torch._foreach_mul_(G, w.gamma)
                if group["outer_weight_decay"] and group["weight_decay"]:
                    torch._foreach_add_(G, w.x, alpha=group["weight_decay"])
                G = w.unflatten(G)
                for p, grad in zip(w.params, G, strict=True):
                    p.grad = grad
                self._outer_update(group, w.params, G, w.foreach)
            for group, t in zip(groups, steps, strict=True):
                group[OUTER_STEP] = t + 1
            gammas = [w.gamma for w in work]
            diag: dict[str, Any] = {"gamma": gammas[0], "gammas": gammas}
            diag["loss"] = loss.detach() if isinstance(loss, Tensor) else loss
            if sq["G"]:
                dev = sq["G"][0].device

                def total(norms: list[Tensor]) -> Tensor:
                    return torch.stack([n.to(dev, torch.float64) for n in norms]).square().sum()

                nG, ng, ns = total(sq["G"]), total(sq["g0"]), total(sq["sum"])
                cos = (ns - nG - ng) / (2.0 * (nG * ng).sqrt()).clamp_min(1e-300)
                cos = cos.clamp(-1.0, 1.0)
                diag.update(dist_x_mu=nG.sqrt(), cos_angle=cos, angle_deg=torch.rad2deg(cos.acos()))
            self.diagnostics = diag
        return loss

    def _prepare(self, index: int, group: dict[str, Any], t: int, name: str) -> _GroupWork | None:
        """Set up one group's inner loop: ``x`` saved, ``x' = mu = x``, buffers zeroed."""
        params = params_with_grad(group, name)
        if not params:
            return None
        gamma = scoped_gamma(
            group["scoping"],
            group["gamma"],
            group["scoping_rate"],
            t if group["advance_scoping"] else 0,
        )
        check_inner_stability(group, gamma, t, name)
        factor = 2.0 if group["noise_convention"] == "authors" else 1.0
        sigma = group["noise"] * math.sqrt(factor * group["sgld_lr"])
        foreach = resolve_foreach(group["foreach"], params)
        w = _GroupWork(group, params, gamma, sigma, foreach)
        momentum = bool(group["sgld_momentum"])
        w.fused = _fused_for(params, group["sgld_momentum"], foreach)
        same = len({(p.device, p.dtype) for p in params}) == 1
        if group["flat"] and same:
            w.make_flat(self._flat_cache.setdefault(index, {}), momentum)
        else:
            for p in params:
                st = self.state[p]
                if not _matches(st.get("anchor"), p):  # scratch: remade for a cast model
                    st["anchor"] = torch.empty_like(p, memory_format=torch.preserve_format)
                    st["mu"] = torch.empty_like(p, memory_format=torch.preserve_format)
                w.x.append(st["anchor"])
                w.mu.append(st["mu"])
                if momentum:
                    if not _matches(st.get("sgld_buffer"), p):
                        st["sgld_buffer"] = torch.zeros_like(p)
                    w.bufs.append(st["sgld_buffer"])
            w.xp = params
            _copy(w.x, params, foreach)
            _copy(w.mu, params, foreach)
            if w.bufs:
                torch._foreach_zero_(w.bufs)
        w.grad0 = [g.clone() for g in w.grads()] if self.record_diagnostics else None
        return w


def _matches(buffer: Tensor | None, p: Tensor) -> bool:
    """Whether a scratch buffer can hold ``p`` (same shape, dtype and device)."""
    return (
        buffer is not None
        and buffer.shape == p.shape
        and buffer.dtype == p.dtype
        and buffer.device == p.device
    )


class _GroupWork:
    """One param group's tensors during an outer step.

    Per-tensor mode: ``xp`` are the parameters themselves, ``x``/``mu``/``bufs`` per-parameter
    state. Flat mode (``flat=True``): the parameters are re-pointed (``p.data``) at views of
    one contiguous ``x'`` buffer for the inner loop, gradients are gathered with one ``cat``,
    and every SGLD operation is a single kernel over the flat buffers; :meth:`restore` puts
    the original storage, which still holds ``x``, back.
    """

    def __init__(
        self, group: dict, params: list[Tensor], gamma: float, sigma: float, foreach: bool
    ) -> None:
        self.group, self.params, self.gamma, self.sigma = group, params, gamma, sigma
        self.foreach = foreach
        self.fused = False
        self.xp: list[Tensor] = []
        self.x: list[Tensor] = []
        self.mu: list[Tensor] = []
        self.bufs: list[Tensor] = []
        self.grad0: list[Tensor] | None = None
        self._flat: dict | None = None
        self._orig: list[Tensor] = []

    def make_flat(self, cache: dict, momentum: bool) -> None:
        key = tuple((id(p), p.shape, p.dtype, p.device) for p in self.params)
        if cache.get("key") != key:
            p0, n = self.params[0], sum(p.numel() for p in self.params)
            cache.clear()
            cache["key"] = key
            for k in ("xp", "x", "mu", "g"):
                cache[k] = torch.empty(n, device=p0.device, dtype=p0.dtype)
            cache["views"] = split_views(cache["xp"], self.params)
        self._flat = cache
        torch.cat([p.detach().reshape(-1) for p in self.params], out=cache["x"])
        cache["xp"].copy_(cache["x"])
        cache["mu"].copy_(cache["x"])
        self.xp, self.x, self.mu = [cache["xp"]], [cache["x"]], [cache["mu"]]
        if momentum:
            if "buf" not in cache:
                cache["buf"] = torch.empty_like(cache["x"])
            self.bufs = [cache["buf"].zero_()]
        self._orig = [p.data for p in self.params]
        for p, v in zip(self.params, cache["views"], strict=True):
            p.data = v

    def grads(self) -> list[Tensor]:
        gs = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self._flat is None:
            return gs
        torch.cat([g.reshape(-1) for g in gs], out=self._flat["g"])
        return [self._flat["g"]]

    def restore(self) -> None:
        """Put ``x`` back into the parameters (also after an exception in the closure)."""
        if self._flat is None:
            _copy(self.params, self.x, self.foreach)
            return
        for p, o in zip(self.params, self._orig, strict=True):
            p.data = o  # the original storage was never written to: it still holds x

    def unflatten(self, tensors: list[Tensor]) -> list[Tensor]:
        if self._flat is None:
            return tensors
        return split_views(tensors[0], self.params)
