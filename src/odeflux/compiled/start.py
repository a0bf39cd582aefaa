"""A batch of problems' start as pure tensor code: step limits and first step, then the loop.

:func:`start_and_run` is what a per-sample solve (:mod:`odeflux.per_sample`) runs, eagerly or
as one compiled program: each problem's ``dtmin``, ``dtmax``, landing tolerance and first step
size (Hairer's estimate, a given ``dt0``, or a try at the whole span), then
:func:`~odeflux.compiled.loop.run_loop`. Written on tensors so that the start is inside the
program too: a compiled solve then makes no eager call between its arguments and its result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..control import TENSOR, Parts, initial_step
from ..solution import Status
from .loop import LoopSpec, VectorField, run_loop

#: How a problem's first step is chosen: a given ``dt0``; Hairer's estimate (one evaluation);
#: a try at the whole span, from Hairer's estimate if the error estimate rejects it.
FIRST_STEP_RULES = ("dt0", "hairer", "interval")


@dataclass(frozen=True)
class Start:
    """What a batch's start is specialised on, beside the loop's :class:`~.loop.LoopSpec`."""

    first_step: str  # one of FIRST_STEP_RULES
    dtmin: bool  # a dtmin was given (else the round-off floor of each problem's time scale)
    dtmax: bool  # a dtmax was given (else each problem's span)

    def __post_init__(self) -> None:
        if self.first_step not in FIRST_STEP_RULES:
            raise ValueError(f"first_step={self.first_step!r}: one of {', '.join(FIRST_STEP_RULES)}")


class Norms:
    """Hairer's norms of each problem (:class:`odeflux.control.HairerNorms` with ``(B,)`` values);
    with ``parts``, the largest of the blocks' RMS norms, as the error norm takes them."""

    def __init__(self, f: Callable, y0: torch.Tensor, f0: torch.Tensor, rtol: Any, atol: Any, parts: Parts | None = None):
        self.f, self.y0, self.f0, self.parts = f, y0, f0, parts
        self.scale = y0.abs() * rtol + atol
        self.d0, self.d1 = self._rms(y0), self._rms(f0)

    def _rms(self, x: torch.Tensor) -> torch.Tensor:
        z = (x / self.scale).reshape(x.shape[0], -1)
        blocks = [(0, z.shape[1])] if self.parts is None else self.parts
        norms = [torch.linalg.vector_norm(z[:, a:b], dim=1) / math.sqrt(b - a) for a, b in blocks]
        return torch.stack(norms).amax(0).to(torch.float64)

    def change(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        hy = h.to(self.y0.dtype).reshape(h.shape + (1,) * (self.y0.dim() - 1))
        f1 = self.f(t.to(self.y0.dtype), self.y0 + hy * self.f0)
        return self._rms(f1 - self.f0)


def start_inputs(
    f: VectorField, y0: torch.Tensor, k0: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor, taus: torch.Tensor,
    rtol: float, atol: float, dt0: float | None, dtmin: float | None, dtmax: float | None, max_steps: int,
    ctrl0: float | None,
) -> tuple:  # fmt: skip
    """:func:`start_and_run`'s arguments after ``spec`` and ``start``, from host numbers: the
    tolerances and step limits as 0-d float64 tensors (NaN where not given), ``max_steps`` a 0-d
    int64, the controller's first memory one per problem (1 where it keeps none)."""
    f64 = dict(dtype=torch.float64, device=y0.device)
    # (torch.full: a third of torch.tensor's cost from a host number.)
    scalar = lambda v: torch.full((), math.nan if v is None else float(v), **f64)  # noqa: E731
    return (
        f, y0, k0, t0, t1, taus, scalar(rtol), scalar(atol), scalar(dt0), scalar(dtmin), scalar(dtmax),
        torch.full((), max_steps, dtype=torch.int64, device=y0.device), torch.full_like(t0, 1.0 if ctrl0 is None else ctrl0),
    )  # fmt: skip


def start_and_run(
    spec: LoopSpec, start: Start, f: VectorField, y0: torch.Tensor, k0: torch.Tensor, t0: torch.Tensor,
    t1: torch.Tensor, taus: torch.Tensor, rtol: torch.Tensor, atol: torch.Tensor, dt0: torch.Tensor,
    dtmin: torch.Tensor, dtmax: torch.Tensor, max_steps: torch.Tensor, ctrl0: torch.Tensor,
    params: dict[str, torch.Tensor] | None = None, traced: bool = True, on_step: Callable[..., None] | None = None,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Start ``B`` problems (``(B,)`` float64 ``t0``, ``t1``; ``k0 = f(t0, y0)``) and run the loop.

    ``dt0``, ``dtmin``, ``dtmax``: 0-d float64 values, read where ``start`` says they were given;
    ``rtol``, ``atol``: 0-d; ``taus``: the ``(B, n)`` saved times; ``params``, ``traced``,
    ``on_step``: as :func:`~.loop.run_loop`, whose final carry this returns, followed by the
    evaluations of ``f`` each problem's start spent ``(B,)`` (``k0`` counted).
    """
    module = f
    if params is not None:  # (the module's values as the loop's body takes them: see run_loop)
        f = lambda tt, yy: torch.func.functional_call(module, params, (tt, yy))  # noqa: E731
    dtype = y0.dtype
    direction = torch.sign(t1 - t0)
    span = (t1 - t0).abs()
    tscale = torch.maximum(torch.maximum(t0.abs(), t1.abs()), torch.ones_like(t0))
    eps64 = 2.0**-52
    if start.dtmin:
        dtmin_t = dtmin.expand_as(t0).clone()
    elif spec.adaptive:
        dtmin_t = torch.maximum(16 * eps64 * tscale, 16 * torch.finfo(dtype).eps * span)
    else:
        dtmin_t = torch.zeros_like(t0)
    dtmax_t = torch.minimum(span, dtmax) if start.dtmax else span
    n_f = torch.ones(t0.shape, dtype=torch.int64, device=t0.device)
    retry, status0 = None, None
    if start.first_step == "dt0":
        h0 = dt0.abs().expand_as(t0)
    else:
        with torch.no_grad():
            norms = Norms(f, y0.detach(), k0.detach(), rtol, atol, spec.parts)
            hairer, extra = initial_step(norms, t0, direction, spec.solver.error_order, dtmax_t, TENSOR)
        if start.first_step == "hairer":
            h0 = torch.maximum(hairer, dtmin_t)
            n_f = n_f + extra
            # Where f is not finite at the start no step size will do: NONFINITE at once, as the
            # eager loop says (a NaN step size would otherwise be retried until max_steps).
            status0 = torch.where(torch.isfinite(hairer), 0, int(Status.NONFINITE))
        else:  # the whole span first; Hairer's estimate (its evaluation counted then) if rejected
            h0, retry = dtmax_t, hairer
    h0 = torch.minimum(h0, dtmax_t)
    ys0 = y0.unsqueeze(1).expand((y0.shape[0], taus.shape[1]) + tuple(y0.shape[1:])).clone()
    carry = run_loop(
        spec, module, y0, k0, t0, t1, h0, taus, ys0, rtol, atol, dtmin_t, dtmax_t, 64 * eps64 * tscale, max_steps,
        ctrl0, params, traced=traced, on_step=on_step, h_retry=retry, status0=status0,
    )  # fmt: skip
    return (*carry, n_f)
