"""``NeuralODE``: a ``torch.nn.Module`` whose output is the solution of an ODE it parametrises."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .solution import Solution
from .solve import solve
from .solvers import Dopri5, Solver
from .vector_field import VectorField

__all__ = ["NeuralODE", "VectorField"]


class NeuralODE(nn.Module):
    """Maps ``x`` to the solution at the end of ``tspan`` of ``dy/dt = vector_field(y)``, ``y(t0) = x``.

    ``vector_field`` is any module taking ``y`` (or ``(t, y)``); ``x`` may have any shape and a batch
    is integrated as one ODE state, as in the Lux tutorial. ``solver`` defaults to ``Dopri5()``
    (:func:`odeflux.solve`'s is ``Tsit5()``): both need about the peers' evaluations for a forward
    solve at equal error, and Dopri5's gradient is the more accurate for the evaluations spent,
    2.3-3.4x on a convolutional field (benchmarks/results/gradient_work_precision.md).
    ``sensealg`` picks the gradient method
    (default ``"auto"``, which picks by the problem, see :func:`odeflux.sensitivity.choose_sensealg`:
    for an explicit Runge-Kutta solve of a batch, backpropagation through the solve, recorded within a graph
    budget and retaking its steps past it; ``InterpolatingAdjoint()`` for a per-sample solve); other keywords go to :func:`odeflux.solve` (``rtol``,
    ``atol``, ``saveat``, ...; ``batch_axis=0`` solves each sample as its own problem, under
    ``DirectAdjoint`` or a continuous adjoint, not ``ForwardSensitivity`` or ``"auto"``; with a
    Rosenbrock solver, ``DirectAdjoint``, which is then the default). With ``return_solution=True`` the forward returns the whole
    :class:`~odeflux.Solution` instead of the final state.
    """

    def __init__(
        self,
        vector_field: nn.Module,
        solver: Solver | None = None,
        tspan: Sequence[float] = (0.0, 1.0),
        sensealg: Any = "default",
        *,
        return_solution: bool = False,
        time_dependent: bool | None = None,
        **solve_kwargs: Any,
    ):
        super().__init__()
        if not isinstance(vector_field, nn.Module):
            raise TypeError(f"vector_field must be an nn.Module, got {type(vector_field).__name__}")
        if len(tuple(tspan)) != 2 or float(tspan[0]) == float(tspan[1]):
            raise ValueError(f"tspan must be a pair (t0, t1) with t0 != t1, got {tspan!r}")
        forbidden = {"f", "y0", "t_span", "solver", "sensealg"} & solve_kwargs.keys()
        if forbidden:
            raise TypeError(f"NeuralODE got {sorted(forbidden)} as solve keywords: pass them as NeuralODE arguments")
        if sensealg == "default":
            from .sensitivity import InterpolatingAdjoint

            # "auto": the method picked by the problem when it is solved (a per-sample solve has none).
            sensealg = "auto" if solve_kwargs.get("batch_axis") is None else InterpolatingAdjoint()
            if solve_kwargs.get("batch_axis") is not None and solver is not None and not solver.tableau_steps:
                from .sensitivity import DirectAdjoint

                sensealg = DirectAdjoint()  # (a per-sample Rosenbrock solve's one gradient)
        self.field = VectorField(vector_field, time_dependent)
        self.solver = solver if solver is not None else Dopri5()
        self.tspan = (float(tspan[0]), float(tspan[1]))
        self.sensealg = sensealg
        self.return_solution = return_solution
        self.solve_kwargs = dict(solve_kwargs)
        self.last_stats = None
        self.last_backward_stats = None  # the last forward's BackwardStats, filled in by its backward pass

    @property
    def vector_field(self) -> nn.Module:
        return self.field.module

    def forward(self, x: torch.Tensor) -> torch.Tensor | Solution:
        kwargs = self.solve_kwargs
        if not self.return_solution and "saveat" not in kwargs:
            kwargs = {"save_start": False, **kwargs}
        sol = solve(self.field, x, self.tspan, solver=self.solver, sensealg=self.sensealg, **kwargs)
        self.last_stats = sol.stats
        self.last_backward_stats = sol.backward_stats
        return sol if self.return_solution else sol.y_final

    def extra_repr(self) -> str:
        return f"solver={self.solver!r}, tspan={self.tspan}, sensealg={self.sensealg!r}"
