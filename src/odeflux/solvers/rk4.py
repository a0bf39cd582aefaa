"""The classic fourth-order Runge-Kutta method (fixed step)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .tableau import ButcherTableau, ExplicitRK

RK4 = ButcherTableau(
    name="RK4",
    order=4,
    c=(0.0, 0.5, 0.5, 1.0),
    a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
    b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
    b_err=None,
    # The standard third-order continuous extension of RK4.
    interp=(
        (1.0, -3 / 2, 2 / 3),
        (0.0, 1.0, -2 / 3),
        (0.0, 1.0, -2 / 3),
        (0.0, -1 / 2, 2 / 3),
    ),
    interp_order=3,
)


@dataclass(eq=False, repr=False)
class RK4(ExplicitRK):
    """Classic RK4: fourth order, fixed step (give ``dt0``)."""

    tableau: ButcherTableau = field(default=RK4, repr=False)
