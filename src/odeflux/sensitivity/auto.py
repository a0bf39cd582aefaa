"""``sensealg="auto"``: the method picked by the problem's size, in the shape of
SciMLSensitivity's default rule (one method for small problems, an adjoint for larger ones), with
the choices measured for this library (benchmarks/results/forward_sensitivity.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch.utils import _pytree as pytree

from .backsolve import BacksolveAdjoint
from .base import SensitivityAlgorithm, sees_every_param, training_dropout
from .direct import DirectAdjoint
from .interpolating import InterpolatingAdjoint
from .step_reverse import GRAPH_BUDGET, recompute_applies

if TYPE_CHECKING:
    from ..problem import Problem

#: A problem is small while its state's entries plus its differentiated parameters' are at most
#: this many: SciMLSensitivity's bound for its forward-mode choice.
SMALL_LIMIT = 100

#: With ``compile=True``, DirectAdjoint is chosen while the state has at most this many entries:
#: its forward solve and its reverse pass are then two compiled programs
#: (:mod:`odeflux.compiled.reverse`; benchmarks/results/small_systems.md).
COMPILED_DIRECT_LIMIT = 4096


def choose_sensealg(problem: "Problem") -> SensitivityAlgorithm:
    """The method ``sensealg="auto"`` picks for ``problem``.

    Small problems (state plus differentiated parameters at most :data:`SMALL_LIMIT` entries):
    ``DirectAdjoint()``. SciMLSensitivity takes forward sensitivities there; in odeflux, on the
    CPU, backpropagation through the solve measured faster than ``ForwardSensitivity`` at every
    size tried (Lotka-Volterra, 4 rates: 174 ms against 664 ms; 4-state MLP fields of 22 to 580
    parameters: 2.5-9 ms against 25-80 ms), and its memory, the steps of a small state, is small.
    With ``compile=True``, while the state has at most :data:`COMPILED_DIRECT_LIMIT` entries and
    every parameter reaches ``f`` as a module parameter or through ``args``: ``DirectAdjoint()``,
    whose forward solve and reverse pass are each one compiled program (measured faster than
    compiled ``ForwardSensitivity``, the earlier choice here, on the spiral and Lotka-Volterra
    benchmarks: benchmarks/results/small_systems.md).
    Larger problems with an explicit Runge-Kutta solver:
    ``DirectAdjoint(recompute=True, graph_budget=GRAPH_BUDGET)``, the discrete gradient: the
    solve recorded whole while its graph is estimated within 512 MiB, else with one step's graph
    alive at a time (memory: the steps' start states). Both measured faster than
    ``InterpolatingAdjoint()`` on every field of benchmarks/results/general.md (the backward
    pass follows the forward's steps, where the adjoint solve chooses its own, more of them on
    the MLP and conv fields), and fewer evaluations at equal gradient error
    (benchmarks/results/gradient_work_precision.md). Other stepwise solvers (implicit,
    Rosenbrock, multistep), and a step that cannot be retaken as it was (``perturb``,
    ``jump_times``, ``dense=True``): ``InterpolatingAdjoint()``.
    Where the field rules the continuous adjoints out for such a solver, an ``f`` that depends on
    tensors requiring grad that they cannot see (captured from its closure, not in ``params=``):
    ``DirectAdjoint()``, which differentiates whatever the solve recorded (the explicit
    Runge-Kutta choice above does so itself: it records the solve where it cannot retake its
    steps). Likewise a field with dropout in training mode, which draws a new mask at each
    evaluation: ``DirectAdjoint()`` (the choices above record the masks, or retake the steps with
    the random generator replayed). A solver that integrates whole spans itself (``ScipySolver``, outside autograd):
    ``BacksolveAdjoint()``.
    """
    params = [p for p in problem.params if p.requires_grad]
    if not problem.solver.stepwise:
        return BacksolveAdjoint()
    if problem.compiled and problem.solver.tableau_steps and problem.y0.numel() <= COMPILED_DIRECT_LIMIT:
        if _substitutable(problem, params):
            return DirectAdjoint()
    if problem.y0.numel() + sum(p.numel() for p in params) <= SMALL_LIMIT:
        return DirectAdjoint()
    if recompute_applies(problem):
        # (It records the solve, and with it whatever f depends on, wherever it cannot retake the
        # steps: no evaluation of f is spent here to look for tensors outside params.)
        return DirectAdjoint(recompute=True, graph_budget=GRAPH_BUDGET)
    if training_dropout(problem.user_f) is not None:  # (a new mask at each evaluation: see the docstring)
        return DirectAdjoint()
    return InterpolatingAdjoint() if sees_every_param(problem, params) else DirectAdjoint()


def _substitutable(problem: "Problem", params: list) -> bool:
    """Whether every differentiated parameter reaches ``f`` where forward mode can substitute it."""
    reach = {id(p) for p in problem.f_params or []}
    if problem.args is not None:
        reach |= {id(x) for x in pytree.tree_leaves(problem.args)}
    return all(id(p) in reach for p in params)
