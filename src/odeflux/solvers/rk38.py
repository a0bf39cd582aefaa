"""Kutta's 3/8 rule, the fourth-order method torchdiffeq's ``rk4`` runs (fixed step)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .tableau import ButcherTableau, ExplicitRK

RK38 = ButcherTableau(
    name="RK38",
    order=4,
    c=(0.0, 1 / 3, 2 / 3, 1.0),
    a=((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)),
    b=(1 / 8, 3 / 8, 3 / 8, 1 / 8),
    b_err=None,
    # The cubic continuous extension of third order. It is the only one: with these nodes the
    # third-order conditions (1, c, c^2, Ac against 1, theta/2, theta^2/3, theta^2/6) form a
    # nonsingular 4x4 system for each power of theta.
    interp=(
        (1.0, -15 / 8, 1.0),
        (0.0, 15 / 8, -3 / 2),
        (0.0, 3 / 8, 0.0),
        (0.0, -3 / 8, 1 / 2),
    ),
    interp_order=3,
)


@dataclass(eq=False, repr=False)
class RK38(ExplicitRK):
    """Kutta's 3/8 rule: fourth order, fixed step (give ``dt0``), 3rd-order dense output.

    torchdiffeq's ``method="rk4"`` is this method; odeflux's ``RK4()`` is the classic one."""

    tableau: ButcherTableau = field(default=RK38, repr=False)
