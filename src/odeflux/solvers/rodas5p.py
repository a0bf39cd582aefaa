"""Rodas5P: Steinebach's stiffly accurate Rosenbrock method of order 5(4), eight stages, with a
fourth-order dense output (OrdinaryDiffEq's ``Rodas5P``).

G. Steinebach, Construction of Rosenbrock-Wanner method Rodas5P and numerical benchmarks within the
Julia Differential Equations package, BIT Numer. Math. 63 (2023). The coefficients are in the
transformed form (:mod:`odeflux.solvers.rosenbrock`): ``a``, ``C``, ``gamma``, the stage times
``c``, the time-derivative coefficients ``d`` and the dense-output matrix ``H``. The method is
stiffly accurate: the solution is the last stage's input plus its increment,
``y1 = y + sum_{j<8} a_8j U_j + U_8`` (so ``m`` is ``a``'s last row with a 1 appended), and the
embedded fourth-order solution is that input, so the error estimate is ``U_8``.

Not a W-method: its order needs the exact Jacobian of each step (``max_jacobian_age=1``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .rosenbrock import Rosenbrock, RosenbrockTableau, rodas_interp

_A = (
    (),
    (3.0,),
    (2.849394379747939, 0.45842242204463923),
    (-6.954028509809101, 2.489845061869568, -10.358996098473584),
    (2.8029986275628964, 0.5072464736228206, -0.3988312541770524, -0.04721187230404641),
    (-7.502846399306121, 2.561846144803919, -11.627539656261098, -0.18268767659942256, 0.030198172008377946),
    (-7.502846399306121, 2.561846144803919, -11.627539656261098, -0.18268767659942256, 0.030198172008377946, 1.0),
    (-7.502846399306121, 2.561846144803919, -11.627539656261098, -0.18268767659942256, 0.030198172008377946, 1.0, 1.0),
)
_C = (
    (),
    (-14.155112264123755,),
    (-17.97296035885952, -2.859693295451294),
    (147.12150275711716, -1.41221402718213, 71.68940251302358),
    (165.43517024871676, -0.4592823456491126, 42.90938336958603, -5.961986721573306),
    (24.854864614690072, -3.0009227002832186, 47.4931110020768, 5.5814197821558125, -0.6610691825249471),
    (30.91273214028599, -3.1208243349937974, 77.79954646070892, 34.28646028294783, -19.097331116725623,
     -28.087943162872662),
    (37.80277123390563, -3.2571969029072276, 112.26918849496327, 66.9347231244047, -40.06618937091002,
     -54.66780262877968, -9.48861652309627),
)  # fmt: skip
_H = (
    (25.948786856663858, -2.5579724845846235, 10.433815404888879, -2.3679251022685204, 0.524948541321073,
     1.1241088310450404, 0.4272876194431874, -0.17202221070155493),
    (-9.91568850695171, -0.9689944594115154, 3.0438037242978453, -24.495224566215796, 20.176138334709044,
     15.98066361424651, -6.789040303419874, -6.710236069923372),
    (11.419903575922262, 2.8879645146136994, 72.92137995996029, 80.12511834622643, -52.072871366152654,
     -59.78993625266729, -0.15582684282751913, 4.883087185713722),
)  # fmt: skip
_M = _A[-1] + (1.0,)  # stiffly accurate: the last stage's input plus its increment

RODAS5P = RosenbrockTableau(
    name="Rodas5P",
    order=5,
    error_order=5,  # the error estimate is the embedded fourth-order solution's local error, O(h^5)
    gamma=0.21193756319429014,
    a=_A,
    C=_C,
    m=_M,
    m_err=(0.0,) * 7 + (1.0,),
    c=(0.0, 0.6358126895828704, 0.4095798393397535, 0.9769306725060716, 0.4288403609558664, 1.0, 1.0, 1.0),
    d=(0.21193756319429014, -0.42387512638858027, -0.3384627126235924, 1.8046452872882734, 2.325825639765069,
       0.0, 0.0, 0.0),
    interp=rodas_interp(_M, _H),
    interp_order=4,
)  # fmt: skip


@dataclass(eq=False, repr=False)
class Rodas5P(Rosenbrock):
    """Steinebach's Rodas5P: stiffly accurate Rosenbrock method of order 5(4), eight stages (seven
    evaluations of ``f``, one Jacobian, one LU factorisation and eight linear solves per step),
    with a fourth-order dense output. For stiff problems at moderate to tight tolerances
    (1e-5 to 1e-10); needs the exact Jacobian of each step."""

    tableau: RosenbrockTableau = field(default=RODAS5P, repr=False)
