"""The quadrature adjoint: lambda backwards with dense output, then mu by adaptive quadrature."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .base import AdjointRun, ContinuousAdjoint
from .rhs import param_rows

# Gauss-Kronrod 7-15 (QUADPACK's QK15) on [-1, 1]: Kronrod nodes from the outside in, the centre last.
_XGK = np.array([
    0.991455371120812639206854697526329, 0.949107912342758524526189684047851,
    0.864864423359769072789712788640926, 0.741531185599394439863864773280788,
    0.586087235467691130294144845693013, 0.405845151377397166906606412076961,
    0.207784955007898467600689403773245, 0.0,
])  # fmt: skip
_WGK = np.array([
    0.022935322010529224963732008058970, 0.063092092629978553290700663189204,
    0.104790010322250183839876322541518, 0.140653259715525918745189590510238,
    0.169004726639267902826583426598550, 0.190350578064785409913256402421014,
    0.204432940075298892414161999234649, 0.209482141084727828012999174891714,
])  # fmt: skip
# The 7-point Gauss weights, at the Kronrod nodes of odd index (1, 3, 5) and the centre.
_WG = np.array([
    0.129484966168869693270611432679082, 0.279705391489276667901467771423780,
    0.381830050505118944950369775488975, 0.417959183673469387755102040816327,
])  # fmt: skip


def kronrod_rule() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nodes on [-1, 1] (15), Kronrod weights (15) and Gauss weights (15, zero off the Gauss nodes)."""
    x = np.concatenate([-_XGK[:-1], [0.0], _XGK[:-1][::-1]])
    wk = np.concatenate([_WGK[:-1], [_WGK[-1]], _WGK[:-1][::-1]])
    wg_half = np.zeros(7)
    wg_half[1::2] = _WG[:3]
    wg = np.concatenate([wg_half, [_WG[3]], wg_half[::-1]])
    return x, wk, wg


@dataclass(eq=False)
class QuadratureAdjoint(ContinuousAdjoint):
    """Solves ``lambda`` backwards with dense output, then integrates ``mu = int lambda^T df/dp dt``
    over each adjoint step by adaptive Gauss-Kronrod (7-15) quadrature, bisecting a step until its
    error estimate meets ``quad_rtol``/``quad_atol`` (default: the adjoint's tolerances).
    """

    quad_rtol: float | None = None
    quad_atol: float | None = None
    max_depth: int = 12

    def integrate_interval(self, run: AdjointRun, t_hi, t_lo, y_hi, y_lo, lam, mu, dense):
        vjp, shape = run.vjp, run.y.shape
        rhs = run.lambda_rhs(dense, t_hi, y_hi)
        res = run.adjoint_integrate(rhs, lam, t_hi, t_lo, blocks=(run.n,), dense=True)
        if run.n_params == 0:
            return res.y, mu
        lam_dense = res.dense
        assert lam_dense is not None
        rtol = self.quad_rtol if self.quad_rtol is not None else run.rtol
        atol = self.quad_atol if self.quad_atol is not None else run.atol
        x, wk, wg = kronrod_rule()
        total = mu

        batched = rhs.batched and lam_dense.on_arrays  # small CPU arrays and a rule with stage plans

        def integrand(ts: list[float]) -> torch.Tensor:
            run.bstats.n_quadrature_points += len(ts)
            rows = param_rows(vjp, dense, ts, lam_dense.at_arrays(ts), run.n_params) if batched else None
            if rows is not None:  # the nodes in one batch
                return torch.from_numpy(rows)
            out = []
            for t in ts:
                out.append(vjp.flat(t, dense.at(t), lam_dense.at(t).view(shape), want_y=False))
            return torch.stack(out)

        # Adaptive bisection with an explicit work list (a recursive closure would be a reference
        # cycle holding both interpolants until the garbage collector runs).
        work = [(*sorted((t0, t0 + dt)), 0) for t0, dt in zip(lam_dense.t_starts, lam_dense.dts)]
        while work:
            a, b, depth = work.pop()
            half, mid = (b - a) / 2, (a + b) / 2
            vals = integrand([mid + half * float(xi) for xi in x])
            wts = torch.tensor(np.stack([wk, wg]) * half, dtype=vals.dtype, device=vals.device)
            est = wts @ vals  # (2, P): Kronrod and Gauss estimates
            err = float(torch.linalg.vector_norm(est[0] - est[1], ord=math.inf))
            size = float(torch.linalg.vector_norm(est[0], ord=math.inf))
            if err <= max(atol, rtol * size) or depth >= self.max_depth:
                total = total + est[0]
            else:
                work += [(a, mid, depth + 1), (mid, b, depth + 1)]
        return res.y, total
