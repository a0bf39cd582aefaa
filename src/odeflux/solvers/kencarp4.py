"""Kennedy and Carpenter's ARK4(3)6L[2]SA ("Additive Runge-Kutta schemes for
convection-diffusion-reaction equations", Appl. Numer. Math. 44 (2003)): an additive pair of a
6-stage explicit method and an ESDIRK (gamma = 1/4, stiffly accurate, L-stable) sharing ``b``,
``c``, a 3rd-order embedded estimate and a 3rd-order dense output.

Given an :class:`odeflux.IMEX` field, the explicit part goes through the explicit tableau and
only the implicit part through Newton; any other field runs the ESDIRK on the whole of ``f``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction as F

from .implicit import ImplicitRK, ImplicitTableau

_G = F(1, 4)
_C = (F(0), F(1, 2), F(83, 250), F(31, 50), F(17, 20), F(1))
_B = (F(82889, 524892), F(0), F(15625, 83664), F(69875, 102672), F(-2260, 8211), _G)
_B_HAT = (
    F(4586570599, 29645900160), F(0), F(178811875, 945068544), F(814220225, 1159782912), F(-3700637, 11593932),
    F(61727, 225920),
)  # fmt: skip
# The implicit tableau below its diagonal (the last row is b: stiffly accurate).
_AI = (
    (),
    (_G,),
    (F(8611, 62500), F(-1743, 31250)),
    (F(5012029, 34652500), F(-654441, 2922500), F(174375, 388108)),
    (F(15267082809, 155376265600), F(-71443401, 120774400), F(730878875, 902184768), F(2285395, 8070912)),
    _B[:5],
)
_AE = (
    (),
    (F(1, 2),),
    (F(13861, 62500), F(6889, 62500)),
    (F(-116923316275, 2393684061468), F(-2731218467317, 15368042101831), F(9408046702089, 11113171139209)),
    (
        F(-451086348788, 2902428689909), F(-2682348792572, 7519795681897), F(12662868775082, 11960479115383),
        F(3355817975965, 11060851509271),
    ),
    (
        F(647845179188, 3216320057751), F(73281519250, 8382639484533), F(552539513391, 3454668386233),
        F(3354512671639, 8306763924573), F(4040, 17871),
    ),
)  # fmt: skip
# The dense output b_i(theta) = P[i][0] theta^3 + P[i][1] theta^2 + P[i][2] theta (the paper's
# b*_ij, highest power first), shared by both parts (3rd order).
_P = (
    (F(6818779379841, 7100303317025), F(-54480133, 30881146), F(6943876665148, 7220017795957)),
    (F(0), F(0), F(0)),
    (F(2173542590792, 12501825683035), F(-11436875, 14766696), F(7640104374378, 9702883013639)),
    (F(-31592104683404, 5083833661969), F(174696575, 18121608), F(-20649996744609, 7521556579894)),
    (F(61146701046299, 7138195549469), F(-12120380, 966161), F(8854892464581, 2390941311638)),
    (F(-17219254887155, 4939391667607), F(3843, 706), F(-11397109935349, 6675773540249)),
)  # fmt: skip
_S = len(_C)


def _full(rows: tuple, diagonal: F) -> tuple[tuple[float, ...], ...]:
    """Rows below the diagonal as a full matrix (``diagonal`` on it from stage 2 on), in floats."""
    return tuple(
        tuple(float(v) for v in row) + (float(diagonal) if i else 0.0,) + (0.0,) * (_S - i - 1) for i, row in enumerate(rows)
    )


KENCARP4 = ImplicitTableau(
    name="KenCarp4",
    order=4,
    c=tuple(float(v) for v in _C),
    a=_full(_AI, _G),
    b=tuple(float(v) for v in _B),
    interp=tuple(tuple(float(v) for v in reversed(row)) for row in _P),
    interp_order=3,
    b_err=tuple(float(b - bh) for b, bh in zip(_B, _B_HAT)),
    error_order=3,
    # Not FSAL: with a split the last stage is not f(t1, y1) (the explicit rows are not b).
    fsal=False,
    a_explicit=_full(_AE, F(0)),
)


@dataclass(eq=False, repr=False)
class KenCarp4(ImplicitRK):
    """KenCarp4: 4th order with a 3rd-order embedded estimate (adaptive), an IMEX pair: give it
    an :class:`odeflux.IMEX` field (``IMEX(explicit=f_nonstiff, implicit=f_stiff)``) and only the
    stiff part's Jacobian is formed and solved with; any other field is solved with the L-stable,
    stiffly accurate ESDIRK alone. Five implicit stages, one Newton matrix (n x n)."""

    tableau: ImplicitTableau = field(default=KENCARP4, repr=False)
    max_iters: int = 10
