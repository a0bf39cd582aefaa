"""Step-size control: the scaled error norm, Hairer's initial step, PI and constant-step controllers.

Controllers work on host floats: the one number the host needs from the device each step is the
scaled error norm (the accept/reject decision), and everything else follows from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import small_cpu


def error_ratio(err: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor, rtol: float, atol: float, n: int | None = None) -> torch.Tensor:
    """RMS norm of ``err / (atol + rtol * max(|y0|, |y1|))``, as OrdinaryDiffEq computes it.

    ``n`` restricts the norm to the first ``n`` elements of the flattened state (a seminorm, used
    by the adjoints to leave the parameter adjoint out of error control). Returns a 0-d tensor.
    """
    if n is not None:
        err, y0, y1 = err.reshape(-1)[:n], y0.reshape(-1)[:n], y1.reshape(-1)[:n]
    scale = torch.maximum(y0.abs(), y1.abs()).mul_(rtol).add_(atol)
    return torch.linalg.vector_norm(err / scale).div_(math.sqrt(err.numel()))


def rms_scaled(x: torch.Tensor, scale: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x / scale)) / math.sqrt(x.numel())


def initial_step(
    f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    t0: float,
    y0: torch.Tensor,
    f0: torch.Tensor,
    direction: float,
    order: int,
    rtol: float,
    atol: float,
    dtmax: float,
    n: int | None = None,
    float_time: bool = False,
    on_numpy: bool | None = None,
) -> tuple[float, int]:
    """Hairer's initial step size (Hairer, Norsett and Wanner, II.4), as in OrdinaryDiffEq.

    Returns the step (positive) and the number of extra ``f`` evaluations it spent (one).
    ``on_numpy`` says whether the state is one for odeflux.small_cpu (worked out if ``None``).
    """
    if on_numpy is None:
        on_numpy = small_cpu.step_applies(y0)
    with torch.no_grad():  # a heuristic: nothing here is differentiated
        return _initial_step(f, t0, y0.detach(), f0.detach(), direction, order, rtol, atol, dtmax, n, float_time, on_numpy)


def _initial_step(f, t0, y0, f0, direction, order, rtol, atol, dtmax, n, float_time, on_numpy) -> tuple[float, int]:
    # The norms on NumPy for small CPU states (odeflux.small_cpu): a dozen tiny ops either way.
    norms = _NumpyNorms(y0, f0, rtol, atol, n) if on_numpy else _TorchNorms(y0, f0, rtol, atol, n)
    d0, d1 = norms.d0, norms.d1
    if not (math.isfinite(d0) and math.isfinite(d1)):
        return float("nan"), 0
    dt0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
    dt0 = min(dt0, dtmax)
    t = t0 + direction * dt0
    on_arrays = getattr(f, "on_arrays", None) if on_numpy else None
    if on_arrays is not None:  # a frozen field on the arrays themselves (odeflux.small_cpu.rk_step's protocol)
        f1 = np.empty_like(norms.f0)
        on_arrays(t, norms.euler_array(direction * dt0), f1)
        d2 = norms.rms_change_array(f1) / dt0
    else:
        f1 = f(t if float_time else torch.full((), t, dtype=y0.dtype, device=y0.device), norms.euler(direction * dt0))
        d2 = norms.rms_change(f1) / dt0
    m = max(d1, d2)
    if not math.isfinite(m):
        return dt0, 1
    dt1 = max(1e-6, dt0 * 1e-3) if m <= 1e-15 else (0.01 / m) ** (1.0 / order)
    return min(100 * dt0, dt1, dtmax), 1


class _TorchNorms:
    """The initial-step heuristic's scaled norms on tensors: ``d0 = ||y0||``, ``d1 = ||f0||``,
    an Euler step, and ``||f1 - f0||``, all scaled by ``atol + rtol |y0|`` (first ``n`` entries)."""

    def __init__(self, y0: torch.Tensor, f0: torch.Tensor, rtol: float, atol: float, n: int | None):
        self.y0, self.f0, self.n = y0, f0, n
        yf, ff = (y0.reshape(-1)[:n], f0.reshape(-1)[:n]) if n is not None else (y0, f0)
        self.scale = yf.abs().mul(rtol).add_(atol)
        d = torch.stack([torch.linalg.vector_norm(yf / self.scale), torch.linalg.vector_norm(ff / self.scale)])
        self.d0, self.d1 = (d / math.sqrt(yf.numel())).tolist()

    def euler(self, h: float) -> torch.Tensor:
        return torch.add(self.y0, self.f0, alpha=h)

    def rms_change(self, f1: torch.Tensor) -> float:
        df = (f1 - self.f0).reshape(-1)[: self.n] if self.n is not None else f1 - self.f0
        return rms_scaled(df, self.scale)


class _NumpyNorms:
    """:class:`_TorchNorms` on the arrays of a small CPU state (odeflux.small_cpu)."""

    def __init__(self, y0: torch.Tensor, f0: torch.Tensor, rtol: float, atol: float, n: int | None):
        self.shape, self.n = y0.shape, n
        self.y0, self.f0 = small_cpu.as_array(y0).reshape(-1), small_cpu.as_array(f0).reshape(-1)
        self.scale = np.abs(self.y0[:n]) * rtol + atol
        self.d0, self.d1 = self._rms(self.y0[:n]), self._rms(self.f0[:n])

    def _rms(self, x: np.ndarray) -> float:
        x = x / self.scale
        return math.sqrt(float(x @ x) / x.size)

    def euler_array(self, h: float) -> np.ndarray:
        return self.y0 + h * self.f0

    def euler(self, h: float) -> torch.Tensor:
        return torch.from_numpy(self.euler_array(h).reshape(self.shape))

    def rms_change_array(self, f1: np.ndarray) -> float:
        return self._rms(f1[: self.n] - self.f0[: self.n])

    def rms_change(self, f1: torch.Tensor) -> float:
        return self.rms_change_array(small_cpu.as_array(f1).reshape(-1))


class StepSizeController:
    """Decides, from the scaled error norm of a step, whether to accept it and the next step size."""

    adaptive: bool = True

    def init_state(self) -> object:
        return None

    def propose(self, dt: float, err: float, state: object, order: int) -> tuple[bool, float, object]:
        """Given ``|dt|`` just tried and its error norm, return ``(accept, next |dt|, new state)``."""
        raise NotImplementedError


@dataclass
class PIController(StepSizeController):
    """The proportional-integral controller of OrdinaryDiffEq (Hairer's DOPRI5 variant).

    With ``q = err**beta1 / qold**beta2 / safety``, clamped to ``[1/qmax, 1/qmin]``, the next step
    is ``dt / q``. ``beta1`` and ``beta2`` default to ``7/(10p)`` and ``2/(5p)`` for a method of
    order ``p``; ``qold`` is the last accepted error norm (at least ``qoldinit``).
    """

    beta1: float | None = None
    beta2: float | None = None
    safety: float = 0.9
    qmin: float = 1 / 5
    qmax: float = 10.0
    qoldinit: float = 1e-4

    def __post_init__(self) -> None:
        if not (0 < self.qmin <= 1 <= self.qmax):
            raise ValueError(f"PIController needs 0 < qmin <= 1 <= qmax, got qmin={self.qmin}, qmax={self.qmax}")
        if not (0 < self.safety <= 1):
            raise ValueError(f"PIController needs 0 < safety <= 1, got {self.safety}")

    def init_state(self) -> float:
        return self.qoldinit

    def propose(self, dt: float, err: float, state: float, order: int) -> tuple[bool, float, float]:
        beta1 = self.beta1 if self.beta1 is not None else 7 / (10 * order)
        beta2 = self.beta2 if self.beta2 is not None else 2 / (5 * order)
        if not math.isfinite(err):
            return False, dt * self.qmin, state
        q11 = err**beta1
        if err <= 1.0:
            q = q11 / state**beta2 / self.safety
            q = min(1 / self.qmin, max(1 / self.qmax, q))
            return True, dt / q, max(err, self.qoldinit)
        return False, dt / min(1 / self.qmin, q11 / self.safety), state


#: A PIController with the defaults, shared by the solves that pick none (a controller keeps no
#: state of its own: ``init_state()`` hands each solve its own).
DEFAULT_PI = PIController()


@dataclass
class IController(StepSizeController):
    """The classic integral controller: ``dt * clamp(safety * err**(-1/p), qmin, qmax)``."""

    safety: float = 0.9
    qmin: float = 1 / 5
    qmax: float = 10.0

    def propose(self, dt: float, err: float, state: object, order: int) -> tuple[bool, float, object]:
        if not math.isfinite(err):
            return False, dt * self.qmin, state
        q = self.qmax if err == 0 else min(self.qmax, max(self.qmin, self.safety * err ** (-1 / order)))
        return err <= 1.0, dt * q, state


@dataclass
class ConstantStepSize(StepSizeController):
    """Fixed steps of ``dt0`` (the last one shortened to land on ``t1``)."""

    adaptive = False

    def propose(self, dt: float, err: float, state: object, order: int) -> tuple[bool, float, object]:
        return True, dt, state
