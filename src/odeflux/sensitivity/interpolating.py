"""The interpolating adjoint: lambda and mu backwards, y(t) from the forward's interpolant."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import small_cpu
from .base import AdjointRun, ContinuousAdjoint
from .vjp import VJPBackend


@dataclass(eq=False)
class InterpolatingAdjoint(ContinuousAdjoint):
    """Solves ``(lambda, mu)`` backwards, taking ``y(t)`` from the forward's interpolant.

    When the forward solution kept no dense output (``save_everystep=False``, as in the tutorial)
    the interpolant comes from the forward's steps kept within ``store_limit``, or else from
    re-solving the forward with dense output on each interval between saved times (its
    checkpoints), as SciMLSensitivity does. ``checkpointing=True`` always re-solves.
    """

    checkpointing: bool = False

    def integrate_interval(self, run: AdjointRun, t_hi, t_lo, y_hi, y_lo, lam, mu, dense):
        rhs = _AdjointRHS(run, dense)
        z = run.adjoint_integrate(rhs, torch.cat([lam, mu]), t_hi, t_lo, error_size=run.n).y
        return z[: run.n], z[run.n :]


class _AdjointRHS:
    """``d(lambda, mu)/dt = -(lambda^T df/dy, lambda^T df/dp)`` at ``y(t)`` from ``dense``.

    Where the forward's steps are NumPy-backed and the VJP backend has a batched form
    (``stage_plan``), it also offers ``prepare_step(t, h)``, which :func:`odeflux.small_cpu.rk_step`
    calls before each step: ``y`` at all the step's new stage times at once, the field's pass over
    them batched, and a plan by which each stage computes only ``lambda``'s derivative (mu does
    not feed back into anything), and mu's derivatives come for all stages together at the end.
    """

    def __init__(self, run: AdjointRun, dense):
        self.n, self.vjp, self.shape, self.dense = run.n, run.vjp, run.y.shape, dense
        self.c = run.solver.tableau.c[1:]
        # (A flag, not a bound method stored on self: that would be a reference cycle, keeping each
        # piece's dense output alive until the garbage collector runs.)
        self.batched = dense.on_arrays and type(self.vjp).stage_plan is not VJPBackend.stage_plan

    def prepare_step(self, t: float, h: float) -> "_SplitStep | None":
        if not self.batched:
            return None
        plan = self.vjp.stage_plan(self.dense.at_arrays([t + c * h for c in self.c]), negate=True)
        if plan is None:
            self.batched = False
            return None
        return _SplitStep(self.n, plan)

    def __call__(self, t: float, z: torch.Tensor) -> torch.Tensor:
        lam = z[: self.n]
        if self.batched:  # one state's plan: cheaper than the whole rule on tensors
            plan = self.vjp.stage_plan(self.dense.at_arrays([t]), negate=True)
            if plan is not None:
                out = np.empty(z.numel(), dtype=plan.dtype)
                plan.stage(0, small_cpu.as_array(lam), out[: self.n])
                plan.params_into(out[None, self.n :])
                return torch.from_numpy(out)
        return self.vjp.flat(t, self.dense.at(t), lam.view(self.shape), negate=True)


class _SplitStep:
    """One adjoint step's plan for :func:`odeflux.small_cpu.rk_step`: stage ``i`` (from 1) is
    the plan's state ``i - 1``; ``finish`` writes mu's part of stages 1.. into its rows."""

    __slots__ = ("n", "plan")

    def __init__(self, n: int, plan):
        self.n, self.plan = n, plan

    def stage(self, i: int, lam, out) -> None:
        self.plan.stage(i - 1, lam, out)

    def finish(self, out) -> None:
        self.plan.params_into(out)
