"""The backsolve adjoint: y, lambda and mu integrated backwards together."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AdjointRun, ContinuousAdjoint


@dataclass(eq=False)
class BacksolveAdjoint(ContinuousAdjoint):
    """Solves ``(y, lambda, mu)`` backwards from the end state; keeps nothing of the forward pass
    but the saved states.

    With ``checkpointing=True`` (the default, as in SciMLSensitivity) ``y`` is reset to the
    forward's saved state at each saved time, which keeps the backward ``y`` from drifting away
    from the forward trajectory on problems that are unstable backwards in time.
    """

    checkpointing: bool = True
    uses_forward_interpolant = False

    def integrate_interval(self, run: AdjointRun, t_hi, t_lo, y_hi, y_lo, lam, mu, dense):
        n, vjp, shape = run.n, run.vjp, run.y.shape
        y_start = y_hi.reshape(-1) if (self.checkpointing or run.backsolve_y is None) else run.backsolve_y

        def rhs(t: float, z: torch.Tensor) -> torch.Tensor:
            out, gy, gp = vjp(t, z[:n].view(shape), z[n : 2 * n].view(shape), want_f=True)
            dz = torch.cat([out.reshape(-1), gy.reshape(-1)] + [g.reshape(-1) for g in gp])
            dz[n:].neg_()
            return dz

        z = run.adjoint_integrate(rhs, torch.cat([y_start, lam, mu]), t_hi, t_lo, blocks=(n, n, run.n_params)).y
        run.backsolve_y = z[:n]
        return z[n : 2 * n], z[2 * n :]
