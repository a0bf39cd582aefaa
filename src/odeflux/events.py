"""Events: stop a solve, or jump its state, where a function of ``(t, y)`` changes sign.

How a solve with events runs. The time span is cut into segments, each ending at an event (or at
``t1``). For each segment:

1. *Locate* (no graph): integrate from the segment's start with an ``on_accept`` hook that
   evaluates every ``g`` at each accepted step's end. Where one changes sign (in a direction the
   event listens to), its root is found on the solver's own dense interpolant inside that step by
   the Illinois method (a bracketing secant, bisection as a safeguard), and the integration stops.
2. *Solve* the segment from its start to the located time ``t*`` with the problem's sensitivity
   method (any of them: the segment is an ordinary :class:`~odeflux.problem.Problem` with
   ``t1 = t*``), saving what the caller asked for inside it. Where no gradient is needed (and
   ``t1`` is finite) the locating pass saves as the solve would and is kept: only the step the
   event is in is solved again, from its start to ``t*``.
3. *Differentiate the event time* by the implicit function theorem: with ``y*`` the segment's
   (differentiable) state at ``t*``, ``t_e = t* - (g(t*, y*) - [g]) / [dg/dt + dg/dy . f]``, where
   ``[.]`` is a constant (detached) value: ``t_e`` equals ``t*`` and its gradient is
   ``-(dg/dtheta) / (dg/dt)`` along the trajectory. The event state ``y_e = y* + [f(t*, y*)] (t_e - t*)``
   carries the time shift in its gradient. A jump gives ``y+ = jump(t_e, y_e)`` and the next
   segment starts from ``y+ - [f(t*, y+)] (t_e - t*)``, so its states feel the moving start time.

A non-terminal event with no jump also ends a segment (the solve restarts with a fresh step), so
that its time is differentiable as well.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

import torch

from .integrator import IntegrationResult
from .solution import DenseOutput, Solution, Stats, Status, times_tensor

if TYPE_CHECKING:
    from .problem import Problem
    from .sensitivity import SensitivityAlgorithm

__all__ = ["Event", "EventRecord", "as_events", "solve_with_events"]

EventFunction = Callable[[torch.Tensor, torch.Tensor], Any]


@dataclass(frozen=True)
class Event:
    """An event: where ``g(t, y)`` (a scalar tensor; ``t`` is a 0-d tensor) changes sign.

    ``direction``: ``+1`` fires only where ``g`` rises through zero, ``-1`` only where it falls,
    ``0`` both ways. ``terminal=True`` ends the solve at the event; a non-terminal event is
    recorded and the solve goes on, from ``jump(t, y)`` when ``jump`` is given (it returns the new
    state, of ``y``'s shape and dtype). ``xtol`` bounds the located time's error against the sign
    change of ``g`` along the solver's interpolant (default ``4 eps max(|t0|, |t1|, |t|, |h|)``,
    with ``eps`` the state dtype's, ``t`` and ``h`` the step's start and size, an infinite ``t1``
    left out: a few ulps of the time); the interpolant itself is as accurate as the solve
    (``rtol``/``atol``), which bounds the error against the exact event. ``g`` is one scalar for
    the whole state (a batch is one state). A sign change and back within one step is not seen.
    """

    g: EventFunction
    terminal: bool = True
    direction: int = 0
    jump: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    xtol: float | None = None

    def __post_init__(self) -> None:
        if not callable(self.g):
            raise TypeError(f"Event: g must be callable as g(t, y), got {type(self.g).__name__}")
        if self.direction not in (-1, 0, 1):
            raise ValueError(f"Event: direction must be -1, 0 or +1, got {self.direction!r}")
        if self.jump is not None:
            if not callable(self.jump):
                raise TypeError(f"Event: jump must be callable as jump(t, y), got {type(self.jump).__name__}")
            if self.terminal:
                raise ValueError("Event: a jump needs terminal=False (a terminal event ends the solve; nothing follows)")
        if self.xtol is not None and not (self.xtol > 0 and math.isfinite(self.xtol)):
            raise ValueError(f"Event: xtol must be positive and finite, got {self.xtol}")


class EventRecord(NamedTuple):
    """One occurrence: its time ``t`` (a 0-d tensor, differentiable), the state ``y`` there (before
    any jump), and ``index``, the event's position in the sequence given to ``solve``."""

    t: torch.Tensor
    y: torch.Tensor
    index: int


def as_events(event: Event | EventFunction | Sequence[Event | EventFunction] | None) -> list[Event]:
    """``solve``'s ``event=`` as a list: a bare callable is a terminal event in both directions."""
    if event is None:
        return []
    items = list(event) if isinstance(event, (list, tuple)) else [event]
    out = []
    for e in items:
        if isinstance(e, Event):
            out.append(e)
        elif callable(e):
            out.append(Event(e))
        else:
            raise TypeError(f"event must be an odeflux.Event, a callable g(t, y) or a sequence of them, got {e!r}")
    if not out:
        raise ValueError("event is an empty sequence: pass at least one Event, or leave event=None")
    return out


# -- evaluating g --------------------------------------------------------------------------------
def _g(events: list[Event], i: int, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = events[i].g(t, y)
    if not isinstance(out, torch.Tensor):
        if isinstance(out, (int, float)) and not isinstance(out, bool):
            return torch.tensor(float(out), dtype=y.dtype, device=y.device)
        raise TypeError(f"event {i}: g(t, y) must return a scalar tensor, got {type(out).__name__}")
    if out.numel() != 1:
        raise ValueError(f"event {i}: g(t, y) must return a scalar, got a tensor of shape {tuple(out.shape)}")
    return out.reshape(())


def _rate(problem: "Problem", events: list[Event], i: int, t: float, y: torch.Tensor) -> float:
    """``dg/dt`` along the trajectory at ``(t, y)``: ``dg/dt + dg/dy . f(t, y)`` (a host float)."""
    y = y.detach()
    tt = _time(t, y)
    with torch.no_grad():
        f = problem.f(tt, y)
    with torch.enable_grad():
        t_ = tt.clone().requires_grad_(True)
        y_ = y.clone().requires_grad_(True)
        out = _g(events, i, t_, y_)
        if not out.requires_grad:
            return 0.0
        gt, gy = torch.autograd.grad(out, (t_, y_), allow_unused=True)
    rate = 0.0 if gt is None else float(gt)
    if gy is not None:
        rate += float((gy * f).sum())
    return rate


def _sign(v: float) -> int:
    return (v > 0) - (v < 0)


def _start_sign(problem: "Problem", events: list[Event], i: int, t: float, y: torch.Tensor, tol: float) -> int:
    """The side of zero ``g`` is on as the solve leaves ``(t, y)``: ``g``'s sign, or, where
    ``|g| <= tol`` (on the event's own zero), the sign of its rate: a solve that starts on the
    zero (or restarts there after the event) does not see that zero again."""
    with torch.no_grad():
        v = float(_g(events, i, _time(t, y), y.detach()))
    if abs(v) > tol:
        return _sign(v)
    return _sign(_rate(problem, events, i, t, y))


def _time(t: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((), t, dtype=like.dtype, device=like.device)


# -- locating ------------------------------------------------------------------------------------
class _Found(NamedTuple):
    t: float
    index: int


class _Locator:
    """The ``on_accept`` hook of the locating pass: watches the signs of every ``g`` at step ends
    and, at the first sign change an event listens to, finds the root inside the step and stops."""

    def __init__(self, problem: "Problem", events: list[Event], signs: list[int]):
        self.problem, self.events, self.signs = problem, events, signs
        self.values: list[float | None] = [None] * len(events)  # g at the current step's start, where known
        self.found: _Found | None = None
        self.step: tuple[float, torch.Tensor] | None = None  # the start of the step the event is in
        t1 = problem.t1 if math.isfinite(problem.t1) else problem.t0
        self.tscale = max(abs(problem.t0), abs(t1))

    def __call__(self, t: float, h: float, y: torch.Tensor, y1: torch.Tensor, K: torch.Tensor) -> bool:
        t_new = t + h
        events, signs = self.events, self.signs
        with torch.no_grad():
            tt = _time(t_new, y1)
            vals = [float(_g(events, i, tt, y1)) for i in range(len(events))]
        best: tuple[float, int] | None = None
        for i, v in enumerate(vals):
            s, s_new = signs[i], _sign(v)
            if s == 0 or s_new == s:  # no side known yet (g sat on zero), or no change
                if s_new != 0:
                    signs[i] = s_new
                continue
            rising = s < 0
            signs[i] = 1 if rising else -1  # the side it crossed to (also where v == 0)
            if events[i].direction != 0 and (events[i].direction > 0) != rising:
                continue
            theta = self._root(i, s, t, h, y, K, self.values[i], v)
            if best is None or theta < best[0]:
                best = (theta, i)
        self.values = list(vals)
        if best is None:
            return False
        theta, i = best
        t_found = t_new if theta >= 1.0 else t + theta * h
        t1 = self.problem.t1
        if math.isfinite(t1) and h * (t_found - t1) > 0:  # t + h may pass t1 by an ulp on the last step
            t_found = t1
        self.found = _Found(t_found, i)
        self.step = (t, y)
        return True

    def _root(
        self, i: int, s: int, t: float, h: float, y: torch.Tensor, K: torch.Tensor, v0: float | None, v1: float
    ) -> float:
        """The fraction ``theta`` of the step where ``g`` along the interpolant leaves the side ``s``:
        a bracket ``[lo, hi]`` (``g`` on side ``s`` at ``lo``, not at ``hi``) narrowed by the
        Illinois method until ``|hi - lo| |h| <= xtol``; returns ``hi``."""
        solver, events = self.problem.solver, self.events
        co = solver.coefficients(y.dtype, y.device)
        eps = torch.finfo(y.dtype).eps
        xtol = events[i].xtol if events[i].xtol is not None else 4 * eps * max(abs(t), abs(t + h), abs(h), self.tscale)
        width_tol = xtol / abs(h)
        if width_tol >= 1.0:
            return 1.0

        def phi(theta: float) -> float:
            with torch.no_grad():
                w = solver.dense_weights(torch.tensor([theta], dtype=y.dtype, device=y.device), co)
                return float(_g(events, i, _time(t + theta * h, y), solver.interpolate(y, h, K, w)[0]))

        lo, hi = 0.0, 1.0
        # The start's value is on side s unless g sat on its zero there (a restart at the event):
        # then a value of the hi end's size stands in for it, making the first try a bisection.
        f_lo = v0 if (v0 is not None and v0 * s > 0) else s * max(abs(v1), 1e-300)
        f_hi = v1
        side = 0  # which end the last update moved: -1 lo, +1 hi (Illinois halves the other's value)
        for it in range(200):
            if hi - lo <= width_tol:
                break
            width = hi - lo
            c = hi - f_hi * (hi - lo) / (f_hi - f_lo) if f_hi != f_lo else 0.5 * (lo + hi)
            if not (lo < c < hi) or it % 3 == 2:  # the secant left the bracket, or every third try: bisect
                c = 0.5 * (lo + hi)
            fc = phi(c)
            if fc * s > 0:
                lo, f_lo = c, fc
                if side == -1:
                    f_hi *= 0.5
                side = -1
            else:
                hi, f_hi = c, fc
                if fc == 0:
                    break
                if side == 1:
                    f_lo *= 0.5
                side = 1
            if hi - lo >= width:  # no progress possible in floating point
                break
        return hi


def _locate(
    problem: "Problem", events: list[Event], t_s: float, y_s: torch.Tensor, signs: list[int], budget: int,
    overrides: dict[str, Any],
) -> tuple[_Locator, IntegrationResult, Stats]:  # fmt: skip
    """The locating pass from ``(t_s, y_s)`` toward ``problem.t1`` (in growing windows where it is
    infinite). ``overrides``: saving options (a finite ``t1``: the pass saves as the solve would)."""
    hook = _Locator(problem, events, signs)
    stats = Stats()
    y_s = y_s.detach()
    if math.isfinite(problem.t1):
        with torch.no_grad():
            res = problem.integrate(y0=y_s, t0=t_s, max_steps=budget, on_accept=hook, **overrides)
        stats.add(res.stats)
        return hook, res, stats
    direction = 1.0 if problem.t1 > problem.t0 else -1.0
    # Windows of doubling length: each is an ordinary finite solve (its dtmin relative to its span).
    fixed = problem.dt0 is not None and not (problem.solver.adaptive and problem.controller.adaptive)
    span = 64 * problem.dt0 if fixed else max(1.0, abs(t_s))  # fixed steps: whole steps per window
    quiet = dict(saveat=None, save_everystep=False, save_start=False, save_end=False, dense=False)
    while True:
        with torch.no_grad():
            res = problem.integrate(
                y0=y_s, t0=t_s, t1=t_s + direction * span, max_steps=budget, on_accept=hook, **quiet
            )
        stats.add(res.stats)
        budget -= res.stats.n_steps
        if hook.found is None and (res.status == Status.MAX_STEPS or (res.status == Status.SUCCESS and budget <= 0)):
            res.status = Status.MAX_STEPS
            res.message = (
                f"no terminal event occurred within max_steps={problem.max_steps} steps (t reached {res.t:.6g}, "
                "t1 is infinite): raise max_steps, or check that g changes sign on the trajectory"
            )
        if hook.found is not None or res.status != Status.SUCCESS:
            return hook, res, stats
        t_s, y_s = res.t, res.y
        span *= 2


# -- solving segments ----------------------------------------------------------------------------
@dataclass
class _Plan:
    """What one segment's solve saves: ``overrides`` for its problem, and whether its last saved
    state (always ``y(t_e)``, which the events need) is also one the caller asked for."""

    overrides: dict[str, Any]
    keep_last: bool


def _plan(problem: "Problem", t_s: float, t_e: float, first: bool, jumped: bool, final: bool) -> _Plan:
    direction = 1.0 if problem.t1 > problem.t0 else -1.0
    if problem.saveat is not None:
        # The caller's times in this segment (a time at a jump belongs to the segment it ends).
        times = [
            tau for tau in problem.saveat
            if (direction * (tau - t_s) >= 0 if first else direction * (tau - t_s) > 0) and direction * (tau - t_e) <= 0
        ]  # fmt: skip
        keep = bool(times) and times[-1] == t_e
        return _Plan(dict(saveat=times if keep else times + [t_e], save_everystep=False), keep)
    save_start = problem.save_start if first else (jumped and problem.save_everystep)
    keep = problem.save_end if final else problem.save_everystep
    return _Plan(dict(saveat=None, save_start=save_start, save_end=True), keep)


def _segment_solve(
    problem: "Problem", sensealg: "SensitivityAlgorithm | None", t_s: float, y_s: torch.Tensor, t_e: float, plan: _Plan
) -> Solution:
    from .problem import solution_from_result
    from .sensitivity import DirectAdjoint

    seg = dataclasses.replace(problem, y0=y_s, t0=t_s, t1=t_e, **plan.overrides)
    if _needs_grad(problem, y_s):
        return (sensealg if sensealg is not None else DirectAdjoint()).solve(seg)
    return solution_from_result(seg.integrate(), seg)


def _needs_grad(problem: "Problem", y: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (y.requires_grad or any(p.requires_grad for p in problem.params))


def _event_point(
    problem: "Problem", events: list[Event], i: int, t_e: float, y_star: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The event's time and state, differentiable by the implicit function theorem (module doc)."""
    tt = _time(t_e, y_star)
    if not torch.is_grad_enabled():
        return tt, y_star
    gv = _g(events, i, tt, y_star)
    if not gv.requires_grad:  # nothing g sees depends on anything differentiable
        return tt, y_star
    rate = _rate(problem, events, i, t_e, y_star)
    if rate == 0.0:
        warnings.warn(
            f"event {i} at t={t_e:.6g}: g touches zero tangentially (its rate along the trajectory is 0), "
            "so the event time has no derivative; it is treated as a constant",
            stacklevel=4,
        )
        return tt, y_star
    with torch.no_grad():
        f_star = problem.f(tt, y_star.detach())
    shift = -(gv - gv.detach()) / rate  # 0 in value; the time's gradient
    return tt + shift, y_star + f_star * shift


def _checked_jump(events: list[Event], i: int, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = events[i].jump(t, y)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"event {i}: jump(t, y) must return a tensor, got {type(out).__name__}")
    if out.shape != y.shape or out.dtype != y.dtype or out.device != y.device:
        raise ValueError(
            f"event {i}: jump(t, y) returned {tuple(out.shape)} {out.dtype} on {out.device} for a state of "
            f"{tuple(y.shape)} {y.dtype} on {y.device}: return the new state in the state's shape, dtype and device"
        )
    return out


def solve_with_events(problem: "Problem", events: list[Event], sensealg: "SensitivityAlgorithm | None") -> Solution:
    """Solve ``problem`` with ``events`` (see the module doc and :func:`odeflux.solve`)."""
    direction = 1.0 if problem.t1 > problem.t0 else -1.0
    t1 = problem.t1
    ts: list[float] = []
    ys: list[torch.Tensor] = []
    records: list[EventRecord] = []
    dense_parts: list[DenseOutput] = []
    n_segments, last_sol = 0, None  # (the last solve by the sensitivity method: its backward stats)
    stats = Stats()
    t_s, y_s = problem.t0, problem.y0
    y_saved_start: torch.Tensor | None = None  # the post-jump state, saved in place of the shifted start
    signs = [_start_sign(problem, events, i, t_s, y_s, 0.0) for i in range(len(events))]
    first, jumped = True, False
    budget = problem.max_steps
    event_t = event_y = None
    status, message, t_final = Status.SUCCESS, "", t1

    while True:
        # Where no gradient is needed (and t1 is finite), the locating pass saves as the solve
        # would: what it saved before the event's step stands, and only that step is solved again,
        # up to the event. Otherwise the segment is solved again by the sensitivity method.
        reuse = math.isfinite(t1) and not _needs_grad(problem, y_s)
        if reuse:
            plan = _plan(problem, t_s, t1, first, jumped, True)
            # No end state: an event may come first (the end is added below when none does).
            over = dict(plan.overrides, dense=problem.dense, **({} if problem.saveat is not None else {"save_end": False}))
        else:
            over = dict(saveat=None, save_everystep=False, save_start=False, save_end=False, dense=False)
        hook, res, st = _locate(problem, events, t_s, y_s, signs, budget, over)
        found = hook.found
        stats.add(st)
        budget -= st.n_steps
        if res.status != Status.SUCCESS:
            # What a solve without events gives on failure: what was saved, and where it stopped.
            status, message, t_final = res.status, res.message, res.t
            if reuse:
                ts.extend(res.ts)
                ys.extend(res.ys)
            if problem.saveat is None and problem.save_end and not (ts and ts[-1] == res.t):
                ts.append(res.t)
                ys.append(res.y)
            break
        t_e = t1 if found is None else found.t
        final = found is None or events[found.index].terminal or t_e == t1
        if reuse:
            seg_ts, seg_ys = list(res.ts), list(res.ys)
            pieces = [res.dense]
            if found is None:
                if problem.saveat is None:
                    seg_ts.append(res.t)
                    seg_ys.append(res.y)
            else:
                t_b, y_b = hook.step
                d = res.dense
                if d is not None and d.t_starts and d.t_starts[-1] == t_b:  # the event's step: solved again below
                    pieces = [DenseOutput(problem.solver, d.t_starts[:-1], d.dts[:-1], d.y0s[:-1], d.Ks[:-1], d.on_arrays)]
                plan = _plan(problem, t_b, t_e, False, False, final)
                tail = _segment_solve(problem, None, t_b, y_b, t_e, plan)
                stats.add(tail.stats)
                if tail.status != Status.SUCCESS:
                    status, message, t_final = tail.status, tail.message, tail.t_final
                    ts.extend(seg_ts + [float(v) for v in tail.ts.tolist()])
                    ys.extend(seg_ys + list(tail.ys.unbind(0)))
                    break
                seg_ts += [float(v) for v in tail.ts.tolist()]
                seg_ys += list(tail.ys.unbind(0))
                pieces.append(tail.dense)
            last_sol = None
        else:
            plan = _plan(problem, t_s, t_e, first, jumped, final)
            seg_sol = _segment_solve(problem, sensealg, t_s, y_s, t_e, plan)
            stats.add(seg_sol.stats)
            seg_ts, seg_ys = [float(v) for v in seg_sol.ts.tolist()], list(seg_sol.ys.unbind(0))
            if seg_sol.status != Status.SUCCESS:
                status, message, t_final = seg_sol.status, seg_sol.message, seg_sol.t_final
                ts.extend(seg_ts)
                ys.extend(seg_ys)
                break
            pieces, last_sol = [seg_sol.dense], seg_sol
        n_segments += 1
        dense_parts.extend(d for d in pieces if d is not None and len(d))
        if y_saved_start is not None and seg_ts and seg_ts[0] == t_s and problem.saveat is None:
            seg_ys[0] = y_saved_start
        y_star = seg_ys[-1]
        n_keep = len(seg_ys) if plan.keep_last else len(seg_ys) - 1
        if found is None:
            ts.extend(seg_ts[:n_keep])
            ys.extend(seg_ys[:n_keep])
            break

        i, t_e = found.index, found.t
        t_ev, y_ev = _event_point(problem, events, i, t_e, y_star)
        if plan.keep_last:
            seg_ys[-1] = y_ev
        ts.extend(seg_ts[:n_keep])
        ys.extend(seg_ys[:n_keep])
        records.append(EventRecord(t_ev, y_ev, i))
        ev = events[i]
        if ev.terminal:
            event_t, event_y, t_final = t_ev, y_ev, t_e
            break
        if direction * (t1 - t_e) <= 0:  # a non-terminal event at t1 itself
            break
        shift = t_ev - t_ev.detach()
        if ev.jump is not None:
            y_post = _checked_jump(events, i, t_ev, y_ev)
            with torch.no_grad():
                f_post = problem.f(_time(t_e, y_post), y_post.detach())
            # The next segment starts at the moving time t_ev: y(t; t* + d, y+) = y(t; t*, y+ - d f).
            y_next = y_post - f_post * shift if shift.requires_grad else y_post
            y_saved_start = y_post
        else:
            y_next, y_saved_start = y_star, None  # the trajectory does not depend on the event's time
        with torch.no_grad():
            g_pre = abs(float(_g(events, i, _time(t_e, y_star), y_star.detach())))
        signs = [
            _start_sign(problem, events, j, t_e, y_next, 2 * g_pre if j == i else 0.0) for j in range(len(events))
        ]
        t_s, y_s, first, jumped = t_e, y_next, False, ev.jump is not None

    y0 = problem.y0
    dense = None
    if problem.dense and dense_parts:
        dense = DenseOutput(
            problem.solver, [t for d in dense_parts for t in d.t_starts], [h for d in dense_parts for h in d.dts],
            [y for d in dense_parts for y in d.y0s], [k for d in dense_parts for k in d.Ks], dense_parts[0].on_arrays,
        )  # fmt: skip
    single = n_segments == 1 and last_sol is not None
    return Solution(
        ts=times_tensor(ts, y0),
        ys=torch.stack(ys) if ys else y0.new_empty((0,) + tuple(y0.shape)),
        stats=stats, status=status, message=message, dense=dense,
        backward_stats=last_sol.backward_stats if single else None,
        t_final=t_final, dense_fn=last_sol.dense_fn if single else None,
        events=records, event_t=event_t, event_y=event_y,
    )  # fmt: skip
