"""Dormand-Prince 8(5,3) as in Hairer's DOP853: 12 stages and FSAL, order 8.

Two departures from DOP853, both because this engine runs one linear tableau per step:

* Error estimate. DOP853 blends a 5th- and a 3rd-order estimate nonlinearly
  (``|e5|^2 / sqrt(|e5|^2 + 0.01 |e3|^2)``, on the norms), which no single ``b_err`` expresses.
  Here ``b_err`` is DOP853's 5th-order estimate alone, and the controller takes its exponent
  (p = 6). It is larger than the blend: at tight tolerances the solver takes 2-3x DOP853's steps
  for the same ``rtol``, and its error lands well below DOP853's.
* Dense output. DOP853's 7th-order interpolant needs three more evaluations of ``f`` per step,
  which this stepper would have to pay on every step (and it would lose FSAL). Instead the
  13 stages already computed carry a 5th-order continuous extension (no extra evaluation), derived
  for odeflux from the order conditions, see ``_INTERP``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .tableau import ButcherTableau, ExplicitRK

# Hairer's published DOP853 coefficients (30 digits, rounded to float64 on parsing).
_C = (
    0.0,
    0.526001519587677318785587544488e-01,
    0.789002279381515978178381316732e-01,
    0.118350341907227396726757197510,
    0.281649658092772603273242802490,
    0.333333333333333333333333333333,
    0.25,
    0.307692307692307692307692307692,
    0.651282051282051282051282051282,
    0.6,
    0.857142857142857142857142857142,
    1.0,
    1.0,
)

# The 8th-order weights, also the last (FSAL) stage's row. Stages 2 to 5 carry no weight.
_B = (
    5.42937341165687622380535766363e-2,
    0.0,
    0.0,
    0.0,
    0.0,
    4.45031289275240888144113950566,
    1.89151789931450038304281599044,
    -5.8012039600105847814672114227,
    3.1116436695781989440891606237e-1,
    -1.52160949662516078556178806805e-1,
    2.01365400804030348374776537501e-1,
    4.47106157277725905176885569043e-2,
)

_A = (
    (),
    (5.26001519587677318785587544488e-2,),
    (1.97250569845378994544595329183e-2, 5.91751709536136983633785987549e-2),
    (2.95875854768068491816892993775e-2, 0.0, 8.87627564304205475450678981324e-2),
    (
        2.41365134159266685502369798665e-1, 0.0, -8.84549479328286085344864962717e-1,
        9.24834003261792003115737966543e-1,
    ),
    (
        3.7037037037037037037037037037e-2, 0.0, 0.0, 1.70828608729473871279604482173e-1,
        1.25467687566822425016691814123e-1,
    ),
    (3.7109375e-2, 0.0, 0.0, 1.70252211019544039314978060272e-1, 6.02165389804559606850219397283e-2, -1.7578125e-2),
    (
        3.70920001185047927108779319836e-2, 0.0, 0.0, 1.70383925712239993810214054705e-1,
        1.07262030446373284651809199168e-1, -1.53194377486244017527936158236e-2, 8.27378916381402288758473766002e-3,
    ),
    (
        6.24110958716075717114429577812e-1, 0.0, 0.0, -3.36089262944694129406857109825,
        -8.68219346841726006818189891453e-1, 2.75920996994467083049415600797e1, 2.01540675504778934086186788979e1,
        -4.34898841810699588477366255144e1,
    ),
    (
        4.77662536438264365890433908527e-1, 0.0, 0.0, -2.48811461997166764192642586468,
        -5.90290826836842996371446475743e-1, 2.12300514481811942347288949897e1, 1.52792336328824235832596922938e1,
        -3.32882109689848629194453265587e1, -2.03312017085086261358222928593e-2,
    ),
    (
        -9.3714243008598732571704021658e-1, 0.0, 0.0, 5.18637242884406370830023853209,
        1.09143734899672957818500254654, -8.14978701074692612513997267357, -1.85200656599969598641566180701e1,
        2.27394870993505042818970056734e1, 2.49360555267965238987089396762, -3.0467644718982195003823669022,
    ),
    (
        2.27331014751653820792359768449, 0.0, 0.0, -1.05344954667372501984066689879e1,
        -2.00087205822486249909675718444, -1.79589318631187989172765950534e1, 2.79488845294199600508499808837e1,
        -2.85899827713502369474065508674, -8.87285693353062954433549289258, 1.23605671757943030647266201528e1,
        6.43392746015763530355970484046e-1,
    ),
    _B,
)

# DOP853's 5th-order error estimate, b - b_hat5 (the FSAL stage carries no weight).
_E5 = (
    0.1312004499419488073250102996e-1,
    0.0,
    0.0,
    0.0,
    0.0,
    -0.1225156446376204440720569753e1,
    -0.4957589496572501915214079952,
    0.1664377182454986536961530415e1,
    -0.3503288487499736816886487290,
    0.3341791187130174790297318841,
    0.8192320648511571246570742613e-1,
    -0.2235530786388629525884427845e-1,
    0.0,
)

# A quintic continuous extension on the 13 stages, derived for odeflux (not part of DOP853):
# b(theta) satisfies every order condition up to order 5 for all theta, b(1) = b, and
# b'(0) = e_1, b'(1) = e_13, so the interpolant is C1 across steps (slopes f(y0) and f(y1)).
# Those conditions leave 8 degrees of freedom; they minimise the sum over the 6-node rooted trees
# of the integral over [0, 1] of (b(theta) . Phi(t) - theta^6 / gamma(t))^2 (the interpolant's
# leading error), the smallest coefficients among the minimisers (solved in 60-digit arithmetic).
# Row i: the coefficients of theta, ..., theta^5 in b_i(theta).
_INTERP = (
    (1.0, -4.607429103047835, 8.992282218226466, -7.8908084567265835, 2.560249075664521),
    (0.0, 0.0, 0.0, 0.0, 0.0),
    (0.0, 0.0, 0.0, 0.0, 0.0),
    (0.0, 0.0, 0.0, 0.0, 0.0),
    (0.0, 0.0, 0.0, 0.0, 0.0),
    (0.0, -2.8097137104087113, 32.12587643391284, -33.57104727283752, 8.705197442085788),
    (0.0, 18.013069798640025, -48.523386767160105, 52.465153634972644, -20.06331876713806),
    (0.0, -11.116895363536422, 8.657573991520431, -12.97048169248452, 9.628599104489926),
    (0.0, -2.9138549608890676, 7.170260458594096, -4.043134199731891, 0.0978930689846817),
    (0.0, 2.3077083619596896, -2.9692153024162202, -1.7454992293592086, 2.254845220153223),
    (0.0, 1.8207810772801172, -9.263873974451286, 14.072231721082373, -6.4277734231071735),
    (0.0, 1.3467379404062085, -6.270325139034161, 8.72398953548856, -3.7556917211328344),
    (0.0, -2.0404040404040025, 10.080808080807932, -15.040404040403855, 6.999999999999926),
)

DOPRI8 = ButcherTableau(
    name="Dopri8",
    order=8,
    error_order=5,
    fsal=True,
    c=_C,
    a=_A,
    b=_B + (0.0,),
    b_err=_E5,
    interp=_INTERP,
    interp_order=5,
)


@dataclass(eq=False, repr=False)
class Dopri8(ExplicitRK):
    """Dormand-Prince 8(5,3) (DOP853's tableau): adaptive, FSAL, 8th order.

    Its error estimate is DOP853's 5th-order one alone (DOP853's blend with the 3rd-order
    estimate is not linear), and its dense output a free 5th-order continuous extension rather
    than DOP853's 7th-order one (three more ``f`` evaluations per step); see the module docstring.
    """

    tableau: ButcherTableau = field(default=DOPRI8, repr=False)

    @property
    def error_order(self) -> int:
        # The estimate is the 5th-order one, O(dt^6): the step-size controller must see that
        # exponent, not 8 (DOP853's blended estimate behaves like dt^8, this one does not).
        return self.tableau.error_order + 1
