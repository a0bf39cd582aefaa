"""The forward Euler method (fixed step)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .tableau import ButcherTableau, ExplicitRK

EULER = ButcherTableau(
    name="Euler", order=1, c=(0.0,), a=((),), b=(1.0,), b_err=None, interp=((1.0,),), interp_order=1
)


@dataclass(eq=False, repr=False)
class Euler(ExplicitRK):
    """Forward Euler: first order, fixed step (give ``dt0``)."""

    tableau: ButcherTableau = field(default=EULER, repr=False)
