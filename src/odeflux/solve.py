"""The entry point: check the inputs, pick the sensitivity method, run the integrator."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .control import DEFAULT_PI, ConstantStepSize, StepSizeController
from .integrator import IntegrationResult, integrate, rk_step_with_error
from .sensitivity import DirectAdjoint, SensitivityAlgorithm
from .solution import Solution, SolveError, Status, times_tensor
from .solvers import ExplicitRK, Tsit5

_FLOATS = (torch.float32, torch.float64)


@dataclass
class Problem:
    """A checked solve request, as the sensitivity methods receive it."""

    f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # f(t, y), args already bound
    y0: torch.Tensor
    t0: float
    t1: float
    solver: ExplicitRK
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
    step_fn: Callable | None = field(repr=False, default=None)
    # f declares it ignores t (a time-independent NeuralODE field): hand it host floats, which
    # saves a tensor op per stage.
    float_time: bool = False
    # The module f is (or whose method it is): its parameters, and the tensors it holds now.
    f_params: list[torch.Tensor] | None = field(repr=False, default=None)
    module_state: list = field(repr=False, default_factory=list)

    def integrate(self, **overrides: Any) -> IntegrationResult:
        """Run the integrator with this problem's options, some replaced."""
        opts = dict(
            f=self.f, y0=self.y0, t0=self.t0, t1=self.t1, solver=self.solver, rtol=self.rtol, atol=self.atol,
            controller=self.controller, dt0=self.dt0, dtmin=self.dtmin, dtmax=self.dtmax, max_steps=self.max_steps,
            saveat=self.saveat, save_everystep=self.save_everystep, save_start=self.save_start,
            save_end=self.save_end, dense=self.dense, step_fn=self.step_fn, float_time=self.float_time,
        )  # fmt: skip
        opts.update(overrides)
        return integrate(**opts)


def solve(
    f: Callable[..., torch.Tensor],
    y0: torch.Tensor,
    t_span: Sequence[float] | torch.Tensor,
    *,
    solver: ExplicitRK | None = None,
    args: Any = None,
    params: Sequence[torch.Tensor] | None = None,
    rtol: float = 1e-3,
    atol: float = 1e-6,
    saveat: Sequence[float] | torch.Tensor | None = None,
    save_everystep: bool = False,
    save_start: bool = True,
    save_end: bool = True,
    dense: bool | None = None,
    dt0: float | None = None,
    dtmin: float | None = None,
    dtmax: float | None = None,
    max_steps: int = 100_000,
    controller: StepSizeController | None = None,
    sensealg: SensitivityAlgorithm | None = None,
    throw: bool = True,
    compile: bool = False,
) -> Solution:
    """Solve ``dy/dt = f(t, y)`` (or ``f(t, y, args)`` when ``args`` is given) over ``t_span``.

    ``y0`` is a float32 or float64 tensor of any shape on any device; a batch is one state.
    ``t_span = (t0, t1)`` may run backwards. Saving: by default the start and end states;
    ``save_everystep`` adds each accepted step, ``saveat`` replaces them with given times.
    ``dense`` keeps the interpolant for ``sol(t)`` (default: when ``save_everystep`` is on).

    Gradients: ``sensealg`` picks how they are computed (``DirectAdjoint`` backpropagates through
    the solver and is the default; ``InterpolatingAdjoint``, ``BacksolveAdjoint``,
    ``QuadratureAdjoint`` and ``GaussAdjoint`` solve the continuous adjoint). The continuous
    adjoints differentiate with respect to ``y0``, the parameters of ``f`` when it is an
    ``nn.Module``, the tensors inside ``args``, and ``params``. Gradients with respect to tensor
    ``t_span`` ends are given by every method.

    With ``throw=True`` (default) a solve that does not reach ``t1`` raises ``SolveError``;
    otherwise check ``sol.status``. ``compile=True`` runs the per-step work through
    ``torch.compile(fullgraph=True)``.
    """
    problem, t_tensors = _make_problem(
        f, y0, t_span, solver, args, params, rtol, atol, saveat, save_everystep, save_start, save_end, dense,
        dt0, dtmin, dtmax, max_steps, controller, compile,
    )  # fmt: skip
    if sensealg is not None and not isinstance(sensealg, SensitivityAlgorithm):
        raise TypeError(
            f"sensealg must be a sensitivity algorithm such as odeflux.InterpolatingAdjoint(), got {sensealg!r}"
        )
    needs_grad = torch.is_grad_enabled() and (
        problem.y0.requires_grad or any(p.requires_grad for p in problem.params) or any(t is not None for t in t_tensors)
    )
    t0_tensor, t1_tensor = t_tensors
    y0_given = problem.y0
    if needs_grad and t0_tensor is not None:
        # y(t; t0 + d, y0) = y(t; t0, y0 - d f(t0, y0)) to first order: dL/dt0 = -<dL/dy0, f(t0, y0)>.
        with torch.no_grad():
            f0 = problem.f(torch.full((), problem.t0, dtype=problem.y0.dtype, device=problem.y0.device), problem.y0)
        shift = (t0_tensor - t0_tensor.detach()).to(problem.y0.dtype)
        problem.y0 = problem.y0 - shift * f0
    if not needs_grad:
        sol = _from_result(problem.integrate(), problem)
    else:
        sol = (sensealg if sensealg is not None else _DIRECT).solve(problem)
    if problem.y0 is not y0_given and len(sol.ts) and float(sol.ts[0]) == problem.t0:
        sol.ys = torch.cat([y0_given.unsqueeze(0), sol.ys[1:]])  # y(t0) = y0 whatever t0 is
    if needs_grad and t1_tensor is not None and sol.status == Status.SUCCESS and len(sol.ts) and float(sol.ts[-1]) == problem.t1:
        # dL/dt1 = <dL/dy(t1), f(t1, y(t1))> for the state saved at t1.
        with torch.no_grad():
            f1 = problem.f(torch.full((), problem.t1, dtype=problem.y0.dtype, device=problem.y0.device), sol.ys[-1])
        shift = (t1_tensor - t1_tensor.detach()).to(problem.y0.dtype)
        last = sol.ys[-1] + shift * f1
        sol.ys = torch.cat([sol.ys[:-1], last.unsqueeze(0)])
    if sol.status == Status.NONFINITE and not bool(torch.isfinite(y0.detach()).all()):
        # Checked only on failure: up front it would cost a host synchronisation every solve.
        raise ValueError("y0 contains NaN or Inf: the initial state must be finite")
    if throw and sol.status != Status.SUCCESS:
        raise SolveError(f"solve failed ({sol.status.name}): {sol.message}", sol.status, sol)
    return sol


def _from_result(res: IntegrationResult, problem: Problem) -> Solution:
    y0 = problem.y0
    ys = torch.stack(res.ys) if res.ys else y0.new_empty((0,) + tuple(y0.shape))
    ts = times_tensor(res.ts, y0)
    return Solution(ts=ts, ys=ys, stats=res.stats, status=res.status, message=res.message, dense=res.dense, t_final=res.t)


def bind_args(f: Callable[..., torch.Tensor], args: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if args is None:
        return f
    return lambda t, y: f(t, y, args)


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


def _make_problem(
    f, y0, t_span, solver, args, params, rtol, atol, saveat, save_everystep, save_start, save_end, dense,
    dt0, dtmin, dtmax, max_steps, controller, compile,
) -> tuple[Problem, tuple[torch.Tensor | None, torch.Tensor | None]]:  # fmt: skip
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
    if not (math.isfinite(t0) and math.isfinite(t1)):
        raise ValueError(f"t_span must be finite, got ({t0}, {t1})")
    if t0 == t1:
        raise ValueError(f"t_span has equal ends ({t0}, {t1}): give an interval of nonzero length")
    # The ends that may carry a gradient: tensors that require one (plain numbers never do).
    t_tensors = tuple(t if isinstance(t, torch.Tensor) and t.requires_grad else None for t in t_pair)

    rtol, atol = _as_float("rtol", rtol), _as_float("atol", atol)
    for name, v in (("rtol", rtol), ("atol", atol)):
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be positive and finite, got {v}")

    if solver is None:
        solver = Tsit5()
    if isinstance(solver, type) and issubclass(solver, ExplicitRK):
        raise TypeError(f"solver must be an instance: pass {solver.__name__}(), not the class")
    if not isinstance(solver, ExplicitRK):
        raise TypeError(f"solver must be an odeflux solver such as odeflux.Tsit5(), got {solver!r}")
    if controller is None:
        controller = DEFAULT_PI if solver.adaptive else ConstantStepSize()
    if not isinstance(controller, StepSizeController):
        raise TypeError(f"controller must be a step-size controller such as odeflux.PIController(), got {controller!r}")
    if controller.adaptive and not solver.adaptive:
        raise ValueError(
            f"{type(solver).__name__} has no error estimate, so it cannot adapt its step: pass dt0= "
            "(and controller=ConstantStepSize()), or choose an adaptive solver such as Tsit5()"
        )

    direction = 1.0 if t1 > t0 else -1.0
    if dt0 is not None:
        dt0 = _as_float("dt0", dt0)
        if not (dt0 > 0 and math.isfinite(dt0)):
            raise ValueError(f"dt0 must be positive and finite (its sign follows t_span), got {dt0}")
    elif not controller.adaptive:
        raise ValueError(f"{type(solver).__name__} with {type(controller).__name__} takes fixed steps: pass dt0=")
    for name, v in (("dtmin", dtmin), ("dtmax", dtmax)):
        if v is not None and not (_as_float(name, v) > 0):
            raise ValueError(f"{name} must be positive, got {v}")
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}")

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
        snap = 8 * torch.finfo(torch.float32).eps * max(1.0, abs(t0), abs(t1))
        save_list = [lo if abs(v - lo) <= snap else hi if abs(v - hi) <= snap else v for v in save_list]
        for v in save_list:
            if not (lo <= v <= hi):
                raise ValueError(f"saveat time {v} is outside t_span ({t0}, {t1})")
        if any(direction * (b - a) <= 0 for a, b in zip(save_list, save_list[1:])):
            raise ValueError("saveat times must be strictly increasing in the direction of integration (t0 -> t1)")
        if save_everystep:
            raise ValueError("pass either saveat= or save_everystep=True, not both")
    if dense is None:
        dense = save_everystep and save_list is None

    f_params, module_state = module_tensors(f)
    problem = Problem(
        f=bind_args(f, args), y0=y0.contiguous(), t0=t0, t1=t1, solver=solver, controller=controller,
        rtol=rtol, atol=atol, dt0=dt0, dtmin=None if dtmin is None else float(dtmin),
        dtmax=None if dtmax is None else float(dtmax), max_steps=max_steps, saveat=save_list,
        save_everystep=bool(save_everystep), save_start=bool(save_start), save_end=bool(save_end),
        dense=bool(dense), params=collect_params(f_params or [], args, params), user_f=f, args=args,
        f_params=f_params, module_state=module_state,
        step_fn=compiled_step() if compile else None, float_time=bool(getattr(f, "ignores_time", False)),
    )  # fmt: skip
    return problem, t_tensors  # type: ignore[return-value]


_COMPILED_STEP: Callable | None = None
_DIRECT = DirectAdjoint()  # solve()'s default method


def compiled_step() -> Callable:
    """The per-step work under ``torch.compile(fullgraph=True)``, built once per process."""
    global _COMPILED_STEP
    if _COMPILED_STEP is None:
        _COMPILED_STEP = torch.compile(rk_step_with_error, fullgraph=True)
    return _COMPILED_STEP
