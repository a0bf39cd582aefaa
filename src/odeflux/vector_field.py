"""``VectorField``: a module in the solver's ``f(t, y)`` convention (modules of ``y`` alone ignore ``t``)."""

from __future__ import annotations

import inspect
import weakref
from typing import Any, Callable

import torch
from torch import nn

from .fields import dense_chain, has_hooks
from .kernels import ArrayField, ArrayKernelSource, ArrayVJP


def takes_time(module: nn.Module) -> bool:
    """Whether ``module.forward`` takes ``(t, y)`` rather than ``(y)``."""
    forward = module.forward
    func = getattr(forward, "__func__", None)  # (a class's forward: its answer kept, one per function)
    if func is not None and func in _TAKES_TIME:
        return _TAKES_TIME[func]
    try:
        sig = inspect.signature(forward)
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    answer = len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values())
    if func is not None:
        _TAKES_TIME[func] = answer
    return answer


def as_field(f: Any, with_args: bool = False) -> Any:
    """``f`` in the solver's ``f(t, y)`` convention: a module of ``y`` alone (and no ``args``)
    wrapped as :class:`VectorField`, as ``NeuralODE`` takes it; anything else as it is."""
    if isinstance(f, nn.Module) and not with_args and not isinstance(f, VectorField) and not takes_time(f):
        return VectorField(f, time_dependent=False)
    return f


#: :func:`takes_time` of each ``forward`` function read (inspect.signature takes ~20 us, a small solve's few percent).
_TAKES_TIME: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class VectorField(nn.Module):
    """Adapts a module to the solver's ``f(t, y)`` convention (``y``-only modules ignore ``t``).

    It forwards the module's VJP rule (:mod:`odeflux.fields`) in the ``(t, y, v, ...)``
    convention, and its array kernels (:class:`odeflux.kernels.ArrayKernelSource`) where the
    module ignores ``t`` and no forward hook would be skipped.
    """

    def __init__(self, module: nn.Module, time_dependent: bool | None = None):
        super().__init__()
        self.module = module
        self.time_dependent = takes_time(module) if time_dependent is None else bool(time_dependent)

    def code_key(self) -> Any:
        """What a compiled program of this field depends on besides tensors: the wrapped module's
        code (:func:`odeflux.compiled.program.code_key`), not this adapter's, which every
        ``NeuralODE`` shares."""
        from .compiled.program import code_key

        return (code_key(self.module), self.time_dependent)

    @property
    def ignores_time(self) -> bool:
        """Tells :func:`odeflux.solve` that ``t`` is unused, so it may pass host floats."""
        return not self.time_dependent

    @property
    def vjp_rule(self) -> Callable[..., Any] | None:
        """The wrapped module's VJP rule (see :mod:`odeflux.fields`; a dense ``nn.Sequential``'s
        is its :func:`~odeflux.fields.dense_chain`'s) in the ``(t, y, v, ...)`` convention, or
        ``None`` when it has none."""
        if self.time_dependent:
            return getattr(self.module, "vjp_rule", None)
        source = self._source()
        rule = getattr(self.module, "vjp_rule", None) if source is None else source.vjp_rule
        return None if rule is None else (lambda t, y, v, **kw: rule(y, v, **kw))

    def _source(self) -> Any:
        if self.time_dependent:
            return None
        module = self.module
        return module if isinstance(module, ArrayKernelSource) else dense_chain(module)

    def array_field(self, y: torch.Tensor) -> ArrayField | None:
        """The module's evaluation on arrays for one solve; ``None`` also where forward hooks are
        registered, which it would skip."""
        source = self._source()
        if source is None or has_hooks(self, self.module):
            return None
        return source.array_field(y)

    def array_vjp(self, y: torch.Tensor) -> ArrayVJP | None:
        """The module's VJP rule on arrays for one solve, or ``None``."""
        source = self._source()
        return None if source is None else source.array_vjp(y)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.time_dependent:
            return self.module(t, y)
        return self.module(y)
