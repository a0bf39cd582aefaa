"""The continuous adjoints of a per-sample solve (``solve(..., batch_axis=0, sensealg=...)``).

The forward solve runs without a graph (the compiled loop's ``B`` problems, :mod:`odeflux.per_sample`).
The backward pass integrates each sample's adjoint ODE from that sample's own last saved time
back to its own ``t0``, again as ``B`` independent problems of one loop (each with its own steps,
error norm and controller), one interval between saved times at a time: the ``j``-th interval
from a sample's start is integrated in the same loop as every other sample's ``j``-th (a sample
with fewer saved times stands still meanwhile), and each saved state's incoming gradient is added
to that sample's ``lambda`` as it is passed. Tolerances, solver, norm and seminorm of the backward
solve are the adjoint's own rule, as for a joint solve (:class:`~odeflux.sensitivity.base.ContinuousAdjoint`).

What each method integrates, per sample:

- :class:`BacksolveAdjoint`: ``(y, lambda, mu)``; ``y`` reset to the forward's saved state at each
  saved time (``checkpointing=True``) or carried on.
- :class:`InterpolatingAdjoint`: ``(lambda, mu)``, ``y(t)`` from the forward's own steps, which the
  forward keeps for this (every iteration of its loop, states and stages: ``iterations x B x (stages + 1) x n``).
- :class:`GaussAdjoint`: ``lambda``; at each accepted adjoint step, Gauss-Legendre quadrature of
  ``lambda^T df/dp`` over that sample's step, ``y`` from the forward's steps as above.
- :class:`QuadratureAdjoint`: ``lambda``, keeping the adjoint's own steps; then, per interval,
  adaptive Gauss-Kronrod (7-15) quadrature of ``lambda^T df/dp`` over each sample's adjoint steps,
  bisected per sample until its own error estimate meets ``quad_rtol``/``quad_atol`` (one piece
  of each sample per round, all samples in the same 15 evaluations).

Parameter adjoints: ``f`` is batch-separable (sample ``b``'s derivative depends on sample ``b``
alone), so ``lambda^T df/dy`` for the batch is one VJP. ``mu`` of backsolve and interpolating
is one block per sample, ``(B, P)``, its derivative ``lambda_b^T df_b/dp`` for every sample at
once (as are the quadrature adjoint's per-sample error estimates, ``15 x B x P`` a round): with
``vjp="autograd"`` one autograd pass with ``B`` cotangents (``is_grads_batched``, each ``lambda``
masked to one sample: any ``f``, ``B x B x n`` cotangents, cost growing as ``B^2``); with
``vjp="func"`` ``torch.func.vmap`` over the samples of ``torch.func.vjp`` of the module on one
sample (cost growing as ``B``; for fields whose samples do not depend on the batch they are in).
Measured (B = 128, a 16-64-16 tanh MLP, rtol = atol = 1e-6, one thread, float64): DirectAdjoint
25 ms, Gauss 53 ms, backsolve/interpolating/quadrature 810/869/1147 ms with autograd and
229/260/295 ms with func, all within 4e-9 of DirectAdjoint's gradients. The Gauss adjoint only needs
the sum over samples of its quadratures: one ordinary VJP per node, ``P`` numbers kept. The
parameters' gradients are the sum of the samples' ``mu``, as autograd sums a batched loss.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

from ..control import ConstantStepSize
from ..solution import BackwardStats, SolveError, Status
from .backsolve import BacksolveAdjoint
from .base import CARRIED_FIRST_STEPS, ContinuousAdjoint, _buffers_kept, _restored, adjoint_parts, hidden_param, split_like
from .gauss import GaussAdjoint
from .interpolating import InterpolatingAdjoint
from .quadrature import QuadratureAdjoint, kronrod_rule

#: The sensitivity methods a per-sample solve takes (DirectAdjoint: backpropagation through its loop).
PER_SAMPLE_METHODS = (BacksolveAdjoint, InterpolatingAdjoint, GaussAdjoint, QuadratureAdjoint)
WORKING = "DirectAdjoint, BacksolveAdjoint, InterpolatingAdjoint, GaussAdjoint or QuadratureAdjoint"


def check_method(method: Any, forward_solver: Any = None) -> None:
    """Refuse, in one line, a method or option a per-sample solve (with ``forward_solver``) does not take."""
    if not isinstance(method, PER_SAMPLE_METHODS):
        raise ValueError(
            f"per-sample solves (batch_axis=) differentiate with sensealg=None, {WORKING}(), not {method!r}"
        )
    name = type(method).__name__
    refused = {
        f"vjp={method.vjp!r} (they take vjp='autograd' or 'func')": method.vjp not in ("autograd", "func"),
        "a callable norm": callable(method.norm),
        "callbacks": method.callbacks is not None,
        "store_limit (the forward's steps are always kept)": method.store_limit is not None,
        "checkpointing=True": method.uses_forward_interpolant and bool(getattr(method, "checkpointing", False)),
        f"solver={type(method.solver).__name__}() (they take explicit Runge-Kutta methods)": (
            method.solver is not None and not getattr(method.solver, "tableau_steps", False)
        ),
    }
    if forward_solver is not None and not forward_solver.tableau_steps:
        fwd = type(forward_solver).__name__
        raise ValueError(
            f"per-sample solves with {fwd} differentiate with DirectAdjoint: pass sensealg=DirectAdjoint() (a continuous "
            f"adjoint's per-sample backward solve takes explicit Runge-Kutta methods; for {name} with {fwd}, solve the batch jointly, without batch_axis)"
        )
    bad = [k for k, on in refused.items() if on]
    if bad:
        raise ValueError(f"per-sample solves (batch_axis=) take {name} without {', '.join(bad)}")


class BatchVJP:
    """Vector-Jacobian products of a batch-separable ``f(t, y)`` (``(B,)`` times, ``(B, ...)`` states).

    One row per sample of ``v^T df/dp`` (``params="each"``): with ``vjp="autograd"`` one backward
    pass of the batch's graph with ``B`` cotangents (``is_grads_batched``: any ``f``, ``B x B x n``
    cotangents, cost growing as ``B^2``); with ``vjp="func"``, ``torch.func.vmap`` over the samples
    of ``torch.func.vjp`` of ``f`` (an ``nn.Module``) on one sample at a time, a batch of one
    (cost growing as ``B``: for a field whose samples do not depend on the batch they are in, such
    as an MLP; one with a parameter per sample is refused, as its output then has the wrong shape).
    """

    def __init__(self, f: Callable, params: list[torch.Tensor], stats: BackwardStats, vjp: str = "autograd"):
        self.f, self.params, self.stats, self.mode = f, params, stats, vjp
        self.n_params = sum(p.numel() for p in params)
        if vjp == "func":
            if not isinstance(f, torch.nn.Module):
                raise ValueError(
                    "per-sample solves take vjp='func' for f an nn.Module (its parameters substituted by name), without "
                    "args=; use vjp='autograd'"
                )
            where = {id(p): i for i, p in enumerate(params)}
            self.names = [(name, where[id(p)]) for name, p in f.named_parameters(remove_duplicate=False) if id(p) in where]
            if len({i for _, i in self.names}) != len(params):
                raise ValueError("per-sample solves take vjp='func' when every tensor differentiated is a parameter of f; "
                                 "use vjp='autograd'")  # fmt: skip

    def _each_func(self, t: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``(B, P)``: each sample's ``v_b^T df/dp``, one sample at a time under ``torch.func.vmap``."""
        from torch.func import functional_call, vjp, vmap

        B, module = y.shape[0], self.f
        primals = {name: self.params[i].detach() for name, i in self.names}
        shape = (1,) + tuple(y.shape[1:])

        def one(pd: dict, tb: torch.Tensor, yb: torch.Tensor, vb: torch.Tensor) -> dict:
            def g(pd: dict) -> torch.Tensor:
                why = "vjp='func' evaluates f on one sample at a time (a batch of one), and f"
                hint = "its samples depend on the batch (a parameter per sample?): use vjp='autograd'"
                try:
                    out = functional_call(module, pd, (tb.unsqueeze(0), yb.unsqueeze(0)))
                except RuntimeError as exc:
                    raise ValueError(f"{why} failed there ({exc}); {hint}") from exc
                if tuple(out.shape) != shape:
                    raise ValueError(f"{why} returned shape {tuple(out.shape)} for {shape}; {hint}")
                return out

            return vjp(g, pd)[1](vb.unsqueeze(0))[0]

        grads = vmap(one, in_dims=(None, 0, 0, 0))(primals, t, y.detach(), v)
        rows = [y.new_zeros((B, p.numel())) for p in self.params]
        for name, i in self.names:
            rows[i] = rows[i] + grads[name].reshape(B, -1)
        return torch.cat(rows, 1)

    def __call__(
        self, t: torch.Tensor, y: torch.Tensor, v: torch.Tensor, *, want_y: bool = True, params: str | None = "each",
        want_f: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
        """``(f(t, y) if want_f, v^T df/dy (B, ...) if want_y, v^T df/dp)``: with ``params="each"`` one
        row per sample ``(B, P)``, with ``"sum"`` summed over the samples ``(P,)``, ``None``: not computed."""
        self.stats.n_vjp_evals += 1
        B = y.shape[0]
        ps = self.params if params is not None else []
        with torch.enable_grad():
            y_ = y.detach().requires_grad_(want_y)
            out = self.f(t, y_)
        gy = gp = None
        if not out.requires_grad:  # f depends on neither (a constant field, say)
            gy = torch.zeros_like(y) if want_y else None
            if params is not None:
                gp = y.new_zeros((B, self.n_params) if params == "each" else (self.n_params,))
            return (out.detach() if want_f else None), gy, gp
        first = ([y_] if want_y else []) + (ps if params == "sum" else [])
        batched = params == "each" and bool(ps) and self.mode == "autograd"
        if first:
            grads = torch.autograd.grad(out, first, v, allow_unused=True, retain_graph=batched)
            grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, first)]
            if want_y:
                gy, grads = grads[0], grads[1:]
            if params == "sum":
                gp = torch.cat([g.reshape(-1) for g in grads]) if grads else y.new_zeros(0)
        if params == "each":
            if not ps:
                gp = y.new_zeros(B, 0)
            elif not batched:
                gp = self._each_func(t, y, v)
            else:
                # One cotangent per sample: v masked to that sample (a batch of B backward passes).
                eye = torch.eye(B, dtype=v.dtype, device=v.device).reshape((B, B) + (1,) * (v.dim() - 1))
                grads = torch.autograd.grad(out, ps, eye * v.unsqueeze(0), is_grads_batched=True, allow_unused=True)
                gp = torch.cat(
                    [(y.new_zeros((B, p.numel())) if g is None else g.reshape(B, -1)) for g, p in zip(grads, ps)], 1
                )  # fmt: skip
        return (out.detach() if want_f else None), gy, gp


class ForwardSteps:
    """Each sample's accepted forward steps (kept by the loop's ``on_step``) and ``y(t)`` from them."""

    def __init__(self, solver: Any):
        self.solver = solver
        self.ts: list[torch.Tensor] = []
        self.hs: list[torch.Tensor] = []
        self.ys: list[torch.Tensor] = []
        self.Ks: list[torch.Tensor] = []
        self.accepts: list[torch.Tensor] = []

    def __call__(self, t: torch.Tensor, hs: torch.Tensor, y: torch.Tensor, K: torch.Tensor, accept: torch.Tensor) -> None:
        self.ts.append(t)
        self.hs.append(hs)
        self.ys.append(y.reshape(y.shape[0], -1))
        self.Ks.append(K.reshape(K.shape[0], K.shape[1], -1))
        self.accepts.append(accept)

    def finish(self, direction: torch.Tensor, shape: torch.Size) -> None:
        """Index each sample's accepted steps in its direction of time (the lists are freed)."""
        self.shape, self.direction = shape, direction
        B = direction.shape[0]
        dev = direction.device
        if not self.ts:  # no step at all: a sample's own start is all there is
            self.T = torch.zeros(1, B, dtype=torch.float64, device=dev)
            self.H = torch.ones(1, B, dtype=torch.float64, device=dev)
            self.Y = torch.zeros((1, B, math.prod(shape[1:])), dtype=torch.float64, device=dev)
            self.K = torch.zeros((1, len(self.solver.tableau.c), B, self.Y.shape[2]), dtype=torch.float64, device=dev)
            A = torch.ones(1, B, dtype=torch.bool, device=dev)
        else:
            self.T, self.H = torch.stack(self.ts), torch.stack(self.hs)
            self.Y, self.K = torch.stack(self.ys), torch.stack(self.Ks)
            A = torch.stack(self.accepts)
        del self.ts, self.hs, self.ys, self.Ks, self.accepts
        self.co = self.solver.coefficients(self.Y.dtype, dev)
        # idx[b, j]: the loop iteration of sample b's j-th accepted step (padded with its last).
        n_acc = A.sum(0)
        self.n_acc = n_acc.tolist()
        order = torch.argsort((~A).to(torch.int8), dim=0, stable=True).T  # accepted iterations first, in order
        S = max(1, int(n_acc.max()))
        self.idx = order[:, :S]
        self.count = n_acc.clamp(min=1)
        key = (direction.unsqueeze(1) * self.T.T.gather(1, self.idx))
        pad = torch.arange(S, device=dev).unsqueeze(0) >= n_acc.unsqueeze(1)
        self.key = torch.where(pad, math.inf, key)

    def at(self, t: torch.Tensor) -> torch.Tensor:
        """``y(t[b])`` of each sample ``b`` from its step that holds ``t[b]`` (its interpolant)."""
        B = t.shape[0]
        t64 = t.to(torch.float64)
        u = (self.direction * t64).unsqueeze(1)
        pos = (torch.searchsorted(self.key, u, right=True) - 1).clamp(min=0)
        pos = torch.minimum(pos, (self.count - 1).unsqueeze(1))
        i = self.idx.gather(1, pos).squeeze(1)
        ar = torch.arange(B, device=t.device)
        start, h = self.T[i, ar], self.H[i, ar]
        h = torch.where(h == 0, 1.0, h)
        theta = (t64 - start) / h
        w = self.solver.dense_weights(theta.to(self.Y.dtype), self.co)  # (B, stages)
        y = self.Y[i, ar] + h.to(self.Y.dtype).unsqueeze(1) * torch.einsum("bs,bsn->bn", w, self.K[i, :, ar])
        return y.reshape(self.shape)


def _user_f(f: Any) -> Any:
    """The user's field behind a per-sample ``f`` (its ``args`` bound: they are parameters, not hidden)."""
    from ..problem import BoundArgs

    return f.f if isinstance(f, BoundArgs) else f


class PerSampleAdjointRun:
    """The state a per-sample solve shares between its forward and backward passes (the run
    :class:`~odeflux.sensitivity.base._AdjointFunction` connects to autograd)."""

    def __init__(
        self, method: ContinuousAdjoint, batch: Any, y0: torch.Tensor, k0: torch.Tensor, t0: torch.Tensor,
        t1: torch.Tensor, taus: torch.Tensor, params: list[torch.Tensor], module_state: list,
    ):  # fmt: skip
        self.method, self.batch, self.params, self.module_state = method, batch, params, module_state
        self.y, self.k0, self.t0, self.t1, self.taus = y0.detach(), k0.detach(), t0, t1, taus
        self.direction = torch.sign(t1 - t0)
        self.bstats = BackwardStats()
        self.n = math.prod(y0.shape[1:])
        self.n_params = sum(p.numel() for p in params)
        solver = method.solver or batch.solver
        adaptive = solver.adaptive
        if not adaptive and batch.dt0 is None:
            raise ValueError(
                f"{type(method).__name__}'s adjoint solve uses {type(solver).__name__}, which takes fixed steps, and the "
                "forward solve has no dt0 for them: pass dt0= to solve, or give the adjoint an adaptive solver (solver=Tsit5())"
            )
        self.adjoint = dict(
            solver=solver, controller=method.step_controller(solver) if adaptive else ConstantStepSize(), adaptive=adaptive, saving=False,
            rtol=method.rtol if method.rtol is not None else batch.rtol,
            atol=method.atol if method.atol is not None else batch.atol,
            dt0=None if adaptive else batch.dt0, dtmin=batch.dtmin, dtmax=None,
            # ("continue", the joint default, and "forward" start each sample's every interval from Hairer's
            # estimate here: the batched loop keeps no controller memory from one interval to the next.)
            max_steps=method.max_steps or batch.max_steps,
            first_step="hairer" if method.first_step in CARRIED_FIRST_STEPS else method.first_step,
        )  # fmt: skip
        self.vjp = BatchVJP(batch.f, params, self.bstats, method.vjp)
        self.steps: ForwardSteps | None = None
        self._check_hidden_params()

    def _check_hidden_params(self) -> None:
        """As :func:`~odeflux.sensitivity.base.check_hidden_params`: a tensor requiring grad that
        ``f`` captures, not among the parameters, would get no gradient: refused."""
        shape = hidden_param(
            _user_f(self.batch.f), lambda: self.batch.f(self.t0.to(self.y.dtype), self.y), self.params, self.module_state,
        )  # fmt: skip
        if shape is not None:
            raise ValueError(
                f"f depends on a tensor of shape {shape} that requires grad but is not among the parameters "
                f"{type(self.method).__name__} differentiates: make f an nn.Module that owns it, pass it inside "
                "args=, or use sensealg=DirectAdjoint()"
            )

    # forward ---------------------------------------------------------------------------------
    def forward(self) -> torch.Tensor:
        y = self.y
        with torch.no_grad():
            if self.method.uses_forward_interpolant:
                self.steps = ForwardSteps(self.batch.solver)
            self.out, self.n_f = self.batch.run(y, self.k0, self.t0, self.t1, self.taus, on_step=self.steps)
        if self.steps is not None:
            self.steps.finish(self.direction, y.shape)
        t, status = self.out[0], self.out[10]
        self.status = torch.where((status == 0) & (self.direction * (self.t1 - t) > 0), int(Status.MAX_STEPS), status)
        # States at saved times a sample never reached: NaN, here rather than after the function,
        # so that a loss reading one (a failed sample's) sends its gradient here to be refused.
        d, taus = self.direction.unsqueeze(1), self.taus
        unreached = torch.isnan(taus) | (d * (taus - t.unsqueeze(1)) > 0)
        return torch.where(unreached.reshape(unreached.shape + (1,) * (y.dim() - 1)), math.nan, self.out[9])

    def recorded(self, y0: torch.Tensor) -> torch.Tensor:
        """The saved states again, recorded in a graph from ``y0`` (``create_graph=True``)."""
        k0 = self.batch.f(self.t0.to(y0.dtype), y0)
        return self.batch.run(y0, k0, self.t0, self.t1, self.taus)[0][9]

    # backward --------------------------------------------------------------------------------
    def backward(self, grad_ys: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with _restored(self.module_state), _buffers_kept(self.module_state), torch.no_grad():
            return self._backward(grad_ys)

    def _knots(self, grad_ys: torch.Tensor) -> tuple[list[list[tuple[float, int, list[int]]]], list[list[int]]]:
        """Per sample: its saved times after ``t0`` in its direction of time, each with one
        column of ``ys`` (its state) and the columns whose gradients it takes; and the columns at ``t0``."""
        B = self.y.shape[0]
        g = grad_ys.reshape(B, grad_ys.shape[1], -1)
        used = (g != 0).any(-1) | ~torch.isfinite(g).all(-1)  # (B, n)
        failed = [b for b, s in enumerate(self.status.tolist()) if s != Status.SUCCESS]
        hit = [b for b in failed if bool(used[b].any())]
        if hit:
            names = sorted({Status(int(self.status[b])).name for b in hit})
            raise SolveError(
                f"cannot differentiate samples that failed ({', '.join(names)}): samples {hit[:8]}"
                f"{'...' if len(hit) > 8 else ''} did not reach t1 (sol.statuses); leave them out of the loss",
                Status(int(self.status[hit[0]])),
            )
        taus, t0, d = self.taus.tolist(), self.t0.tolist(), self.direction.tolist()
        t_end = self.out[0].tolist()
        knots, starts = [], []
        for b in range(B):
            row, start = [], []
            if b not in failed:
                cols = [c for c, v in enumerate(taus[b]) if not math.isnan(v) and d[b] * (v - t_end[b]) <= 0]
                for c in sorted(cols, key=lambda c: d[b] * taus[b][c]):
                    v = taus[b][c]
                    if v == t0[b]:
                        start.append(c)
                    elif row and row[-1][0] == v:
                        row[-1][2].append(c)
                    else:
                        row.append((v, c, [c]))
            knots.append(row)
            starts.append(start)
        return knots, starts

    def _backward(self, grad_ys: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        m = self.method
        y0 = self.y
        B, n, P, dtype, dev = y0.shape[0], self.n, self.n_params, y0.dtype, y0.device
        knots, starts = self._knots(grad_ys)
        g = grad_ys.reshape(B, grad_ys.shape[1], n)
        ys = self.out[9].reshape(B, -1, n)
        lam = y0.new_zeros(B, n)
        mu = y0.new_zeros(B, P)  # (backsolve, interpolating)
        total = y0.new_zeros(P)  # (gauss)
        y_carry = y0.reshape(B, n).clone()  # (backsolve without checkpointing)
        started = [False] * B
        t0 = self.t0.tolist()
        for j in range(max((len(r) for r in knots), default=0), 0, -1):
            t_hi, t_lo, y_hi, active = [], [], [], []
            for b, row in enumerate(knots):
                if j <= len(row):
                    v, c, cols = row[j - 1]
                    lam[b] += g[b, cols].sum(0)
                    t_hi.append(v)
                    t_lo.append(row[j - 2][0] if j >= 2 else t0[b])
                    y_hi.append(ys[b, c])
                    active.append(b)
                else:  # stands still at its last saved time (or its start) until its turn
                    v, c = (row[-1][0], row[-1][1]) if row else (t0[b], None)
                    t_hi.append(v)
                    t_lo.append(v)
                    y_hi.append(ys[b, c] if c is not None else y0[b].reshape(n))
            t_hi_t = torch.tensor(t_hi, dtype=torch.float64, device=dev)
            t_lo_t = torch.tensor(t_lo, dtype=torch.float64, device=dev)
            y_hi_t = torch.stack(y_hi)
            if isinstance(m, BacksolveAdjoint):
                if not m.checkpointing:
                    keep = torch.tensor(started, device=dev).unsqueeze(1)
                    y_hi_t = torch.where(keep, y_carry, y_hi_t)
                z = self._segment((n, n, P), torch.cat([y_hi_t, lam, mu], 1), t_hi_t, t_lo_t, active, self._backsolve_rhs)
                y_carry, lam, mu = z[:, :n], z[:, n : 2 * n], z[:, 2 * n :]
                for b in active:
                    started[b] = True
            elif isinstance(m, InterpolatingAdjoint):
                z = self._segment((n, P), torch.cat([lam, mu], 1), t_hi_t, t_lo_t, active, self._interpolating_rhs)
                lam, mu = z[:, :n], z[:, n:]
            elif isinstance(m, QuadratureAdjoint):
                lam_steps = ForwardSteps(self.adjoint["solver"]) if P else None
                lam = self._segment((n,), lam, t_hi_t, t_lo_t, active, self._lambda_rhs, record=lam_steps)
                if lam_steps is not None:
                    lam_steps.finish(torch.sign(t_lo_t - t_hi_t), y0.shape)
                    total = total + self._quadrature(lam_steps, t_lo_t)
            else:
                record = self._gauss_quadrature(total) if P else None  # (adds into total)
                lam = self._segment((n,), lam, t_hi_t, t_lo_t, active, self._lambda_rhs, record=record)
        for b, cols in enumerate(starts):
            if cols:
                lam[b] += g[b, cols].sum(0)
        grads = mu.sum(0) + total
        return lam.reshape(y0.shape).to(dtype), split_like(grads, self.params)

    def _segment(
        self, blocks: tuple[int, ...], z: torch.Tensor, t_hi: torch.Tensor, t_lo: torch.Tensor, active: list[int],
        rhs: Callable, record: Callable | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Carry each sample's adjoint state ``z`` (``(B, sum(blocks))``) from ``t_hi`` back to ``t_lo``."""
        from ..per_sample import Batch  # (per_sample imports this module)

        batch = Batch(rhs, parts=adjoint_parts(self.method, blocks), **self.adjoint)
        k0 = rhs(t_hi.to(z.dtype), z)
        out, n_f = batch.run(z, k0, t_hi, t_lo, on_step=record)
        t, n_steps, n_acc, n_rej, status = out[0], out[5], out[6], out[7], out[10]
        self.bstats.n_steps += int(n_steps.sum())
        self.bstats.n_accepted += int(n_acc.sum())
        self.bstats.n_rejected += int(n_rej.sum())
        bad = [b for b in active if int(status[b]) != 0 or float(t[b]) != float(t_lo[b])]
        if bad:
            code = Status(int(status[bad[0]])) if int(status[bad[0]]) else Status.MAX_STEPS
            raise SolveError(
                f"the adjoint solve of {type(self.method).__name__} failed ({code.name}) for samples {bad[:8]}"
                f"{'...' if len(bad) > 8 else ''}", code,
            )  # fmt: skip
        return out[2]

    # the adjoint systems, on (B, ...) states -------------------------------------------------
    def _backsolve_rhs(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        n, shape = self.n, self.y.shape
        out, gy, gp = self.vjp(t, z[:, :n].reshape(shape), z[:, n : 2 * n].reshape(shape), want_f=True)
        return torch.cat([out.reshape(-1, n), -gy.reshape(-1, n), -gp], 1)

    def _interpolating_rhs(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        n, shape = self.n, self.y.shape
        _, gy, gp = self.vjp(t, self.steps.at(t), z[:, :n].reshape(shape))
        return torch.cat([gy.reshape(-1, n), gp], 1).neg()

    def _lambda_rhs(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        _, gy, _ = self.vjp(t, self.steps.at(t), z.reshape(self.y.shape), params=None)
        return gy.reshape(z.shape).neg()

    def _quadrature(self, lam_steps: ForwardSteps, t_rest: torch.Tensor) -> torch.Tensor:
        """``sum_b int lambda_b^T df/dp`` over each sample's adjoint steps of one interval, by
        adaptive Gauss-Kronrod (7-15) bisection with each sample's own error estimate (the joint
        :class:`QuadratureAdjoint`'s rule); ``t_rest``: where a sample with nothing left stands."""
        m = self.method
        rtol = m.quad_rtol if m.quad_rtol is not None else self.adjoint["rtol"]
        atol = m.quad_atol if m.quad_atol is not None else self.adjoint["atol"]
        x, wk, wg = kronrod_rule()
        dtype, dev = self.y.dtype, self.y.device
        wts = torch.tensor(np.stack([wk, wg]), dtype=dtype, device=dev)  # (2, 15)
        B = self.y.shape[0]
        T, H, idx = lam_steps.T, lam_steps.H, lam_steps.idx
        # Each sample's pieces (start, signed size, depth), from its accepted adjoint steps.
        work: list[list[tuple[float, float, int]]] = []
        for b in range(B):
            steps = idx[b, : lam_steps.n_acc[b]].tolist()
            work.append([(float(T[i, b]), float(H[i, b]), 0) for i in steps])
        total = self.y.new_zeros(self.n_params)
        rest = t_rest.tolist()
        while any(work):
            items = [w.pop() if w else (rest[b], 0.0, -1) for b, w in enumerate(work)]
            a = torch.tensor([it[0] for it in items], dtype=torch.float64, device=dev)
            h = torch.tensor([it[1] for it in items], dtype=torch.float64, device=dev)
            half, mid = h / 2, a + h / 2
            vals = []
            for xi in x:
                tau = mid + half * float(xi)
                lam = lam_steps.at(tau.to(dtype))
                vals.append(self.vjp(tau.to(dtype), self.steps.at(tau.to(dtype)), lam, want_y=False)[2])
            self.bstats.n_quadrature_points += 15 * sum(it[2] >= 0 for it in items)
            # mu(t_lo) = mu(t_hi) + int_{t_lo}^{t_hi}: a piece of signed size h adds -h/2 sum w v.
            est = torch.einsum("ki,ibp->kbp", wts, torch.stack(vals)) * (-half).to(dtype).reshape(1, B, 1)
            err = (est[0] - est[1]).abs().amax(1).tolist() if self.n_params else [0.0] * B
            size = est[0].abs().amax(1).tolist() if self.n_params else [0.0] * B
            for b, (t_a, h_b, depth) in enumerate(items):
                if depth < 0:
                    continue
                if err[b] <= max(atol, rtol * size[b]) or depth >= m.max_depth:
                    total = total + est[0, b]
                else:
                    work[b] += [(t_a, h_b / 2, depth + 1), (t_a + h_b / 2, h_b / 2, depth + 1)]
        return total

    def _gauss_quadrature(self, total: torch.Tensor) -> Callable:
        """The loop's ``on_step``: at each adjoint step, ``int lambda^T df/dp`` over each sample's
        step by Gauss-Legendre quadrature at ``ceil((order + 1) / 2)`` nodes (accepted steps only),
        summed over the samples into ``total`` (in place)."""
        solver = self.adjoint["solver"]
        m = math.ceil((solver.order + 1) / 2)
        x, w = np.polynomial.legendre.leggauss(m)
        thetas = (x + 1) / 2
        dtype, dev = self.y.dtype, self.y.device
        co = solver.coefficients(dtype, dev)
        lam_weights = solver.dense_weights(torch.tensor(thetas, dtype=dtype, device=dev), co)  # (m, stages)

        def record(t: torch.Tensor, hs: torch.Tensor, z: torch.Tensor, K: torch.Tensor, accept: torch.Tensor) -> None:
            if not bool(accept.any()):
                return
            self.bstats.n_quadrature_points += m * int(accept.sum())
            h = hs.to(dtype).unsqueeze(1)
            # mu(t_lo) = mu(t_hi) + int_{t_lo}^{t_hi} lambda^T df/dp: each step adds -hs times the mean
            # (hs signed: negative where the sample's forward ran forward in time).
            scale = torch.where(accept, -hs / 2, 0.0).to(dtype).unsqueeze(1)
            for j in range(m):
                lam = z + h * torch.einsum("s,sbn->bn", lam_weights[j], K)
                tau = t + float(thetas[j]) * hs
                _, _, gp = self.vjp(tau.to(dtype), self.steps.at(tau), (lam * scale * float(w[j])).reshape(self.y.shape),
                                    want_y=False, params="sum")  # fmt: skip
                total.add_(gp)

        return record
