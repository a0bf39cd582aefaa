"""Bogacki-Shampine 3(2), with cubic Hermite dense output."""

from __future__ import annotations

from dataclasses import dataclass, field

from .tableau import ButcherTableau, ExplicitRK, hermite_interp

_B = (2 / 9, 1 / 3, 4 / 9)
_B_HAT = (7 / 24, 1 / 4, 1 / 3, 1 / 8)

BS3 = ButcherTableau(
    name="BS3",
    order=3,
    error_order=2,
    fsal=True,
    c=(0.0, 1 / 2, 3 / 4, 1.0),
    a=((), (1 / 2,), (0.0, 3 / 4), _B),
    b=_B + (0.0,),
    b_err=tuple(x - y for x, y in zip(_B + (0.0,), _B_HAT)),
    interp=hermite_interp(_B + (0.0,), fsal_stage=3),
    interp_order=3,
)


@dataclass(eq=False, repr=False)
class BS3(ExplicitRK):
    """Bogacki-Shampine 3(2): adaptive, FSAL, cubic Hermite dense output. Good at loose tolerances."""

    tableau: ButcherTableau = field(default=BS3, repr=False)
