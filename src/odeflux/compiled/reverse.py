"""DirectAdjoint's reverse pass as one compiled program (``compile=True`` under autograd).

The forward solve runs as the compiled loop with its accepted steps recorded (their starts,
sizes and states: the loop's dense output). The reverse pass walks those steps last to first in
a second ``torch.while_loop``: for step ``i`` from ``(t_i, y_i)`` with size ``h_i`` it pulls the
cotangent of ``y_{i+1}`` and of the step's stages (where a saved time was interpolated inside
the step) back through the step by ``torch.func.vjp``, to ``y_i`` and to the parameters, which
are substituted into ``f`` (:class:`~odeflux.sensitivity.vjp.FunctionalF`). That is what
autograd computes through the recorded solve (step sizes constants in both, each stage
recomputed from the step's start as a checkpoint would), so the gradient is DirectAdjoint's, to
round-off; only the place it runs differs: one compiled program instead of a graph of small ops.

Why not differentiate the loop itself: torch 2.13 differentiates ``torch.while_loop`` wrongly
(see :mod:`.program`); a loop of explicit VJPs needs no autograd of the loop.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..solution import BackwardStats, Solution, SolveError, Status
from ..sensitivity.base import _buffers_kept, _restored
from .loop import Located, locate
from .program import _RECORD, _REFUSED, RECORD_LIMIT, STEP_REFUSED, _apart, _program, _reason, code_key, warn_eager

if TYPE_CHECKING:
    from ..problem import Problem
    from ..solvers.tableau import Solver


def capacity(n: int) -> int:
    """The reverse program's step buffers for ``n`` steps: the next power of 4 from 64 (as the
    compiled loop's record grows), so that a solve with a few more or fewer steps reuses it."""
    c = 64
    while c < n:
        c *= 4
    return c


def run_reverse(
    solver: Solver, fn: Callable[..., torch.Tensor], n: torch.Tensor, ts: torch.Tensor, hs: torch.Tensor,
    ys: torch.Tensor, ybar_b: torch.Tensor, kbar: torch.Tensor, params: tuple[torch.Tensor, ...],
    traced: bool = True,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Cotangents of ``y0`` and of ``params`` from those of the saved states, for ``B``
    independent problems (a joint solve is ``B = 1``), each walking back over its own steps.

    ``n``: each problem's number of steps ``(B,)`` int64; ``ts``, ``hs``: each step's start and
    signed size (float64, ``(B, C)``, ``C >= n``); ``ys``: each step's start state ``(B, C, ...)``;
    ``ybar_b``: the cotangent given to each step boundary's state ``(B, C + 1, ...)``; ``kbar``: to
    each step's stages ``(B, C, stages, ...)`` (:func:`cotangents`). ``fn(t, y, *params)``: ``f``
    of the ``(B,)`` times and ``(B, ...)`` states with the parameters substituted, each sample's
    derivative depending on its own state only. ``traced``: carried by ``torch.while_loop``
    (compiled); otherwise a Python loop. The parameters' cotangents are summed over the problems.
    """
    dtype = ys.dtype
    co = solver.coefficients(dtype, ys.device)
    col = lambda x, like: x.reshape(x.shape + (1,) * (like.dim() - x.dim()))  # noqa: E731

    def row(buf: torch.Tensor, j: torch.Tensor) -> torch.Tensor:  # each problem's entry j[b] of buf[b]
        idx = j.reshape((-1, 1) + (1,) * (buf.dim() - 2)).expand((buf.shape[0], 1) + tuple(buf.shape[2:]))
        return buf.gather(1, idx).squeeze(1)

    def cond(i, a, *g):
        return (i >= 0).any()

    def body(i, a, *g):
        live = i >= 0
        j = i.clamp(min=0)
        t = row(ts, j).to(dtype)
        h = torch.where(live, row(hs, j), 0.0).to(dtype)  # (a problem done stands still: a step of 0)
        y = row(ys, j)

        def step(y_: torch.Tensor, *p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            f = lambda tt, yy: fn(tt, yy, *p)  # noqa: E731
            y1, _, K, _ = solver.step(f, t, y_, h, f(t, y_), co)
            return y1, K

        _, pull = torch.func.vjp(step, y, *params)
        a_in = torch.where(col(live, a), a + row(ybar_b, j + 1), 0.0)
        k_in = torch.where(col(live, y).unsqueeze(0), row(kbar, j).movedim(1, 0), 0.0)
        dy, *dp = pull((a_in, k_in))
        return (i - 1, torch.where(col(live, a), dy, a), *(gi + di for gi, di in zip(g, dp)))

    carry = (n - 1, torch.zeros_like(ys[:, 0]), *(torch.zeros_like(p) for p in params))
    if traced:
        from torch._higher_order_ops.while_loop import while_loop

        carry = tuple(while_loop(cond, body, carry))
    else:
        while bool(cond(*carry)):
            carry = body(*carry)
    return (carry[1] + ybar_b[:, 0], *carry[2:])


def place_saved(
    solver: Solver, ts: torch.Tensor, hs: torch.Tensor, n: torch.Tensor, t_end: torch.Tensor, taus: torch.Tensor,
    dtype: torch.dtype,
) -> tuple[Located, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Where each saved time ``taus`` (``(B, m)``) sits among each problem's recorded steps
    (:func:`~.loop.locate`), whether it lies inside a step (its state interpolated there: its
    cotangent reaches that step's stages too), and the step boundary its cotangent goes to (a
    state on a boundary is that boundary's, ``t0``'s is ``y0``; one inside step ``i`` has
    ``y_i``'s part)."""
    d = torch.sign(t_end - ts[:, 0])  # (a problem with no steps has no direction: nothing below counts)
    at = locate(solver, solver.coefficients(dtype, taus.device), ts, hs, n, t_end, taus, d, dtype)
    at_end = at.ok & (taus == at.t_next)
    boundary = torch.where(at.i < 0, 0, torch.where(at_end, at.ic + 1, at.ic))
    return at, at.ok & ~at_end, boundary


def cotangents(
    solver: Solver, ts: torch.Tensor, hs: torch.Tensor, n: torch.Tensor, t_end: torch.Tensor, taus: torch.Tensor,
    grads: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The saved states' cotangents ``grads`` (``(B, m, ...)``, at the times ``taus``, ``(B, m)``,
    NaN pads) given to each problem's step boundaries (``(B, C + 1, ...)``) and to the stages of
    the steps they were interpolated in (``(B, C, stages, ...)``): a state saved on a boundary is
    that boundary's (``t0``'s is ``y0``); one inside step ``i`` is ``y_i + h_i sum_j w_j(theta) K_j``,
    the interpolant the loop saved it by. ``ts``, ``hs``, ``n``: the record as
    :func:`run_reverse` takes it; ``t_end``: the time each problem reached."""
    B, C = ts.shape
    m = taus.shape[1]
    dtype = grads.dtype
    shape = tuple(grads.shape[2:])
    s = solver.tableau.stages
    known = ~torch.isnan(taus)
    g = torch.where(known.reshape((B, m) + (1,) * len(shape)), grads, 0.0).reshape(B, m, -1)
    at, inside, boundary = place_saved(solver, ts, hs, n, t_end, taus, dtype)
    X = g.shape[2]
    ybar_b = grads.new_zeros(B, C + 1, X).scatter_add_(1, boundary.unsqueeze(2).expand(B, m, X), g)
    w = torch.where(inside.unsqueeze(2), at.weights, 0.0)  # (B, m, s)
    kb = (w.unsqueeze(3) * g.unsqueeze(2)).reshape(B, m, s * X)
    kbar = grads.new_zeros(B, C, s * X).scatter_add_(1, at.ic.unsqueeze(2).expand(B, m, s * X), kb)
    return ybar_b.reshape((B, C + 1) + shape), kbar.reshape((B, C, s) + shape)


def reverse_from_saved(
    solver: Solver, fn: Callable[..., torch.Tensor], n: torch.Tensor, ts: torch.Tensor, hs: torch.Tensor,
    ys: torch.Tensor, t_end: torch.Tensor, taus: torch.Tensor, grads: torch.Tensor, params: tuple[torch.Tensor, ...],
    traced: bool = True,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """:func:`run_reverse` from the saved states' cotangents ``grads`` (:func:`cotangents`): the
    whole reverse pass, what one compiled program runs."""
    ybar_b, kbar = cotangents(solver, ts, hs, n, t_end, taus, grads)
    return run_reverse(solver, fn, n, ts, hs, ys, ybar_b, kbar, params, traced=traced)


def reverse_pass(key: tuple, code: object, solver: Solver, fn: Callable[..., torch.Tensor], n: torch.Tensor,
                 ts: torch.Tensor, hs: torch.Tensor, ys: torch.Tensor, t_end: torch.Tensor, taus: torch.Tensor,
                 grads: torch.Tensor, params: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """The cotangents of ``y0`` (``(B, ...)``) and of ``params`` from those of the saved states, by
    the compiled :func:`reverse_from_saved` (keyed by ``key`` and the shapes); a field the
    compiler cannot take gets the one line, and the same pass runs eagerly."""
    solver.coefficients(ys.dtype, ys.device)  # (made before tracing: see PerSampleProgram.run)
    pv = tuple(q.detach().clone() for q in params)  # (a program may not take inputs that alias its module's)
    args = (solver, fn, n, ts, hs, ys, t_end, taus, grads.detach(), pv)
    full = (*key, tuple(ys.shape), taus.shape, ys.dtype, ys.device, tuple(q.shape for q in pv))
    if key not in _REFUSED and code not in STEP_REFUSED:
        try:
            return _program(full, reverse_from_saved)(*_apart(args))
        except Exception as exc:  # a field the compiler cannot take: said once, then the same pass eagerly
            _REFUSED[key] = _reason(exc)
            STEP_REFUSED.add(code)
            warn_eager(exc, "for its reverse pass")
    return reverse_from_saved(*args, traced=False)


class _OneProblem:
    """A joint solve's ``fn(t, y, *params)`` as the reverse pass's field of ``B = 1`` problem."""

    def __init__(self, fn: Callable[..., torch.Tensor]):
        self.fn = fn

    def __call__(self, t: torch.Tensor, y: torch.Tensor, *p: torch.Tensor) -> torch.Tensor:
        return self.fn(t.reshape(()), y.squeeze(0), *p).unsqueeze(0)


class CompiledReverseRun:
    """A DirectAdjoint solve with ``compile=True``: the compiled loop forward (its steps
    recorded), the compiled reverse pass backward (:class:`~odeflux.sensitivity.base._AdjointFunction`'s run)."""

    def __init__(self, problem: Problem, params: list[torch.Tensor], fn: Callable[..., torch.Tensor]):
        self.problem, self.params, self.fn = problem, params, _OneProblem(fn)
        self.module_state = problem.module_state
        self.code = code_key(problem.f)
        self.bstats = BackwardStats()
        self.result = None

    def forward(self) -> torch.Tensor:
        y = self.problem.y0.detach()
        with torch.no_grad():
            # (The reverse pass recomputes each step's stages from its start: the record keeps none.)
            self.result = self.problem.integrate(y0=y, dense=True, dense_stages=False)
        ys = self.result.ys
        return torch.stack(ys) if ys else y.new_empty((0,) + tuple(y.shape))

    def recorded(self, y0: torch.Tensor) -> torch.Tensor:
        """The solve again, recorded in a graph from ``y0`` (``create_graph=True``), with the eager
        step: a compiled graph cannot be differentiated twice."""
        from ..sensitivity.base import _stack_like

        return _stack_like(self.problem.integrate(y0=y0, compiled=False), self.result)

    def backward(self, grad_ys: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        res = self.result
        if res.status != Status.SUCCESS:
            raise SolveError(f"cannot differentiate a solve that failed ({res.status.name}): {res.message}", res.status)
        p, dense = self.problem, res.dense
        y0 = p.y0
        f64 = dict(dtype=torch.float64, device=y0.device)
        n = 0 if dense is None else len(dense)
        if dense is not None and dense.record is not None:  # the compiled loop's record, as it is
            ts, hs, ys = dense.record
        else:  # steps taken on the host: padded to the program's capacity
            C = capacity(n)
            ts, hs = torch.zeros(C, **f64), torch.zeros(C, **f64)  # (apart: a program's inputs may not alias)
            ys = y0.new_zeros((C,) + tuple(y0.shape))
            if n:
                ts[:n] = torch.tensor(dense.t_starts, **f64)
                hs[:n] = torch.tensor(dense.dts, **f64)
                ys[:n] = torch.stack(dense.y0s)
        taus = torch.tensor([res.ts], **f64)
        # (The module's own tensors as in the forward pass, and its buffers left as they were.)
        with _restored(self.module_state), _buffers_kept(self.module_state), torch.no_grad():
            gy0, *gp = reverse_pass(
                ("reverse", self.code, repr(p.solver)), self.code, p.solver, self.fn,
                torch.full((1,), n, dtype=torch.int64, device=y0.device), ts.unsqueeze(0), hs.unsqueeze(0),
                ys.unsqueeze(0), torch.full((1,), res.t, **f64), taus, grad_ys.unsqueeze(0), self.params,
            )  # fmt: skip
        gy0 = gy0.squeeze(0)
        self.bstats.n_vjp_evals += n * self.problem.solver.tableau.stages
        return gy0, list(gp)


def solve_compiled_reverse(problem: Problem) -> Solution | None:
    """DirectAdjoint's solve with the compiled reverse pass, or ``None`` where it does not apply:
    a solver other than an explicit Runge-Kutta method, a differentiable dense output, options
    that evaluate ``f`` off the steps' starts (``perturb``, ``jump_times``), or parameters that
    reach ``f`` other than as module parameters or through ``args`` (then the solve is recorded)."""
    from ..sensitivity.base import check_hidden_params, run_solution
    from ..sensitivity.vjp import FunctionalF

    if not problem.solver.tableau_steps or problem.dense or problem.perturb or problem.jump_times:
        return None
    if code_key(problem.f) in STEP_REFUSED:  # (a field the compiler refused: its graph is recorded)
        return None
    params = [q for q in problem.params if q.requires_grad]
    try:
        check_hidden_params(problem, params)
        fn = FunctionalF(problem, params, "compile")
    except ValueError:
        return None
    return run_solution(CompiledReverseRun(problem, params, fn), problem)


#: A per-sample gradient with at most this many saved times per sample interpolates them inside
#: its compiled loop, which then records no stages (the reverse pass recomputes them): each step
#: copies a record a quarter the size (Tsit5's). With more, the saved states come from the record.
SAVED_IN_LOOP = 4

#: A per-sample solve's record starts with at most this many entries (its capacity the largest
#: power of 4 within it, at least 4): a batch's record is copied once a step in the compiled loop.
PER_SAMPLE_RECORD = 1 << 18


class PerSampleReverseRun:
    """DirectAdjoint of a per-sample solve (:mod:`odeflux.per_sample`) with ``compile=True``: the
    compiled loop of the ``B`` problems forward, each problem's steps recorded, and the compiled
    reverse pass of ``B`` problems backward (:class:`~odeflux.sensitivity.base._AdjointFunction`'s run)."""

    def __init__(self, batch: Any, y0: torch.Tensor, k0: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor,
                 taus: torch.Tensor, params: list[torch.Tensor], module_state: list, fn: Callable[..., torch.Tensor]):  # fmt: skip
        self.batch, self.params, self.module_state, self.fn = batch, params, module_state, fn
        self.y, self.k0, self.t0, self.t1, self.taus = y0.detach(), k0.detach(), t0, t1, taus
        self.direction = torch.sign(t1 - t0)
        self.code = code_key(batch.f)
        self.bstats = BackwardStats()

    def _first_capacity(self) -> int:
        per_step = self.y.numel() * (self.batch.solver.tableau.stages + 1)
        c = 4
        while c * 4 * per_step <= PER_SAMPLE_RECORD and c < 64:
            c *= 4
        return max(c, _RECORD.get(("per-sample", self.code, tuple(self.y.shape)), 0))

    def forward(self) -> torch.Tensor:
        y, b = self.y, self.batch
        C = self._first_capacity()
        k0 = self.k0
        with torch.no_grad():
            while True:
                out, n_f = b.run(y, k0, self.t0, self.t1, self.taus, compile=True, record=C,
                                 record_stages=self.taus.shape[1] > SAVED_IN_LOOP)  # fmt: skip
                t, n_acc, status = out[0], out[6], out[10]
                full = (n_acc == C) & (status == 0) & (self.direction * (self.t1 - t) > 0)
                if not bool(full.any()):
                    break
                C *= 4  # a record filled before its problem's t1: again with four times the room
                _RECORD[("per-sample", self.code, tuple(y.shape))] = C
                if C * y.numel() * (b.solver.tableau.stages + 1) > RECORD_LIMIT or C > 4 * b.max_steps:
                    raise SolveError(
                        f"compile=True: a per-sample gradient would keep more than {C // 4} steps per sample "
                        f"({C * y.numel() * (b.solver.tableau.stages + 1):,} numbers): pass compile=False", Status.MAX_STEPS,
                    )  # fmt: skip
        self.out, self.n_f = out, n_f
        self.status = torch.where((status == 0) & (self.direction * (self.t1 - t) > 0), int(Status.MAX_STEPS), status)
        # States at saved times a sample never reached: NaN (a failed sample's, refused if differentiated).
        unreached = torch.isnan(self.taus) | (self.direction.unsqueeze(1) * (self.taus - t.unsqueeze(1)) > 0)
        return torch.where(unreached.reshape(unreached.shape + (1,) * (y.dim() - 1)), math.nan, out[9])

    def recorded(self, y0: torch.Tensor) -> torch.Tensor:
        """The saved states again, recorded in a graph from ``y0`` (``create_graph=True``)."""
        k0 = self.batch.f(self.t0.to(y0.dtype), y0)
        return self.batch.run(y0, k0, self.t0, self.t1, self.taus)[0][9]

    def backward(self, grad_ys: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        bad = (self.status != Status.SUCCESS) & (grad_ys.reshape(grad_ys.shape[0], -1) != 0).any(1)
        if bool(bad.any()):
            which = bad.nonzero().flatten().tolist()
            raise SolveError(
                f"cannot differentiate samples that failed (samples {which[:8]}): leave them out of the loss "
                "(sol.statuses says which succeeded)", Status(int(self.status[which[0]])),
            )  # fmt: skip
        out = self.out
        t_end, n_acc = out[0], out[6]
        rec_t, rec_h, rec_y = out[13:16]
        g = torch.nan_to_num(grad_ys.detach())  # (NaN-padded saved times: no cotangent)
        with _restored(self.module_state), _buffers_kept(self.module_state), torch.no_grad():
            gy0, *gp = reverse_pass(
                ("reverse-per-sample", self.code, repr(self.batch.solver)), self.code, self.batch.solver, self.fn,
                n_acc, rec_t, rec_h, rec_y, t_end, self.taus, g, self.params,
            )  # fmt: skip
        self.bstats.n_vjp_evals += int(n_acc.sum()) * self.batch.solver.tableau.stages
        return gy0, list(gp)


class _Fields:
    """What :class:`~odeflux.sensitivity.vjp.FunctionalF` reads of a problem, for a per-sample ``f``."""

    def __init__(self, f: Any):
        from ..problem import BoundArgs

        self.user_f, self.args = (f.f, f.args) if isinstance(f, BoundArgs) else (f, None)


def per_sample_reverse_run(batch: Any, y0: torch.Tensor, k0: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor,
                           taus: torch.Tensor, params: list[torch.Tensor], module_state: list) -> PerSampleReverseRun | None:  # fmt: skip
    """The compiled reverse pass for a per-sample DirectAdjoint solve (``k0 = f(t0, y0)``), or ``None`` where the
    parameters cannot be substituted into ``f`` (captured from its closure): the loop is then
    recorded as a graph."""
    from ..sensitivity.base import hidden_param
    from ..sensitivity.per_sample_adjoint import _user_f
    from ..sensitivity.vjp import FunctionalF

    if code_key(batch.f) in STEP_REFUSED:  # (a field the compiler refused: the loop is recorded)
        return None
    try:
        fn = FunctionalF(_Fields(batch.f), params, "compile")
    except ValueError:
        return None
    y = y0.detach()
    if hidden_param(_user_f(batch.f), lambda: batch.f(t0.to(y.dtype), y), params, module_state) is not None:
        return None
    return PerSampleReverseRun(batch, y0, k0, t0, t1, taus, params, module_state, fn)
