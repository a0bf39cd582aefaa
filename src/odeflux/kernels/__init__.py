"""The seam for special kernels: how one solve's per-step numerics are carried out.

Every algorithm of the engine exists once, in torch: the Runge-Kutta step
(:meth:`odeflux.solvers.ExplicitRK.step`; :meth:`odeflux.solvers.ImplicitRK.step` for implicit
tableaus), its error norm (:func:`odeflux.control.error_ratio`), Hairer's initial step
(:func:`odeflux.control.initial_step`), dense output (:class:`odeflux.solution.DenseOutput`) and
the adjoints' right-hand sides. A *step kernel*
(:class:`StepKernel`) is how a solve runs them: :class:`TorchStepKernel` on torch's ops (any
field, any device, under autograd, optionally compiled), or :class:`NumpyStepKernel`, the same
arithmetic on NumPy arrays that view the tensors' memory, for small CPU states outside autograd,
where torch's per-op dispatch (3-6 us) costs more than the work.

:func:`choose_step_kernel` picks one kernel per solve, once, from typed facts: the solver
(:attr:`~odeflux.solvers.tableau.Solver.tableau_steps`: the NumPy kernel re-implements only the
explicit Runge-Kutta step), the state (:func:`arrays.state_applies`), whether the caller asked
for a compiled step (a field's array form is still taken then, being the faster on a small CPU
state; a planner is not), and whether the right-hand side implements one of the two array
interfaces below:

- :class:`ArrayKernelSource`: a field that can hand a solve its evaluation
  (:class:`ArrayField`) and VJP (:class:`ArrayVJP`) on NumPy arrays, built for that solve from
  its parameters as they are then (:class:`odeflux.fields.MLP`; :class:`odeflux.VectorField`
  forwards it for a time-independent module with no hooks).
- :class:`StepPlanner`: a right-hand side that batches work over a step's stages (the
  adjoints' systems, :mod:`odeflux.sensitivity.rhs`).

Nothing is probed by name on each call. Adding a kernel means a class with
:class:`StepKernel`'s five methods and one branch in :func:`choose_step_kernel`, and a test that
compares it with :class:`TorchStepKernel` step by step (``tests/test_kernels.py``).
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Protocol

import numpy as np
import torch

from . import arrays

if TYPE_CHECKING:
    from ..control import HairerNorms, Parts
    from ..solvers.tableau import Solver


class StepKernel(Protocol):
    """One solve's per-step numerics. Times are host floats; states are tensors of the state's
    shape (NumPy-backed ones for :class:`NumpyStepKernel`)."""

    #: Whether the steps are NumPy-backed (dense output then looks up ``y(t)`` on arrays).
    arrays: bool

    def running(self) -> ContextManager[Any]:
        """Held while the solve runs (NumPy's BLAS on one thread, for the NumPy kernel)."""

    def evaluate(self, t: float, y: torch.Tensor) -> torch.Tensor:
        """``f(t, y)``."""

    def time(self, t: float) -> Any:
        """``t`` as ``f`` receives it (a 0-d tensor, or a host float)."""

    def step(self, t: float, y: torch.Tensor, h: float, k: torch.Tensor, inside_end: bool = False) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """One step of size ``h`` from ``(t, y)`` with ``k = f(t, y)``: the new state, the stages
        ``(stages, *shape)`` and the scaled error norm (a 0-d tensor or a float; ``None`` for
        fixed-step methods). An adaptive solve reads the norm back to the host: the one
        synchronisation per step; a fixed-step explicit one never does. ``inside_end``: stages on
        the step's end are evaluated just before it (the step ends on a jump of ``f``)."""

    def norms(self, t: float, y: torch.Tensor, k: torch.Tensor) -> HairerNorms:
        """The scaled norms Hairer's initial step needs at ``(t, y)`` with ``k = f(t, y)``."""

    def evaluations(self, K: torch.Tensor) -> int:
        """How many evaluations of ``f`` the step that returned the stages ``K`` made."""


class ArrayField(abc.ABC):
    """``f`` on flat NumPy arrays for one solve: ``evaluate(t, x, out)`` writes ``f(t, x)`` into
    ``out`` (both of the state's size)."""

    @abc.abstractmethod
    def evaluate(self, t: float, x: np.ndarray, out: np.ndarray) -> None: ...


class ArrayVJP(abc.ABC):
    """A field's VJP rule on flat NumPy arrays for one solve, the parameters in the field's
    ``parameters()`` order."""

    #: Total number of parameter entries.
    n_params: int

    @abc.abstractmethod
    def __call__(self, y: np.ndarray, v: np.ndarray, want_y: bool = True, want_p: bool = True, negate: bool = False) -> np.ndarray:
        """``[v^T df/dy (if want_y), v^T df/dp (if want_p)]`` as one flat array, negated if asked."""

    @abc.abstractmethod
    def stage_plan(self, ys: np.ndarray, negate: bool = False) -> Any:
        """The VJPs at ``m`` states known in advance (``(m, state size)``): the forward pass over
        all of them at once, then per state only the cotangent's part (see
        :class:`odeflux.kernels.dense_layers.StagePlan`)."""


class ArrayKernelSource(abc.ABC):
    """A vector field that can run a solve on NumPy arrays (see the module docstring). Any class
    with these two methods counts as one (as for a ``typing.Protocol``, but the check is cached
    per class: it is made once per solve)."""

    @abc.abstractmethod
    def array_field(self, y: torch.Tensor) -> ArrayField | None:
        """Its evaluation on arrays for one solve from states like ``y`` (shape, dtype), or ``None``."""

    @abc.abstractmethod
    def array_vjp(self, y: torch.Tensor) -> ArrayVJP | None:
        """Its VJP rule on arrays for one solve from states like ``y``, or ``None``."""

    @classmethod
    def __subclasshook__(cls, other: type) -> bool:
        if cls is ArrayKernelSource:
            return all(any(name in k.__dict__ for k in other.__mro__) for name in ("array_field", "array_vjp"))
        return NotImplemented


class StepPlan(abc.ABC):
    """One step's plan (:class:`StepPlanner`): the state is ``(head, tail)`` with ``n`` head
    entries; a stage's head derivative depends on the head of its state alone, and the tail's
    derivatives feed nothing back."""

    n: int

    @abc.abstractmethod
    def stage(self, i: int, head: np.ndarray, out: np.ndarray) -> None:
        """Stage ``i``'s head derivative (``i >= 1``) from its head state, into ``out``."""

    @abc.abstractmethod
    def finish(self, out: np.ndarray) -> None:
        """The tail derivatives of stages ``1..`` at once, into the rows of ``out``."""


class StepPlanner(abc.ABC):
    """A right-hand side that plans each step of the NumPy kernel (the adjoints' systems)."""

    @abc.abstractmethod
    def plan_step(self, t: float, h: float) -> StepPlan | None:
        """This step's plan, or ``None`` for stage-by-stage evaluation."""


def choose_step_kernel(
    f: Any, y0: torch.Tensor, solver: Solver, *, rtol: float, atol: float, parts: Parts | None,
    float_time: bool, compiled: bool, norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
    perturb: bool = False, jumps: bool = False,
) -> StepKernel:  # fmt: skip
    """The kernel for one solve of ``f`` from ``y0`` (see the module docstring). An implicit
    Runge-Kutta solver gets :class:`ImplicitStepKernel`; the NumPy kernel takes explicit
    tableaus only (``solver.tableau_steps``). A user's ``norm``, ``perturb`` and steps ending on
    jumps of ``f`` run on torch's ops."""
    if isinstance(solver, RungeKutta) and not solver.explicit:
        if compiled:
            raise ValueError(
                f"compile=True compiles the explicit Runge-Kutta step; {type(solver).__name__} is implicit (its Newton "
                "iterations check convergence on the host): pass compile=False"
            )
        return ImplicitStepKernel(f, solver, y0, rtol, atol, parts, float_time, False, norm, perturb)
    if solver.tableau_steps and norm is None and not perturb and not jumps and arrays.state_applies(y0):
        array_f = f.array_field(y0) if isinstance(f, ArrayKernelSource) else None
        planner = f if isinstance(f, StepPlanner) and not compiled else None
        # (A field's array form is taken with compile=True too: on a small CPU state it beats the
        # compiled loop, which took 1.6-2.2x its time from a (1, 4) state to the tutorial's
        # (128, 20); benchmarks/results/compiled_crossover.md.)
        if array_f is not None or planner is not None:
            return NumpyStepKernel(f, solver, y0, rtol, atol, parts, float_time, array_f, planner)
    return TorchStepKernel(f, solver, y0, rtol, atol, parts, float_time, compiled, norm, perturb)


from .numpy_step import NumpyStepKernel  # noqa: E402 (they build on the interfaces above)
from .torch_step import ImplicitStepKernel, TorchStepKernel  # noqa: E402
from ..solvers.tableau import RungeKutta  # noqa: E402

__all__ = [
    "ImplicitStepKernel", "NumpyStepKernel", "TorchStepKernel",
    "ArrayField", "ArrayKernelSource", "ArrayVJP", "StepKernel", "StepPlan", "StepPlanner", "arrays", "choose_step_kernel",
]  # fmt: skip
