"""Kvaerno's 5(4) ESDIRK (A. Kvaerno, "Singly diagonally implicit Runge-Kutta methods with an
explicit first stage", BIT 44 (2004)): seven stages, an explicit first one, six implicit ones
with one diagonal value gamma = 0.26; stiffly accurate and L-stable, FSAL. The embedded 4th-order
solution is stage 6 (c_6 = 1), so the error estimate is ``h (row 7 - row 6) . K``.

Stage 3 lies past the step's end (c_3 = 1.23): the field is evaluated up to 0.23 h beyond it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .implicit import ImplicitRK, ImplicitTableau
from .tableau import hermite_interp

_G = 0.26
# The rows below the diagonal of Kvaerno's 5(4) pair with gamma = 0.26 (17 significant digits).
_ROWS = (
    (),
    (_G,),
    (0.13, 0.84033320996790809),
    (0.22371961478320505, 0.47675532319799699, -0.06470895363112615),
    (0.16648564323248321, 0.10450018841591720, 0.03631482272098715, -0.13090704451073998),
    (0.13855640231268224, 0.0, -0.04245337201752043, 0.02446657898003141, 0.61943039072480676),
    (0.13659751177640291, 0.0, -0.05496908796538376, -0.04118626728321046, 0.62993304899016403, 0.06962479448202728),
)  # fmt: skip
_S = len(_ROWS)
_A = tuple(tuple(row) + ((_G,) if i else (0.0,)) + (0.0,) * (_S - i - 1) for i, row in enumerate(_ROWS))
_B = _A[-1]  # stiffly accurate
_B_HAT = _A[-2][:-1] + (0.0,)  # stage 6 is the embedded 4th-order solution
_C = tuple(sum(row) for row in _A)  # (row sums: c_3 = 1.23..., c_6 = c_7 = 1)

KVAERNO5 = ImplicitTableau(
    name="Kvaerno5",
    order=5,
    c=_C,
    a=_A,
    b=_B,
    # Cubic Hermite through y0, f(t0, y0), y1 and the last stage f(t1, y1) (FSAL): 3rd order inside
    # the step (an error of O(h^4)), exact at its ends.
    interp=hermite_interp(_B, fsal_stage=_S - 1),
    interp_order=3,
    b_err=tuple(b - bh for b, bh in zip(_B, _B_HAT)),
    error_order=4,
    fsal=True,
)


@dataclass(eq=False, repr=False)
class Kvaerno5(ImplicitRK):
    """Kvaerno5: 5th order, L-stable, stiffly accurate ESDIRK with a 4th-order embedded estimate
    (adaptive); six implicit stages solved one at a time with one Newton matrix (n x n)."""

    tableau: ImplicitTableau = field(default=KVAERNO5, repr=False)
    max_iters: int = 10
