"""The explicit midpoint method (fixed step)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .tableau import ButcherTableau, ExplicitRK

MIDPOINT = ButcherTableau(
    name="Midpoint",
    order=2,
    c=(0.0, 0.5),
    a=((), (0.5,)),
    b=(0.0, 1.0),
    b_err=None,
    # b_1(theta) = theta - theta^2, b_2(theta) = theta^2: second order inside the step.
    interp=((1.0, -1.0), (0.0, 1.0)),
    interp_order=2,
)


@dataclass(eq=False, repr=False)
class Midpoint(ExplicitRK):
    """Explicit midpoint: second order, fixed step (give ``dt0``)."""

    tableau: ButcherTableau = field(default=MIDPOINT, repr=False)
