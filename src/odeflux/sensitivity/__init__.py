from .base import DirectAdjoint, SensitivityAlgorithm

__all__ = ["DirectAdjoint", "SensitivityAlgorithm"]
