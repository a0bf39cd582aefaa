"""Heun's method: the explicit trapezoidal rule with Euler as its embedded error estimate."""

from __future__ import annotations

from dataclasses import dataclass, field

from .tableau import ButcherTableau, ExplicitRK

HEUN = ButcherTableau(
    name="Heun",
    order=2,
    error_order=1,
    c=(0.0, 1.0),
    a=((), (1.0,)),
    b=(0.5, 0.5),
    b_err=(0.5 - 1.0, 0.5),
    # b_1(theta) = theta - theta^2/2, b_2(theta) = theta^2/2: second order inside the step.
    interp=((1.0, -0.5), (0.0, 0.5)),
    interp_order=2,
)


@dataclass(eq=False, repr=False)
class Heun(ExplicitRK):
    """Heun 2(1): adaptive, second order."""

    tableau: ButcherTableau = field(default=HEUN, repr=False)
