"""Pytree states: a tuple, list or dict of tensors (nested) integrated as one flat state, and
complex states (a complex tensor, or complex tensors in a structure) on their real view.

The engine integrates one flat tensor. A structured state is flattened once at the entry point
(:func:`odeflux.solve`): the field is wrapped to take and return the flat tensor, a user's norm
to take the structure, and the saved states are handed back in the structure, so every solver,
controller and sensitivity method works on any structure without knowing of it. The default
error norm is then one RMS norm over all entries, as for a tensor state. A complex leaf enters
the flat state as its real view (``torch.view_as_real``: real and imaginary parts side by side),
so the norm takes them as two entries each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["TreeSpec", "TreeField", "flatten", "is_tree"]


def is_tree(y: Any) -> bool:
    """Whether ``y`` is a structured state (anything but a single tensor)."""
    return isinstance(y, (tuple, list, dict))


def needs_flattening(y: Any) -> bool:
    """Whether ``y`` is integrated as a flat real state: a structure, or a complex tensor."""
    return is_tree(y) or (isinstance(y, torch.Tensor) and y.is_complex())


@dataclass(frozen=True)
class TreeSpec:
    """The structure of a state: its containers, and each leaf's shape, in flattening order."""

    kind: type | None  # tuple, list, dict, or None for a tensor leaf
    keys: tuple  # dict keys (sorted) or positions
    children: tuple["TreeSpec", ...]
    shape: tuple[int, ...] = ()
    complex: bool = False  # a complex leaf: 2 real entries each in the flat state

    @property
    def leaves(self) -> int:
        return 1 if self.kind is None else sum(c.leaves for c in self.children)

    @property
    def size(self) -> int:
        if self.kind is None:
            return math.prod(self.shape) * (2 if self.complex else 1)
        return sum(c.size for c in self.children)

    def unflatten(self, flat: torch.Tensor, batch: tuple[int, ...] = ()) -> Any:
        """The structure from a flat tensor of shape ``(*batch, size)``."""
        out, _ = self._take(flat, 0, batch)
        return out

    def _take(self, flat: torch.Tensor, at: int, batch: tuple[int, ...]) -> tuple[Any, int]:
        if self.kind is None:
            n = self.size
            if self.complex:  # (torch.complex, not view_as_complex: the slice may start at an odd offset)
                pairs = flat[..., at : at + n].reshape(batch + self.shape + (2,))
                return torch.complex(pairs[..., 0], pairs[..., 1]), at + n
            return flat[..., at : at + n].reshape(batch + self.shape), at + n
        parts = []
        for c in self.children:
            p, at = c._take(flat, at, batch)
            parts.append(p)
        if self.kind is dict:
            return dict(zip(self.keys, parts)), at
        return self.kind(parts), at

    def describe(self) -> str:
        if self.kind is None:
            return f"{'complex tensor' if self.complex else 'tensor'}{list(self.shape)}"
        inner = ", ".join(
            (f"{k!r}: " if self.kind is dict else "") + c.describe() for k, c in zip(self.keys, self.children)
        )
        return {tuple: "({})", list: "[{}]", dict: "{{{}}}"}[self.kind].format(inner + ("," if self.kind is tuple and len(self.children) == 1 else ""))


def _spec(y: Any, where: str) -> TreeSpec:
    if isinstance(y, torch.Tensor):
        if y.dtype == torch.complex32:
            raise TypeError(f"{where} has dtype {y.dtype}; odeflux integrates complex64 or complex128 states: pass {where}.to(torch.complex64)")
        return TreeSpec(None, (), (), tuple(y.shape), y.is_complex())
    if isinstance(y, dict):
        keys = tuple(sorted(y, key=repr))
        return TreeSpec(dict, keys, tuple(_spec(y[k], f"{where}[{k!r}]") for k in keys))
    if isinstance(y, (tuple, list)):
        if not y:
            raise ValueError(f"{where} is an empty {type(y).__name__}: a state needs at least one tensor")
        return TreeSpec(type(y) if type(y) in (tuple, list) else tuple, tuple(range(len(y))), tuple(_spec(v, f"{where}[{i}]") for i, v in enumerate(y)))
    raise TypeError(
        f"{where} is a {type(y).__name__}: a state is a tensor or a tuple/list/dict of tensors (wrap numbers with torch.as_tensor)"
    )


def _leaves(y: Any, spec: TreeSpec, out: list, where: str) -> None:
    if spec.kind is None:
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"{where} is a {type(y).__name__} where the state has a tensor")
        if tuple(y.shape) != spec.shape:
            raise ValueError(f"{where} has shape {tuple(y.shape)} where the state's entry has shape {spec.shape}")
        if y.is_complex() != spec.complex:
            want = "a complex" if spec.complex else "a real"
            raise TypeError(f"{where} has dtype {y.dtype} where the state's entry is {want} tensor: return the state's dtype")
        out.append(torch.view_as_real(y) if spec.complex else y)
        return
    if spec.kind is dict:
        if not isinstance(y, dict):
            raise ValueError(f"{where} is a {type(y).__name__} where the state is {spec.describe()}: return the state's structure")
        if set(y) != set(spec.keys):
            got = sorted(y, key=repr)
            raise ValueError(f"{where} has keys {got} where the state has keys {list(spec.keys)}: return the state's structure")
        for k, c in zip(spec.keys, spec.children):
            _leaves(y[k], c, out, f"{where}[{k!r}]")
        return
    if not isinstance(y, (tuple, list)) or len(y) != len(spec.children):
        got = f"a {type(y).__name__} of {len(y)}" if isinstance(y, (tuple, list)) else f"a {type(y).__name__}"
        raise ValueError(f"{where} is {got} where the state is {spec.describe()}: return the state's structure")
    for i, (v, c) in enumerate(zip(y, spec.children)):
        _leaves(v, c, out, f"{where}[{i}]")


def flatten(y: Any, spec: TreeSpec | None = None, where: str = "y0") -> tuple[torch.Tensor, TreeSpec]:
    """``y`` as one flat 1-d tensor and its structure (checked against ``spec`` where given)."""
    if spec is None:
        spec = _spec(y, where)
    leaves: list[torch.Tensor] = []
    _leaves(y, spec, leaves, where)
    first = leaves[0]
    for i, leaf in enumerate(leaves[1:], 1):
        if leaf.dtype != first.dtype or leaf.device != first.device:
            raise ValueError(
                f"{where}'s tensors differ in dtype or device ({first.dtype} on {first.device} and {leaf.dtype} on "
                f"{leaf.device}): give every tensor of the state one dtype and device"
            )
    return torch.cat([leaf.reshape(-1) for leaf in leaves]), spec


class TreeField(nn.Module):
    """``f`` of a structured state, as a field of the flat state (a module, so that its
    parameters are the wrapped module's, for the continuous adjoints)."""

    def __init__(self, f: Callable[..., Any], spec: TreeSpec):
        super().__init__()
        if isinstance(f, nn.Module):
            self.inner = f  # registered: its parameters and buffers are this module's
        else:
            object.__setattr__(self, "inner", f)
        self.spec = spec
        self.ignores_time = bool(getattr(f, "ignores_time", False))

    def forward(self, t: Any, y: torch.Tensor, *args: Any) -> torch.Tensor:
        return flatten(self.inner(t, self.spec.unflatten(y), *args), self.spec, where="f(t, y)")[0]


def tree_norm(norm: Callable[[Any], torch.Tensor], spec: TreeSpec) -> Callable[[torch.Tensor], torch.Tensor]:
    """A user's norm of the structure, as a norm of the flat state."""
    return lambda flat: norm(spec.unflatten(flat))
