"""Rosenbrock23: Shampine and Reichelt's L-stable Rosenbrock-W pair of orders 2(3) (MATLAB's
``ode23s``; OrdinaryDiffEq's ``Rosenbrock23``), with its second-order dense output.

L. F. Shampine and M. W. Reichelt, The MATLAB ODE Suite, SIAM J. Sci. Comput. 18 (1997). With
``d = 1 / (2 + sqrt 2)``, ``e32 = 6 + sqrt 2``, ``W = I - h d J`` and ``F0 = f(t, y)``::

    k1 = W^-1 (F0 + h d T)
    F1 = f(t + h/2, y + h/2 k1);      k2 = W^-1 (F1 - k1) + k1
    y1 = y + h k2;                    F2 = f(t + h, y1)
    k3 = W^-1 (F2 - e32 (k2 - F1) - 2 (k1 - F0) + h d T)
    err = h/6 (k1 - 2 k2 + k3)

As a classical Rosenbrock method (``W k_i = f(..) + h J sum_{j<i} gamma_ij k_j + gamma_i h T``)
this is ``alpha_21 = 1/2``, ``alpha_32 = 1``, ``gamma_21 = -d``, ``gamma_31 = d (e32 - 2)``,
``gamma_32 = -d e32``, ``b = (0, 1, 0)`` and the third-order ``b_hat = (1, 4, 1) / 6``. (The
``h d T`` in ``k3`` is the paper's: with it ``gamma_3 = sum_j gamma_3j``, which the third order
needs on non-autonomous problems.) The second-order solution holds for any ``W`` (a W-method:
``sum b_j alpha_j = 1/2`` and ``sum b_j gamma_j = 0``), so a Jacobian may serve several steps
(``max_jacobian_age``); the error estimate is sharpest with a fresh one (the default).

Dense output: ``y(t + theta h) = y0 + h (theta (1 - theta) k1 + theta (theta - 2d) k2) / (1 - 2d)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .rosenbrock import Rosenbrock, RosenbrockTableau

_D = 1.0 / (2.0 + math.sqrt(2.0))
_E32 = 6.0 + math.sqrt(2.0)

ROSENBROCK23 = RosenbrockTableau.from_classical(
    name="Rosenbrock23",
    order=2,
    error_order=3,  # the error estimate is the second-order solution's local error, O(h^3)
    alpha=((0.0, 0.0, 0.0), (0.5, 0.0, 0.0), (0.0, 1.0, 0.0)),
    Gamma=((_D, 0.0, 0.0), (-_D, _D, 0.0), (_D * (_E32 - 2.0), -_D * _E32, _D)),
    b=(0.0, 1.0, 0.0),
    b_hat=(1 / 6, 4 / 6, 1 / 6),
    # On the classical k: theta (1 - theta) / (1 - 2d) for k1, theta (theta - 2d) / (1 - 2d) for k2.
    interp=((1 / (1 - 2 * _D), -1 / (1 - 2 * _D)), (-2 * _D / (1 - 2 * _D), 1 / (1 - 2 * _D)), (0.0, 0.0)),
    interp_order=2,
    w_method=True,
)


@dataclass(eq=False, repr=False)
class Rosenbrock23(Rosenbrock):
    """Shampine-Reichelt's L-stable Rosenbrock-W 2(3) (``ode23s``): three stages, two evaluations
    of ``f`` and three linear solves per step. For stiff problems at loose tolerances (1e-2 to
    1e-4), and where the Jacobian is inexact (a W-method: ``max_jacobian_age > 1`` reuses it)."""

    tableau: RosenbrockTableau = field(default=ROSENBROCK23, repr=False)
