"""Discrete sensitivities: backpropagate through the solver's own operations."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ..problem import solution_from_result
from ..solution import Solution
from .base import SensitivityAlgorithm, sees_every_param
from .rk_reverse import reverse_pass_rule, solve_reverse
from .step_reverse import recompute_applies, record_within, solve_step_reverse

if TYPE_CHECKING:
    from ..problem import Problem


class DirectAdjoint(SensitivityAlgorithm):
    """Backpropagation through every operation of the solve (the tutorial's ``ReverseDiffAdjoint``).

    The gradient is exact for the discrete solution the solver computed, with no extra backward
    solve; the memory it keeps grows with the number of steps. Step-size decisions are treated as
    constants, as in every discrete adjoint.

    Where the field brings a VJP rule (:mod:`odeflux.fields`) and the state is small and on the
    CPU, the same reverse pass is written out by hand (:mod:`.rk_reverse`) rather than recorded as
    a graph; ``hand_written=False`` always records the graph. That pass is taken with
    ``compile=True`` too, being the faster there. Otherwise with ``compile=True`` (an explicit
    Runge-Kutta solver, parameters reaching ``f`` as module parameters or through ``args``) the
    forward solve is the compiled loop with its steps recorded and the reverse pass a second
    compiled program (:mod:`odeflux.compiled.reverse`): the same gradient, no graph.

    ``recompute=True`` keeps no graph between the passes either, eagerly and for any field: the
    forward keeps each accepted step's start state, and the backward pass takes each step again,
    recorded, and differentiates it, last step first (:mod:`.step_reverse`). The same gradient,
    with one step's graph alive at a time (the memory of the steps' start states, as the
    continuous adjoints keep), for one more evaluation of ``f`` per stage. Where a step cannot be
    retaken as it was (an implicit solver, ``perturb``, ``jump_times``, ``dense=True``), or ``f``
    depends on tensors requiring grad outside ``params`` (then they would get no gradient), the
    solve is recorded as without it. Under ``compile=True`` its forward solve is the compiled
    loop and its backward pass stays eager (for states past the compiled reverse program's size).
    ``graph_budget`` (bytes, with ``recompute=True``): the solve is recorded whole while its
    graph is estimated to fit, and its steps are retaken only past that (``sensealg="auto"``
    takes 512 MiB): a solve of few steps then costs no more evaluations than ``DirectAdjoint()``.
    """

    def __init__(self, hand_written: bool = True, recompute: bool = False, graph_budget: int | None = None):
        if graph_budget is not None and not recompute:
            raise ValueError("DirectAdjoint(graph_budget=...) bounds what recompute=True records: pass recompute=True too")
        if graph_budget is not None and graph_budget < 0:
            raise ValueError(f"graph_budget must be a number of bytes >= 0, got {graph_budget}")
        self.hand_written = hand_written
        self.recompute = recompute
        self.graph_budget = graph_budget

    def solve(self, problem: "Problem") -> Solution:
        vjp = reverse_pass_rule(problem) if self.hand_written else None
        if vjp is not None:
            # (Eagerly under compile=True too: the two compiled programs took 1.26-1.52x its time
            # at every size measured, benchmarks/results/compiled_crossover.md.)
            return solve_reverse(dataclasses.replace(problem, compiled=False) if problem.compiled else problem, vjp)
        if problem.compiled and not self.recompute:
            from ..compiled.reverse import solve_compiled_reverse

            sol = solve_compiled_reverse(problem)
            if sol is not None:
                return sol
        if self.recompute and recompute_applies(problem):
            # (A solve recorded whole differentiates every tensor f depends on: the check for
            # tensors outside params, one more evaluation of f, is needed only to retake steps.)
            sol = record_within(problem, self.graph_budget) if self.graph_budget and not problem.compiled else None
            if sol is not None:
                return sol
            # (A step retaken differentiates the parameters only.)
            if sees_every_param(problem, [q for q in problem.params if q.requires_grad]):
                return solve_step_reverse(problem)
        return solution_from_result(problem.integrate(), problem)

    def __repr__(self) -> str:
        opts = ([] if self.hand_written else ["hand_written=False"]) + (["recompute=True"] if self.recompute else [])
        opts += [] if self.graph_budget is None else [f"graph_budget={self.graph_budget}"]
        return f"DirectAdjoint({', '.join(opts)})"

