"""Explicit Runge-Kutta solvers: one file per method holding its tableau, one generic stepper."""

from .bs3 import BS3
from .dopri5 import Dopri5
from .dopri8 import Dopri8
from .euler import Euler
from .fehlberg2 import Fehlberg2
from .heun import Heun
from .heun2 import Heun2
from .heun3 import Heun3
from .midpoint import Midpoint
from .rk4 import RK4
from .rk38 import RK38
from .tableau import ButcherTableau, ExplicitRK, StepResult
from .tsit5 import Tsit5

SOLVERS = {
    cls.__name__.lower(): cls
    for cls in (Tsit5, Dopri5, Dopri8, BS3, Heun, Fehlberg2, Euler, Midpoint, Heun2, Heun3, RK4, RK38)
}
# torchdiffeq's adaptive_heun is Heun() (the same tableau; its error weights differ only in sign).
SOLVERS["adaptive_heun"] = Heun

__all__ = [
    "BS3", "ButcherTableau", "Dopri5", "Dopri8", "Euler", "ExplicitRK", "Fehlberg2", "Heun", "Heun2", "Heun3",
    "Midpoint", "RK38", "RK4", "SOLVERS", "StepResult", "Tsit5",
]  # fmt: skip
