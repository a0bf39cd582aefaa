"""torchdiffeq's API on odeflux: switch by changing one import.

``from odeflux.compat.torchdiffeq import odeint, odeint_adjoint, odeint_event, odeint_dense``
takes torchdiffeq's arguments and translates them onto :func:`odeflux.solve`: the method name
onto a solver, the options onto solve's keywords, ``odeint_adjoint`` onto
:class:`~odeflux.BacksolveAdjoint` (torchdiffeq's adjoint re-solves the state backwards). Nothing
here integrates anything itself. Where the two libraries differ, see the README's migration
section (outputs between the steps of fixed-grid methods come from the solver's own dense
output, not linear interpolation, for instance).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from typing import Any, Callable

import torch
from torch import nn

from ..control import IController
from ..integrator import StepCallbacks
from ..sensitivity import BacksolveAdjoint
from ..solution import Status
from ..solve import skipped_by_dynamo, solve
from ..solvers import SOLVERS
from ..tree import is_tree

__all__ = ["odeint", "odeint_adjoint", "odeint_dense", "odeint_event", "METHODS"]

# torchdiffeq's method names and odeflux's solvers (looked up in odeflux.solvers.SOLVERS).
ADAPTIVE = {"dopri8": "dopri8", "dopri5": "dopri5", "tsit5": "tsit5", "bosh3": "bs3", "fehlberg2": "fehlberg2", "adaptive_heun": "heun"}
FIXED = {
    "euler": "euler", "midpoint": "midpoint", "heun2": "heun2", "heun3": "heun3",
    "rk4": "rk38",  # torchdiffeq's rk4 is the 3/8 rule
    "explicit_adams": "explicit_adams", "implicit_adams": "implicit_adams", "fixed_adams": "fixed_adams",
    "implicit_euler": "implicit_euler", "implicit_midpoint": "implicit_midpoint", "trapezoid": "trapezoid",
    "radauIIA3": "radauiia3", "radauIIA5": "radauiia5", "gl4": "gl4", "gl6": "gl6", "sdirk2": "sdirk2", "trbdf2": "trbdf2",
}  # fmt: skip
METHODS = (*ADAPTIVE, *FIXED, "scipy_solver")

# The options torchdiffeq's solvers take, by kind of method.
_ADAPTIVE_OPTIONS = {"first_step", "safety", "ifactor", "dfactor", "max_num_steps", "dtype", "step_t", "jump_t", "norm", "min_step", "max_step"}
_FIXED_OPTIONS = {"step_size", "grid_constructor", "interp", "perturb", "max_iters", "max_order", "norm", "dtype"}
_SCIPY_OPTIONS = {"solver", "min_step", "max_step", "first_step", "norm", "dtype"}

_CALLBACKS = ("callback_step", "callback_accept_step", "callback_reject_step")


# As odeflux.solve, the entry points run as units that an enclosing torch.compile skips.
@skipped_by_dynamo
def odeint(
    func: Callable[..., Any], y0: Any, t: torch.Tensor, *, rtol: float = 1e-7, atol: float = 1e-9,
    method: str | None = None, options: dict | None = None, event_fn: Callable | None = None,
) -> Any:  # fmt: skip
    """torchdiffeq's ``odeint``: the solution at every time of ``t`` (stacked along a new first
    axis; a tuple of such for a tuple state), differentiable by backpropagation through the
    solver. With ``event_fn``, integrates from ``t[0]`` until ``event_fn(t, y)`` crosses zero and
    returns ``(event_t, solution at [t[0], event_t])``."""
    return _odeint(func, y0, t, rtol, atol, method, options, event_fn, None)


@skipped_by_dynamo
def odeint_adjoint(
    func: Callable[..., Any], y0: Any, t: torch.Tensor, *, rtol: float = 1e-7, atol: float = 1e-9,
    method: str | None = None, options: dict | None = None, event_fn: Callable | None = None,
    adjoint_rtol: float | None = None, adjoint_atol: float | None = None, adjoint_method: str | None = None,
    adjoint_options: dict | None = None, adjoint_params: Any = None,
) -> Any:  # fmt: skip
    """torchdiffeq's ``odeint_adjoint``: as :func:`odeint`, with gradients from the continuous
    adjoint solved backwards in time (:class:`odeflux.BacksolveAdjoint`), with respect to
    ``y0``, ``t`` and ``adjoint_params`` (default: ``func``'s parameters)."""
    if adjoint_params is None and not isinstance(func, nn.Module):
        raise ValueError(
            "func must be an nn.Module to find the adjoint's parameters: make it one, or pass them as adjoint_params=(...)"
        )
    options = dict(options or {})
    if adjoint_options is None:
        adjoint_options = {k: v for k, v in options.items() if k != "norm"}
    adjoint_options = dict(adjoint_options)
    adj_method = adjoint_method if adjoint_method is not None else (method or "dopri5")
    params = list(func.parameters()) if adjoint_params is None else list(adjoint_params)
    norm = _AdjointNorm(_as_real(y0), params, adjoint_options.pop("norm", None))
    adj_solver = _solver(adj_method, adjoint_options)
    # (scipy's solvers control their own error, as in torchdiffeq: no norm reaches them)
    adj_norm: Any = "mixed" if _kind(adj_method) == "scipy" else norm
    sensealg = BacksolveAdjoint(
        rtol=adjoint_rtol if adjoint_rtol is not None else rtol,
        atol=adjoint_atol if adjoint_atol is not None else atol,
        solver=adj_solver, norm=adj_norm, max_steps=adjoint_options.get("max_num_steps", _MAX_STEPS),
        callbacks=_callbacks(func, "_adjoint", adj_method),
    )  # fmt: skip
    ys = _odeint(func, y0, t, rtol, atol, method, options, event_fn, sensealg, None if adjoint_params is None else params)
    # As torchdiffeq, the backward node holds the adjoint's options (its norm may be replaced
    # until backward runs).
    for out in ys if isinstance(ys, tuple) else (ys,):
        node = _adjoint_node(out)
        if node is not None:
            node.adjoint_options = norm.options
    return ys


@skipped_by_dynamo
def odeint_event(
    func: Callable[..., Any], y0: Any, t0: torch.Tensor, *, event_fn: Callable, reverse_time: bool = False,
    odeint_interface: Callable = odeint, **kwargs: Any,
) -> tuple[torch.Tensor, Any]:  # fmt: skip
    """torchdiffeq's ``odeint_event``: integrate from ``t0`` (backwards with ``reverse_time``)
    until ``event_fn(t, y)`` crosses zero; returns ``(event_t, solution at [t0, event_t])``, the
    event time differentiable (implicit function theorem) whichever interface solves it."""
    t0 = torch.as_tensor(t0).reshape(-1)
    t = torch.cat([t0, t0.detach() + (-1.0 if reverse_time else 1.0)])
    return odeint_interface(func, y0, t, event_fn=event_fn, **kwargs)


@skipped_by_dynamo
def odeint_dense(
    func: Callable[..., Any], y0: torch.Tensor, t0: Any, t1: Any, *, rtol: float = 1e-7, atol: float = 1e-9,
    method: str | None = None, options: dict | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:  # fmt: skip
    """torchdiffeq's ``odeint_dense``: a function of times in ``[t0, t1]`` giving the states
    there from the solve's dense output (any adaptive method, not only dopri5)."""
    t = torch.stack([torch.as_tensor(t0, dtype=torch.float64).reshape(()), torch.as_tensor(t1, dtype=torch.float64).reshape(())])
    kwargs = _translate(func, y0, t, rtol, atol, method or "dopri5", dict(options or {}), None)
    kwargs.pop("saveat")
    sol = solve(func, y0, (float(t.detach()[0]), float(t.detach()[1])), dense=True, **kwargs)
    return lambda t_eval: sol(torch.as_tensor(t_eval))


def _as_real(y0: Any) -> Any:
    """A complex state as odeflux integrates it (:mod:`odeflux.tree`): its real view."""
    return torch.view_as_real(y0) if isinstance(y0, torch.Tensor) and y0.is_complex() else y0


# -- the adjoint's norm, in torchdiffeq's layout -----------------------------------------------


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.abs().reshape(()) if x.numel() == 1 else x.pow(2).mean().sqrt()


class _AdjointNorm:
    """odeflux's adjoint norm (a function of the blocks ``y, lambda, mu``) calling a norm of
    torchdiffeq's tuple ``(t, y, adj_y, *adj_params)``, looked up in ``options["norm"]`` at each
    call. The default is torchdiffeq's: the largest RMS norm over each tensor of the state and of
    its adjoint and over each parameter's adjoint (``"seminorm"``: the parameters left out); a
    user's norm of a tuple state gets each tensor separately."""

    def __init__(self, y0: Any, params: list[torch.Tensor], norm: Any):
        self.leaves = [y.shape for y in y0] if is_tree(y0) else None
        self.shape = None if self.leaves is not None else y0.shape
        self.param_shapes = [p.shape for p in params]
        seminorm = norm == "seminorm"
        if norm is None or seminorm:
            norm = self._default(seminorm)
        elif not callable(norm):
            raise ValueError(f"adjoint_options['norm'] must be a function or 'seminorm', got {norm!r}")
        elif self.leaves is not None:
            norm = self._unflattening(norm)
        self.options: dict[str, Any] = {"norm": norm}

    def _split_state(self, flat: torch.Tensor) -> list[torch.Tensor]:
        sizes = [math.prod(s) for s in self.leaves]
        return [x.reshape(s) for x, s in zip(flat.split(sizes), self.leaves)]

    def _default(self, seminorm: bool) -> Callable[[tuple], torch.Tensor]:
        n_params = len(self.param_shapes)

        def norm(tensors: tuple) -> torch.Tensor:
            t, y, adj_y, *adj_p = tensors
            parts = [y, adj_y] if self.leaves is None else [*self._split_state(y), *self._split_state(adj_y)]
            if not seminorm:
                parts += adj_p[:n_params]
            return torch.stack([t.abs(), *(_rms(x) for x in parts if x.numel())]).max()

        return norm

    def _unflattening(self, user: Callable[[tuple], torch.Tensor]) -> Callable[[tuple], torch.Tensor]:
        def norm(tensors: tuple) -> torch.Tensor:
            t, y, adj_y, *adj_p = tensors
            return user((t, *self._split_state(y), *self._split_state(adj_y), *adj_p))

        return norm

    def __call__(self, blocks: tuple[torch.Tensor, ...]) -> torch.Tensor:
        y, lam, *rest = blocks
        mu = rest[0] if rest else y.new_zeros(0)
        if self.shape is not None:
            y, lam = y.reshape(self.shape), lam.reshape(self.shape)
        sizes = [math.prod(s) for s in self.param_shapes]
        if sum(sizes) == mu.numel():
            adj_p = [m.reshape(s) for m, s in zip(mu.split(sizes), self.param_shapes)]
        else:  # (f's own parameters besides adjoint_params: one block)
            adj_p = [mu]
        return self.options["norm"]((y.new_zeros(()), y, lam, *adj_p))


def _adjoint_node(out: torch.Tensor) -> Any:
    """The adjoint's backward node behind ``out`` (a few view/slice nodes down), if any."""
    node = out.grad_fn
    for _ in range(3):
        if node is None:
            return None
        if type(node).__name__.startswith("_AdjointFunction"):
            return node
        nexts = [n for n, _ in node.next_functions if n is not None]
        node = nexts[0] if len(nexts) == 1 else None
    return None


# -- the translation -------------------------------------------------------------------------

_MAX_STEPS = 2**31 - 1  # torchdiffeq's max_num_steps default


def _kind(method: str) -> str:
    if method in ADAPTIVE:
        return "adaptive"
    if method in FIXED:
        return "fixed"
    if method == "scipy_solver":
        return "scipy"
    raise ValueError(f'Invalid method "{method}". Must be one of {{{", ".join(repr(m) for m in METHODS)}}}')


def _solver(method: str, options: dict) -> Any:
    kind = _kind(method)
    name = "scipy_solver" if kind == "scipy" else {**ADAPTIVE, **FIXED}[method]
    cls = SOLVERS.get(name)
    if cls is None:
        raise ValueError(f"method={method!r} is not available in this version of odeflux: choose another method")
    kwargs: dict[str, Any] = {}
    accepted = _parameters(cls)
    if kind == "scipy" and "solver" in options:
        kwargs["method" if "method" in accepted else "solver"] = options["solver"]
    for key in ("max_iters", "max_order"):
        if key in options and key in accepted:
            kwargs[key] = options[key]
    return cls(**kwargs)


def _parameters(cls: Any) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    try:
        return set(inspect.signature(cls).parameters)
    except (TypeError, ValueError):
        return set()


def _callbacks(func: Any, suffix: str, method: str) -> StepCallbacks | None:
    found = {name: getattr(func, name + suffix, None) for name in _CALLBACKS}
    kind = _kind(method)
    unusable = [n + suffix for n, c in found.items() if c is not None and (kind == "scipy" or (kind == "fixed" and n != "callback_step"))]
    if unusable:
        warnings.warn(f"Solver '{method}' does not support callbacks {set(unusable)}: they are not called")
    if kind == "scipy":
        return None
    cb = StepCallbacks(step=found["callback_step"], accept=found["callback_accept_step"], reject=found["callback_reject_step"])
    return cb if cb else None


def _times(t: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.as_tensor(t, dtype=torch.float64)
        except (TypeError, ValueError):
            raise TypeError(f"t must be a 1-d tensor of times, got {type(t).__name__}") from None
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(f"t must be a non-empty 1-d tensor of times, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if t.numel() > 1:
        d = (t[1:] - t[:-1]).detach()
        if not (bool((d > 0).all()) or bool((d < 0).all())):
            raise ValueError("t must be strictly increasing or strictly decreasing: sort it and drop repeated times")
    return t


def _translate(func: Any, y0: Any, t: torch.Tensor, rtol: float, atol: float, method: str, options: dict, params: Any) -> dict:
    """solve()'s keywords for torchdiffeq's method and options."""
    kind = _kind(method)
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if isinstance(tol, (tuple, list)) or (isinstance(tol, torch.Tensor) and tol.numel() > 1):
            raise ValueError(
                f"{name} per tensor or per entry is not supported by odeflux (one tolerance for the whole state): "
                f"pass one number, the tightest ({name}={float(torch.as_tensor(tol).min()):g}), or a norm= option "
                "that weighs the entries"
            )
    known = {"adaptive": _ADAPTIVE_OPTIONS, "fixed": _FIXED_OPTIONS, "scipy": _SCIPY_OPTIONS}[kind]
    unknown = set(options) - known
    if unknown:
        warnings.warn(f"{method}: Unexpected arguments {unknown}")
    kw: dict[str, Any] = dict(rtol=rtol, atol=atol, solver=_solver(method, options), saveat=t, params=params)
    if "norm" in options and options["norm"] is not None:
        kw["norm"] = options["norm"]
    max_step = options.get("max_step", math.inf)
    min_step = float(options.get("min_step", 0.0))
    first, last = float(t.detach()[0]), float(t.detach()[-1])  # (times that require grad, as torchdiffeq's suite passes)
    if kind == "adaptive":
        # torchdiffeq never gives up for a small step: the only floor is the time's own precision.
        kw["dtmin"] = max(min_step, 16 * 2.0**-52 * max(1.0, abs(first), abs(last)))
        kw["controller"] = IController(
            safety=float(options.get("safety", 0.9)), qmax=float(options.get("ifactor", 10.0)),
            qmin=float(options.get("dfactor", 0.2)), shrink_accepted=False, min_step=min_step,
        )  # fmt: skip
        kw["max_steps"] = int(options.get("max_num_steps", _MAX_STEPS))
        if options.get("first_step") is not None:
            kw["dt0"] = float(options["first_step"])
        kw["step_times"] = options.get("step_t")
        kw["jump_times"] = options.get("jump_t")
    elif kind == "fixed":
        step_size = options.get("step_size")
        grid = options.get("grid_constructor")
        span = abs(last - first)
        if step_size is not None:
            if grid is not None:
                raise ValueError("step_size and grid_constructor are mutually exclusive: pass one of them")
            kw["dt0"] = abs(float(step_size))
        else:
            # The steps are the grid: each lands on the next grid time.
            points = grid(func, y0, t) if grid is not None else t
            kw["dt0"] = span
            kw["step_times"] = torch.as_tensor(points).detach().reshape(-1)
        kw["perturb"] = bool(options.get("perturb", False))
    else:
        if options.get("first_step") is not None:
            kw["dt0"] = float(options["first_step"])
        if min_step > 0:
            kw["dtmin"] = min_step
    if math.isfinite(float(max_step)):
        kw["dtmax"] = float(max_step)
    return kw


def _odeint(
    func: Any, y0: Any, t: Any, rtol: float, atol: float, method: str | None, options: dict | None,
    event_fn: Callable | None, sensealg: Any, params: Any = None,
) -> Any:  # fmt: skip
    method = "dopri5" if method is None else method
    options = dict(options or {})
    t = _times(t)
    if event_fn is None and t.numel() == 1:
        _kind(method)
        return tuple(y.unsqueeze(0) for y in y0) if is_tree(y0) else y0.unsqueeze(0)
    kw = _translate(func, y0, t, rtol, atol, method, options, params)
    kw["callbacks"] = _callbacks(func, "", method)
    if sensealg is not None:
        kw["sensealg"] = sensealg
    if event_fn is not None:
        return _until_event(func, y0, t, event_fn, kw)
    if _kind(method) == "scipy" and sensealg is None:
        # As torchdiffeq's scipy_solver under odeint: a result without a graph (scipy's steps are
        # not differentiable; odeint_adjoint gives gradients), and a failure of scipy's is a
        # warning with the times it reached, not an exception.
        with torch.no_grad():
            sol = solve(func, y0, (t[0], t[-1]), throw=False, **kw)
        if sol.status != Status.SUCCESS:
            warnings.warn(f"scipy_solver: {sol.message} (returning the {len(sol.ts)} of {len(t)} times reached)")
        return sol.ys
    sol = solve(func, y0, (t[0], t[-1]), **kw)
    return sol.ys


def _until_event(func: Any, y0: Any, t: torch.Tensor, event_fn: Callable, kw: dict) -> tuple[torch.Tensor, Any]:
    from ..events import Event

    if t.numel() < 2:
        raise ValueError("with event_fn, t must hold the start time and one more time giving the direction")
    direction = 1.0 if float(t.detach()[1]) > float(t.detach()[0]) else -1.0
    kw = {k: v for k, v in kw.items() if k not in ("saveat", "step_times")}
    sol = solve(func, y0, (t[0], math.copysign(math.inf, direction)), event=Event(event_fn, terminal=True), **kw)
    event_t = sol.event_t.to(t.dtype)
    if is_tree(y0):
        ys = tuple(torch.stack([a, b]) for a, b in zip(y0, sol.event_y))
    else:
        ys = torch.stack([y0, sol.event_y])
    return event_t, ys
