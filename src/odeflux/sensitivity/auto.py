"""``sensealg="auto"``: the method picked by the problem's size, in the shape of
SciMLSensitivity's default rule (one method for small problems, an adjoint for larger ones), with
the choices measured for this library (benchmarks/results/forward_sensitivity.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .backsolve import BacksolveAdjoint
from .base import SensitivityAlgorithm, check_hidden_params
from .direct import DirectAdjoint
from .interpolating import InterpolatingAdjoint

if TYPE_CHECKING:
    from ..problem import Problem

#: A problem is small while its state's entries plus its differentiated parameters' are at most
#: this many: SciMLSensitivity's bound for its forward-mode choice.
SMALL_LIMIT = 100


def choose_sensealg(problem: "Problem") -> SensitivityAlgorithm:
    """The method ``sensealg="auto"`` picks for ``problem``.

    Small problems (state plus differentiated parameters at most :data:`SMALL_LIMIT` entries):
    ``DirectAdjoint()``. SciMLSensitivity takes forward sensitivities there; in odeflux, on the
    CPU, backpropagation through the solve measured faster than ``ForwardSensitivity`` at every
    size tried (Lotka-Volterra, 4 rates: 174 ms against 664 ms; 4-state MLP fields of 22 to 580
    parameters: 2.5-9 ms against 25-80 ms), and its memory, the steps of a small state, is small.
    Larger problems: ``InterpolatingAdjoint()`` (memory bounded whatever the number of steps;
    faster than DirectAdjoint on large states, benchmarks/results/general.md).
    Where the field rules the continuous adjoints out, an ``f`` that depends on tensors requiring
    grad that they cannot see (captured from its closure, not in ``params=``): ``DirectAdjoint()``,
    which differentiates whatever the solve recorded. A solver that integrates whole spans itself
    (``ScipySolver``, outside autograd): ``BacksolveAdjoint()``.
    """
    params = [p for p in problem.params if p.requires_grad]
    if not problem.solver.stepwise:
        return BacksolveAdjoint()
    if problem.y0.numel() + sum(p.numel() for p in params) <= SMALL_LIMIT:
        return DirectAdjoint()
    try:
        check_hidden_params(problem, params)
    except ValueError:
        return DirectAdjoint()
    return InterpolatingAdjoint()
