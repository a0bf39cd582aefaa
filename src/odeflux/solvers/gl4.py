"""Gauss-Legendre of order 4 (two stages): A-stable, symplectic (fixed step)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .implicit import ImplicitRK, ImplicitTableau, collocation

_R3 = math.sqrt(3.0) / 6
_C = (0.5 - _R3, 0.5 + _R3)  # the Gauss points on [0, 1]

GL4 = ImplicitTableau(
    name="GaussLegendre4",
    order=4,
    c=_C,
    a=((0.25, 0.25 - _R3), (0.25 + _R3, 0.25)),
    b=(0.5, 0.5),
    # The collocation polynomial (quadratic), stage order 2.
    interp=collocation(_C)[2],
    interp_order=2,
)


@dataclass(eq=False, repr=False)
class GaussLegendre4(ImplicitRK):
    """Gauss-Legendre, order 4: A-stable (not L-stable), symplectic, fixed step (give ``dt0``);
    a coupled system of 2n unknowns per step."""

    tableau: ImplicitTableau = field(default=GL4, repr=False)
