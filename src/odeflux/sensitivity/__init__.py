"""The adjoint family: one file per method, named for what it does; VJP backends in vjp.py."""

from .backsolve import BacksolveAdjoint
from .auto import SMALL_LIMIT, choose_sensealg
from .base import ContinuousAdjoint, SensitivityAlgorithm
from .direct import DirectAdjoint
from .forward import ForwardSensitivity
from .gauss import GaussAdjoint
from .interpolating import InterpolatingAdjoint
from .quadrature import QuadratureAdjoint
from .vjp import VJP_BACKENDS

SENSEALGS = {
    "interpolating": InterpolatingAdjoint,
    "gauss": GaussAdjoint,
    "backsolve": BacksolveAdjoint,
    "quadrature": QuadratureAdjoint,
    "direct": DirectAdjoint,
}

__all__ = [
    "BacksolveAdjoint", "ContinuousAdjoint", "DirectAdjoint", "ForwardSensitivity", "GaussAdjoint", "InterpolatingAdjoint",
    "QuadratureAdjoint", "SENSEALGS", "SMALL_LIMIT", "SensitivityAlgorithm", "VJP_BACKENDS", "choose_sensealg",
]
