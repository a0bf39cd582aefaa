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
from typing import Any, Callable, NamedTuple

import torch

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
    #: Capacity of the accepted steps' record (dense output), 0 for none: each problem's first
    #: ``record`` accepted steps are kept, and a problem stops (unfinished) when its record is full.
    record: int = 0
    #: The record keeps each step's stages too (what the states saved after the loop are
    #: interpolated from, and what dense output reads); without them the saved states are
    #: interpolated inside the loop, as without a record, and the record is four times smaller
    #: for Tsit5 (a reverse pass recomputes the stages from each step's start).
    record_stages: bool = True


def run_loop(
    spec: LoopSpec, f: VectorField, y0: torch.Tensor, k0: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor,
    h0: torch.Tensor, taus: torch.Tensor, ys0: torch.Tensor, rtol: torch.Tensor, atol: torch.Tensor,
    dtmin: torch.Tensor, dtmax: torch.Tensor, land_tol: torch.Tensor, max_steps: torch.Tensor,
    ctrl0: torch.Tensor, params: dict[str, torch.Tensor] | None = None, traced: bool = True,
    on_step: Callable[..., None] | None = None, h_retry: torch.Tensor | None = None,
    status0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Integrate ``B`` independent problems, each from ``(t0[b], y0[b])`` (``k0 = f(t0, y0)``) to
    ``t1[b]`` with first step ``h0[b]``, each with its own steps, error norm, controller memory,
    counters and status (one problem, ``B = 1``, is how a joint solve runs: :class:`JointField`).

    ``f(t, y)`` takes the ``(B,)`` times and the ``(B, ...)`` states. Times, step sizes, ``dtmin``,
    ``dtmax`` and ``land_tol`` are float64 ``(B,)`` tensors, ``rtol``/``atol`` 0-d; ``taus``
    the ``(B, n)`` saveat times (in each direction of integration; NaN pads), ``ys0`` their
    ``(B, n, ...)`` states so far. A problem that is done (or failed) stops advancing while the
    others go on. ``traced``: carried by ``torch.while_loop`` (what ``torch.compile`` takes);
    otherwise by a Python loop that reads one flag per step (what autograd differentiates).
    Returns the final carry ``(t, h, y, k, ctrl, n_steps, n_accepted, n_rejected, n_f, ys, status,
    err, grid_n)``, each per problem, followed where ``spec.record`` is set by the record of the
    accepted steps: their starts ``(B, C)``, signed sizes ``(B, C)``, start states ``(B, C, ...)``
    and, with ``spec.record_stages``, stages ``(B, C, stages, ...)`` (what
    :class:`~odeflux.solution.DenseOutput` keeps).
    ``params``: the values of the module ``f``'s parameters, substituted by name (inputs of the
    program rather than attributes it reads: torch.while_loop refuses a body whose inputs alias,
    as the views a field takes of one parameter, ``a, b = self.rates``, would).
    ``on_step(t, hs, y, K, accept)`` (host loop only) hears of every step: its start times, signed
    sizes, start states, stages and which problems accepted it (the per-sample adjoints keep the
    forward's steps, and sum their quadratures, with it).
    ``h_retry`` (``(B,)``): ``h0`` is a try at the whole span (``first_step="interval"``); a
    problem whose try is rejected goes on from at most ``h_retry``, Hairer's estimate, whose
    evaluation is counted then, as the eager loop spends it then.
    ``status0`` (``(B,)`` int64): each problem's status before its first step; one that is not
    ``SUCCESS`` (0) takes no step (a start that is not finite: :func:`~.start.start_and_run`).
    """
    if on_step is not None and traced:
        raise ValueError("run_loop: on_step= takes the host loop (traced=False)")
    module = f

    def field() -> VectorField:
        """``f`` for one iteration: with ``params`` substituted, copied once inside the loop's body
        (views of a tensor from outside it would be lifted into the body as inputs of their own,
        which alias)."""
        if params is None:
            return module
        values = {k: v.clone() for k, v in params.items()}
        return lambda tt, yy: torch.func.functional_call(module, values, (tt, yy))
    solver, rule, adaptive = spec.solver, spec.controller.rule, spec.adaptive
    order, fsal = solver.error_order, solver.fsal
    dtype, device = y0.dtype, y0.device
    co = solver.coefficients(dtype, device)
    direction = torch.sign(t1 - t0)
    own = solver.loop_steps  # steps by solver.loop_step (a Rosenbrock method, for all B problems)
    # Evaluations per step, k1 being given (an explicit tableau: its stages but the first).
    extra_evals = solver.loop_evaluations() if own else len(co.c) - 1
    # A (B,) value against (B, ...) states, or a (B, n) one against (B, n, ...) saved states.
    col = lambda x: x.reshape(x.shape + (1,) * (y0.dim() - 1))  # noqa: E731

    C = spec.record

    def active(t, n_steps, status, n_acc):
        going = (direction * (t1 - t) > 0) & (status == 0) & (n_steps < max_steps)
        return going & (n_acc < C) if C else going

    def cond(t, h, y, k, ctrl, n_steps, n_acc, n_rej, n_f, ys, status, err, grid_n, *record):
        return active(t, n_steps, status, n_acc).any()

    def body(t, h, y, k, ctrl, n_steps, n_acc, n_rej, n_f, ys, status, err, grid_n, *record):
        going = active(t, n_steps, status, n_acc)
        remaining = direction * (t1 - t)
        lands = h >= remaining - land_tol
        hm = torch.where(going, torch.where(lands, remaining, h), 0.0)  # (a problem that is done stands still)
        hs = direction * hm
        f = field()
        if own:
            # (A problem standing still steps by its last size, not 0, its result unused: a linearly
            # implicit step divides by the step, and autograd would carry 0 * inf = NaN back
            # through the unselected branch of the torch.where below into the others' gradients.)
            h_own = torch.where(going, hs, direction * h)
            y1, e_vec, K, k_end, flags = solver.loop_step(f, t.to(dtype), y, h_own.to(dtype), k, co)
        else:
            y1, e_vec, K, _ = solver.step(f, t.to(dtype), y, hs.to(dtype), k, co)
            flags = None
        if adaptive:
            # Step-size decisions are constants to autograd, as in the eager loop.
            e = error_ratio(e_vec.detach(), y.detach(), y1.detach(), rtol, atol, spec.parts, per_sample=True)
            e = e.to(torch.float64)
            accept, h_new, ctrl_new = rule(hm, e, ctrl, order, TENSOR)
            accept = accept & going
            t_new = torch.where(lands, t1, t + hs)
        else:
            e = torch.zeros_like(err)
            accept, h_new, ctrl_new = going, h, ctrl
            # Fixed steps: t0 + n h, so round-off does not pile up into a sliver of a last step.
            t_new = torch.where(lands, t1, t0 + (grid_n + 1) * hs)
        stepped = going  # the attempts counted as steps
        if flags is not None:
            # A singular W or a Jacobian that is not finite ends the solve uncounted, as the eager
            # stepper's LinearSolveFailure does (status: NONFINITE where J is not finite).
            failed_ls = going & (flags != 0)
            accept, stepped = accept & ~failed_ls, going & ~failed_ls
        if on_step is not None:
            on_step(t, hs, y, K, accept)
        if spec.saving and not (C and spec.record_stages):
            # States at the saveat times inside this step: the interpolant, or y1 on its end.
            inside = accept.unsqueeze(1) & (direction.unsqueeze(1) * (taus - t.unsqueeze(1)) > 0)
            inside = inside & (direction.unsqueeze(1) * (taus - t_new.unsqueeze(1)) <= 0)
            # (theta outside the step is set to 0: no inf or NaN reaches autograd through the mask.)
            theta = torch.where(inside, (taus - t.unsqueeze(1)) / torch.where(going, hs, 1.0).unsqueeze(1), 0.0)
            weights = solver.dense_weights(theta.to(dtype), co) * hs.to(dtype).reshape(-1, 1, 1)  # (B, n, stages)
            B, s = y.shape[0], K.shape[0]
            interp = y.reshape(B, 1, -1) + torch.einsum("bns,sbx->bnx", weights, K.reshape(s, B, -1))
            interp = interp.reshape(ys.shape)
            new = torch.where(col(taus == t_new.unsqueeze(1)), y1.unsqueeze(1), interp)
            ys = torch.where(col(inside), new, ys)
        else:
            ys = ys.clone()
        if fsal:
            k_new = K[-1]
            n_eval = stepped.to(torch.int64) * extra_evals
        else:
            # (Evaluated for every problem; counted as the eager loop counts: after accepted
            # steps that do not end the solve. A loop step's own f at its end, at t + hs: t_new
            # but where it lands on t1, where it is only the solve's last derivative; not in
            # float32, whose t + hs is not the host's time.)
            k_new = k_end if own and dtype == torch.float64 else f(t_new.to(dtype), y1)
            n_eval = stepped.to(torch.int64) * extra_evals + (accept & ~lands).to(torch.int64)
        y_next = torch.where(col(accept), y1, y)
        k_next = torch.where(col(accept), k_new, k)
        t_next = torch.where(accept, t_new, t)
        # (New tensors throughout: the loop may not alias its carried inputs.)
        ctrl_next = torch.where(accept, ctrl_new, ctrl)
        # A step cut short to land on t1 must not shrink the next one.
        h_new = torch.where(accept & lands & (h_new < h), h, h_new)
        if h_retry is not None:  # a rejected try at the whole span: on from Hairer's estimate
            retry = going & ~accept & (n_steps == 0)
            h_new = torch.where(retry, torch.minimum(h_new, h_retry), h_new)
            n_eval = n_eval + retry.to(torch.int64)
        h_next = torch.where(going, torch.minimum(h_new, dtmax), h)
        unfinished = direction * (t1 - t_next) > 0
        too_small = going & unfinished & (h_next < dtmin)
        failed = torch.where(torch.isfinite(e), int(Status.DT_MIN), int(Status.NONFINITE))
        if h_retry is not None:  # (no step size will do where the start itself is not finite)
            no_start = retry & ~torch.isfinite(h_retry)
            failed = torch.where(no_start, int(Status.NONFINITE), failed)
            too_small = too_small | no_start
        status_next = torch.where(too_small, failed, status)
        if flags is not None:
            code = torch.where(flags >= 2, int(Status.NONFINITE), int(Status.LINEAR_SOLVE_FAILED))
            status_next = torch.where(failed_ls, code, status_next)
            h_next = torch.where(failed_ls, h, h_next)  # (the message's dt: the one tried, as eager)
        if C:
            # Each attempt is written at the problem's next free slot; a rejected one is
            # overwritten by the attempt after it, so the slots below n_accepted are the accepted steps.
            kept = (t, hs, y, K.movedim(0, 1)) if spec.record_stages else (t, hs, y)
            record = _write(record, torch.clamp(n_acc, max=C - 1), kept)
        return (
            t_next, h_next, y_next, k_next, ctrl_next, n_steps + stepped.to(torch.int64),
            n_acc + accept.to(torch.int64), n_rej + (stepped & ~accept).to(torch.int64), n_f + n_eval, ys,
            status_next, torch.where(going, e, err), grid_n + accept.to(torch.int64), *record,
        )  # fmt: skip

    count = lambda: torch.zeros(t0.shape, dtype=torch.int64, device=device)  # noqa: E731
    status = count() if status0 is None else status0.clone()
    carry = (t0.clone(), h0, y0, k0, ctrl0, count(), count(), count(), count(), ys0, status, torch.zeros_like(t0), count())
    if C:
        B, s = y0.shape[0], len(co.c)
        carry += (t0.new_zeros(B, C), t0.new_zeros(B, C), y0.new_zeros((B, C) + tuple(y0.shape[1:])))
        if spec.record_stages:
            carry += (y0.new_zeros((B, C, s) + tuple(y0.shape[1:])),)
    if traced:
        # (Imported here: torch's higher-order ops import torch._dynamo, seconds of start-up that
        # a process without compile=True should not pay.)
        from torch._higher_order_ops.while_loop import while_loop

        # (Carried inputs in the layout the body returns: an expanded or transposed one, such as
        # a batch of one's times broadcast from a number, would differ from it in strides.)
        carry = tuple(c.clone(memory_format=torch.contiguous_format) for c in carry)
        packed = tuple(while_loop(lambda *c: cond(*_unpacked(c)), lambda *c: _packed(body(*_unpacked(c))), _packed(carry)))
        carry = _unpacked(packed)
    else:
        while bool(cond(*carry)):  # the one read per step
            carry = body(*carry)
    if spec.saving and C and spec.record_stages:
        carry = carry[:9] + (_saved_from_record(solver, co, taus, carry, direction),) + carry[10:]
    return carry


def _packed(carry: tuple) -> tuple:
    """The loop's carry with its per-problem scalars packed: the times, step sizes, controller
    memories and errors in one ``(B, 4)`` float64 tensor, the six counters in one ``(B, 6)`` int64
    tensor. Inductor's C++ wrapper allocates each carried tensor afresh every iteration (and a
    handle for it in the condition and the body), which on a small state costs more than the
    step's arithmetic: 13 carried values become 5."""
    t, h, y, k, ctrl, n_steps, n_acc, n_rej, n_f, ys, status, err, grid_n, *record = carry
    floats = torch.stack([t, h, ctrl, err], -1)
    counts = torch.stack([n_steps, n_acc, n_rej, n_f, status, grid_n], -1)
    return (floats, counts, y, k, ys, *record)


def _unpacked(packed: tuple) -> tuple:
    """:func:`_packed`'s carry in the loop's own order."""
    floats, counts, y, k, ys, *record = packed
    t, h, ctrl, err = floats.unbind(-1)
    n_steps, n_acc, n_rej, n_f, status, grid_n = counts.unbind(-1)
    return (t, h, y, k, ctrl, n_steps, n_acc, n_rej, n_f, ys, status, err, grid_n, *record)


class Located(NamedTuple):
    """Where each saved time falls in a record of accepted steps (:func:`locate`), ``(B, n)`` each."""

    i: torch.Tensor  # the step it falls in; -1: on or before the start
    ic: torch.Tensor  # ``i`` clamped to a valid slot
    last: torch.Tensor  # that step is the problem's last recorded one
    t_next: torch.Tensor  # that step's end
    ok: torch.Tensor  # inside that step or on its end (not at the start, not past the end, not NaN)
    weights: torch.Tensor  # ``(B, n, stages)``: the interpolant's stage weights times the step, 0 where not ok


def locate(
    solver: Solver, co: Any, rec_t: torch.Tensor, rec_h: torch.Tensor, n_acc: torch.Tensor, t_end: torch.Tensor,
    taus: torch.Tensor, direction: torch.Tensor, dtype: torch.dtype,
) -> Located:  # fmt: skip
    """Each saved time ``taus`` (``(B, n)``) among each problem's recorded steps (starts ``rec_t``,
    signed sizes ``rec_h``, ``(B, C)``; ``n_acc`` of them; ``t_end`` reached): what the states saved
    from the record (:func:`run_loop`) and their cotangents (:mod:`.reverse`) are computed from."""
    B, C = rec_t.shape
    d = direction.reshape(B, 1)
    valid = torch.arange(C, device=taus.device) < n_acc.unsqueeze(1)  # (B, C)
    before = valid.unsqueeze(1) & (d.unsqueeze(2) * (rec_t.unsqueeze(1) - taus.unsqueeze(2)) < 0)  # (B, n, C)
    i = before.sum(-1) - 1
    ic = i.clamp(min=0)
    last = ic + 1 >= n_acc.unsqueeze(1)
    t_next = torch.where(last, t_end.unsqueeze(1), rec_t.gather(1, (ic + 1).clamp(max=C - 1)))
    ok = (i >= 0) & (d * (taus - t_next) <= 0)
    h = rec_h.gather(1, ic)
    theta = torch.where(ok, (taus - rec_t.gather(1, ic)) / torch.where(ok, h, 1.0), 0.0)
    weights = solver.dense_weights(theta.to(dtype), co) * torch.where(ok, h, 0.0).to(dtype).unsqueeze(2)
    return Located(i, ic, last, t_next, ok, weights)


def _saved_from_record(solver: Solver, co: Any, taus: torch.Tensor, carry: tuple, direction: torch.Tensor) -> torch.Tensor:
    """The states at the saveat times from the record of the accepted steps, after the loop (the
    same interpolant as in the loop, once per time rather than every time at every step)."""
    t_end, y_end, n_acc, ys0 = carry[0], carry[2], carry[6], carry[9]
    rec_t, rec_h, rec_y, rec_K = carry[13:]
    B, C = rec_t.shape
    n = taus.shape[1]
    col = lambda x: x.reshape(x.shape + (1,) * (ys0.dim() - x.dim()))  # noqa: E731
    at = locate(solver, co, rec_t, rec_h, n_acc, t_end, taus, direction, ys0.dtype)
    gather = lambda buf, idx: buf.gather(1, idx.reshape(idx.shape + (1,) * (buf.dim() - 2)).expand(idx.shape + buf.shape[2:]))  # noqa: E731
    K = gather(rec_K, at.ic)  # (B, n, stages, ...)
    s = K.shape[2]
    interp = gather(rec_y, at.ic).reshape(B, n, -1) + torch.einsum("bns,bnsx->bnx", at.weights, K.reshape(B, n, s, -1))
    y_next = torch.where(col(at.last), y_end.unsqueeze(1), gather(rec_y, (at.ic + 1).clamp(max=C - 1)))
    new = torch.where(col(taus == at.t_next), y_next, interp.reshape(ys0.shape))
    return torch.where(col(at.ok), new, ys0)


def _write(record: tuple, slot: torch.Tensor, values: tuple) -> tuple:
    """``record``'s buffers (``(B, C, ...)`` each) with each problem's ``values`` (``(B, ...)``)
    written at its ``slot``."""
    out = []
    for buf, v in zip(record, values):
        idx = slot.reshape((-1, 1) + (1,) * (buf.dim() - 2)).expand((buf.shape[0], 1) + tuple(buf.shape[2:]))
        out.append(buf.scatter(1, idx, v.reshape(idx.shape)))
    return tuple(out)


def module_params(f: Any) -> dict[str, torch.Tensor] | None:
    """The module ``f``'s parameters by name, detached (:func:`run_loop`'s ``params``), or ``None``."""
    if not isinstance(f, torch.nn.Module):
        return None
    named, seen = {}, set()
    for name, p in f.named_parameters(remove_duplicate=False):
        ptr = p.untyped_storage().data_ptr()
        # (Parameters that are views of one tensor, a flat parameter vector's, are copied apart:
        # a compiled loop may not take inputs that alias.)
        named[name] = p.detach().clone() if ptr in seen else p.detach()
        seen.add(ptr)
    return named or None


class JointField(torch.nn.Module):
    """``f`` of one state as the loop's field of ``B = 1`` problem: ``f(t[0], y[0])[None]`` (a
    module, so that torch.compile sees through it to ``f`` as it does for ``f`` itself)."""

    def __init__(self, f: VectorField):
        super().__init__()
        self.f = f

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.f(t.reshape(()), y.squeeze(0)).unsqueeze(0)
