"""The backsolve adjoint: y, lambda and mu integrated backwards together."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..solvers.implicit import JacobianSource, jacobian, linearization
from .base import AdjointRun, ContinuousAdjoint
from .vjp import VJPBackend


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
        n = run.n
        y_start = y_hi.reshape(-1) if (self.checkpointing or run.backsolve_y is None) else run.backsolve_y
        rhs = BacksolveRHS(run.vjp, n, run.y.shape)
        z = run.adjoint_integrate(rhs, torch.cat([y_start, lam, mu]), t_hi, t_lo, blocks=(n, n, run.n_params)).y
        run.backsolve_y = z[:n]
        return z[n : 2 * n], z[2 * n :]


class BacksolveRHS(JacobianSource):
    """``d(y, lambda, mu)/dt = (f, -lambda^T df/dy, -lambda^T df/dp)`` on the flat state."""

    def __init__(self, vjp: VJPBackend, n: int, shape: torch.Size):
        self.vjp, self.n, self.shape = vjp, n, shape

    def __call__(self, t: float, z: torch.Tensor) -> torch.Tensor:
        n, shape = self.n, self.shape
        out, gy, gp = self.vjp(t, z[:n].view(shape), z[n : 2 * n].view(shape), want_f=True)
        dz = torch.cat([out.reshape(-1), gy.reshape(-1)] + [g.reshape(-1) for g in gp])
        dz[n:].neg_()
        return dz

    def jacobian(self, t: float, z: torch.Tensor) -> torch.Tensor:
        """For an implicit adjoint solve: ``(y, lambda)``'s block as ``diag(J, -J^T)`` at ``y``
        (``mu`` is the tail). The coupling of ``lambda``'s derivative to ``y`` (second derivatives
        of ``f``) is left out: simplified Newton converges without it."""
        n = self.n
        J = jacobian(self.vjp.problem.f, self.vjp.time(t), z[:n].view(self.shape))
        out = J.new_zeros(2 * n, 2 * n)
        out[:n, :n] = J
        out[n:, n:] = -J.T
        return out

    def jacobian_product(self, t: float, z: torch.Tensor) -> tuple[int, Callable[[torch.Tensor], torch.Tensor]]:
        """For a matrix-free adjoint solve: the products of :meth:`jacobian`'s block, ``(J v_y,
        -J^T v_lambda)``: a JVP (the double-VJP trick) and a VJP of ``f`` on one graph at ``y``."""
        n = self.n
        jv, vjp = linearization(self.vjp.problem.f, self.vjp.time(t), z[:n].view(self.shape))
        return 2 * n, lambda v: torch.cat([jv(v[:n]), vjp(v[n:]).neg_()])
