"""The solvers: Runge-Kutta methods (one file per method holding its tableau, one generic stepper
per kind: :class:`ExplicitRK` for explicit tableaus, :class:`ImplicitRK` for implicit ones), the
fixed-step Adams methods, the adaptive Rosenbrock methods (:class:`Rosenbrock`: one generic stepper,
one file per method), and scipy's ``solve_ivp`` behind :class:`ScipySolver`."""

from .adams import AdamsBashforth, AdamsMoulton
from .bs3 import BS3
from .dopri5 import Dopri5
from .dopri8 import Dopri8
from .euler import Euler
from .fehlberg2 import Fehlberg2
from .gl4 import GaussLegendre4
from .gl6 import GaussLegendre6
from .heun import Heun
from .heun2 import Heun2
from .heun3 import Heun3
from .implicit import IMEX, ImplicitRK, ImplicitStepper, ImplicitTableau, JacobianSource, NewtonFailure
from .implicit_euler import ImplicitEuler
from .implicit_midpoint import ImplicitMidpoint
from .kencarp4 import KenCarp4
from .kvaerno5 import Kvaerno5
from .midpoint import Midpoint
from .radauiia3 import RadauIIA3
from .radauiia5 import RadauIIA5
from .rk4 import RK4
from .rodas5p import Rodas5P
from .rosenbrock import LinearSolveFailure, Rosenbrock, RosenbrockTableau
from .rosenbrock23 import Rosenbrock23
from .rk38 import RK38
from .scipy_solver import ScipySolver
from .sdirk2 import SDIRK2
from .tableau import ButcherTableau, ExplicitRK, RungeKutta, Solver, Stepper, StepResult
from .trapezoid import Trapezoid
from .trbdf2 import TRBDF2
from .tsit5 import Tsit5

#: The explicit Runge-Kutta solvers by name (each a tableau: what the NumPy kernel and the
#: hand-written reverse pass run).
RK_SOLVERS = {
    cls.__name__.lower(): cls
    for cls in (Tsit5, Dopri5, Dopri8, BS3, Heun, Fehlberg2, Euler, Midpoint, Heun2, Heun3, RK4, RK38)
}
# torchdiffeq's adaptive_heun is Heun() (the same tableau; its error weights differ only in sign).
RK_SOLVERS["adaptive_heun"] = Heun

#: Every solver by name (torchdiffeq's names where it has one); each builds with no arguments.
SOLVERS: dict[str, type[Solver]] = {
    **RK_SOLVERS,
    # the implicit Runge-Kutta methods (fixed step)
    "implicit_euler": ImplicitEuler, "implicit_midpoint": ImplicitMidpoint, "trapezoid": Trapezoid,
    "radauiia3": RadauIIA3, "radauiia5": RadauIIA5, "gl4": GaussLegendre4, "gl6": GaussLegendre6,
    "sdirk2": SDIRK2, "trbdf2": TRBDF2,
    # adaptive ESDIRKs (KenCarp4 also an IMEX pair)
    "kvaerno5": Kvaerno5, "kencarp4": KenCarp4,
    # the Rosenbrock methods (adaptive, linearly implicit)
    "rosenbrock23": Rosenbrock23, "rodas5p": Rodas5P,
    "explicit_adams": AdamsBashforth,
    # torchdiffeq's implicit_adams and fixed_adams are both its Adams-Bashforth-Moulton solver.
    "implicit_adams": AdamsMoulton,
    "fixed_adams": AdamsMoulton,
    "scipy_solver": ScipySolver,  # LSODA by default
}  # fmt: skip

__all__ = [
    "AdamsBashforth", "AdamsMoulton", "BS3", "ButcherTableau", "Dopri5", "Dopri8", "Euler", "ExplicitRK", "Fehlberg2",
    "Heun", "Heun2", "Heun3", "Midpoint", "RK38", "RK4", "RK_SOLVERS", "SOLVERS", "ScipySolver", "Solver", "StepResult",
    "Stepper", "Tsit5",
    "GaussLegendre4", "GaussLegendre6", "ImplicitEuler", "ImplicitMidpoint", "ImplicitRK", "ImplicitTableau",
    "IMEX", "ImplicitStepper", "JacobianSource", "KenCarp4", "Kvaerno5", "NewtonFailure", "RadauIIA3", "RadauIIA5", "RungeKutta", "SDIRK2", "TRBDF2", "Trapezoid",
    "LinearSolveFailure", "Rodas5P", "Rosenbrock", "Rosenbrock23", "RosenbrockTableau",
]  # fmt: skip
