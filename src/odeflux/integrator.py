"""The adaptive loop: step, accept or reject, save, keep dense output.

One integration is a small state object (:class:`_Integration`) with its collaborators: the step
kernel (:mod:`odeflux.kernels`, chosen once per solve: the per-step numerics), the step-size
controller (:mod:`odeflux.control`), the saver (which states the caller gets back) and the
dense recorder (the steps kept for interpolation). What a caller can ask of it is typed in
:class:`IntegrateOptions`. It records a graph only if the caller does (the discrete adjoint
differentiates through it; the continuous adjoints run it under ``torch.no_grad``). Per step the
host reads one number from the device, the error norm of the step, and only for adaptive methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .control import Parts, StepSizeController, initial_step
from .kernels import StepKernel, choose_step_kernel
from .kernels.torch_step import rk_step_with_error
from .compiled import compiled_loop
from .solution import DenseOutput, Stats, Status
from .solvers.implicit import NewtonFailure
from .solvers.rosenbrock import LinearSolveFailure
from .solvers.tableau import Solver

VectorField = Callable[[Any, torch.Tensor], torch.Tensor]
#: ``on_accept(t, h, y, y1, K)``: called after each accepted step from ``(t, y)`` to ``y1``; a
#: true return value ends the integration at the step's end (status SUCCESS; what was saved is then
#: not the solve's to return: odeflux.events discards it).
OnAccept = Callable[[float, float, torch.Tensor, torch.Tensor, torch.Tensor], "bool | None"]

#: The ways to pick the first step of an adaptive solve with no ``dt0`` (see :class:`IntegrateOptions`).
FIRST_STEPS = ("hairer", "interval")

__all__ = [
    "FIRST_STEPS", "IntegrateOptions", "IntegrationResult", "OnAccept", "StepCallbacks", "integrate", "nudge",
    "rk_step_with_error",
]  # fmt: skip


@dataclass(frozen=True)
class StepCallbacks:
    """Functions told of each step: ``step(t, y, dt)`` before each attempted step, ``accept``
    and ``reject`` after it (``t``, ``y`` and ``dt`` the step's start and size). What they
    return is ignored; they must not modify ``y``."""

    step: Callable[[Any, torch.Tensor, Any], Any] | None = None
    accept: Callable[[Any, torch.Tensor, Any], Any] | None = None
    reject: Callable[[Any, torch.Tensor, Any], Any] | None = None

    def __bool__(self) -> bool:
        return any(c is not None for c in (self.step, self.accept, self.reject))


def nudge(t: float, direction: float, dtype: torch.dtype) -> float:
    """The time next to ``t`` in ``direction``, representable in ``dtype`` (where a field with a
    discontinuity at ``t`` is evaluated on the side the solve goes on to)."""
    x = torch.tensor(t, dtype=dtype)
    return float(torch.nextafter(x, torch.tensor(t + direction, dtype=dtype)))


@dataclass(frozen=True)
class IntegrateOptions:
    """How one integration runs.

    ``saveat`` (host times, in the direction of integration) replaces the default saving of the
    start and end states; ``save_everystep`` adds every accepted step. ``dense`` keeps the steps
    for interpolation. What the adjoints and checkpoint re-solves ask for besides:
    ``error_parts`` splits the error norm into blocks of the flattened state, the largest of
    their RMS norms counting (:data:`odeflux.control.Parts`: a mixed norm, or a seminorm that
    leaves entries out); ``compiled`` steps through the compiled step; ``float_time`` hands ``f`` host
    floats for ``t`` instead of 0-d tensors; ``on_accept`` hears of each accepted step;
    ``dense_budget`` (bytes) stops keeping dense output, and drops what was kept, once it would
    take more than that. ``dense_stages=False``: the caller reads only each kept step's start, size
    and start state (a reverse pass that recomputes the stages), so a compiled loop need not record
    the stages (its record, copied once a step, is then ``stages + 1`` times smaller). ``norm`` replaces the error norm: a function of the scaled error
    ``err / (atol + rtol * max(|y0|, |y1|))`` (in the state's shape) returning a 0-d tensor. ``step_times``: the
    steps land on each of these times; ``jump_times`` besides discard the FSAL derivative there and
    evaluate ``f`` again just past the time (a discontinuity of ``f``). ``perturb``: ``f`` is
    evaluated just inside each step (after its start, before its end), never on a step boundary.
    ``callbacks`` hear of each step attempted, accepted and rejected. ``first_step`` (adaptive steps with no ``dt0``): ``"hairer"`` starts from
    Hairer's estimate (one extra evaluation), ``"interval"`` first tries the whole span (up to
    ``dtmax``) as one step and, if the error estimate rejects it, goes on from the smaller of the
    controller's proposal and Hairer's estimate.
    """

    rtol: float
    atol: float
    controller: StepSizeController
    dt0: float | None = None
    dtmin: float | None = None
    dtmax: float | None = None
    max_steps: int = 100_000
    saveat: Sequence[float] | None = None
    save_everystep: bool = False
    save_start: bool = True
    save_end: bool = True
    dense: bool = False
    error_parts: Parts | None = None
    compiled: bool = False
    float_time: bool = False
    on_accept: OnAccept | None = field(default=None, compare=False)
    dense_budget: int | None = None
    dense_stages: bool = True
    first_step: str = "hairer"
    norm: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, compare=False)
    step_times: tuple[float, ...] = ()
    jump_times: tuple[float, ...] = ()
    perturb: bool = False
    callbacks: StepCallbacks | None = field(default=None, compare=False)
    #: The step-size controller's memory to start from (``None``: a fresh one), as a solve that
    #: goes on from where another stopped keeps it (an adjoint's intervals, ``first_step="continue"``).
    controller_state: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.first_step not in FIRST_STEPS:
            raise ValueError(f"first_step={self.first_step!r}: choose one of {', '.join(FIRST_STEPS)}")
        if self.norm is not None and self.error_parts is not None:
            raise ValueError("pass either norm= or error_parts=, not both")


@dataclass
class IntegrationResult:
    """The raw outcome of :func:`integrate`; :func:`odeflux.solve` turns it into a ``Solution``."""

    ts: list[float]
    ys: list[torch.Tensor]
    t: float  # the time reached
    y: torch.Tensor  # the state reached
    k: torch.Tensor | None  # f(t, y) at the time reached, when known (FSAL)
    dt_next: float  # the step size the controller proposed next
    stats: Stats
    status: Status = Status.SUCCESS
    message: str = ""
    dense: DenseOutput | None = field(default=None, repr=False)
    controller_state: Any = field(default=None, repr=False)  # the controller's memory at the end (adaptive)


def integrate(
    f: VectorField, y0: torch.Tensor, t0: float, t1: float, solver: Solver, options: IntegrateOptions
) -> IntegrationResult:
    """Integrate ``dy/dt = f(t, y)`` from ``t0`` to ``t1`` (either direction) with ``solver``."""
    if not solver.stepwise:  # it integrates whole spans itself (odeflux.ScipySolver)
        return solver.integrate_span(f, y0, t0, t1, options)
    kernel = choose_step_kernel(
        f, y0, solver, rtol=options.rtol, atol=options.atol, parts=options.error_parts,
        float_time=options.float_time, compiled=options.compiled, norm=options.norm, perturb=options.perturb,
        jumps=bool(options.jump_times),
    )  # fmt: skip
    # (compile=True on a field whose NumPy kernel applies takes that kernel: see choose_step_kernel.)
    program = compiled_loop(f, solver, options, y0) if options.compiled and not kernel.arrays else None
    with kernel.running():
        return _Integration(kernel, y0, t0, t1, solver, options).run(program)


class _Saver:
    """Which states the caller gets back: the start and end, every step, or ``saveat`` times
    (interpolated inside steps, never forcing one)."""

    def __init__(self, opts: IntegrateOptions, solver: Solver, t0: float, y0: torch.Tensor, direction: float):
        self.solver, self.direction = solver, direction
        self.save_everystep, self.save_end = opts.save_everystep, opts.save_end
        self.times = list(opts.saveat) if opts.saveat is not None else None
        self.ts: list[float] = []
        self.ys: list[torch.Tensor] = []
        self.si = 0
        if self.times is None:
            if opts.save_start:
                self.ts.append(t0)
                self.ys.append(y0)
        else:
            while self.si < len(self.times) and direction * (self.times[self.si] - t0) <= 0:
                self.ts.append(self.times[self.si])
                self.ys.append(y0)
                self.si += 1

    def accepted(self, t: float, h: float, y: torch.Tensor, y1: torch.Tensor, K: torch.Tensor, t_new: float, last: bool) -> None:
        times = self.times
        if times is None:
            if self.save_everystep and not last:
                self.ts.append(t_new)
                self.ys.append(y1)
            return
        j, si, direction = self.si, self.si, self.direction
        while j < len(times) and direction * (times[j] - t_new) <= 0:
            j += 1
        if j == si:
            return
        inner = [tau for tau in times[si:j] if tau != t_new]
        if inner:
            solver = self.solver
            theta = torch.tensor([(tau - t) / h for tau in inner], dtype=y.dtype, device=y.device)
            co = solver.coefficients(y.dtype, y.device)
            self.ys.extend(solver.interpolate(y, h, K, solver.dense_weights(theta, co)).unbind(0))
            self.ts.extend(inner)
        if len(inner) < j - si:
            self.ts.append(t_new)
            self.ys.append(y1)
        self.si = j

    def finish(self, t_end: float, y: torch.Tensor) -> tuple[list[float], list[torch.Tensor]]:
        # On failure this is the last state reached, so the caller sees how far it got (saved once:
        # save_start or save_everystep may already hold it).
        if self.save_end and self.times is None and not (self.ts and self.ts[-1] == t_end):
            self.ts.append(t_end)
            self.ys.append(y)
        return self.ts, self.ys


class _DenseRecorder:
    """The accepted steps kept for interpolation, within an optional byte budget."""

    def __init__(self, on: bool, budget: int | None, stages: bool = True):
        self.on, self.budget, self.stages = on, budget, stages
        self.t: list[float] = []
        self.dt: list[float] = []
        self.y: list[torch.Tensor] = []
        self.K: list[torch.Tensor] = []
        self.record: tuple[torch.Tensor, ...] | None = None  # (a compiled loop's: DenseOutput.record)

    def accepted(self, t: float, h: float, y: torch.Tensor, K: torch.Tensor) -> None:
        if not self.on:
            return
        self.t.append(t)
        self.dt.append(h)
        self.y.append(y)
        if self.stages:  # (without them the output is the steps only: a reverse pass recomputes them)
            self.K.append(K)
        if self.budget is not None and len(self.y) * (K.numel() * self.stages + y.numel()) * y.element_size() > self.budget:
            self.on = False
            self.t, self.dt, self.y, self.K = [], [], [], []

    def output(self, solver: Solver, on_arrays: bool) -> DenseOutput | None:
        if not (self.on and self.dt):
            return None
        return DenseOutput(solver, self.t, self.dt, self.y, self.K, on_arrays, record=self.record)


class _Integration:
    """One integration's state: where it is, the step it tries next, and its collaborators."""

    def __init__(self, kernel: StepKernel, y0: torch.Tensor, t0: float, t1: float, solver: Solver, opts: IntegrateOptions):
        self.kernel, self.solver, self.opts = kernel, solver, opts
        self.t0, self.t1 = t0, t1
        self.direction = 1.0 if t1 > t0 else -1.0
        self.stats = Stats()
        self.ctrl_state: Any = None  # the controller's memory after the last step (IntegrationResult.controller_state)
        self.controller = opts.controller
        self.adaptive = solver.adaptive and opts.controller.adaptive
        span = abs(t1 - t0)
        tscale = max(abs(t0), abs(t1), 1.0)
        # The last step lands exactly on t1 rather than leaving a sliver of a step behind.
        self.land_tol = 64 * 2.0**-52 * tscale
        dtmin = opts.dtmin
        if dtmin is None:
            # Time runs in float64 on the host, so |t| only bounds dtmin through float64's eps; the
            # state's precision bounds it relative to the span (smaller steps could not cross it
            # within max_steps).
            dtmin = max(16 * 2.0**-52 * tscale, 16 * torch.finfo(y0.dtype).eps * span) if self.adaptive else 0.0
        self.dtmin = dtmin
        self.dtmax = span if opts.dtmax is None else min(abs(opts.dtmax), span)
        self.t, self.y = t0, y0
        self.k: torch.Tensor | None = None
        # The times steps land on before t1, in the direction of integration.
        d = self.direction
        inside = {float(s) for s in (*opts.step_times, *opts.jump_times) if d * (s - t0) > self.land_tol and d * (t1 - s) > self.land_tol}
        self.stops = sorted(inside, key=lambda s: d * s)
        self.jumps = {float(s) for s in opts.jump_times}
        self.callbacks = opts.callbacks or None
        self.saver = _Saver(opts, solver, t0, y0, self.direction)
        self.dense = _DenseRecorder(opts.dense, opts.dense_budget, opts.dense_stages)

    # -- the outcome -------------------------------------------------------------------------
    def result(self, status: Status, message: str, dt_next: float) -> IntegrationResult:
        # The linear-algebra counters of (linearly) implicit steppers that keep them.
        for name, v in (getattr(self.kernel, "counters", None) or {}).items():
            setattr(self.stats, name, getattr(self.stats, name) + v)
        dense = self.dense.output(self.solver, self.kernel.arrays)
        ts, ys = self.saver.finish(self.t1 if status == Status.SUCCESS else self.t, self.y)
        return IntegrationResult(ts, ys, self.t, self.y, self.k, dt_next, self.stats, status, message, dense, self.ctrl_state)

    def max_steps_message(self, dt: float) -> str:
        return (
            f"max_steps={self.opts.max_steps} steps were taken and t={self.t:.6g} has not reached t1={self.t1:.6g} "
            f"(last dt={dt:.3g}): raise max_steps, loosen rtol/atol, or check whether the problem is stiff"
        )

    def dt_min_message(self, dt: float) -> str:
        return (
            f"the step size fell below dtmin={self.dtmin:.3g} at t={self.t:.6g} (dt={dt:.3g}): the problem "
            "may be stiff or singular there; loosen rtol/atol, lower dtmin, or use float64"
        )

    def hairer(self) -> float:
        """Hairer's estimate from where the solve is; NaN where the start itself is not finite.
        As OrdinaryDiffEq: never below dtmin, or the first proposal could end the solve (DT_MIN)."""
        norms = self.kernel.norms(self.t, self.y, self.k)
        h, extra = initial_step(norms, self.t, self.direction, self.solver.error_order, self.dtmax)
        self.stats.n_f_evals += extra
        return max(h, self.dtmin) if math.isfinite(h) else h

    # -- an adaptive implicit step whose Newton iteration failed ------------------------------
    #: The factor a step shrinks by when its Newton iteration fails (OrdinaryDiffEq's range is
    #: 0.25-0.5; a quarter gets below a sharp transient's scale in fewer failed tries).
    NEWTON_SHRINK = 0.25

    def newton_rejected(self, exc: NewtonFailure, t: float, y: torch.Tensor, h: float, speculative: bool) -> tuple[float, IntegrationResult | None]:
        """Count the failed step as a rejected one and return the next step size (a quarter of
        it, or Hairer's estimate after a failed try at the whole span), or the result that ends
        the solve where that falls below dtmin."""
        stats, callbacks = self.stats, self.callbacks
        stats.n_steps += 1
        stats.n_rejected += 1
        stats.n_f_evals += exc.n_evals
        if callbacks is not None and callbacks.reject is not None:
            callbacks.reject(self.kernel.time(t), y, h)
        dt = abs(h) * self.NEWTON_SHRINK
        if speculative:
            dt = min(dt, self.hairer())
        if not dt >= self.dtmin:
            return dt, self.result(
                Status.NEWTON_FAILED,
                f"{exc} (the step fell below dtmin={self.dtmin:.3g} retrying it: the problem may be singular there; "
                "loosen rtol/atol, lower dtmin or raise max_iters)",
                dt,
            )
        return dt, None

    # -- the loop ----------------------------------------------------------------------------
    def run(self, program: Any = None) -> IntegrationResult:
        """Evaluate ``f`` at ``t0`` (its output checked here, with the eager error messages), then
        choose the first step size and step to ``t1``: on the host, or as the compiled ``program``
        (:class:`odeflux.compiled.LoopProgram`, which chooses its first step inside) where one is given."""
        opts, kernel, stats, direction = self.opts, self.kernel, self.stats, self.direction
        self.k = kernel.evaluate(nudge(self.t0, direction, self.y.dtype) if opts.perturb else self.t0, self.y)
        _check_derivative(self.k, self.y)
        stats.n_f_evals += 1
        if opts.dt0 is None and not self.adaptive:
            raise ValueError(f"{type(self.solver).__name__} takes fixed steps: pass dt0= (the step size)")
        if program is not None:  # (its first step, dt0 or Hairer's estimate, is chosen inside it)
            return program.run(self)
        return self.start_eagerly()

    def start_eagerly(self) -> IntegrationResult:
        """The first step size chosen on the host (``dt0``, Hairer's estimate or the whole span),
        then the eager loop; ``f`` at ``t0`` is known (:meth:`run`)."""
        opts = self.opts
        speculative = False  # the first step is a try at the whole span (first_step="interval")
        if opts.dt0 is not None:
            dt = abs(opts.dt0)
        elif opts.first_step == "interval":
            dt, speculative = self.dtmax, True
        else:
            dt = self.hairer()
            if not math.isfinite(dt):
                return self.result(Status.NONFINITE, _nonfinite_message(self.t0, None), float("nan"))
        dt = min(dt, self.dtmax)
        return self.steps(dt, speculative)

    def steps(self, dt: float, speculative: bool) -> IntegrationResult:
        """The eager loop, from the first step size ``dt``."""
        opts, kernel, stats, direction, t1 = self.opts, self.kernel, self.stats, self.direction, self.t1
        callbacks, stops = self.callbacks, self.stops
        ctrl_state = self.controller.init_state() if opts.controller_state is None else opts.controller_state
        order = self.solver.error_order
        last_err = 0.0
        si = 0  # the next stop
        grid_t0, grid_n = self.t0, 0  # fixed steps: grid_t0 + n h, restarted at each stop

        while direction * (t1 - self.t) > 0:
            if stats.n_steps >= opts.max_steps:
                return self.result(Status.MAX_STEPS, self.max_steps_message(dt), dt)
            t, y = self.t, self.y
            target = stops[si] if si < len(stops) else t1
            remaining = abs(target - t)
            lands = dt >= remaining - self.land_tol  # this step ends on the next stop (or t1)
            last = lands and si == len(stops)
            h = direction * (remaining if lands else dt)
            if callbacks is not None and callbacks.step is not None:
                callbacks.step(kernel.time(t), y, h)
            try:
                if lands and not last and target in self.jumps:
                    y1, K, err = kernel.step(t, y, h, self.k, inside_end=True)
                else:
                    y1, K, err = kernel.step(t, y, h, self.k)
            except NewtonFailure as exc:  # an implicit step: reported as a status, like the others
                if not self.adaptive:
                    return self.result(Status.NEWTON_FAILED, str(exc), dt)
                dt, failed = self.newton_rejected(exc, t, y, h, speculative)
                if failed is not None:
                    return failed
                speculative = False
                continue
            except LinearSolveFailure as exc:  # a Rosenbrock step's singular or non-finite matrix
                return self.result(exc.status, str(exc), dt)
            stats.n_steps += 1
            stats.n_f_evals += kernel.evaluations(K)
            if self.adaptive:
                last_err = float(err)  # the one host synchronisation per step
                accept, dt_new, ctrl_state = self.controller.propose(abs(h), last_err, ctrl_state, order)
                self.ctrl_state = ctrl_state
                if speculative:
                    speculative = False
                    if not accept:
                        # The try at the whole span failed: go on as a cautious start would, from
                        # Hairer's estimate (one more evaluation) where it is the smaller step, and
                        # with the controller's memory of the failed try wiped.
                        h0 = self.hairer()
                        if not math.isfinite(h0):  # the start itself is not finite: no step size will do
                            return self.result(Status.NONFINITE, _nonfinite_message(t, None), float("nan"))
                        dt_new = min(dt_new, h0)
                        ctrl_state = self.controller.init_state()
            else:
                accept, dt_new = True, dt
            if accept:
                # Fixed steps: t0 + n h, so round-off does not pile up into a sliver of a last step.
                grid_n += 1
                t_new = target if lands else (t + h if self.adaptive else grid_t0 + grid_n * h)
                stats.n_accepted += 1
                self.dense.accepted(t, h, y, K)
                if callbacks is not None and callbacks.accept is not None:
                    callbacks.accept(kernel.time(t), y, h)
                if opts.on_accept is not None and opts.on_accept(t, h, y, y1, K):
                    self.t, self.y, self.k = t_new, y1, None  # the caller stops here (an event in this step)
                    return self.result(Status.SUCCESS, "stopped by on_accept", dt_new)
                self.saver.accepted(t, h, y, y1, K, t_new, last)
                self.t, self.y = t_new, y1
                jumped = False
                if lands and not last:
                    si += 1
                    grid_t0, grid_n = t_new, 0
                    jumped = t_new in self.jumps
                if self.solver.fsal and not jumped and not opts.perturb:
                    self.k = K[-1]
                else:
                    self.k = None
                    if direction * (t1 - t_new) > 0:
                        # Past a jump f is evaluated just after it, on the side the solve goes on to.
                        t_eval = nudge(t_new, direction, y1.dtype) if jumped or opts.perturb else t_new
                        self.k = kernel.evaluate(t_eval, y1)
                        stats.n_f_evals += 1
            else:
                stats.n_rejected += 1
                if callbacks is not None and callbacks.reject is not None:
                    callbacks.reject(kernel.time(t), y, h)
            if self.adaptive:
                if accept and lands and dt_new < dt:
                    # A step cut short to land on a stop says little about the step size: a sliver
                    # must not shrink the next step.
                    dt_new = dt
                dt = min(dt_new, self.dtmax)
                if dt < self.dtmin and direction * (t1 - self.t) > 0:
                    if not math.isfinite(last_err):
                        return self.result(Status.NONFINITE, _nonfinite_message(self.t, dt), dt)
                    return self.result(Status.DT_MIN, self.dt_min_message(dt), dt)

        if not self.adaptive and not bool(torch.isfinite(self.y).all()):
            return self.result(Status.NONFINITE, _nonfinite_message(self.t, dt, fixed_step=True), dt)
        return self.result(Status.SUCCESS, "", dt)


def _check_derivative(k: object, y0: torch.Tensor) -> None:
    if not isinstance(k, torch.Tensor):
        raise TypeError(f"f(t, y) must return a tensor, got {type(k).__name__}")
    if k.shape != y0.shape:
        raise ValueError(
            f"f(t, y) returned shape {tuple(k.shape)} for a state of shape {tuple(y0.shape)}: "
            "the derivative must have the state's shape"
        )
    if k.dtype != y0.dtype:
        raise ValueError(
            f"f(t, y) returned dtype {k.dtype} for a state of dtype {y0.dtype}: make f return the state's dtype "
            "(or pass y0 in the dtype f computes in)"
        )
    if k.device != y0.device:
        raise ValueError(f"f(t, y) returned a tensor on {k.device} for a state on {y0.device}: keep f on the state's device")


def _nonfinite_message(t: float, dt: float | None, fixed_step: bool = False) -> str:
    where = f"t={t:.6g}" + (f" (dt={dt:.3g})" if dt is not None else "")
    if fixed_step:
        # Fixed steps check finiteness once, at the end (no per-step sync), so t is only a bound.
        where = f"some t up to {where} (fixed-step solves check only the final state; save_everystep=True shows where)"
    return (
        f"the solution became NaN or Inf at {where}: f produced a non-finite value. Check f for overflow or "
        "division by zero there, try float64, or tighten rtol/atol"
    )
