"""``NeuralODE``: a ``torch.nn.Module`` whose output is the solution of an ODE it parametrises."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .solution import Solution
from .solve import solve
from .solvers import ExplicitRK, Tsit5


def _takes_time(module: nn.Module) -> bool:
    """Whether ``module.forward`` takes ``(t, y)`` rather than ``(y)``."""
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values())


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run forward hooks (its own or global ones)."""
    glob = torch.nn.modules.module
    return bool(
        module._forward_hooks or module._forward_pre_hooks
        or getattr(glob, "_global_forward_hooks", None) or getattr(glob, "_global_forward_pre_hooks", None)
    )  # fmt: skip


class _FieldOfY:
    """A frozen field of ``y`` alone in the solver's ``(t, y)`` convention, keeping its
    array-level entry point (``on_arrays``) where it has one."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        if hasattr(fn, "on_arrays"):
            on_arrays = fn.on_arrays
            self.on_arrays = lambda t, x, out: on_arrays(x, out)

    def __call__(self, t: Any, y: torch.Tensor) -> torch.Tensor:
        return self.fn(y)


class _RuleOfY:
    """A VJP rule of ``y`` alone in the ``(t, y, v, ...)`` convention, keeping its array-level
    forms (``stage_plan``, ``on_arrays``) where it has them."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        for name in ("stage_plan", "on_arrays"):
            if hasattr(fn, name):
                setattr(self, name, getattr(fn, name))

    def __call__(self, t: Any, y: torch.Tensor, v: torch.Tensor, **kw: Any) -> torch.Tensor:
        return self.fn(y, v, **kw)


class VectorField(nn.Module):
    """Adapts a module to the solver's ``f(t, y)`` convention (``y``-only modules ignore ``t``)."""

    def __init__(self, module: nn.Module, time_dependent: bool | None = None):
        super().__init__()
        self.module = module
        self.time_dependent = _takes_time(module) if time_dependent is None else bool(time_dependent)

    @property
    def ignores_time(self) -> bool:
        """Tells :func:`odeflux.solve` that ``t`` is unused, so it may pass host floats."""
        return not self.time_dependent

    def _rule(self, name: str) -> Callable[..., Any] | None:
        rule = getattr(self.module, name, None)
        return rule if rule is None or self.time_dependent else _RuleOfY(rule)

    @property
    def vjp_rule(self) -> Callable[..., Any] | None:
        """The wrapped module's VJP rule (see :mod:`odeflux.fields`) in the ``(t, y, v, ...)``
        convention, or ``None`` when it has none."""
        return self._rule("vjp_rule")

    @property
    def vjp_rule_flat(self) -> Callable[..., Any] | None:
        """The wrapped module's flattened VJP rule (``vjp_rule_flat``), as :attr:`vjp_rule`."""
        return self._rule("vjp_rule_flat")

    def frozen(self, y: torch.Tensor, vjp: bool = False) -> Callable[..., torch.Tensor] | None:
        """The wrapped module's ``frozen`` evaluation for one solve (see :class:`odeflux.fields.MLP`)
        in the ``(t, y)`` convention, or ``None``: also when forward hooks are registered, which
        a frozen evaluation would skip."""
        freeze = getattr(self.module, "frozen", None)
        if freeze is None or self.time_dependent or (not vjp and (_has_hooks(self) or _has_hooks(self.module))):
            return None
        fn = freeze(y, vjp=vjp)
        if fn is None:
            return None
        kept = self.__dict__.get("_wrapped_forms")
        if kept is None:
            kept = self.__dict__["_wrapped_forms"] = {}
        wrapped = kept.get(vjp)
        if wrapped is None or wrapped.fn is not fn:  # (the module keeps its forms: so do we, their wrappers)
            wrapped = kept[vjp] = _RuleOfY(fn) if vjp else _FieldOfY(fn)
        return wrapped

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.time_dependent:
            return self.module(t, y)
        return self.module(y)


class NeuralODE(nn.Module):
    """Maps ``x`` to the solution at the end of ``tspan`` of ``dy/dt = vector_field(y)``, ``y(t0) = x``.

    ``vector_field`` is any module taking ``y`` (or ``(t, y)``); ``x`` may have any shape and a batch
    is integrated as one ODE state, as in the Lux tutorial. ``sensealg`` picks the gradient method
    (default ``InterpolatingAdjoint()``); other keywords go to :func:`odeflux.solve` (``rtol``,
    ``atol``, ``saveat``, ...). With ``return_solution=True`` the forward returns the whole
    :class:`~odeflux.Solution` instead of the final state.
    """

    def __init__(
        self,
        vector_field: nn.Module,
        solver: ExplicitRK | None = None,
        tspan: Sequence[float] = (0.0, 1.0),
        sensealg: Any = "default",
        *,
        return_solution: bool = False,
        time_dependent: bool | None = None,
        **solve_kwargs: Any,
    ):
        super().__init__()
        if not isinstance(vector_field, nn.Module):
            raise TypeError(f"vector_field must be an nn.Module, got {type(vector_field).__name__}")
        if len(tuple(tspan)) != 2 or float(tspan[0]) == float(tspan[1]):
            raise ValueError(f"tspan must be a pair (t0, t1) with t0 != t1, got {tspan!r}")
        forbidden = {"f", "y0", "t_span", "solver", "sensealg"} & solve_kwargs.keys()
        if forbidden:
            raise TypeError(f"NeuralODE got {sorted(forbidden)} as solve keywords: pass them as NeuralODE arguments")
        if sensealg == "default":
            from .sensitivity import InterpolatingAdjoint

            sensealg = InterpolatingAdjoint()
        self.field = VectorField(vector_field, time_dependent)
        self.solver = solver if solver is not None else Tsit5()
        self.tspan = (float(tspan[0]), float(tspan[1]))
        self.sensealg = sensealg
        self.return_solution = return_solution
        self.solve_kwargs = dict(solve_kwargs)
        self.last_stats = None
        self.last_backward_stats = None  # the last forward's BackwardStats, filled in by its backward pass

    @property
    def vector_field(self) -> nn.Module:
        return self.field.module

    def forward(self, x: torch.Tensor) -> torch.Tensor | Solution:
        kwargs = self.solve_kwargs
        if not self.return_solution and "saveat" not in kwargs:
            kwargs = {"save_start": False, **kwargs}
        sol = solve(self.field, x, self.tspan, solver=self.solver, sensealg=self.sensealg, **kwargs)
        self.last_stats = sol.stats
        self.last_backward_stats = sol.backward_stats
        return sol if self.return_solution else sol.ys[-1]

    def extra_repr(self) -> str:
        return f"solver={self.solver!r}, tspan={self.tspan}, sensealg={self.sensealg!r}"
