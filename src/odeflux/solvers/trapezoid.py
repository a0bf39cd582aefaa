"""The trapezoidal rule (Crank-Nicolson; Lobatto IIIA with two stages): A-stable (fixed step)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .implicit import ImplicitRK, ImplicitTableau

TRAPEZOID = ImplicitTableau(
    name="Trapezoid",
    order=2,
    c=(0.0, 1.0),
    a=((0.0, 0.0), (0.5, 0.5)),
    b=(0.5, 0.5),
    # The collocation polynomial on c = (0, 1): b_1(theta) = theta - theta^2/2, b_2(theta) = theta^2/2.
    interp=((1.0, -0.5), (0.0, 0.5)),
    interp_order=2,
)


@dataclass(eq=False, repr=False)
class Trapezoid(ImplicitRK):
    """Trapezoidal rule (Crank-Nicolson): second order, A-stable (not L-stable), fixed step
    (give ``dt0``). Its first stage is ``f(t, y)``: one implicit stage per step."""

    tableau: ImplicitTableau = field(default=TRAPEZOID, repr=False)
