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

import bisect
from typing import TYPE_CHECKING, Callable

import torch

from ..solution import BackwardStats, Solution, SolveError, Status, times_tensor
from .program import _REFUSED, STEP_REFUSED, _program, _reason, code_key, warn_eager

if TYPE_CHECKING:
    from ..problem import Problem
    from ..solution import DenseOutput
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
    """Cotangents of ``y0`` and of ``params`` from those of the solve's saved states.

    ``n``: the number of steps (0-d int64); ``ts``, ``hs``: each step's start and signed size
    (float64, ``(C,)``, ``C >= n``); ``ys``: each step's start state ``(C, ...)``; ``ybar_b``:
    the cotangent given to each step boundary's state ``(C + 1, ...)``; ``kbar``: to each step's
    stages ``(C, stages, ...)``. ``fn(t, y, *params)``: ``f`` with the parameters substituted.
    ``traced``: carried by ``torch.while_loop`` (compiled); otherwise a Python loop.
    """
    dtype = ys.dtype
    co = solver.coefficients(dtype, ys.device)
    row = lambda x, j: x.index_select(0, j).squeeze(0)  # noqa: E731

    def cond(i, a, *g):
        return i >= 0

    def body(i, a, *g):
        j = i.clamp(min=0).reshape(1)
        t, h, y = row(ts, j).to(dtype), row(hs, j).to(dtype), row(ys, j)

        def step(y_: torch.Tensor, *p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            f = lambda tt, yy: fn(tt, yy, *p)  # noqa: E731
            y1, _, K, _ = solver.step(f, t, y_, h, f(t, y_), co)
            return y1, K

        _, pull = torch.func.vjp(step, y, *params)
        dy, *dp = pull((a + row(ybar_b, j + 1), row(kbar, j)))
        return (i - 1, dy, *(gi + di for gi, di in zip(g, dp)))

    carry = (n - 1, torch.zeros_like(ys[0]), *(torch.zeros_like(p) for p in params))
    if traced:
        from torch._higher_order_ops.while_loop import while_loop

        carry = tuple(while_loop(cond, body, carry))
    else:
        while bool(cond(*carry)):
            carry = body(*carry)
    return (carry[1] + ybar_b[0], *carry[2:])


def cotangents(dense: DenseOutput | None, t0: float, t_end: float, ts: list[float], grads: torch.Tensor, C: int,
               shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The saved states' cotangents ``grads`` (one per time in ``ts``) given to the step
    boundaries (``(C + 1, ...)``) and to the stages of the steps they were interpolated in
    (``(C, stages, ...)``): a state saved on a boundary is that boundary's; one inside step ``i``
    is ``y_i + h_i sum_j w_j(theta) K_j``."""
    n = 0 if dense is None else len(dense)
    s = 1 if dense is None else dense.solver.tableau.stages
    ybar_b = grads.new_zeros((C + 1,) + shape)
    kbar = grads.new_zeros((C, s) + shape)
    if not ts:
        return ybar_b, kbar
    if n == 0:
        ybar_b[0] += grads.sum(0)
        return ybar_b, kbar
    starts, dts = dense.t_starts, dense.dts
    ends = starts[1:] + [t_end]
    direction = dense.direction
    keys = [direction * e for e in ends]
    where, inside, theta = [], [], []
    for t in ts:
        if t == t0:
            where.append(0)
            continue
        i = min(bisect.bisect_left(keys, direction * t), n - 1)  # the step whose end is at or past t
        if t == ends[i]:
            where.append(i + 1)
        else:
            where.append(i)
            inside.append((len(where) - 1, i))
            theta.append((t - starts[i]) / dts[i])
    ybar_b.index_add_(0, torch.tensor(where, device=grads.device), grads)
    if inside:
        rows = torch.tensor([r for r, _ in inside], device=grads.device)
        steps = torch.tensor([i for _, i in inside], device=grads.device)
        co = dense.solver.coefficients(grads.dtype, grads.device)
        w = dense.solver.dense_weights(torch.tensor(theta, dtype=grads.dtype, device=grads.device), co)  # (m, stages)
        w = w * torch.tensor([dts[i] for _, i in inside], dtype=grads.dtype, device=grads.device).unsqueeze(1)
        g = grads.index_select(0, rows).reshape(len(inside), 1, -1)
        kbar.view(C, s, -1).index_add_(0, steps, w.unsqueeze(2) * g)
    return ybar_b, kbar


class ReverseProgram:
    """The compiled reverse pass of one solve's recorded steps (see the module docstring)."""

    def __init__(self, problem: Problem, params: list[torch.Tensor], fn: Callable[..., torch.Tensor]):
        self.problem, self.params, self.fn = problem, params, fn
        self.code = code_key(problem.f)
        self.key = ("reverse", self.code, repr(problem.solver))

    def run(self, dense: DenseOutput | None, t_end: float, ts: list[float], grads: torch.Tensor) -> tuple[torch.Tensor, ...]:
        p = self.problem
        y0 = p.y0
        shape = tuple(y0.shape)
        n = 0 if dense is None else len(dense)
        if dense is not None:
            ys, _ = dense.stacked_steps()
            C = max(capacity(n), ys.shape[0])
            ts_t = torch.zeros(C, dtype=torch.float64, device=y0.device)
            hs_t = torch.zeros(C, dtype=torch.float64, device=y0.device)
            ts_t[:n] = torch.tensor(dense.t_starts, dtype=torch.float64)
            hs_t[:n] = torch.tensor(dense.dts, dtype=torch.float64)
            if ys.shape[0] < C:
                ys = torch.cat([ys, ys.new_zeros((C - ys.shape[0],) + shape)])
        else:
            C = capacity(0)
            ts_t = hs_t = torch.zeros(C, dtype=torch.float64, device=y0.device)
            ys = y0.new_zeros((C,) + shape)
        ybar_b, kbar = cotangents(dense, p.t0, t_end, ts, grads.detach(), C, shape)
        params = tuple(q.detach().clone() for q in self.params)  # (a program may not take inputs that alias its module's)
        args = (p.solver, self.fn, torch.tensor(n, dtype=torch.int64, device=y0.device), ts_t, hs_t, ys, ybar_b, kbar, params)
        key = (*self.key, C, shape, y0.dtype, y0.device, tuple(q.shape for q in params))
        if self.key not in _REFUSED and self.code not in STEP_REFUSED:
            try:
                return _program(key, run_reverse)(*args)
            except Exception as exc:  # a field the compiler cannot take: said once, then the same pass eagerly
                _REFUSED[self.key] = _reason(exc)
                STEP_REFUSED.add(self.code)
                warn_eager(exc, "for its reverse pass")
        return run_reverse(*args, traced=False)


class CompiledReverseRun:
    """A DirectAdjoint solve with ``compile=True``: the compiled loop forward (its steps
    recorded), the compiled reverse pass backward (:class:`~odeflux.sensitivity.base._AdjointFunction`'s run)."""

    def __init__(self, problem: Problem, params: list[torch.Tensor], fn: Callable[..., torch.Tensor]):
        self.problem, self.params = problem, params
        self.module_state = problem.module_state
        self.program = ReverseProgram(problem, params, fn)
        self.bstats = BackwardStats()
        self.result = None

    def forward(self) -> torch.Tensor:
        y = self.problem.y0.detach()
        with torch.no_grad():
            self.result = self.problem.integrate(y0=y, dense=True)
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
        with torch.no_grad():
            gy0, *gp = self.program.run(res.dense, res.t, res.ts, grad_ys)
        n = 0 if res.dense is None else len(res.dense)
        self.bstats.n_vjp_evals += n * self.problem.solver.tableau.stages
        return gy0, list(gp)


def solve_compiled_reverse(problem: Problem) -> Solution | None:
    """DirectAdjoint's solve with the compiled reverse pass, or ``None`` where it does not apply:
    a solver other than an explicit Runge-Kutta method, a differentiable dense output, options
    that evaluate ``f`` off the steps' starts (``perturb``, ``jump_times``), or parameters that
    reach ``f`` other than as module parameters or through ``args`` (then the solve is recorded)."""
    from ..sensitivity.base import _AdjointFunction, check_hidden_params
    from ..sensitivity.vjp import FunctionalF

    if not problem.solver.tableau_steps or problem.dense or problem.perturb or problem.jump_times:
        return None
    params = [q for q in problem.params if q.requires_grad]
    try:
        check_hidden_params(problem, params)
        fn = FunctionalF(problem, params, "compile")
    except ValueError:
        return None
    run = CompiledReverseRun(problem, params, fn)
    ys = _AdjointFunction.apply(run, problem.y0, *params)
    res = run.result
    return Solution(
        ts=times_tensor(res.ts, problem.y0), ys=ys, stats=res.stats, status=res.status, message=res.message,
        backward_stats=run.bstats, t_final=res.t,
    )  # fmt: skip
