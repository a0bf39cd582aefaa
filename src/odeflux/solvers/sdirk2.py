"""The two-stage, second-order, L-stable SDIRK method (Alexander's, gamma = 1 - sqrt(2)/2; fixed step)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .implicit import ImplicitRK, ImplicitTableau

_G = 1 - math.sqrt(2.0) / 2  # the root of gamma^2 - 2 gamma + 1/2 that makes it L-stable with gamma < 1

SDIRK2 = ImplicitTableau(
    name="SDIRK2",
    order=2,
    c=(_G, 1.0),
    a=((_G, 0.0), (1 - _G, _G)),
    b=(1 - _G, _G),
    # The quadratic weights meeting the order-2 conditions at every theta, b_1 + b_2 = theta and
    # gamma b_1 + b_2 = theta^2/2: b_2(theta) = (theta^2/2 - gamma theta)/(1 - gamma), b_1 = theta - b_2.
    interp=((1 / (1 - _G), -0.5 / (1 - _G)), (-_G / (1 - _G), 0.5 / (1 - _G))),
    interp_order=2,
)


@dataclass(eq=False, repr=False)
class SDIRK2(ImplicitRK):
    """SDIRK2: second order, L-stable, fixed step (give ``dt0``); two stages solved one at a
    time with one Newton matrix (n unknowns)."""

    tableau: ImplicitTableau = field(default=SDIRK2, repr=False)
