"""The implicit (backward) Euler method: first order, L-stable (fixed step)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .implicit import ImplicitRK, ImplicitTableau

IMPLICIT_EULER = ImplicitTableau(
    name="ImplicitEuler",
    order=1,
    c=(1.0,),
    a=((1.0,),),
    b=(1.0,),
    # The collocation polynomial on c = 1: linear, y0 + theta h K.
    interp=((1.0,),),
    interp_order=1,
)


@dataclass(eq=False, repr=False)
class ImplicitEuler(ImplicitRK):
    """Implicit Euler: first order, L-stable, fixed step (give ``dt0``)."""

    tableau: ImplicitTableau = field(default=IMPLICIT_EULER, repr=False)
