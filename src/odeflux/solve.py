"""The entry point: check the inputs, pick the sensitivity method, run the integrator."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .control import StepSizeController
from .problem import make_problem, solution_from_result
from .sensitivity import DirectAdjoint, SensitivityAlgorithm
from .solution import Solution, SolveError, Status
from .solvers import Solver

_DIRECT = DirectAdjoint()  # solve()'s default method


def solve(
    f: Callable[..., torch.Tensor],
    y0: torch.Tensor,
    t_span: Sequence[float] | torch.Tensor,
    *,
    solver: Solver | None = None,
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
    problem, t_tensors = make_problem(
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
        sol = solution_from_result(problem.integrate(), problem)
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
