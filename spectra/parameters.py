"""Map a model's trainable parameters (or a chosen subset) to one flat vector and back.

The curvature operators work on a flat vector theta of length n.  This module is
the only place that knows how theta is laid out: which parameters are in it, in
which order, and how a flat vector becomes the ``{name: tensor}`` dict that
``torch.func.functional_call`` needs.  Nothing here mutates the model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

__all__ = ["ParameterView", "ParamSelector"]

#: What ``params=`` accepts: None (all trainable parameters), names or regular
#: expressions (a parameter is kept if any pattern fully matches its name or
#: its name starts with ``pattern + "."``), a predicate ``(name, param) -> bool``,
#: or the parameter tensors themselves.
ParamSelector = (
    None | str | Sequence[str] | Callable[[str, nn.Parameter], bool] | Iterable[torch.Tensor]
)


class ParameterView:
    """The flat layout of a model's selected parameters.

    Args:
        model: any ``nn.Module``.
        params: a :data:`ParamSelector`; default all parameters with
            ``requires_grad``.  Tied parameters appear once (``named_parameters``
            de-duplicates them; :meth:`with_aliases` puts theta's tensor into every slot).

    Attributes:
        names: selected parameter names, in ``model.named_parameters()`` order.
        shapes, numels: their shapes and sizes.
        n: total number of selected scalars.
        dtype, device: of the selected parameters (all must share a device).
    """

    def __init__(self, model: nn.Module, params: ParamSelector = None) -> None:
        named = list(model.named_parameters())
        trainable = [(name, p) for name, p in named if p.requires_grad]
        if not trainable:
            raise ValueError(
                f"{type(model).__name__} has no trainable parameters (requires_grad=True); "
                "unfreeze some with p.requires_grad_(True)"
            )
        chosen = _select(trainable, params)
        if not chosen:
            available = ", ".join(name for name, _ in trainable[:8])
            more = "" if len(trainable) <= 8 else f", ... ({len(trainable)} in all)"
            raise ValueError(
                f"params={params!r} matches no trainable parameter; available: {available}{more}"
            )
        devices = {p.device for _, p in chosen}
        if len(devices) > 1:
            raise ValueError(
                f"selected parameters live on several devices {sorted(map(str, devices))}; "
                "move the model to one device (model.to(device)) or select parameters on one"
            )
        dtypes = {p.dtype for _, p in chosen}
        self.model = model
        self.names: tuple[str, ...] = tuple(name for name, _ in chosen)
        self.shapes: tuple[torch.Size, ...] = tuple(p.shape for _, p in chosen)
        self.numels: tuple[int, ...] = tuple(p.numel() for _, p in chosen)
        self.n: int = sum(self.numels)
        self.device: torch.device = devices.pop()
        # Mixed precision among parameters is legal in PyTorch; report the widest.
        self.dtype: torch.dtype = max(dtypes, key=lambda d: torch.finfo(d).bits)
        selected = set(self.names)
        self.fixed_names: tuple[str, ...] = tuple(n for n, _ in named if n not in selected)
        self.aliases: dict[str, tuple[str, ...]] = _slot_aliases(model)

    def flat_params(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A detached copy of the selected parameters as one (n,) vector."""
        params = dict(self.model.named_parameters())
        return self.flatten([params[name] for name in self.names]).to(dtype or self.dtype)

    def flatten(self, tensors: Sequence[torch.Tensor] | dict[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate per-parameter tensors (in :attr:`names` order) into (n,) or (n, k).

        A dict is read by name.  Tensors with one extra trailing dimension k (e.g. a
        block of k directions) give an (n, k) result.
        """
        if isinstance(tensors, dict):
            tensors = [tensors[name] for name in self.names]
        if len(tensors) != len(self.names):
            raise ValueError(f"expected {len(self.names)} tensors, got {len(tensors)}")
        pieces = []
        for t, shape, numel in zip(tensors, self.shapes, self.numels, strict=True):
            extra = t.shape[len(shape) :]
            pieces.append(t.detach().reshape(numel, *extra))
        return torch.cat(pieces, dim=0)

    def unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split an (n,) vector into ``{name: view}`` with each parameter's shape."""
        if vec.ndim != 1 or vec.shape[0] != self.n:
            raise ValueError(f"expected a vector of shape ({self.n},), got {tuple(vec.shape)}")
        out = {}
        for name, piece, shape in zip(
            self.names, torch.split(vec, self.numels), self.shapes, strict=True
        ):
            out[name] = piece.view(shape)
        return out

    def fixed_state(self, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """Unselected parameters and all buffers, detached copies cast to ``dtype``.

        Copies, so that BatchNorm in train mode updates these and never the
        model's own running statistics.  Non-floating buffers keep their dtype.
        """
        state: dict[str, torch.Tensor] = {}
        params = dict(self.model.named_parameters())
        for name in self.fixed_names:
            state[name] = _cast(params[name], dtype)
        for name, buf in self.model.named_buffers():
            state[name] = _cast(buf, dtype)
        return state

    def with_aliases(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` with the same tensor also under each other slot that holds it.

        For ``functional_call(..., tie_weights=False)``: every (module, attribute) slot of
        a tied tensor is named once, so each is swapped once and restored.  Why not
        ``tie_weights=True``: it names every alias path, and a module reachable under
        two names (``self.head2 = self.head``) is then swapped twice and restored
        wrongly, leaving the operator's tensors in the user's model.
        """
        out = dict(state)
        for name, value in state.items():
            for alias in self.aliases.get(name, ()):
                out[alias] = value
        return out

    def __repr__(self) -> str:
        return f"ParameterView(n={self.n}, tensors={len(self.names)}, device={self.device})"


def _slot_aliases(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """For each parameter or buffer name (the first one PyTorch lists), the other names
    under which the same tensor sits in a *different* (module, attribute) slot."""
    first: dict[int, str] = {}
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        first.setdefault(id(t), name)
    slots: dict[str, set[tuple[int, str]]] = {}
    aliases: dict[str, list[str]] = {}
    every = (
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    )
    for name, t in every:
        head = first[id(t)]
        owner, _, attr = name.rpartition(".")
        slot = (id(model.get_submodule(owner)), attr)
        seen = slots.setdefault(head, set())
        if slot in seen:  # the same module reached under another path
            continue
        seen.add(slot)
        if name != head:
            aliases.setdefault(head, []).append(name)
    return {k: tuple(v) for k, v in aliases.items()}


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.detach()
    if dtype is not None and t.is_floating_point():
        return t.to(dtype=dtype, copy=True)
    return t.clone()


def _select(
    trainable: list[tuple[str, nn.Parameter]], params: ParamSelector
) -> list[tuple[str, nn.Parameter]]:
    if params is None:
        return trainable
    if isinstance(params, str):
        params = [params]
    if callable(params) and not isinstance(params, nn.Module):
        return [(n, p) for n, p in trainable if params(n, p)]
    params = list(params)
    if all(isinstance(p, str) for p in params):
        patterns = [re.compile(p) for p in params]
        return [
            (n, p)
            for n, p in trainable
            if any(pat.fullmatch(n) or n.startswith(pat.pattern + ".") for pat in patterns)
        ]
    if all(isinstance(p, torch.Tensor) for p in params):
        ids = {id(p) for p in params}
        return [(n, p) for n, p in trainable if id(p) in ids]
    raise TypeError(
        "params must be None, parameter names/patterns, a predicate (name, param) -> bool, "
        "or the parameter tensors themselves"
    )
