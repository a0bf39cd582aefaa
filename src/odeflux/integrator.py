"""The adaptive time-stepping loop: step, control, save, keep dense output.

It knows nothing of autograd: whatever graph the solver's tensor operations build is the caller's
business (the discrete adjoint differentiates through it; the continuous adjoints run it under
``torch.no_grad``). Per step the host reads one number from the device, the error norm of the
step, and only for adaptive methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import small_cpu
from .control import StepSizeController, error_ratio, initial_step
from .solution import DenseOutput, Stats, Status
from .solvers.tableau import ExplicitRK

VectorField = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepFn = Callable[..., tuple]


#: The ways to pick the first step of an adaptive solve with no ``dt0`` (see :func:`_integrate`).
FIRST_STEPS = ("hairer", "interval")


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


def rk_step_with_error(
    solver: ExplicitRK, f: VectorField, t: torch.Tensor, y: torch.Tensor, dt: float, k: torch.Tensor, co, rtol: float, atol: float, n: int | None
):
    """The per-step work: one Runge-Kutta step and its scaled error norm (``None`` if fixed-step).

    Pure tensor code with no host synchronisation: this is what ``torch.compile`` traces.
    """
    y1, err, K = solver.step(f, t, y, dt, k, co)
    if err is None:
        return y1, K, None
    if torch.is_grad_enabled():
        with torch.no_grad():
            e = error_ratio(err, y, y1, rtol, atol, n)
    else:
        e = error_ratio(err, y, y1, rtol, atol, n)
    return y1, K, e


def integrate(f: VectorField, y0: torch.Tensor, t0: float, t1: float, solver: ExplicitRK, **options: Any) -> IntegrationResult:
    """Integrate ``dy/dt = f(t, y)`` from ``t0`` to ``t1`` (either direction) with ``solver``.

    The options are :func:`_integrate`'s. Small CPU states step through NumPy
    (:mod:`odeflux.small_cpu`), with NumPy's BLAS held to one thread meanwhile.
    """
    if options.get("step_fn") is None and small_cpu.step_applies(y0):
        with small_cpu.one_blas_thread:
            return _integrate(f, y0, t0, t1, solver, numpy_steps=True, **options)
    return _integrate(f, y0, t0, t1, solver, numpy_steps=False, **options)


def _integrate(
    f: VectorField,
    y0: torch.Tensor,
    t0: float,
    t1: float,
    solver: ExplicitRK,
    *,
    numpy_steps: bool,
    rtol: float,
    atol: float,
    controller: StepSizeController,
    dt0: float | None = None,
    dtmin: float | None = None,
    dtmax: float | None = None,
    max_steps: int = 100_000,
    saveat: Sequence[float] | None = None,
    save_everystep: bool = False,
    save_start: bool = True,
    save_end: bool = True,
    dense: bool = False,
    error_size: int | None = None,
    k0: torch.Tensor | None = None,
    step_fn: StepFn | None = None,
    float_time: bool = False,
    on_accept: Callable[[float, float, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
    dense_budget: int | None = None,
    first_step: str = "hairer",
) -> IntegrationResult:
    """:func:`integrate`'s work; ``numpy_steps``: step through :func:`odeflux.small_cpu.rk_step`.

    ``saveat`` (host times, in the direction of integration) replaces the default saving of the
    start and end states; ``save_everystep`` adds every accepted step. ``error_size`` limits the
    error norm to the first entries of the flattened state (a seminorm). ``k0`` is ``f(t0, y0)``
    if the caller already has it. ``step_fn`` replaces :func:`rk_step_with_error` (a compiled copy).
    ``float_time=True`` hands ``f`` host floats for ``t`` instead of 0-d tensors (the adjoints' own
    right-hand sides look up the forward's interpolant by host time, with no device round trip).
    ``on_accept(t, dt, y, y1, K)`` is called after each accepted step. ``dense_budget`` (bytes)
    stops keeping dense output, and drops what was kept, once it would take more than that.
    ``first_step`` (adaptive steps with no ``dt0``): ``"hairer"`` starts from Hairer's estimate
    (one extra evaluation); ``"interval"`` first tries the whole span (up to ``dtmax``) as one
    step and, if the error estimate rejects it, goes on from the smaller of the controller's
    proposal and Hairer's estimate. The adjoints use it: their systems are often smooth enough
    to be crossed in far fewer steps than the forward took.
    """
    direction = 1.0 if t1 > t0 else -1.0
    stats = Stats()
    dtype, device = y0.dtype, y0.device
    co = solver.coefficients(dtype, device)
    adaptive = solver.adaptive and controller.adaptive
    order = solver.error_order
    # Small CPU states outside autograd step through NumPy (odeflux.small_cpu): same arithmetic,
    # a fraction of torch's per-op cost at these sizes.
    step = small_cpu.rk_step if numpy_steps else (step_fn or rk_step_with_error)
    freeze = getattr(f, "frozen", None)
    if freeze is not None and step_fn is None and not torch.is_grad_enabled():
        # A field that can evaluate itself with its checks done once for the whole solve (no graph
        # is recorded here, so nothing is lost): see odeflux.fields.MLP.frozen.
        f = freeze(y0) or f
    # A field that evaluates on the NumPy step's arrays (a frozen one): the whole solve stays on them.
    on_arrays = getattr(f, "on_arrays", None) if numpy_steps else None
    span = abs(t1 - t0)
    tscale = max(abs(t0), abs(t1), 1.0)
    # The last step lands exactly on t1 rather than leaving a sliver of a step behind.
    land_tol = 64 * 2.0**-52 * tscale
    if dtmin is None:
        # Time runs in float64 on the host, so |t| only bounds dtmin through float64's eps; the state's
        # precision bounds it relative to the span (smaller steps could not cross it within max_steps).
        dtmin = max(16 * 2.0**-52 * tscale, 16 * torch.finfo(dtype).eps * span) if adaptive else 0.0
    dtmax = span if dtmax is None else min(abs(dtmax), span)

    ts: list[float] = []
    ys: list[torch.Tensor] = []
    dense_t: list[float] = []
    dense_dt: list[float] = []
    dense_y: list[torch.Tensor] = []
    dense_K: list[torch.Tensor] = []
    save_times = list(saveat) if saveat is not None else None
    si = 0

    def as_time(t: float) -> torch.Tensor | float:
        return t if float_time else torch.full((), t, dtype=dtype, device=device)

    t, y = t0, y0
    k = k0
    if k is None:
        if on_arrays is not None:  # (a frozen field: its output is the state's shape and dtype by construction)
            y0_np = small_cpu.as_array(y0)
            k_np = np.empty_like(y0_np)
            on_arrays(t0, y0_np, k_np)
            k = torch.from_numpy(k_np)
        else:
            k = f(as_time(t0), y0)
            _check_derivative(k, y0)
        stats.n_f_evals += 1

    def result(status: Status, message: str, dt_next: float) -> IntegrationResult:
        dense_out = (
            DenseOutput(solver, dense_t, dense_dt, dense_y, dense_K, True if numpy_steps else None)
            if dense and dense_dt else None
        )  # fmt: skip
        t_end = t1 if status == Status.SUCCESS else t
        # On failure this is the last state reached, so the caller sees how far it got (saved once:
        # save_start or save_everystep may already hold it).
        if save_end and save_times is None and not (ts and ts[-1] == t_end):
            ts.append(t_end)
            ys.append(y)
        return IntegrationResult(ts, ys, t, y, k, dt_next, stats, status, message, dense_out)

    if save_times is None:
        if save_start:
            ts.append(t0)
            ys.append(y0)
    else:
        while si < len(save_times) and direction * (save_times[si] - t0) <= 0:
            ts.append(save_times[si])
            ys.append(y0)
            si += 1

    def hairer_start(t: float, y: torch.Tensor, k: torch.Tensor) -> float:
        # Hairer's estimate from (t, y), with f(t, y) = k; NaN where the start itself is not finite.
        # As OrdinaryDiffEq: never below dtmin, or the first proposal could end the solve (DT_MIN).
        h, extra = initial_step(f, t, y, k, direction, order, rtol, atol, dtmax, error_size, float_time, numpy_steps)
        stats.n_f_evals += extra
        return max(h, dtmin) if math.isfinite(h) else h

    if first_step not in FIRST_STEPS:
        raise ValueError(f"first_step={first_step!r}: choose one of {', '.join(FIRST_STEPS)}")
    speculative = False  # the first step is a try at the whole span (first_step="interval")
    if dt0 is not None:
        dt = abs(dt0)
    elif not adaptive:
        raise ValueError(f"{type(solver).__name__} takes fixed steps: pass dt0= (the step size)")
    elif first_step == "interval":
        dt, speculative = dtmax, True
    else:
        dt = hairer_start(t0, y0, k)
        if not math.isfinite(dt):
            return result(Status.NONFINITE, _nonfinite_message(t0, None), float("nan"))
    dt = min(dt, dtmax)
    ctrl_state = controller.init_state()
    last_err = 0.0

    while direction * (t1 - t) > 0:
        if stats.n_steps >= max_steps:
            return result(
                Status.MAX_STEPS,
                f"max_steps={max_steps} steps were taken and t={t:.6g} has not reached t1={t1:.6g} "
                f"(last dt={dt:.3g}): raise max_steps, loosen rtol/atol, or check whether the problem is stiff",
                dt,
            )
        remaining = abs(t1 - t)
        last = dt >= remaining - land_tol
        h = direction * (remaining if last else dt)
        y1, K, err = step(solver, f, as_time(t), y, h, k, co, rtol, atol, error_size)
        stats.n_steps += 1
        stats.n_f_evals += K.shape[0] - 1
        if adaptive:
            last_err = float(err)  # the one host synchronisation per step
            accept, dt_new, ctrl_state = controller.propose(abs(h), last_err, ctrl_state, order)
            if speculative:
                speculative = False
                if not accept:
                    # The try at the whole span failed: go on as a cautious start would, from
                    # Hairer's estimate (one more evaluation) where it is the smaller step, and
                    # with the controller's memory of the failed try wiped.
                    h0 = hairer_start(t, y, k)
                    if not math.isfinite(h0):  # the start itself is not finite: no step size will do
                        return result(Status.NONFINITE, _nonfinite_message(t, None), float("nan"))
                    dt_new = min(dt_new, h0)
                    ctrl_state = controller.init_state()
        else:
            accept, dt_new = True, dt
        if accept:
            # Fixed steps: t0 + n h, so round-off does not pile up into a sliver of a last step.
            t_new = t1 if last else (t + h if adaptive else t0 + (stats.n_accepted + 1) * h)
            stats.n_accepted += 1
            if dense:
                dense_t.append(t)
                dense_dt.append(h)
                dense_y.append(y)
                dense_K.append(K)
                if dense_budget is not None and len(dense_K) * (K.numel() + y.numel()) * y.element_size() > dense_budget:
                    dense = False
                    dense_t, dense_dt, dense_y, dense_K = [], [], [], []
            if on_accept is not None:
                on_accept(t, h, y, y1, K)
            if save_times is not None:
                j = si
                while j < len(save_times) and direction * (save_times[j] - t_new) <= 0:
                    j += 1
                if j > si:
                    inner = [tau for tau in save_times[si:j] if tau != t_new]
                    if inner:
                        theta = torch.tensor([(tau - t) / h for tau in inner], dtype=dtype, device=device)
                        ys.extend(solver.interpolate(y, h, K, solver.dense_weights(theta, co)).unbind(0))
                        ts.extend(inner)
                    if len(inner) < j - si:
                        ts.append(t_new)
                        ys.append(y1)
                    si = j
            elif save_everystep and not last:
                ts.append(t_new)
                ys.append(y1)
            t, y = t_new, y1
            if solver.fsal:
                k = K[-1]
            else:
                k = None
                if direction * (t1 - t) > 0:
                    k = f(as_time(t), y)
                    stats.n_f_evals += 1
        else:
            stats.n_rejected += 1
        if adaptive:
            dt = min(dt_new, dtmax)
            if dt < dtmin and direction * (t1 - t) > 0:
                if not math.isfinite(last_err):
                    return result(Status.NONFINITE, _nonfinite_message(t, dt), dt)
                return result(
                    Status.DT_MIN,
                    f"the step size fell below dtmin={dtmin:.3g} at t={t:.6g} (dt={dt:.3g}): the problem may be "
                    "stiff or singular there; loosen rtol/atol, lower dtmin, or use float64",
                    dt,
                )

    if not adaptive and not bool(torch.isfinite(y).all()):
        return result(Status.NONFINITE, _nonfinite_message(t, dt, fixed_step=True), dt)
    return result(Status.SUCCESS, "", dt)


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
