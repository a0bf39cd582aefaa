"""The sensitivity-method interface. (Filled in by the adjoint family.)"""

from __future__ import annotations


class SensitivityAlgorithm:
    """How ``solve`` computes gradients of a loss of its solution."""


class DirectAdjoint(SensitivityAlgorithm):
    """Backpropagate through the solver's own operations (discrete sensitivities)."""
