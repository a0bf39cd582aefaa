"""The interpolating adjoint: lambda and mu backwards, y(t) from the forward's interpolant."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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

    Where the forward's steps are NumPy-backed and the VJP backend has a batched form, it also
    offers ``prepare_step(t, h)``, which :func:`odeflux.small_cpu.rk_step` calls before each
    step: ``y`` at all the step's new stage times at once, and the field's pass over them
    batched, so that each stage only does the part that depends on ``lambda``.
    """

    def __init__(self, run: AdjointRun, dense):
        self.n, self.vjp, self.shape, self.dense = run.n, run.vjp, run.y.shape, dense
        self.c = run.solver.tableau.c[1:]
        self.pending: list[tuple[float, object]] = []  # (stage time, its rule), in stage order
        # (A flag, not a bound method stored on self: that would be a reference cycle, keeping each
        # piece's dense output alive until the garbage collector runs.)
        self.batched = dense.on_arrays and type(self.vjp).at_states is not VJPBackend.at_states

    def prepare_step(self, t: float, h: float) -> None:
        if not self.batched:
            return
        times = [t + c * h for c in self.c]  # as rk_step computes them, so they match exactly
        ys = torch.from_numpy(self.dense.at_arrays(times).reshape((len(times),) + tuple(self.shape)))
        fns = self.vjp.at_states(ys)
        if fns is None:
            self.batched = False
        # In stage order, consumed in stage order: two stages may share a time (Tsit5's last two).
        self.pending = list(zip(times, fns))[::-1] if fns is not None else []

    def __call__(self, t: float, z: torch.Tensor) -> torch.Tensor:
        lam = z[: self.n].view(self.shape)
        if self.pending and self.pending[-1][0] == t:
            return self.pending.pop()[1](lam, negate=True)
        return self.vjp.flat(t, self.dense.at(t), lam, negate=True)
