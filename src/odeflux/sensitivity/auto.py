"""``sensealg="auto"``: the method picked by the problem's size, as SciMLSensitivity's default
rule picks one (forward sensitivities for small problems, an adjoint for larger ones)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .backsolve import BacksolveAdjoint
from .base import SensitivityAlgorithm, check_hidden_params
from .direct import DirectAdjoint
from .forward import ForwardSensitivity
from .interpolating import InterpolatingAdjoint

if TYPE_CHECKING:
    from ..problem import Problem

#: ForwardSensitivity while the state's entries plus the differentiated parameters' are at most
#: this many (SciMLSensitivity's rule uses 100). Measured crossover (benchmarks/forward_sensitivity.py,
#: results in benchmarks/results/forward_sensitivity.md): see the README's adjoint section.
FORWARD_LIMIT = 100


def choose_sensealg(problem: "Problem") -> SensitivityAlgorithm:
    """The method ``sensealg="auto"`` picks for ``problem``.

    ``ForwardSensitivity()`` while state plus parameters stay within :data:`FORWARD_LIMIT` entries;
    otherwise ``InterpolatingAdjoint()``. Where the field rules those out, an ``f`` that depends
    on tensors requiring grad that they cannot see (captured from its closure, not in
    ``params=``): ``DirectAdjoint()``, which differentiates whatever the solve recorded. A solver
    that integrates whole spans itself (``ScipySolver``: no recorded steps, no forward
    interpolant of odeflux's): ``BacksolveAdjoint()``.
    """
    params = [p for p in problem.params if p.requires_grad]
    size = problem.y0.numel() + sum(p.numel() for p in params)
    stepwise = problem.solver.stepwise
    try:
        check_hidden_params(problem, params)
        hidden = False
    except ValueError:
        hidden = True
    if hidden:
        return DirectAdjoint()
    if not stepwise:
        return BacksolveAdjoint()
    if size <= FORWARD_LIMIT:
        return ForwardSensitivity()
    return InterpolatingAdjoint()
