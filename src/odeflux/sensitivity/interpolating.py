"""The interpolating adjoint: lambda and mu backwards, y(t) from the forward's interpolant."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AdjointRun, ContinuousAdjoint
from .rhs import AdjointRHS


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
        rhs = AdjointRHS(run, dense, t_hi, y_hi)
        z = run.adjoint_integrate(rhs, torch.cat([lam, mu]), t_hi, t_lo, blocks=(run.n, run.n_params)).y
        return z[: run.n], z[run.n :]
