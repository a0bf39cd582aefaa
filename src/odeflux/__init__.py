"""odeflux: neural ordinary differential equations for PyTorch, with the adjoint family."""

from .control import ConstantStepSize, IController, PIController, StepSizeController
from .events import Event, EventRecord
from .fields import MLP
from .integrator import StepCallbacks
from .nn import NeuralODE, VectorField
from .sensitivity import (
    BacksolveAdjoint,
    ContinuousAdjoint,
    DirectAdjoint,
    ForwardSensitivity,
    GaussAdjoint,
    InterpolatingAdjoint,
    QuadratureAdjoint,
    SensitivityAlgorithm,
)
from .solution import BackwardStats, DenseOutput, Solution, SolveError, Stats, Status
from .solve import solve
from .solvers import BS3, RK4, ButcherTableau, Dopri5, Euler, ExplicitRK, Heun, Midpoint, Tsit5
from .solvers import RK38, Dopri8, Fehlberg2, Heun2, Heun3
from .solvers import (
    SDIRK2, TRBDF2, GaussLegendre4, GaussLegendre6, ImplicitEuler, ImplicitMidpoint, ImplicitRK, RadauIIA3, RadauIIA5,
    RungeKutta, Trapezoid,
)  # fmt: skip
from .solvers import AdamsBashforth, AdamsMoulton, ScipySolver, Solver
from .solvers import IMEX, KenCarp4, Kvaerno5
from .solvers import Rodas5P, Rosenbrock, Rosenbrock23

__version__ = "0.1.0"

__all__ = [
    "BS3", "RK4", "BacksolveAdjoint", "BackwardStats", "ContinuousAdjoint", "GaussAdjoint", "InterpolatingAdjoint",
    "NeuralODE", "QuadratureAdjoint", "ButcherTableau", "ConstantStepSize", "DenseOutput", "DirectAdjoint", "Dopri5",
    "Euler", "ForwardSensitivity", "Event", "EventRecord", "ExplicitRK", "Heun", "IController", "MLP", "Midpoint", "PIController", "SensitivityAlgorithm", "Solution",
    "SolveError", "Stats", "Status", "StepSizeController", "Tsit5", "VectorField", "solve",
    "Dopri8", "Fehlberg2", "Heun2", "Heun3", "RK38", "StepCallbacks",
    "GaussLegendre4", "GaussLegendre6", "ImplicitEuler", "ImplicitMidpoint", "ImplicitRK", "RadauIIA3", "RadauIIA5",
    "RungeKutta", "SDIRK2", "TRBDF2", "Trapezoid",
    "AdamsBashforth", "AdamsMoulton", "ScipySolver", "Solver",
    "IMEX", "KenCarp4", "Kvaerno5",
    "Rodas5P", "Rosenbrock", "Rosenbrock23",
]
