"""Tsitouras' 5(4) pair (2011) with its free 4th-order interpolant; the default solver."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .tableau import ButcherTableau, ExplicitRK

_A7 = (0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081, 2.324710524099774)

# Dense output as in OrdinaryDiffEq: b_1(theta) = theta + r12 theta^2 + r13 theta^3 + r14 theta^4 and
# b_i(theta) = r_i2 theta^2 + r_i3 theta^3 + r_i4 theta^4 for i >= 2.
_R = np.array(
    [
        [1.0, -2.763706197274826, 2.9132554618219126, -1.0530884977290216],
        [0.0, 0.13169999999999998, -0.2234, 0.1017],
        [0.0, 3.9302962368947516, -5.941033872131505, 2.490627285651253],
        [0.0, -12.411077166933676, 30.33818863028232, -16.548102889244902],
        [0.0, 37.50931341651104, -88.1789048947664, 47.37952196281928],
        [0.0, -27.896526289197286, 65.09189467479366, -34.87065786149661],
        [0.0, 1.5, -4.0, 2.5],
    ]
)

TSIT5 = ButcherTableau(
    name="Tsit5",
    order=5,
    error_order=4,
    fsal=True,
    c=(0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0),
    a=(
        (),
        (0.161,),
        (-0.008480655492356989, 0.335480655492357),
        (2.8971530571054935, -6.359448489975075, 4.3622954328695815),
        (5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525),
        (5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401, -0.02826905039406838),
        _A7,
    ),
    b=_A7 + (0.0,),
    # b - b_hat (the sign of the last weight follows OrdinaryDiffEq's correction of the paper).
    b_err=(
        0.00178001105222577714,
        0.0008164344596567469,
        -0.007880878010261995,
        0.1447110071732629,
        -0.5823571654525552,
        0.45808210592918697,
        -1.0 / 66.0,
    ),
    interp=tuple(tuple(float(v) for v in row) for row in _R),
    interp_order=4,
)


@dataclass(eq=False, repr=False)
class Tsit5(ExplicitRK):
    """Tsitouras 5(4): adaptive, FSAL, 4th-order dense output. The default."""

    tableau: ButcherTableau = field(default=TSIT5, repr=False)
