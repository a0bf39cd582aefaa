"""Step-size control: the scaled error norm, Hairer's initial step, PI and constant-step controllers.

Controllers work on host floats: the one number the host needs from the device each step is the
scaled error norm (the accept/reject decision), and everything else follows from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch


#: Blocks ``(start, stop)`` of the flattened state: the error norm is the largest of their RMS
#: norms, and entries in no block are left out (``None``: one RMS norm over the whole state).
Parts = tuple[tuple[int, int], ...]


def error_ratio(
    err: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor, rtol: float, atol: float, parts: Parts | None = None,
    norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:  # fmt: skip
    """RMS norm of ``err / (atol + rtol * max(|y0|, |y1|))``, as OrdinaryDiffEq computes it.

    With ``parts``, the largest of the blocks' RMS norms (see :data:`Parts`): the adjoints' mixed
    norm over ``(lambda, mu)``, as torchdiffeq's adjoint takes it, or a seminorm that leaves the
    parameter adjoint out of error control. ``norm`` (a function of the scaled error, in the
    state's shape) replaces the RMS norm. Returns a 0-d tensor.
    """
    if norm is not None:
        scale = torch.maximum(y0.abs(), y1.abs()).mul_(rtol).add_(atol)
        return norm(err / scale).reshape(())
    if parts is not None:
        end = parts[-1][1]
        err, y0, y1 = err.reshape(-1)[:end], y0.reshape(-1)[:end], y1.reshape(-1)[:end]
    scale = torch.maximum(y0.abs(), y1.abs()).mul_(rtol).add_(atol)
    scaled = err / scale
    if parts is None or len(parts) == 1 and parts[0][0] == 0:
        return torch.linalg.vector_norm(scaled).div_(math.sqrt(scaled.numel()))
    return torch.stack([torch.linalg.vector_norm(scaled[a:b]) / math.sqrt(b - a) for a, b in parts]).max()


def part_rms(xs: list[torch.Tensor], parts: Parts | None) -> list[float]:
    """For each flat tensor in ``xs``, its RMS norm, or the largest of its blocks' (one host read)."""
    if parts is None:
        norms = [torch.linalg.vector_norm(x) / math.sqrt(x.numel()) for x in xs]
    else:
        norms = [torch.stack([torch.linalg.vector_norm(x[a:b]) / math.sqrt(b - a) for a, b in parts]).max() for x in xs]
    return torch.stack(norms).tolist()


class HairerNorms(Protocol):
    """What Hairer's initial step reads from a state ``y0`` with ``f0 = f(t0, y0)``, every norm
    the RMS norm scaled by ``atol + rtol |y0|`` (over the first ``n`` entries for a seminorm):
    ``d0 = ||y0||``, ``d1 = ||f0||``, and ``change(t, h) = ||f(t, y0 + h f0) - f0||`` (one
    evaluation of ``f``). Each step kernel (:mod:`odeflux.kernels`) computes them its own way."""

    d0: float
    d1: float

    def change(self, t: float, h: float) -> float: ...


def initial_step(norms: HairerNorms, t0: float, direction: float, order: int, dtmax: float) -> tuple[float, int]:
    """Hairer's initial step size (Hairer, Norsett and Wanner, II.4), as in OrdinaryDiffEq.

    Returns the step (positive; NaN where the start itself is not finite) and the number of
    extra ``f`` evaluations it spent.
    """
    d0, d1 = norms.d0, norms.d1
    if not (math.isfinite(d0) and math.isfinite(d1)):
        return float("nan"), 0
    dt0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
    dt0 = min(dt0, dtmax)
    with torch.no_grad():  # a heuristic: nothing here is differentiated
        d2 = norms.change(t0 + direction * dt0, direction * dt0) / dt0
    m = max(d1, d2)
    if not math.isfinite(m):
        return dt0, 1
    dt1 = max(1e-6, dt0 * 1e-3) if m <= 1e-15 else (0.01 / m) ** (1.0 / order)
    return min(100 * dt0, dt1, dtmax), 1


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
    """The classic integral controller: ``dt * clamp(safety * err**(-1/p), qmin, qmax)``.

    ``shrink_accepted=False`` never shrinks the step after an accepted one (torchdiffeq's rule).
    ``min_step``: proposals never fall below it, and a step at or below it is accepted whatever
    its error (torchdiffeq's ``min_step``: a floor on the work, not an accuracy guarantee).
    """

    safety: float = 0.9
    qmin: float = 1 / 5
    qmax: float = 10.0
    shrink_accepted: bool = True
    min_step: float = 0.0

    def __post_init__(self) -> None:
        if not (0 < self.qmin <= 1 <= self.qmax):
            raise ValueError(f"IController needs 0 < qmin <= 1 <= qmax, got qmin={self.qmin}, qmax={self.qmax}")
        if not (0 < self.safety <= 1):
            raise ValueError(f"IController needs 0 < safety <= 1, got {self.safety}")
        if not self.min_step >= 0:
            raise ValueError(f"IController needs min_step >= 0, got {self.min_step}")

    def propose(self, dt: float, err: float, state: object, order: int) -> tuple[bool, float, object]:
        forced = dt <= self.min_step
        if not math.isfinite(err):
            return forced, max(dt * self.qmin, self.min_step), state
        accept = err <= 1.0 or forced
        qmin = 1.0 if accept and not self.shrink_accepted else self.qmin
        q = self.qmax if err == 0 else min(self.qmax, max(qmin, self.safety * err ** (-1 / order)))
        return accept, max(dt * q, self.min_step), state


@dataclass
class ConstantStepSize(StepSizeController):
    """Fixed steps of ``dt0`` (the last one shortened to land on ``t1``)."""

    adaptive = False

    def propose(self, dt: float, err: float, state: object, order: int) -> tuple[bool, float, object]:
        return True, dt, state
