"""Runge-Kutta-Fehlberg 2(1), as torchdiffeq's ``fehlberg2``: the 2nd-order solution is kept."""

from __future__ import annotations

from dataclasses import dataclass, field

from .tableau import ButcherTableau, ExplicitRK

_B = (1 / 512, 255 / 256, 1 / 512)
# Fehlberg's 1st-order companion is the third stage's input, so its last weight is zero.
_B_HAT = (1 / 256, 255 / 256, 0.0)

FEHLBERG2 = ButcherTableau(
    name="Fehlberg2",
    order=2,
    error_order=1,
    c=(0.0, 1 / 2, 1.0),
    a=((), (1 / 2,), _B_HAT[:2]),
    b=_B,
    b_err=tuple(x - y for x, y in zip(_B, _B_HAT)),
    # b_i(theta) = theta [i = 1] + theta^2 (b_i - [i = 1]): second order for every theta, as any
    # method of order >= 2 with c_1 = 0 allows without its end slope (it is not FSAL).
    interp=((1.0, _B[0] - 1.0), (0.0, _B[1]), (0.0, _B[2])),
    interp_order=2,
)


@dataclass(eq=False, repr=False)
class Fehlberg2(ExplicitRK):
    """Runge-Kutta-Fehlberg 2(1): adaptive, 2nd order (with local extrapolation), quadratic dense
    output. Three stages per step; the last stage sits at the step's end but is not FSAL (the
    solution kept is the 2nd-order one).

    The estimate is the error of Fehlberg's 1st-order formula, which is nearly 2nd order
    (``b_hat . c = 255/512``): ``dt (k3 - k1) / 512`` runs well below the error of the solution
    kept, so expect errors of 10-2000x ``rtol`` (as with torchdiffeq's ``fehlberg2``)."""

    tableau: ButcherTableau = field(default=FEHLBERG2, repr=False)
