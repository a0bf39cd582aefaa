"""What a solve does under ``torch.autocast`` (mixed-precision training, AMP).

The field runs under the caller's autocast, as any layer of the model would: its matrix products
in bfloat16 or float16. The solver's own arithmetic does not: stage sums, the error norm and the
controller are the accumulations that low precision ruins (autocast would run the stage sums'
``addmm`` in bfloat16, a relative error of 4e-3 a step), so the state is integrated in float32
(a float16 or bfloat16 ``y0``, the output of an autocast layer before the ``NeuralODE``, is
promoted) and each evaluation of the field is cast back to the state's dtype. The continuous
adjoints evaluate the field again in the backward pass, outside the caller's autocast: the field
re-enters the autocast it was solved under, so the backward pass differentiates the function the
forward pass integrated (as ``torch.utils.checkpoint`` does for recomputed layers).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree

_LOW = (torch.float16, torch.bfloat16)


def autocast_of(y0: Any) -> tuple[str, torch.dtype] | None:
    """``(device type, dtype)`` of the autocast active for ``y0``'s device, or ``None``."""
    if isinstance(y0, torch.Tensor):  # (no tree walk for the common case: this runs on every solve)
        leaf = y0
    else:
        leaf = next((x for x in pytree.tree_leaves(y0) if isinstance(x, torch.Tensor)), None)
    if leaf is None:
        return None
    kind = "cpu" if leaf.is_cpu else leaf.device.type
    try:
        if not torch.is_autocast_enabled(kind):
            return None
        return kind, torch.get_autocast_dtype(kind)
    except RuntimeError:  # (a device type autocast does not know, such as "meta": no autocast there)
        return None
    except (TypeError, AttributeError):  # (torch before 2.4: per-device functions)
        if kind == "cpu" and torch.is_autocast_cpu_enabled():
            return kind, torch.get_autocast_cpu_dtype()
        if kind == "cuda" and torch.is_autocast_enabled():
            return kind, torch.get_autocast_gpu_dtype()
        return None


def promoted(y0: Any) -> Any:
    """``y0`` with float16 and bfloat16 tensors as float32 (differentiably)."""
    return pytree.tree_map(lambda x: x.float() if isinstance(x, torch.Tensor) and x.dtype in _LOW else x, y0)


def engine_outside(kind: str) -> contextlib.AbstractContextManager:
    """The solver's own arithmetic outside the caller's autocast."""
    return torch.autocast(kind, enabled=False)


def _cast_like(out: Any, y: Any) -> Any:
    if isinstance(out, torch.Tensor) and isinstance(y, torch.Tensor):
        return out if out.dtype == y.dtype else out.to(y.dtype)
    try:
        return pytree.tree_map(lambda o, s: o.to(s.dtype) if o.dtype != s.dtype else o, out, y)
    except (ValueError, TypeError, AttributeError):  # (another structure: the solve's own check names it)
        return out


class _Autocast:
    def _call(self, f: Callable[..., Any], t: Any, y: Any, rest: tuple) -> Any:
        with torch.autocast(self.kind, dtype=self.dtype):
            out = f(t, y, *rest)
        return _cast_like(out, y)

    def code_key(self) -> Any:
        """What a compiled program of this field depends on (:func:`odeflux.compiled.program.code_key`)."""
        from .compiled.program import code_key

        return ("autocast", self.kind, self.dtype, code_key(self.inner))


class AutocastModule(nn.Module, _Autocast):
    """A module field ``f`` evaluated under autocast ``(kind, dtype)``, its output in the state's
    dtype; its parameters are ``f``'s (what the adjoints differentiate)."""

    def __init__(self, f: nn.Module, kind: str, dtype: torch.dtype):
        super().__init__()
        self.inner, self.kind, self.dtype = f, kind, dtype

    def forward(self, t: Any, y: Any, *rest: Any) -> Any:
        return self._call(self.inner, t, y, rest)


class AutocastFunction(_Autocast):
    """:class:`AutocastModule` for a field that is a function."""

    def __init__(self, f: Callable[..., Any], kind: str, dtype: torch.dtype):
        self.inner, self.kind, self.dtype = f, kind, dtype
        owner = getattr(f, "__self__", None)
        if isinstance(owner, nn.Module):  # (a module's bound method: the adjoints find its parameters there)
            self.__self__ = owner

    def __call__(self, t: Any, y: Any, *rest: Any) -> Any:
        return self._call(self.inner, t, y, rest)


def under_autocast(f: Callable[..., Any], kind: str, dtype: torch.dtype, with_args: bool) -> Callable[..., Any]:
    """``f`` evaluated under the autocast ``(kind, dtype)`` (see the module docstring); an IMEX
    field as it is (its split must stay visible to its solver: it runs outside autocast)."""
    from .solvers import IMEX
    from .vector_field import as_field

    if isinstance(f, IMEX):
        return f
    f = as_field(f, with_args)
    if isinstance(f, nn.Module):
        return AutocastModule(f, kind, dtype)
    return AutocastFunction(f, kind, dtype)
