"""Heun's second-order method (the explicit trapezoidal rule) with fixed steps."""

from __future__ import annotations

from dataclasses import dataclass, field

from .tableau import ButcherTableau, ExplicitRK

HEUN2 = ButcherTableau(
    name="Heun2",
    order=2,
    c=(0.0, 1.0),
    a=((), (1.0,)),
    b=(0.5, 0.5),
    # Heun's tableau without its Euler error estimate: the same method as Heun(), but with no
    # estimate the solve takes the fixed steps dt0 asks for whatever controller is named.
    b_err=None,
    # b_1(theta) = theta - theta^2/2, b_2(theta) = theta^2/2: second order inside the step.
    interp=((1.0, -0.5), (0.0, 0.5)),
    interp_order=2,
)


@dataclass(eq=False, repr=False)
class Heun2(ExplicitRK):
    """Heun (explicit trapezoid), torchdiffeq's ``heun2``: second order, fixed step (give ``dt0``)."""

    tableau: ButcherTableau = field(default=HEUN2, repr=False)
