"""Dormand-Prince 5(4) (Hairer's DOPRI5) with its own 4th-order dense output."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .tableau import ButcherTableau, ExplicitRK, polynomial_weights

_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
_B_HAT = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
# Hairer's continuous extension (dopri5.f, CONTD5) weights.
_D = (
    -12715105075 / 11282082432,
    0.0,
    87487479700 / 32700410799,
    -10690763975 / 1880347072,
    701980252875 / 199316789632,
    -1453857185 / 822651844,
    69997945 / 29380423,
)


def _dense() -> tuple[tuple[float, ...], ...]:
    # CONTD5: y(theta) = y0 + theta*r2 + theta(1-theta)*r3 + theta^2(1-theta)*r4 + theta^2(1-theta)^2*r5
    # with r2 = h b.k, r3 = h k1 - r2, r4 = r2 - h k7 - r3, r5 = h d.k.
    b = np.array(_B + (0.0,))
    e1, e7 = np.eye(7)[0], np.eye(7)[6]
    r3 = e1 - b
    r4 = b - e7 - r3
    d = np.array(_D)
    return polynomial_weights(
        [
            ([1.0], b),
            ([1.0, -1.0], r3),
            ([0.0, 1.0, -1.0], r4),
            ([0.0, 1.0, -2.0, 1.0], d),
        ],
        7,
    )


DOPRI5 = ButcherTableau(
    name="Dopri5",
    order=5,
    error_order=4,
    fsal=True,
    c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    a=(
        (),
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        _B,
    ),
    b=_B + (0.0,),
    b_err=tuple(x - y for x, y in zip(_B + (0.0,), _B_HAT)),
    interp=_dense(),
    interp_order=4,
)


@dataclass(eq=False, repr=False)
class Dopri5(ExplicitRK):
    """Dormand-Prince 5(4): adaptive, FSAL, Hairer's 4th-order dense output."""

    tableau: ButcherTableau = field(default=DOPRI5, repr=False)
