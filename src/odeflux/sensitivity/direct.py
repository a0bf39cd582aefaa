"""Discrete sensitivities: backpropagate through the solver's own operations."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..solution import Solution
from .base import SensitivityAlgorithm

if TYPE_CHECKING:
    from ..solve import Problem


class DirectAdjoint(SensitivityAlgorithm):
    """Backpropagation through every operation of the solve (the tutorial's ``ReverseDiffAdjoint``).

    The gradient is exact for the discrete solution the solver computed, with no extra backward
    solve; the memory it keeps grows with the number of steps. Step-size decisions are treated as
    constants, as in every discrete adjoint.
    """

    def solve(self, problem: "Problem") -> Solution:
        from ..solve import _from_result

        return _from_result(problem.integrate(), problem)

    def __repr__(self) -> str:
        return "DirectAdjoint()"
