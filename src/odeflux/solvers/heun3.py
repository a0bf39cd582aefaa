"""Heun's third-order method (fixed step), as torchdiffeq's ``heun3``."""

from __future__ import annotations

from dataclasses import dataclass, field

from .tableau import ButcherTableau, ExplicitRK

_B = (1 / 4, 0.0, 3 / 4)

HEUN3 = ButcherTableau(
    name="Heun3",
    order=3,
    c=(0.0, 1 / 3, 2 / 3),
    a=((), (1 / 3,), (0.0, 2 / 3)),
    b=_B,
    b_err=None,
    # b_i(theta) = theta [i = 1] + theta^2 (b_i - [i = 1]). Second order is the most these stages
    # allow for every theta: third order would need the theta^2 coefficients q to satisfy
    # q.c^2 = q.Ac = 0, which forces q_2 = q_3 = 0, and then q.c = 0 instead of 1/2.
    interp=((1.0, _B[0] - 1.0), (0.0, _B[1]), (0.0, _B[2])),
    interp_order=2,
)


@dataclass(eq=False, repr=False)
class Heun3(ExplicitRK):
    """Heun's third-order method: third order, fixed step (give ``dt0``), 2nd-order dense output."""

    tableau: ButcherTableau = field(default=HEUN3, repr=False)
