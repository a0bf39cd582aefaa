"""Step-size control: the scaled error norm, Hairer's initial step, PI and constant-step controllers.

Controllers work on host floats: the one number the host needs from the device each step is the
scaled error norm (the accept/reject decision), and everything else follows from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch


#: Blocks ``(start, stop)`` of the flattened state: the error norm is the largest of their RMS
#: norms, and entries in no block are left out (``None``: one RMS norm over the whole state).
Parts = tuple[tuple[int, int], ...]


def error_ratio(
    err: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor, rtol: float, atol: float, parts: Parts | None = None,
    norm: Callable[[torch.Tensor], torch.Tensor] | None = None, per_sample: bool = False,
) -> torch.Tensor:  # fmt: skip
    """RMS norm of ``err / (atol + rtol * max(|y0|, |y1|))``, as OrdinaryDiffEq computes it.

    ``per_sample``: the states are ``(B, ...)``, ``B`` independent problems, and the norm is each
    one's (a ``(B,)`` tensor; ``parts`` then index one problem's flattened state).

    With ``parts``, the largest of the blocks' RMS norms (see :data:`Parts`): the adjoints' mixed
    norm over ``(lambda, mu)``, as torchdiffeq's adjoint takes it, or a seminorm that leaves the
    parameter adjoint out of error control. ``norm`` (a function of the scaled error, in the
    state's shape) replaces the RMS norm. Returns a 0-d tensor.
    """
    if norm is not None:
        scale = torch.maximum(y0.abs(), y1.abs()).mul_(rtol).add_(atol)
        return norm(err / scale).reshape(())
    if per_sample:
        B = err.shape[0]
        err, y0, y1 = err.reshape(B, -1), y0.reshape(B, -1), y1.reshape(B, -1)
        scaled = err / (torch.maximum(y0.abs(), y1.abs()) * rtol + atol)
        if parts is None:
            return torch.linalg.vector_norm(scaled, dim=1) / math.sqrt(scaled.shape[1])
        return torch.stack([torch.linalg.vector_norm(scaled[:, a:b], dim=1) / math.sqrt(b - a) for a, b in parts]).amax(0)
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


def initial_step(
    norms: HairerNorms, t0: Any, direction: Any, order: int, dtmax: Any, ops: Ops | None = None
) -> tuple[Any, int]:  # fmt: skip
    """Hairer's initial step size (Hairer, Norsett and Wanner, II.4), as in OrdinaryDiffEq.

    Returns the step (positive; NaN where the start itself is not finite) and the number of
    extra ``f`` evaluations it counts (none where the start is not finite). On host floats
    (``ops`` :data:`HOST`, the default) or on tensors of one value per problem (:data:`TENSOR`:
    ``B`` problems, ``norms`` giving ``(B,)`` norms).
    """
    ops = HOST if ops is None else ops
    d0, d1 = norms.d0, norms.d1
    finite = ops.both(ops.isfinite(d0), ops.isfinite(d1))
    if ops is HOST and not finite:
        return float("nan"), 0
    # (The floors only keep 0 out of divisions in branches that are not selected.)
    dt0 = ops.where(ops.either(d0 < 1e-5, d1 < 1e-5), 1e-6, 0.01 * d0 / ops.maximum(d1, 1e-300))
    dt0 = ops.minimum(dt0, dtmax)
    with torch.no_grad():  # a heuristic: nothing here is differentiated
        d2 = norms.change(t0 + direction * dt0, direction * dt0) / dt0
    m = ops.maximum(d1, d2)
    dt1 = ops.where(m <= 1e-15, ops.maximum(dt0 * 1e-3, 1e-6), (0.01 / ops.maximum(m, 1e-300)) ** (1.0 / order))
    h = ops.where(ops.isfinite(m), ops.minimum(ops.minimum(dt1, 100 * dt0), dtmax), dt0)
    if ops is not HOST:  # (as the host's early return: no step, and no evaluation counted)
        return ops.where(finite, h, math.nan), torch.where(finite, 1, 0)
    return h, 1


class Ops:
    """The few operations a controller's rule needs, on host floats (:data:`HOST`) or on 0-d
    tensors (:data:`TENSOR`, for a loop traced as one compiled program). A rule written with them
    exists once and gives the same arithmetic on both: every branch is computed and one selected."""

    def __init__(self, where: Callable, minimum: Callable, maximum: Callable, isfinite: Callable, both: Callable, either: Callable):
        self.where, self.minimum, self.maximum, self.isfinite = where, minimum, maximum, isfinite
        self.both, self.either = both, either


HOST = Ops(lambda c, a, b: a if c else b, min, max, math.isfinite, lambda a, b: a and b, lambda a, b: a or b)


def _tensor_min(a: Any, b: Any) -> torch.Tensor:
    if not isinstance(a, torch.Tensor):
        a, b = b, a
    return torch.minimum(a, b) if isinstance(b, torch.Tensor) else a.clamp(max=b)


def _tensor_max(a: Any, b: Any) -> torch.Tensor:
    if not isinstance(a, torch.Tensor):
        a, b = b, a
    return torch.maximum(a, b) if isinstance(b, torch.Tensor) else a.clamp(min=b)


def _tensor_where(c: torch.Tensor, a: Any, b: Any) -> torch.Tensor:
    if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):  # (float64, as host floats are)
        a = torch.tensor(a, dtype=torch.float64, device=c.device)
    return torch.where(c, a, b)


TENSOR = Ops(_tensor_where, _tensor_min, _tensor_max, torch.isfinite, torch.logical_and, torch.logical_or)


class StepSizeController:
    """Decides, from the scaled error norm of a step, whether to accept it and the next step size.

    A controller implements :meth:`rule` with the operations of an :class:`Ops`; the eager loop
    calls it on host floats (:meth:`propose`), the compiled loop (:mod:`odeflux.compiled`) on
    0-d tensors. ``state`` is a float (a tensor there) or ``None``."""

    adaptive: bool = True

    def init_state(self) -> object:
        return None

    def rule(self, dt: Any, err: Any, state: Any, order: int, ops: Ops) -> tuple[Any, Any, Any]:
        """Given ``|dt|`` just tried and its error norm, ``(accept, next |dt|, new state)``."""
        raise NotImplementedError

    def propose(self, dt: float, err: float, state: object, order: int) -> tuple[bool, float, object]:
        """:meth:`rule` on host floats."""
        return self.rule(dt, err, state, order, HOST)


@dataclass
class PIController(StepSizeController):
    """The proportional-integral controller of OrdinaryDiffEq (Hairer's DOPRI5 variant).

    With ``q = err**beta1 / qold**beta2 / safety``, clamped to ``[1/qmax, 1/qmin]``, the next step
    is ``dt / q``. ``beta1`` and ``beta2`` default to ``7/(10p)`` and ``2/(5p)`` for a method of
    order ``p``; ``qold`` is the last accepted error norm (at least ``qoldinit``).

    ``qoldinit`` defaults to 0.1, not OrdinaryDiffEq's and Hairer's 1e-4
    (``PIController(qoldinit=1e-4)``): with the memory of a tiny error floored at 1e-4 the step
    grows about 2-3x a step where the error is far below the tolerance (a smooth neural field),
    against 5-10x. Measured at equal error (benchmarks/results/work_precision.md and
    gradient_work_precision.md) 0.1 needs as few or fewer evaluations, forward and per gradient.

    ``integral_start=True``: the first accepted step, which has no error memory yet, proposes the
    next step as :class:`IController` does (``dt * clamp(safety * err**(-1/p), qmin, qmax)``), the
    PI filter after it. Hairer's first step is cautious by design, and its error is far below the
    tolerance; the PI filter grows it 3-5x where the integral rule grows it up to 10x.
    """

    beta1: float | None = None
    beta2: float | None = None
    safety: float = 0.9
    qmin: float = 1 / 5
    qmax: float = 10.0
    qoldinit: float = 0.1
    integral_start: bool = False

    def __post_init__(self) -> None:
        if not (0 < self.qmin <= 1 <= self.qmax):
            raise ValueError(f"PIController needs 0 < qmin <= 1 <= qmax, got qmin={self.qmin}, qmax={self.qmax}")
        if not (0 < self.safety <= 1):
            raise ValueError(f"PIController needs 0 < safety <= 1, got {self.safety}")
        if not (0 < self.qoldinit <= 1):
            raise ValueError(f"PIController needs 0 < qoldinit <= 1, got {self.qoldinit}")

    def init_state(self) -> float:
        return -1.0 if self.integral_start else self.qoldinit  # (-1: no step accepted yet)

    def rule(self, dt: Any, err: Any, state: Any, order: int, ops: Ops) -> tuple[Any, Any, Any]:
        beta1 = self.beta1 if self.beta1 is not None else 7 / (10 * order)
        beta2 = self.beta2 if self.beta2 is not None else 2 / (5 * order)
        finite = ops.isfinite(err)
        accept = ops.both(finite, err <= 1.0)
        q11 = err**beta1
        if self.integral_start:  # (state -1 until a step is accepted: the integral rule then)
            q = ops.where(state < 0, err ** (1 / order), q11 / ops.maximum(state, self.qoldinit) ** beta2)
        else:
            q = q11 / state**beta2
        q = ops.minimum(1 / self.qmin, ops.maximum(1 / self.qmax, q / self.safety))
        # (q11 > 1 wherever the rejected step size is selected: the floor only keeps 0 out of it.)
        rejected = ops.where(finite, dt / ops.minimum(1 / self.qmin, ops.maximum(q11, 1e-300) / self.safety), dt * self.qmin)
        return accept, ops.where(accept, dt / q, rejected), ops.where(accept, ops.maximum(err, self.qoldinit), state)


#: A PIController with the defaults, shared by the solves with an adaptive explicit method that
#: pick none (a controller keeps no state of its own: ``init_state()`` hands each solve its own).
DEFAULT_PI = PIController()
#: OrdinaryDiffEq's PI controller as it is (the error memory floored at 1e-4), the default of
#: - the implicit and Rosenbrock methods: the 0.1 floor was measured on explicit methods only; on
#:   ROBER it moves KenCarp4's gradient 6e-5 from the finite differences' at rtol 1e-6, against
#:   under 1e-5 with this;
#: - the continuous adjoints' backward solves: their error estimate sees neither the error of the
#:   y(t) they read nor that of an adjoint far below atol, and with the 0.1 floor the default
#:   adjoint's gradient was less accurate than torchdiffeq odeint_adjoint's at 10 of 33 (field,
#:   tolerance) pairs, against 1 with this (benchmarks/results/gradient_work_precision.md).
ORDINARYDIFFEQ_PI = PIController(qoldinit=1e-4)


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

    def rule(self, dt: Any, err: Any, state: Any, order: int, ops: Ops) -> tuple[Any, Any, Any]:
        forced = dt <= self.min_step
        finite = ops.isfinite(err)
        accept = ops.where(finite, ops.either(err <= 1.0, forced), forced)
        qmin = self.qmin if self.shrink_accepted else ops.where(accept, 1.0, self.qmin)
        # An error below 1e-300 (or 0) proposes qmax like any error under (safety/qmax)^p.
        q = ops.minimum(self.qmax, ops.maximum(qmin, self.safety * ops.maximum(err, 1e-300) ** (-1 / order)))
        q = ops.where(finite, q, self.qmin)
        return accept, ops.maximum(dt * q, self.min_step), state


@dataclass
class ConstantStepSize(StepSizeController):
    """Fixed steps of ``dt0`` (the last one shortened to land on ``t1``)."""

    adaptive = False

    def rule(self, dt: Any, err: Any, state: Any, order: int, ops: Ops) -> tuple[Any, Any, Any]:
        return True, dt, state
