"""The implicit midpoint rule (Gauss-Legendre of order 2): A-stable, symplectic (fixed step)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .implicit import ImplicitRK, ImplicitTableau

IMPLICIT_MIDPOINT = ImplicitTableau(
    name="ImplicitMidpoint",
    order=2,
    c=(0.5,),
    a=((0.5,),),
    b=(1.0,),
    # The collocation polynomial on c = 1/2: linear, y0 + theta h K.
    interp=((1.0,),),
    interp_order=1,
)


@dataclass(eq=False, repr=False)
class ImplicitMidpoint(ImplicitRK):
    """Implicit midpoint: second order, A-stable, symplectic, fixed step (give ``dt0``)."""

    tableau: ImplicitTableau = field(default=IMPLICIT_MIDPOINT, repr=False)
