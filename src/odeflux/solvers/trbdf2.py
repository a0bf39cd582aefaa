"""TR-BDF2 (Bank et al. 1985) as a three-stage ESDIRK, gamma = 2 - sqrt(2): a trapezoidal stage to
t + gamma h, then BDF2 to t + h; second order, L-stable (fixed step)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .implicit import ImplicitRK, ImplicitTableau
from .tableau import hermite_interp

_G = 2 - math.sqrt(2.0)
_D = _G / 2  # the diagonal
_W = math.sqrt(2.0) / 4  # (1 - d) / 2

TRBDF2 = ImplicitTableau(
    name="TRBDF2",
    order=2,
    c=(0.0, _G, 1.0),
    a=((0.0, 0.0, 0.0), (_D, _D, 0.0), (_W, _W, _D)),
    b=(_W, _W, _D),
    # Stage 1 is f(t, y) and stage 3 is f(t + h, y1) (stiffly accurate): cubic Hermite through the
    # step's ends, second order inside the step (y1 is).
    interp=hermite_interp((_W, _W, _D), fsal_stage=2),
    interp_order=2,
)


@dataclass(eq=False, repr=False)
class TRBDF2(ImplicitRK):
    """TR-BDF2: second order, L-stable, fixed step (give ``dt0``); two implicit stages solved one
    at a time with one Newton matrix (n unknowns)."""

    tableau: ImplicitTableau = field(default=TRBDF2, repr=False)
