"""DirectAdjoint's reverse pass written out by hand, for small CPU states and a field with a VJP rule.

Backpropagating through an explicit Runge-Kutta step ``y1 = y + h sum_i b_i k_i``,
``k_i = f(Y_i)``, ``Y_i = y + h sum_{j<i} a_ij k_j`` gives, from the cotangent ``ybar1`` of
``y1`` (and ``Kbar`` of the stages, where a saved state was interpolated inside the step):

    kbar_i = h b_i ybar1 + Kbar_i + h sum_{j>i} a_ji Ybar_j,    Ybar_i = J_f(Y_i)^T kbar_i,
    ybar   = ybar1 + sum_i Ybar_i,                              pbar  += sum_i (d f(Y_i)/dp)^T kbar_i,

stages last to first, steps last to first. That is exactly what autograd computes through the
solver's operations (the step sizes are constants in both), but here each stage costs one call of
the field's VJP rule on NumPy (:mod:`odeflux.kernels.dense_layers`) instead of a recorded graph of tiny torch
ops. The forward pass keeps each accepted step's start and stages, as the graph would.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..kernels import ArrayVJP, arrays
from ..kernels.numpy_step import coefficients
from ..solution import BackwardStats, Solution, SolveError, Status
from .base import _stack_like, run_solution, split_like
from .vjp import find_array_vjp

if TYPE_CHECKING:
    from ..problem import Problem


def reverse_pass_rule(problem: "Problem") -> ArrayVJP | None:
    """The field's VJP rule on arrays for this problem when the hand-written reverse pass
    applies: an explicit Runge-Kutta solver (the pass above is its step's), a small CPU state, no
    differentiable dense output, and a rule covering exactly the parameters that require grad;
    otherwise ``None``. It applies under ``compile=True`` too: DirectAdjoint then runs it
    eagerly, being the faster (benchmarks/results/compiled_crossover.md)."""
    y0 = problem.y0
    if not problem.solver.tableau_steps or problem.dense or not arrays.small_state(y0):
        return None
    params = [p for p in problem.params if p.requires_grad]
    return find_array_vjp(problem, params, y0.detach())


class ReverseRun:
    """Forward: the solve without a graph, keeping its steps. Backward: the reverse pass above."""

    def __init__(self, problem: "Problem", params: list[torch.Tensor], vjp: ArrayVJP):
        self.problem, self.params, self.vjp = problem, params, vjp
        self.module_state = problem.module_state
        self.y = problem.y0.detach()
        self.bstats = BackwardStats()
        self.result = None

    def forward(self) -> torch.Tensor:
        with torch.no_grad():
            self.result = self.problem.integrate(y0=self.y, dense=True)
        ys = self.result.ys
        return torch.stack(ys) if ys else self.y.new_empty((0,) + tuple(self.y.shape))

    def recorded(self, y0: torch.Tensor) -> torch.Tensor:
        """The forward's saved states again, recorded in a graph from ``y0`` (``create_graph=True``)."""
        res = self.problem.integrate(y0=y0)
        return _stack_like(res, self.result)

    def backward(self, grad_ys: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        res = self.result
        if res.status != Status.SUCCESS:
            raise SolveError(f"cannot differentiate a solve that failed ({res.status.name}): {res.message}", res.status)
        with torch.no_grad(), arrays.one_blas_thread:  # (this run exists only for small CPU states)
            return self._backward(grad_ys)

    def _backward(self, grad_ys: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        res, p = self.result, self.problem
        tab = p.solver.tableau
        n, shape = self.y.numel(), self.y.shape
        dtype = arrays.as_array(self.y).dtype
        dense = res.dense
        n_steps = 0 if dense is None else len(dense)
        starts = [] if dense is None else dense.t_starts
        ends = starts[1:] + [res.t] if n_steps else []
        direction = 1.0 if p.t1 > p.t0 else -1.0
        keys = [direction * e for e in ends]

        # Cotangents of the step boundaries (ybar[i]: the state before step i) and of the stages.
        ybar = np.zeros((n_steps + 1, n), dtype=dtype)
        kbar: dict[int, np.ndarray] = {}
        grads = arrays.as_array(grad_ys.contiguous()).reshape(len(res.ts), n)
        for t, g in zip(res.ts, grads):
            if t == p.t0 or not n_steps:
                ybar[0] += g
                continue
            i = min(bisect.bisect_left(keys, direction * t), n_steps - 1)  # the step whose end is at or past t
            if t == ends[i]:
                ybar[i + 1] += g
            else:  # interpolated inside step i: y(t) = y_i + h sum_j b_j(theta) k_j
                theta = (t - starts[i]) / dense.dts[i]
                w = np.asarray(tab.dense_weights(theta), dtype=dtype) * dense.dts[i]
                kbar.setdefault(i, np.zeros((tab.stages, n), dtype=dtype))
                kbar[i] += np.outer(w, g)
                ybar[i] += g

        a_ext, b_ext, _ = coefficients(p.solver, self.y.dtype)
        A, b = a_ext[:, 1:], b_ext[1:]
        # Stages whose k feeds nothing (an FSAL method's last: b = 0, used by no later stage) need
        # a VJP only where an interpolated saved state gave them a cotangent.
        feeds = [bool(b[j] != 0 or A[j + 1 :, j].any()) for j in range(tab.stages)]
        n_p = sum(q.numel() for q in self.params)
        mu = np.zeros(n_p, dtype=dtype)
        mu_step = np.empty(n_p, dtype=dtype)
        for i in range(n_steps - 1, -1, -1):
            h = dense.dts[i]
            hA = A * h
            y_i = arrays.as_array(dense.y0s[i]).reshape(n)
            K = arrays.as_array(dense.Ks[i]).reshape(tab.stages, n)
            stage_in = np.dot(hA, K)
            stage_in += y_i
            kb = np.outer(b * h, ybar[i + 1])
            if i in kbar:
                kb += kbar[i]
            Ybar = np.zeros((tab.stages, n), dtype=dtype)  # row j: J_f(Y_j)^T kbar_j; stages without a VJP stay 0
            live = [j for j in range(tab.stages) if feeds[j] or i in kbar]
            # With the rule's batched form: one forward pass of the field over all the live stages,
            # and their parameter products together at the end.
            plan = self.vjp.stage_plan(stage_in[live])
            for k in range(len(live) - 1, -1, -1):
                j = live[k]
                v = kb[j] + np.dot(hA[j + 1 :, j], Ybar[j + 1 :]) if j + 1 < tab.stages else kb[j]
                plan.stage(k, v, Ybar[j])
                self.bstats.n_vjp_evals += 1
            plan.params_total(mu_step)
            mu += mu_step
            ybar[i] += ybar[i + 1]
            ybar[i] += np.add.reduce(Ybar, axis=0)
        return torch.from_numpy(ybar[0].reshape(shape)), split_like(torch.from_numpy(mu), self.params)


def solve_reverse(problem: "Problem", vjp: ArrayVJP) -> Solution:
    """The solve, differentiable through :class:`ReverseRun`."""
    return run_solution(ReverseRun(problem, [q for q in problem.params if q.requires_grad], vjp), problem)


__all__: list[Any] = ["ReverseRun", "reverse_pass_rule", "solve_reverse"]
