"""The adaptive loop as pure tensor code: what ``torch.compile`` turns into one program.

The same step, error norm, controller rule and dense output as the eager loop
(:mod:`odeflux.integrator`): :meth:`~odeflux.solvers.ExplicitRK.step`,
:func:`~odeflux.control.error_ratio`, :meth:`~odeflux.control.StepSizeController.rule` on 0-d
tensors (:data:`~odeflux.control.TENSOR`) and :meth:`~odeflux.solvers.tableau.Solver.interpolate`.
What differs is only where decisions are taken: every quantity the eager loop keeps on the host
(the time, the step size, the controller's memory, the counters, the status) is a 0-d tensor
here, each decision a ``torch.where``, and the loop a ``torch.while_loop``, so nothing leaves the
device until the solve is done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch._higher_order_ops.while_loop import while_loop

from ..control import TENSOR, StepSizeController, error_ratio
from ..solution import Status
from ..solvers.tableau import Solver

VectorField = Callable[[Any, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LoopSpec:
    """What one compiled program is specialised on (with ``f`` and the tensors' shapes/dtypes)."""

    solver: Solver
    controller: StepSizeController
    adaptive: bool
    saving: bool  # saveat times given (else only the end state is returned)
    parts: tuple[tuple[int, int], ...] | None = None  # the error norm's blocks (IntegrateOptions.error_parts)


class Carry:
    """Names for the loop's carried tensors (``torch.while_loop`` carries a flat tuple)."""

    FIELDS = ("t", "h", "y", "k", "ctrl", "n_steps", "n_accepted", "n_rejected", "n_f", "ys", "status", "err", "grid_n")


def run_loop(
    spec: LoopSpec, f: VectorField, y0: torch.Tensor, k0: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor,
    h0: torch.Tensor, taus: torch.Tensor, ys0: torch.Tensor, rtol: torch.Tensor, atol: torch.Tensor,
    dtmin: torch.Tensor, dtmax: torch.Tensor, land_tol: torch.Tensor, max_steps: torch.Tensor,
    ctrl0: torch.Tensor,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Integrate from ``(t0, y0)`` (``k0 = f(t0, y0)``) to ``t1`` with first step ``h0``.

    Times, step sizes and tolerances are float64 0-d tensors; ``taus`` the saveat times (in the
    direction of integration) with ``ys0`` their states so far (``y0`` where a time is at or
    before ``t0``). Returns the final carry (:class:`Carry`'s fields).
    """
    solver, rule, adaptive = spec.solver, spec.controller.rule, spec.adaptive
    order, fsal = solver.error_order, solver.fsal
    dtype, device = y0.dtype, y0.device
    co = solver.coefficients(dtype, device)
    direction = torch.sign(t1 - t0)
    extra_evals = len(co.c) - 1  # per step, k1 being given (an explicit tableau)

    def cond(t, h, y, k, ctrl, n_steps, n_acc, n_rej, n_f, ys, status, err, grid_n):
        return (direction * (t1 - t) > 0) & (status == 0) & (n_steps < max_steps)

    def body(t, h, y, k, ctrl, n_steps, n_acc, n_rej, n_f, ys, status, err, grid_n):
        remaining = direction * (t1 - t)
        lands = h >= remaining - land_tol
        hm = torch.where(lands, remaining, h)
        hs = direction * hm
        y1, e_vec, K, _ = solver.step(f, t.to(dtype), y, hs.to(dtype), k, co)
        if adaptive:
            # Step-size decisions are constants to autograd, as in the eager loop.
            e = error_ratio(e_vec.detach(), y.detach(), y1.detach(), rtol, atol, spec.parts).to(torch.float64)
            accept, h_new, ctrl_new = rule(hm, e, ctrl, order, TENSOR)
            t_new = torch.where(lands, t1, t + hs)
        else:
            e = torch.zeros_like(err)
            accept, h_new, ctrl_new = torch.ones((), dtype=torch.bool, device=device), h, ctrl
            # Fixed steps: t0 + n h, so round-off does not pile up into a sliver of a last step.
            t_new = torch.where(lands, t1, t0 + (grid_n + 1) * hs)
        if spec.saving:
            # States at the saveat times inside this step: the interpolant, or y1 on its end.
            inside = accept & (direction * (taus - t) > 0) & (direction * (taus - t_new) <= 0)
            theta = ((taus - t) / hs).to(dtype)
            # (h scales the weights: a tensor addmm alpha would be a data-dependent scalar to autograd.)
            interp = solver.interpolate(y, 1.0, K, solver.dense_weights(theta, co) * hs.to(dtype))
            on_end = (taus == t_new).reshape((-1,) + (1,) * y.dim())
            new = torch.where(on_end, y1.unsqueeze(0), interp)
            ys = torch.where(inside.reshape((-1,) + (1,) * y.dim()), new, ys)
        else:
            ys = ys.clone()
        if fsal:
            k_new = K[-1]
            n_eval = extra_evals
        else:
            k_new = f(t_new.to(dtype), y1)
            n_eval = extra_evals + (accept & ~lands).to(torch.int64)  # (as the eager loop counts)
        y_next = torch.where(accept, y1, y)
        k_next = torch.where(accept, k_new, k)
        t_next = torch.where(accept, t_new, t)
        # A step cut short to land on t1 must not shrink the next one.
        h_new = torch.where(accept & lands & (h_new < h), h, h_new)
        h_next = torch.minimum(h_new, dtmax)
        unfinished = direction * (t1 - t_next) > 0
        too_small = unfinished & (h_next < dtmin)
        status_next = torch.where(
            too_small, torch.where(torch.isfinite(e), int(Status.DT_MIN), int(Status.NONFINITE)), status
        )
        return (
            t_next, h_next, y_next, k_next, ctrl_new, n_steps + 1, n_acc + accept.to(torch.int64),
            n_rej + (~accept).to(torch.int64), n_f + n_eval, ys, status_next, e, grid_n + accept.to(torch.int64),
        )  # fmt: skip

    # (Each carried tensor its own: the loop may not alias its inputs.)
    count = lambda: torch.zeros((), dtype=torch.int64, device=device)  # noqa: E731
    carry = (t0.clone(), h0, y0, k0, ctrl0, count(), count(), count(), count(), ys0, count(), torch.zeros_like(t0), count())
    return tuple(while_loop(cond, body, carry))
