"""Radau IIA of order 5 (three stages, Hairer's RADAU5 method): L-stable, stiffly accurate (fixed step)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .implicit import ImplicitRK, ImplicitTableau, collocation

_S6 = math.sqrt(6.0)
_C = ((4 - _S6) / 10, (4 + _S6) / 10, 1.0)  # the Radau right points

RADAUIIA5 = ImplicitTableau(
    name="RadauIIA5",
    order=5,
    c=_C,
    a=(
        ((88 - 7 * _S6) / 360, (296 - 169 * _S6) / 1800, (-2 + 3 * _S6) / 225),
        ((296 + 169 * _S6) / 1800, (88 + 7 * _S6) / 360, (-2 - 3 * _S6) / 225),
        ((16 - _S6) / 36, (16 + _S6) / 36, 1 / 9),
    ),
    b=((16 - _S6) / 36, (16 + _S6) / 36, 1 / 9),
    # The collocation polynomial (cubic): the method's own dense output, stage order 3.
    interp=collocation(_C)[2],
    interp_order=3,
)


@dataclass(eq=False, repr=False)
class RadauIIA5(ImplicitRK):
    """Radau IIA, order 5: L-stable, fixed step (give ``dt0``); a coupled system of 3n unknowns per step."""

    tableau: ImplicitTableau = field(default=RADAUIIA5, repr=False)
