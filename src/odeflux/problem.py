"""A checked solve request (:class:`Problem`), as the sensitivity methods receive it.

:func:`make_problem` checks what :func:`odeflux.solve` was given and says what to fix;
:func:`solution_from_result` turns an integration into a :class:`~odeflux.Solution`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Iterable
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .control import StepSizeController
from .vector_field import as_field
from .integrator import IntegrateOptions, IntegrationResult, StepCallbacks, integrate
from .solution import Solution, times_tensor
from .solvers import Solver, Tsit5
from .solvers.implicit import IMEX

_FLOATS = (torch.float32, torch.float64)


@dataclass
class Problem:
    """A checked solve request, as the sensitivity methods receive it."""

    f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # f(t, y), args already bound
    y0: torch.Tensor
    t0: float
    t1: float
    solver: Solver
    controller: StepSizeController
    rtol: float
    atol: float
    dt0: float | None
    dtmin: float | None
    dtmax: float | None
    max_steps: int
    saveat: list[float] | None
    save_everystep: bool
    save_start: bool
    save_end: bool
    dense: bool
    params: list[torch.Tensor]  # the tensors (besides y0) that gradients flow to
    user_f: Callable[..., torch.Tensor] = field(repr=False, default=None)
    args: Any = None
    compiled: bool = False  # step through the compiled step (solve(compile=True))
    # f declares it ignores t (a time-independent NeuralODE field): hand it host floats, which
    # saves a tensor op per stage.
    float_time: bool = False
    # The module f is (or whose method it is): its parameters, and the tensors it holds now.
    f_params: list[torch.Tensor] | None = field(repr=False, default=None)
    module_state: list = field(repr=False, default_factory=list)
    # solve()'s norm=, step_times=, jump_times=, perturb= and callbacks= (see IntegrateOptions).
    norm: Callable[[torch.Tensor], torch.Tensor] | None = field(repr=False, default=None)
    step_times: tuple[float, ...] = ()
    jump_times: tuple[float, ...] = ()
    perturb: bool = False
    callbacks: StepCallbacks | None = field(repr=False, default=None)

    def options(self, **overrides: Any) -> IntegrateOptions:
        """This problem's integration options, some replaced."""
        fields = dict(
            rtol=self.rtol, atol=self.atol, controller=self.controller, dt0=self.dt0, dtmin=self.dtmin,
            dtmax=self.dtmax, max_steps=self.max_steps, saveat=self.saveat, save_everystep=self.save_everystep,
            save_start=self.save_start, save_end=self.save_end, dense=self.dense, compiled=self.compiled,
            float_time=self.float_time, norm=self.norm, step_times=self.step_times, jump_times=self.jump_times,
            perturb=self.perturb, callbacks=self.callbacks,
        )  # fmt: skip
        fields.update(overrides)
        return IntegrateOptions(**fields)

    def integrate(self, y0: torch.Tensor | None = None, t0: float | None = None, t1: float | None = None, **overrides: Any) -> IntegrationResult:
        """Run the integrator on this problem (from ``y0`` over ``[t0, t1]`` where given), with
        some of its options replaced."""
        return integrate(
            self.f, self.y0 if y0 is None else y0, self.t0 if t0 is None else t0, self.t1 if t1 is None else t1,
            self.solver, self.options(**overrides),
        )


def solution_from_result(res: IntegrationResult, problem: Problem) -> Solution:
    y0 = problem.y0
    ys = torch.stack(res.ys) if res.ys else y0.new_empty((0,) + tuple(y0.shape))
    ts = times_tensor(res.ts, y0)
    return Solution(ts=ts, ys=ys, stats=res.stats, status=res.status, message=res.message, dense=res.dense, t_final=res.t)


def bind_args(f: Callable[..., torch.Tensor], args: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if args is None:
        return f
    if isinstance(f, IMEX):  # (an IMEX method must still see the split)
        return f.bind(args)
    return BoundArgs(f, args)


class BoundArgs:
    """``f(t, y, args)`` as ``f(t, y)``."""

    def __init__(self, f: Callable[..., torch.Tensor], args: Any):
        self.f, self.args = f, args

    def __call__(self, t: Any, y: torch.Tensor) -> torch.Tensor:
        return self.f(t, y, self.args)

    def code_key(self) -> Any:
        """What a compiled loop of this depends on besides tensors (:func:`odeflux.compiled.program.code_key`)."""
        from .compiled.program import code_key

        return code_key(self.f)


ModuleState = list[tuple[nn.Module, str, str, torch.Tensor]]


def module_tensors(f: Any) -> tuple[list[torch.Tensor] | None, ModuleState]:
    """One walk over the module ``f`` is (or whose bound method it is): its parameters as
    ``parameters()`` lists them, and every ``(module, "_parameters" | "_buffers", name, tensor)``
    it holds now (the continuous adjoints put those back for their backward pass). ``(None, [])``
    when ``f`` is no module's."""
    module = f if isinstance(f, nn.Module) else getattr(f, "__self__", None)
    if not isinstance(module, nn.Module):
        return None, []
    params: list[torch.Tensor] = []
    state: ModuleState = []
    seen: set[int] = set()
    for mod in module.modules():
        for name, t in mod._parameters.items():
            if t is not None:
                state.append((mod, "_parameters", name, t))
                if id(t) not in seen:
                    seen.add(id(t))
                    params.append(t)
        for name, t in mod._buffers.items():
            if t is not None:
                state.append((mod, "_buffers", name, t))
    return params, state


def collect_params(f_params: Sequence[torch.Tensor], args: Any, params: Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
    """The tensors gradients may flow to besides ``y0``: ``f``'s parameters (``f_params``, as
    :func:`module_tensors` lists them), ``args``' tensors, ``params``."""
    found: list[torch.Tensor] = []
    seen: set[int] = set()

    def add(p: Any) -> None:
        if isinstance(p, torch.Tensor) and id(p) not in seen:
            seen.add(id(p))
            found.append(p)

    for p in f_params:
        add(p)
    if args is not None:
        for leaf in pytree.tree_leaves(args):
            add(leaf)
    if params is not None:
        if isinstance(params, nn.Module):
            raise TypeError(
                f"params must be a sequence of tensors, got a {type(params).__name__} module: pass list(module.parameters())"
            )
        if isinstance(params, torch.Tensor) or not isinstance(params, Iterable):
            raise TypeError(f"params must be a sequence of tensors, got a {type(params).__name__}: pass [p] for one tensor p")
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params must be a sequence of tensors, got an element of type {type(p).__name__}")
            add(p)
    return [p for p in found if p.is_floating_point()]


def _as_float(name: str, v: Any) -> float:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(v.shape)}")
        v = v.item()
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {v!r}") from None
    return x


def _positive_or_none(name: str, v: Any) -> float | None:
    if v is None:
        return None
    x = _as_float(name, v)
    if not x > 0:
        raise ValueError(f"{name} must be positive, got {x}")
    return x


def check_step_options(rtol: Any, atol: Any, dt0: Any, dtmin: Any, dtmax: Any, max_steps: Any) -> tuple:
    """The tolerances and step limits checked, each a float (``dt0``, ``dtmin``, ``dtmax`` may
    be ``None``): ``(rtol, atol, dt0, dtmin, dtmax)``, or one clear error."""
    rtol, atol = _as_float("rtol", rtol), _as_float("atol", atol)
    for name, v in (("rtol", rtol), ("atol", atol)):
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be positive and finite, got {v}")
    if dt0 is not None:
        dt0 = _as_float("dt0", dt0)
        if not (dt0 > 0 and math.isfinite(dt0)):
            raise ValueError(f"dt0 must be positive and finite (its sign follows t_span), got {dt0}")
    dtmin, dtmax = _positive_or_none("dtmin", dtmin), _positive_or_none("dtmax", dtmax)
    if dtmin is not None and dtmax is not None and dtmin > dtmax:
        raise ValueError(f"dtmin={dtmin} is above dtmax={dtmax}: no step size is allowed; lower dtmin or raise dtmax")
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}")
    return rtol, atol, dt0, dtmin, dtmax


def check_solver(solver: Any) -> Solver:
    """``solver`` (``Tsit5()`` for ``None``) if it is an odeflux solver instance, else one clear error."""
    if solver is None:
        return Tsit5()
    if isinstance(solver, type) and issubclass(solver, Solver):
        raise TypeError(f"solver must be an instance: pass {solver.__name__}(), not the class")
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be an odeflux solver such as odeflux.Tsit5(), got {solver!r}")
    return solver


def make_problem(
    f, y0, t_span, solver, args, params, rtol, atol, saveat, save_everystep, save_start, save_end, dense,
    dt0, dtmin, dtmax, max_steps, controller, compile, open_end: bool = False, *, norm=None, step_times=None,
    jump_times=None, perturb=False, callbacks=None,
) -> tuple[Problem, tuple[torch.Tensor | None, torch.Tensor | None]]:  # fmt: skip
    """``open_end``: ``t1`` may be infinite (a solve that a terminal event ends: odeflux.events)."""
    if not callable(f):
        raise TypeError(f"f must be callable as f(t, y), got {type(f).__name__}")
    if not isinstance(y0, torch.Tensor):
        raise TypeError(f"y0 must be a torch.Tensor, got {type(y0).__name__}: wrap it with torch.as_tensor(y0, dtype=torch.float32)")
    if y0.dtype not in _FLOATS:
        raise TypeError(
            f"y0 has dtype {y0.dtype}; odeflux integrates float32 or float64 states: pass y0.float() or y0.double()"
        )
    if y0.numel() == 0:
        raise ValueError("y0 is empty: the state needs at least one element")

    if isinstance(t_span, torch.Tensor):
        if t_span.numel() != 2:
            raise ValueError(f"t_span must hold two times (t0, t1), got a tensor of shape {tuple(t_span.shape)}")
        t_pair = (t_span.reshape(-1)[0], t_span.reshape(-1)[1])
    else:
        try:
            t_pair = tuple(t_span)
        except TypeError:
            raise TypeError(f"t_span must be a pair (t0, t1), got {t_span!r}") from None
        if len(t_pair) != 2:
            raise ValueError(f"t_span must be a pair (t0, t1), got {len(t_pair)} values")
    t0, t1 = _as_float("t_span[0]", t_pair[0]), _as_float("t_span[1]", t_pair[1])
    if not (math.isfinite(t0) and (math.isfinite(t1) or (open_end and math.isinf(t1)))):
        hint = ": an infinite t1 needs a terminal event (event=odeflux.Event(g))" if math.isinf(t1) and not open_end else ""
        raise ValueError(f"t_span must be finite, got ({t0}, {t1}){hint}")
    if t0 == t1:
        raise ValueError(f"t_span has equal ends ({t0}, {t1}): give an interval of nonzero length")
    # The ends that may carry a gradient: tensors that require one (plain numbers never do).
    t_tensors = tuple(t if isinstance(t, torch.Tensor) and t.requires_grad else None for t in t_pair)

    rtol, atol, dt0, dtmin, dtmax = check_step_options(rtol, atol, dt0, dtmin, dtmax, max_steps)
    solver = check_solver(solver)
    if compile and not (solver.tableau_steps or solver.compiled_steps):
        raise ValueError(
            f"compile=True compiles the explicit Runge-Kutta and Rosenbrock steps; {type(solver).__name__} takes other "
            "steps (implicit or multistep, checked on the host): pass compile=False"
        )
    if controller is None:
        controller = solver.default_controller()
    if not isinstance(controller, StepSizeController):
        raise TypeError(f"controller must be a step-size controller such as odeflux.PIController(), got {controller!r}")
    if controller.adaptive and not solver.adaptive:
        raise ValueError(
            f"{type(solver).__name__} has no error estimate, so it cannot adapt its step: pass dt0= "
            "(and controller=ConstantStepSize()), or choose an adaptive solver such as Tsit5()"
        )

    direction = 1.0 if t1 > t0 else -1.0
    if dt0 is None and not controller.adaptive:
        raise ValueError(f"{type(solver).__name__} with {type(controller).__name__} takes fixed steps: pass dt0=")

    save_list = None
    if saveat is not None:
        if isinstance(saveat, torch.Tensor):
            if saveat.ndim > 1:
                raise ValueError(f"saveat must be a 1-d sequence of times, got shape {tuple(saveat.shape)}")
            save_list = [float(v) for v in saveat.detach().reshape(-1).tolist()]
        else:
            save_list = [_as_float("saveat[i]", v) for v in saveat]
        if not save_list:
            raise ValueError("saveat is empty: pass at least one time, or leave saveat=None")
        lo, hi = min(t0, t1), max(t0, t1)
        # Times that round-tripped through float32 (torch.linspace(0, 6.28, n), say) may miss the
        # ends by an ulp: those snap onto them.
        # Each end by its own scale: float32 misses an end by an ulp of that end, so a span reaching
        # 1e5 must not snap saveat=1e-2 onto its start at 0.
        eps32 = 8 * torch.finfo(torch.float32).eps
        snap_lo, snap_hi = (eps32 * max(1.0, abs(e)) if math.isfinite(e) else 0.0 for e in (lo, hi))
        save_list = [lo if abs(v - lo) <= snap_lo else hi if abs(v - hi) <= snap_hi else v for v in save_list]
        for v in save_list:
            if not (lo <= v <= hi):
                raise ValueError(f"saveat time {v} is outside t_span ({t0}, {t1})")
        if any(direction * (b - a) <= 0 for a, b in zip(save_list, save_list[1:])):
            raise ValueError("saveat times must be strictly increasing in the direction of integration (t0 -> t1)")
        if save_everystep:
            raise ValueError("pass either saveat= or save_everystep=True, not both")
    if dense is None:
        dense = save_everystep and save_list is None

    f = as_field(f, args is not None)
    if norm is not None and not callable(norm):
        raise TypeError(f"norm must be a function of the scaled error returning a scalar tensor, got {norm!r}")
    if callbacks is not None and not isinstance(callbacks, StepCallbacks):
        raise TypeError(f"callbacks must be odeflux.StepCallbacks(step=..., accept=..., reject=...), got {callbacks!r}")
    f_params, module_state = module_tensors(f)
    problem = Problem(
        f=bind_args(f, args), y0=y0.contiguous(), t0=t0, t1=t1, solver=solver, controller=controller,
        rtol=rtol, atol=atol, dt0=dt0, dtmin=dtmin, dtmax=dtmax, max_steps=max_steps, saveat=save_list,
        save_everystep=bool(save_everystep), save_start=bool(save_start), save_end=bool(save_end),
        dense=bool(dense), params=collect_params(f_params or [], args, params), user_f=f, args=args,
        f_params=f_params, module_state=module_state,
        compiled=bool(compile), float_time=bool(getattr(f, "ignores_time", False)),
        norm=norm, step_times=_times("step_times", step_times), jump_times=_times("jump_times", jump_times),
        perturb=bool(perturb), callbacks=callbacks,
    )  # fmt: skip
    return problem, t_tensors  # type: ignore[return-value]


def _times(name: str, times: Any) -> tuple[float, ...]:
    """``step_times``/``jump_times`` as host floats (those outside the span are never reached)."""
    if times is None:
        return ()
    if isinstance(times, torch.Tensor):
        if times.ndim > 1:
            raise ValueError(f"{name} must be a 1-d sequence of times, got shape {tuple(times.shape)}")
        out = [float(v) for v in times.detach().reshape(-1).tolist()]
    else:
        try:
            out = [_as_float(f"{name}[i]", v) for v in times]
        except TypeError:
            raise TypeError(f"{name} must be a sequence of times, got {times!r}") from None
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} must be finite, got {out}")
    return tuple(out)
