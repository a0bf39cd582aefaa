"""The Gauss adjoint: lambda backwards, mu by Gauss-Legendre quadrature on each adjoint step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..kernels import arrays
from .base import AdjointRun, ContinuousAdjoint
from .rhs import param_rows


@dataclass(eq=False)
class GaussAdjoint(ContinuousAdjoint):
    """Solves ``lambda`` backwards and, at each accepted adjoint step, adds ``int lambda^T df/dp``
    over the step by Gauss-Legendre quadrature at ``ceil((order + 1) / 2)`` nodes, with ``lambda``
    from the adjoint step's own interpolant and ``y`` from the forward's dense output.

    Parameters can have any structure (no flattening on the user's side). ``checkpointing``
    as for :class:`InterpolatingAdjoint`.
    """

    checkpointing: bool = False

    def integrate_interval(self, run: AdjointRun, t_hi, t_lo, y_hi, y_lo, lam, mu, dense):
        vjp, shape, solver = run.vjp, run.y.shape, run.solver
        rhs = run.lambda_rhs(dense, t_hi, y_hi)
        if run.n_params == 0:
            return run.adjoint_integrate(rhs, lam, t_hi, t_lo, blocks=(run.n,)).y, mu

        m = math.ceil((solver.order + 1) / 2)
        x, w = np.polynomial.legendre.leggauss(m)
        thetas = (x + 1) / 2
        co = solver.coefficients(lam.dtype, lam.device)
        theta_t = torch.tensor(thetas, dtype=lam.dtype, device=lam.device)
        lam_weights = solver.dense_weights(theta_t, co)  # (m, stages), fixed for every step
        acc: list[torch.Tensor] = []

        def on_accept(t: float, h: float, z0: torch.Tensor, z1: torch.Tensor, K: torch.Tensor) -> None:
            lams = solver.interpolate(z0, h, K, lam_weights)  # (m, n)
            run.bstats.n_quadrature_points += m
            if rhs.batched:  # small CPU arrays and a rule with stage plans: the nodes in one batch
                taus = [t + float(th) * h for th in thetas]
                rows = param_rows(vjp, dense, taus, arrays.as_array(lams).reshape(m, -1), run.n_params)
                if rows is not None:
                    acc.append(torch.from_numpy(np.dot((w * (abs(h) / 2)).astype(rows.dtype), rows)))
                    return
            part = None
            for j in range(m):
                tau = t + float(thetas[j]) * h
                g = vjp.flat(tau, dense.at(tau), lams[j].view(shape), want_y=False)
                part = g * float(w[j]) if part is None else part.add_(g, alpha=float(w[j]))
            acc.append(part.mul_(abs(h) / 2))

        z = run.adjoint_integrate(rhs, lam, t_hi, t_lo, blocks=(run.n,), on_accept=on_accept).y
        if acc:
            mu = mu + torch.stack(acc).sum(0)
        return z, mu
