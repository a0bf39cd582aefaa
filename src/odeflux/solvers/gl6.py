"""Gauss-Legendre of order 6 (three stages): A-stable, symplectic (fixed step)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .implicit import ImplicitRK, ImplicitTableau, collocation

_S15 = math.sqrt(15.0)
_C = (0.5 - _S15 / 10, 0.5, 0.5 + _S15 / 10)  # the Gauss points on [0, 1]

GL6 = ImplicitTableau(
    name="GaussLegendre6",
    order=6,
    c=_C,
    a=(
        (5 / 36, 2 / 9 - _S15 / 15, 5 / 36 - _S15 / 30),
        (5 / 36 + _S15 / 24, 2 / 9, 5 / 36 - _S15 / 24),
        (5 / 36 + _S15 / 30, 2 / 9 + _S15 / 15, 5 / 36),
    ),
    b=(5 / 18, 4 / 9, 5 / 18),
    # The collocation polynomial (cubic), stage order 3.
    interp=collocation(_C)[2],
    interp_order=3,
)


@dataclass(eq=False, repr=False)
class GaussLegendre6(ImplicitRK):
    """Gauss-Legendre, order 6: A-stable (not L-stable), symplectic, fixed step (give ``dt0``);
    a coupled system of 3n unknowns per step."""

    tableau: ImplicitTableau = field(default=GL6, repr=False)
