"""Radau IIA of order 3 (two stages): L-stable, stiffly accurate (fixed step)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .implicit import ImplicitRK, ImplicitTableau, collocation

_C = (1 / 3, 1.0)  # the Radau right points: zeros of P_2(2x - 1) - P_1(2x - 1)

RADAUIIA3 = ImplicitTableau(
    name="RadauIIA3",
    order=3,
    c=_C,
    a=((5 / 12, -1 / 12), (3 / 4, 1 / 4)),
    b=(3 / 4, 1 / 4),
    # The collocation polynomial (quadratic): the method's own dense output, stage order 2.
    interp=collocation(_C)[2],
    interp_order=2,
)


@dataclass(eq=False, repr=False)
class RadauIIA3(ImplicitRK):
    """Radau IIA, order 3: L-stable, fixed step (give ``dt0``); a coupled system of 2n unknowns per step."""

    tableau: ImplicitTableau = field(default=RADAUIIA3, repr=False)
