"""The continuous adjoints' right-hand sides, with y(t) from the forward's interpolant.

``AdjointRHS`` is the interpolating adjoint's ``(lambda, mu)`` system, ``LambdaRHS`` the
``lambda`` equation alone (the Gauss and quadrature adjoints get ``mu`` by quadrature). Both are
plain ``f(t, z)`` callables and step planners (:class:`odeflux.kernels.StepPlanner`): where the
forward's steps are small CPU arrays and the VJP backend has a batched form (``stage_plan``,
:class:`odeflux.kernels.dense_layers.StagePlan`) the NumPy step kernel asks each for a plan of
its step (``plan_step(t, h)``): ``y`` at all its new stage times at once, the field's pass over them batched, each stage then computing only
``lambda``'s derivative, and ``mu``'s (which feeds back into nothing) for all stages at the end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from ..kernels import StepPlan, StepPlanner, arrays
from ..kernels.dense_layers import StagePlan
from ..solvers.implicit import JacobianSource, jacobian, linearization
from .vjp import VJPBackend

if TYPE_CHECKING:
    from ..solution import DenseOutput
    from .base import AdjointRun


class _PlannedRHS(StepPlanner, JacobianSource):
    def __init__(
        self, run: AdjointRun, dense: DenseOutput, t_known: float | None = None, y_known: torch.Tensor | None = None
    ):
        self.n, self.vjp, self.shape, self.dense = run.n, run.vjp, run.y.shape, dense
        # The forward state at one time, where the adjoint starts (the interval's end): taken as it
        # is rather than interpolated (exact, and no lookup for the adjoint's first evaluation).
        self.t_known, self.y_known = (t_known, y_known) if y_known is not None else (None, None)
        # Stage plans are for explicit steps (the NumPy kernel's); an implicit solver gets none.
        self.c = run.solver.tableau.c[1:] if run.solver.tableau_steps else ()
        # (A flag, not a bound method stored on self: that would be a reference cycle, keeping each
        # piece's dense output alive until the garbage collector runs.)
        self.batched = dense.on_arrays and type(self.vjp).stage_plan is not VJPBackend.stage_plan

    def _states(self, times: list[float]) -> np.ndarray:
        if len(times) == 1 and times[0] == self.t_known:
            return arrays.as_array(self.y_known).reshape(1, -1)
        return self.dense.at_arrays(times)

    def _plan(self, times: list[float]) -> StagePlan | None:
        plan = self.vjp.stage_plan(self._states(times), negate=True)
        if plan is None:
            self.batched = False
        return plan

    def _single(self, t: float, v: torch.Tensor, want_p: bool) -> torch.Tensor | None:
        """The negated products at one time on arrays (the backend's rule on the arrays at once:
        fewer calls than a one-state plan), or ``None`` where the backend has no array form."""
        out = self.vjp.on_arrays(self._states([t])[0], arrays.as_array(v), want_p, negate=True)
        if out is None:
            self.batched = False
            return None
        return torch.from_numpy(out)

    def jacobian(self, t: float, z: torch.Tensor) -> torch.Tensor:
        """For an implicit adjoint solve: ``lambda``'s block, ``-J_f(t, y(t))^T`` (``mu``, when it
        is part of the state, depends on ``lambda`` alone: the tail)."""
        y = self.y_known if t == self.t_known else self.dense.at(t)
        return jacobian(self.vjp.problem.f, self.vjp.time(t), y).T.neg()

    def jacobian_product(self, t: float, z: torch.Tensor) -> tuple[int, Callable[[torch.Tensor], torch.Tensor]]:
        """For a matrix-free adjoint solve: ``v -> -J_f(t, y(t))^T v`` on ``lambda``'s block, a VJP
        of ``f`` (one graph of ``f`` here, a backward pass per product; ``mu`` is the tail)."""
        y = self.y_known if t == self.t_known else self.dense.at(t)
        _, vjp = linearization(self.vjp.problem.f, self.vjp.time(t), y, want_jvp=False)
        return self.n, lambda v: vjp(v).neg_()

    def plan_step(self, t: float, h: float) -> _PlannedStep | None:
        if not self.batched or not len(self.c):  # (a one-stage method has no new stages to plan)
            return None
        plan = self._plan([t + c * h for c in self.c])  # as the NumPy step computes them, so they match exactly
        return None if plan is None else _PlannedStep(self.n, plan)


class AdjointRHS(_PlannedRHS):
    """``d(lambda, mu)/dt = -(lambda^T df/dy, lambda^T df/dp)`` at ``y(t)``, on the flat ``z = (lambda, mu)``."""

    def __call__(self, t: float, z: torch.Tensor) -> torch.Tensor:
        lam = z[: self.n]
        out = self._single(t, lam, want_p=True) if self.batched else None
        if out is not None:  # (lambda, mu)'s layout is the rule's flat one
            return out
        return self.vjp.flat(t, self.dense.at(t), lam.view(self.shape), negate=True)


class LambdaRHS(_PlannedRHS):
    """``dlambda/dt = -lambda^T df/dy`` at ``y(t)``, on the flat ``lambda``."""

    def __call__(self, t: float, z: torch.Tensor) -> torch.Tensor:
        out = self._single(t, z, want_p=False) if self.batched else None
        if out is not None:
            return out
        _, gy, _ = self.vjp(t, self.dense.at(t), z.view(self.shape), want_p=False)
        return gy.reshape(-1).neg()


def param_rows(
    vjp: VJPBackend, dense: DenseOutput, ts: list[float], lams: np.ndarray, n_params: int
) -> np.ndarray | None:
    """Row ``j``: ``lams[j]^T df/dp`` at ``y(ts[j])`` from ``dense`` (small CPU arrays), with the
    field's pass over all the states batched in one stage plan; ``None`` where the backend has no
    plan. The Gauss and quadrature adjoints' nodes."""
    plan = vjp.stage_plan(dense.at_arrays(ts))
    if plan is None:
        return None
    for j, lam in enumerate(lams):
        plan.stage(j, lam)  # (no out: only the parameter part is wanted)
    rows = np.empty((len(ts), n_params), dtype=plan.dtype)
    plan.params_into(rows)
    return rows


class _PlannedStep(StepPlan):
    """One adjoint step's plan for the NumPy step kernel: stage ``i`` (from 1) is the
    plan's state ``i - 1``; ``finish`` writes ``mu``'s part of stages 1.. into its rows (none for
    ``LambdaRHS``, whose state is ``lambda`` alone)."""

    __slots__ = ("n", "plan")

    def __init__(self, n: int, plan: Any):
        self.n, self.plan = n, plan

    def stage(self, i: int, lam: np.ndarray, out: np.ndarray) -> None:
        self.plan.stage(i - 1, lam, out)

    def finish(self, out: np.ndarray) -> None:
        if out.shape[1]:
            self.plan.params_into(out)
