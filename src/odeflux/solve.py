"""The entry point: check the inputs, pick the sensitivity method, run the integrator."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import torch
from torch.utils import _pytree as pytree

from .autocast import autocast_of, engine_outside, promoted, under_autocast
from .control import StepSizeController
from .events import Event, EventFunction, EventRecord, as_events, solve_with_events
from .integrator import StepCallbacks
from .problem import make_problem, solution_from_result
from .tree import TreeField, flatten, is_tree, needs_flattening, tree_norm
from .vector_field import as_field
from .sensitivity import DirectAdjoint, SensitivityAlgorithm, choose_sensealg
from .solution import Solution, SolveError, Status
from .solvers import Solver
from .solvers.tableau import _is_compiling

_DIRECT = DirectAdjoint()  # solve()'s default method

_SKIPPED = (
    "an odeflux solve decides its steps on the host and runs outside the compiled graph (one graph break), "
    "so it cannot be inside a fullgraph=True program or a torch.export: drop fullgraph=True, or compile the "
    "solve itself with compile=True"
)
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # (torch.compiler.is_exporting: torch >= 2.5)


_SKIPPED_FNS: dict[Callable[..., Any], Callable[..., Any]] = {}


def _disabled(fn: Callable[..., Any]) -> Callable[..., Any]:
    try:
        return torch.compiler.disable(fn, reason=_SKIPPED)
    except TypeError:  # (torch before 2.8 takes no reason)
        return torch.compiler.disable(fn)


def skipped_by_dynamo(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run as a unit that an enclosing ``torch.compile`` does not trace.

    A solve decides its steps on the host (one float a step, a loop as long as the data makes
    it): ``torch.compile(model)`` around a ``NeuralODE`` traced it step by step, breaking the graph
    at each step, tracing again for each new step size (seconds a call, slower than eager) and
    failing inside dynamo on some inputs. Skipped, it is one graph break where the compiled model
    calls it, and runs as it does eagerly (``compile=True`` compiles the solve itself).

    The skipping wrapper (``torch.compiler.disable``) is made when dynamo first meets ``fn``: made
    at import, it would import dynamo with odeflux (seconds of every process's start-up)."""

    @functools.wraps(fn)
    def entry(*args: Any, **kwargs: Any) -> Any:
        if _is_compiling():  # (True only while dynamo or torch.export traces this call)
            if _is_exporting():
                raise RuntimeError(
                    f"odeflux.{fn.__name__} cannot be traced by torch.export: a solve runs its loop on the host (adaptive "
                    "steps decided from the state's values, kernels of its own); export the layers around the ODE, or run "
                    "the model eagerly"
                )
            skipped = _SKIPPED_FNS.get(fn)
            if skipped is None:  # (a graph break of its own, once: dynamo runs disable() eagerly)
                skipped = _SKIPPED_FNS[fn] = _disabled(fn)  # odeflux solves run outside compiled graphs: drop fullgraph=True, or compile=True
            return skipped(*args, **kwargs)
        return fn(*args, **kwargs)

    return entry


@skipped_by_dynamo
def solve(
    f: Callable[..., Any],
    y0: Any,
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
    sensealg: SensitivityAlgorithm | str | None = None,
    throw: bool = True,
    compile: bool = False,
    norm: Callable[[Any], torch.Tensor] | None = None,
    step_times: Sequence[float] | torch.Tensor | None = None,
    jump_times: Sequence[float] | torch.Tensor | None = None,
    perturb: bool = False,
    callbacks: StepCallbacks | None = None,
    event: Event | EventFunction | Sequence[Event | EventFunction] | None = None,
    batch_axis: int | None = None,
) -> Solution:
    """Solve ``dy/dt = f(t, y)`` (or ``f(t, y, args)`` when ``args`` is given) over ``t_span``.

    ``y0`` is a float32 or float64 tensor of any shape on any device; a batch is one state.
    It may also be a tuple, list or dict of tensors (nested; one dtype and device): ``f`` then
    takes and returns that structure, and ``sol.ys`` holds it, each tensor stacked over the saved
    times. ``t_span = (t0, t1)`` may run backwards. Saving: by default the start and end states;
    ``save_everystep`` adds each accepted step, ``saveat`` replaces them with given times.
    ``dense`` keeps the interpolant for ``sol(t)`` (default: when ``save_everystep`` is on).

    Gradients: ``sensealg`` picks how they are computed (``DirectAdjoint`` backpropagates through
    the solver and is the default; ``InterpolatingAdjoint``, ``BacksolveAdjoint``,
    ``QuadratureAdjoint`` and ``GaussAdjoint`` solve the continuous adjoint;
    ``ForwardSensitivity`` integrates dy/d(y0, params) alongside the state, for few parameters).
    ``sensealg="auto"`` picks one by the problem's size (:func:`odeflux.sensitivity.choose_sensealg`);
    ``sol.sensealg`` says which method computed the gradients. The continuous
    adjoints and ForwardSensitivity differentiate with respect to ``y0``, the parameters of ``f`` when it is an
    ``nn.Module``, the tensors inside ``args``, and ``params``. Gradients with respect to tensor
    ``t_span`` ends are given by every method.

    A tensor ``saveat`` that requires grad gives gradients with respect to the saved times.

    Control of the steps: ``norm`` replaces the RMS error norm (a function of the scaled error
    ``err / (atol + rtol max(|y0|, |y1|))`` in the state's structure, returning a scalar tensor);
    the steps land on each of ``step_times``, and on each of ``jump_times``, where ``f`` may jump
    (its value carried over from the last stage is discarded, and it is evaluated again just
    past the time); ``perturb=True`` evaluates ``f`` just inside each step, never on a step's
    ends (fixed-step solves of an ``f`` that jumps on the grid); ``callbacks`` hear of each step
    attempted, accepted and rejected (:class:`StepCallbacks`).

    Under ``torch.autocast`` ``f`` runs under it and the solver's own arithmetic in float32 (a
    float16 or bfloat16 ``y0`` is promoted; :mod:`odeflux.autocast`).

    With ``throw=True`` (default) a solve that does not reach ``t1`` raises ``SolveError``;
    otherwise check ``sol.status``. ``compile=True`` runs the per-step work through
    ``torch.compile(fullgraph=True)``.

    Events: ``event`` is an :class:`odeflux.Event`, a bare ``g(t, y)`` (a terminal event in both
    directions) or a sequence of events; see :mod:`odeflux.events` for how they are located and
    differentiated. A terminal event ends the solve there: ``sol.event_t`` and ``sol.event_y``
    hold its time (a 0-d tensor) and state, ``sol.t_final`` its time, saved times past it are
    dropped (``saveat`` is truncated; ``save_end`` saves the event state) and the status is
    ``SUCCESS``. With a terminal event ``t_span`` may end at ``inf`` (or ``-inf``): the solve runs
    until the event fires, or fails with ``MAX_STEPS``. Every occurrence, terminal or not, is in
    ``sol.events`` as ``EventRecord(t, y, index)`` (``y`` before any jump). A non-terminal event
    with a ``jump`` restarts the solve from ``jump(t, y)``; the saved states of the segments are
    stitched in order (``save_everystep`` saves both the state before and after a jump, at the
    same time). Event times and states are differentiable under every ``sensealg``.

    Per-sample solves: ``batch_axis=0`` makes each sample along axis 0 of ``y0`` its own problem
    (its own steps, error norm, status and counters; :mod:`odeflux.per_sample`). ``f(t, y)`` then
    gets ``t`` of shape ``(batch,)``, one time per sample; ``t_span``'s ends may be one per
    sample, and ``saveat`` ``(batch, n)`` times (NaN pads shorter rows). ``sol.ts`` is
    ``(batch, n)``, ``sol.ys`` ``(batch, n, ...)`` (NaN where a sample never got);
    ``sol.statuses`` and ``sol.sample_stats`` are per sample, ``sol.status`` the worst.
    Their gradients: ``sensealg=None``/``DirectAdjoint()`` backpropagates through the per-sample
    loop; ``BacksolveAdjoint``, ``InterpolatingAdjoint``, ``GaussAdjoint`` and ``QuadratureAdjoint``
    solve each sample's adjoint backwards on its own steps (``vjp="autograd"`` or ``"func"``).
    """
    if autocast_of(y0) is not None:  # (first: locals() are solve's arguments)
        return _solve_under_autocast(**locals())
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {compile!r}")
    if _under_vmap(y0, args):
        raise ValueError(
            "odeflux.solve cannot run under torch.func.vmap: a solve decides each step on the host (its error, "
            "the end of the span), which vmap cannot batch. Solve the batch as one state (y0 with a batch axis), "
            "or each sample with its own steps: batch_axis=0"
        )
    if batch_axis is not None:
        given = {
            "params": params is not None, "save_everystep": save_everystep, "save_end=False": not save_end, "dense": bool(dense), "norm": norm is not None,
            "step_times": step_times is not None, "jump_times": jump_times is not None, "perturb": perturb,
            "callbacks": callbacks is not None, "event": event is not None, "a structured y0": is_tree(y0),
        }  # fmt: skip
        refused = [name for name, on in given.items() if on]
        if refused:
            raise ValueError(f"per-sample solves (batch_axis=) do not take {', '.join(refused)}: drop them, or batch_axis")
        from .per_sample import solve_per_sample

        return solve_per_sample(
            f, y0, t_span, solver=solver, args=args, rtol=rtol, atol=atol, saveat=saveat, dt0=dt0, dtmin=dtmin,
            dtmax=dtmax, max_steps=max_steps, controller=controller, sensealg=sensealg, throw=throw, compile=compile,
            batch_axis=batch_axis, save_start=save_start,
        )  # fmt: skip
    if needs_flattening(y0):
        return _solve_tree(
            f, y0, t_span, norm, args,
            dict(solver=solver, params=params, rtol=rtol, atol=atol, saveat=saveat, save_everystep=save_everystep,
                 save_start=save_start, save_end=save_end, dense=dense, dt0=dt0, dtmin=dtmin, dtmax=dtmax,
                 max_steps=max_steps, controller=controller, sensealg=sensealg, throw=throw, compile=compile,
                 step_times=step_times, jump_times=jump_times, perturb=perturb, callbacks=callbacks),
            event,
        )  # fmt: skip
    events = as_events(event)
    problem, t_tensors = make_problem(
        f, y0, t_span, solver, args, params, rtol, atol, saveat, save_everystep, save_start, save_end, dense,
        dt0, dtmin, dtmax, max_steps, controller, compile, open_end=bool(events), norm=norm, step_times=step_times,
        jump_times=jump_times, perturb=perturb, callbacks=callbacks,
    )  # fmt: skip
    if math.isinf(problem.t1) and not any(e.terminal for e in events):
        raise ValueError(
            f"t_span ends at {problem.t1}: an infinite end needs a terminal event to stop the solve (event=Event(g))"
        )
    if sensealg is not None and not isinstance(sensealg, SensitivityAlgorithm) and sensealg != "auto":
        raise TypeError(
            f"sensealg must be a sensitivity algorithm such as odeflux.InterpolatingAdjoint(), or \"auto\", got {sensealg!r}"
        )
    save_grad = isinstance(saveat, torch.Tensor) and saveat.requires_grad and torch.is_grad_enabled()
    needs_grad = torch.is_grad_enabled() and (
        problem.y0.requires_grad or any(p.requires_grad for p in problem.params) or any(t is not None for t in t_tensors)
        or save_grad
    )
    t0_tensor, t1_tensor = t_tensors
    if sensealg == "auto":
        sensealg = choose_sensealg(problem) if needs_grad else None
    y0_given = problem.y0
    if needs_grad and t0_tensor is not None:
        # y(t; t0 + d, y0) = y(t; t0, y0 - d f(t0, y0)) to first order: dL/dt0 = -<dL/dy0, f(t0, y0)>.
        with torch.no_grad():
            f0 = problem.f(torch.full((), problem.t0, dtype=problem.y0.dtype, device=problem.y0.device), problem.y0)
        shift = (t0_tensor - t0_tensor.detach()).to(problem.y0.dtype)
        problem.y0 = problem.y0 - shift * f0
    if events:
        sol = solve_with_events(problem, events, sensealg)
    elif not needs_grad:
        sol = solution_from_result(problem.integrate(), problem)
    else:
        sol = (sensealg if sensealg is not None else _DIRECT).solve(problem)
    if needs_grad:
        sol.sensealg = sensealg if sensealg is not None else _DIRECT
    if problem.y0 is not y0_given and len(sol.ts) and float(sol.ts[0]) == problem.t0:
        # The state saved at t0: y0 itself where the start is saved (it moves with t0); at a
        # saveat time that equals t0, the state there, which moving t0 shifts.
        first = y0_given if problem.saveat is None else problem.y0
        sol.ys = torch.cat([first.unsqueeze(0), sol.ys[1:]])
    if (
        needs_grad and t1_tensor is not None and problem.saveat is None and sol.status == Status.SUCCESS
        and len(sol.ts) and float(sol.ts[-1]) == problem.t1
    ):  # fmt: skip
        # dL/dt1 = <dL/dy(t1), f(t1, y(t1))> for the state saved at t1 (saveat times stay put).
        with torch.no_grad():
            f1 = problem.f(torch.full((), problem.t1, dtype=problem.y0.dtype, device=problem.y0.device), sol.ys[-1])
        shift = (t1_tensor - t1_tensor.detach()).to(problem.y0.dtype)
        last = sol.ys[-1] + shift * f1
        sol.ys = torch.cat([sol.ys[:-1], last.unsqueeze(0)])
    if save_grad and len(sol.ts):
        sol.ys = _saved_time_grads(problem, saveat, sol)
    if sol.status == Status.NONFINITE and not bool(torch.isfinite(y0.detach()).all()):
        # Checked only on failure: up front it would cost a host synchronisation every solve.
        raise ValueError("y0 contains NaN or Inf: the initial state must be finite")
    if throw and sol.status != Status.SUCCESS:
        raise SolveError(f"solve failed ({sol.status.name}): {sol.message}", sol.status, sol)
    return sol


def _saved_time_grads(problem, saveat: torch.Tensor, sol: Solution) -> torch.Tensor:
    """The saved states with ``dy(s_i)/ds_i = f(s_i, y(s_i))`` attached to the saveat times."""
    n = sol.ys.shape[0]
    times = saveat.reshape(-1)[:n]
    with torch.no_grad():
        fs = torch.stack([problem.f(torch.full((), float(t), dtype=sol.ys.dtype, device=sol.ys.device), y) for t, y in zip(sol.ts.tolist(), sol.ys)])
    shift = (times - times.detach()).to(sol.ys.dtype).reshape((n,) + (1,) * (sol.ys.ndim - 1))
    return sol.ys + shift * fs


_IS_BATCHED = getattr(torch._C._functorch, "is_batchedtensor", None)  # (torch.func.vmap's batched tensors)


def _solve_under_autocast(f: Callable[..., Any], y0: Any, t_span: Any, **kw: Any) -> Solution:
    """:func:`solve` under ``torch.autocast``: the field under it, the solver's arithmetic outside
    it, a float16/bfloat16 ``y0`` integrated in float32 (:mod:`odeflux.autocast`)."""
    kind, dtype = autocast_of(y0)
    with engine_outside(kind):
        return solve(under_autocast(f, kind, dtype, kw["args"] is not None), promoted(y0), t_span, **kw)


def _under_vmap(y0: Any, args: Any) -> bool:
    """Whether a tensor of the state or of ``args`` is batched by ``torch.func.vmap``."""
    if _IS_BATCHED is None:
        return False
    if isinstance(y0, torch.Tensor) and args is None:  # (the common case, without a tree walk)
        return _IS_BATCHED(y0)
    return any(isinstance(x, torch.Tensor) and _IS_BATCHED(x) for x in pytree.tree_leaves((y0, args)))


def _solve_tree(f: Callable[..., Any], y0: Any, t_span: Any, norm: Any, args: Any, kwargs: dict, event: Any) -> Solution:
    """:func:`solve` of a structured state: one flat state underneath (see :mod:`odeflux.tree`)."""
    flat, spec = flatten(y0)
    f = as_field(f, args is not None)
    if not callable(f):
        raise TypeError(f"f must be callable as f(t, y), got {type(f).__name__}")
    if norm is not None and not callable(norm):
        raise TypeError(f"norm must be a function of the scaled error returning a scalar tensor, got {norm!r}")
    events = [_tree_event(e, spec) for e in as_events(event)]
    cb = kwargs.get("callbacks")
    if cb is not None:  # (each called with the state in its structure)
        kwargs = dict(kwargs, callbacks=StepCallbacks(
            step=_tree_callback(cb.step, spec), accept=_tree_callback(cb.accept, spec), reject=_tree_callback(cb.reject, spec)
        ))  # fmt: skip
    sol = solve(
        TreeField(f, spec), flat, t_span, args=args, norm=None if norm is None else tree_norm(norm, spec),
        event=events or None, **kwargs,
    )  # fmt: skip
    sol.tree = spec
    sol.ys = spec.unflatten(sol.ys, batch=(sol.ys.shape[0],))
    if sol.event_y is not None:
        sol.event_y = spec.unflatten(sol.event_y)
    sol.events = [EventRecord(r.t, spec.unflatten(r.y), r.index) for r in sol.events]
    return sol


def _tree_callback(callback: Callable | None, spec: Any) -> Callable | None:
    return None if callback is None else (lambda t, y, dt: callback(t, spec.unflatten(y), dt))


def _tree_event(e: Event, spec: Any) -> Event:
    """An event of a structured state as an event of the flat state."""
    g, jump = e.g, e.jump
    flat_jump = None if jump is None else (lambda t, y: flatten(jump(t, spec.unflatten(y)), spec, where="jump(t, y)")[0])
    return dataclasses.replace(e, g=lambda t, y: g(t, spec.unflatten(y)), jump=flat_jump)
