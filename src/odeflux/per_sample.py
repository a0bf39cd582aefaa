"""A batch of independent problems: ``solve(..., batch_axis=0)``.

Each sample along the batch axis is its own ODE: its own step sizes, accept/reject decisions,
error norm, ``t_span`` ends, ``saveat`` times, counters and status. The loop is the compiled
loop's (:func:`odeflux.compiled.loop.run_loop`, which integrates ``B`` problems at once; a joint
solve is its ``B = 1``): on the host it reads one flag per step for the whole batch (whether
any sample is still going), and with ``compile=True`` outside autograd it runs as one compiled
program. Samples that are done or failed stand still while the others go on.

Gradients: backpropagation through the per-sample loop (``DirectAdjoint``, the default), or a
continuous adjoint (``BacksolveAdjoint``, ``InterpolatingAdjoint``, ``GaussAdjoint``,
``QuadratureAdjoint``) that integrates each sample's adjoint ODE back from its own last saved time
to its own ``t0`` with its own steps (:mod:`odeflux.sensitivity.per_sample_adjoint`). Either way
each parameter's gradient is summed over the samples, as autograd does for a batched loss.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch

from .compiled.loop import LoopSpec
from .compiled.program import PerSampleProgram
from .compiled.reverse import per_sample_reverse_run
from .compiled.start import Start, start_and_run, start_inputs
from .control import Parts, ConstantStepSize, IController, PIController, StepSizeController
from .problem import BoundArgs, bind_args, check_solver, check_step_options, collect_params, module_tensors
from .sensitivity import DirectAdjoint
from .sensitivity.base import _AdjointFunction, check_no_training_dropout
from .sensitivity.per_sample_adjoint import PerSampleAdjointRun, check_method
from .solution import Solution, SolveError, Stats, Status
from .solvers import Solver
from .vector_field import as_field

__all__ = ["solve_per_sample"]


class Batch:
    """How the ``B`` problems of a per-sample solve are stepped (solver, controller, tolerances and
    step limits): :meth:`run` integrates ``f`` from ``(t0, y0)`` to ``t1`` with the compiled loop's
    ``B`` problems at once. The forward solve is one run; the per-sample adjoints
    (:mod:`odeflux.sensitivity.per_sample_adjoint`) run their backward systems through it too."""

    def __init__(
        self, f: Callable, solver: Solver, controller: StepSizeController, adaptive: bool, *, saving: bool,
        rtol: float, atol: float, dt0: float | None, dtmin: float | None, dtmax: float | None, max_steps: int,
        parts: Parts | None = None, first_step: str = "hairer",
    ):  # fmt: skip
        self.f, self.solver, self.controller, self.adaptive, self.saving = f, solver, controller, adaptive, saving
        self.rtol, self.atol, self.dt0, self.dtmin, self.dtmax, self.max_steps = rtol, atol, dt0, dtmin, dtmax, max_steps
        self.parts = parts
        #: How each problem's first step is chosen (see :mod:`odeflux.compiled.start`).
        self.start = Start("dt0" if dt0 is not None else first_step, dtmin is not None, dtmax is not None)

    def run(
        self, y0: torch.Tensor, k0: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor, taus: torch.Tensor | None = None,
        *, compile: bool = False, on_step: Callable | None = None, record: int = 0, record_stages: bool = True,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:  # fmt: skip
        """The loop's final carry (see :func:`~odeflux.compiled.loop.run_loop`) and the
        evaluations its start took (``k0`` given), per problem. A problem with ``t0 == t1``
        stands still. ``record``: the capacity of the loop's record of accepted steps (0: none);
        ``record_stages``: whether it keeps their stages (:class:`~odeflux.compiled.loop.LoopSpec`).
        With ``compile`` (and no ``on_step``) the start and the loop are one compiled program."""
        inputs = start_inputs(
            self.f, y0, k0, t0, t1, t1.unsqueeze(1) if taus is None else taus, self.rtol, self.atol, self.dt0,
            self.dtmin, self.dtmax, self.max_steps, self.controller.init_state(),
        )  # fmt: skip
        spec = LoopSpec(self.solver, self.controller, self.adaptive, self.saving, self.parts, record, record_stages)
        if compile and on_step is None:
            out = PerSampleProgram(self.f, spec, self.start).run(inputs)
        else:
            out = start_and_run(spec, self.start, *inputs, traced=False, on_step=on_step)
        return out[:-1], out[-1]


def _per_sample_times(name: str, v: Any, B: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(v.detach() if isinstance(v, torch.Tensor) else v, dtype=torch.float64).to(device)
    if t.numel() == 1:
        return t.reshape(()).expand(B).clone()
    if t.shape != (B,):
        raise ValueError(f"{name} must be a number or one per sample (shape ({B},)), got shape {tuple(t.shape)}")
    return t.clone()


def solve_per_sample(
    f: Callable[..., Any], y0: torch.Tensor, t_span: Any, *, solver: Solver | None, args: Any, rtol: float,
    atol: float, saveat: Any, dt0: float | None, dtmin: float | None, dtmax: float | None, max_steps: int,
    controller: StepSizeController | None, sensealg: Any, throw: bool, compile: bool, batch_axis: int,
    save_start: bool = True,
) -> Solution:  # fmt: skip
    """:func:`odeflux.solve` with ``batch_axis`` (see the module docstring and ``solve``)."""
    if not isinstance(y0, torch.Tensor) or y0.dtype not in (torch.float32, torch.float64):
        raise TypeError("batch_axis needs y0 as a float32 or float64 tensor with the batch along that axis")
    if batch_axis != 0:
        raise ValueError(f"batch_axis={batch_axis}: per-sample solves take the batch on axis 0: pass y0.movedim({batch_axis}, 0)")
    if y0.dim() < 1 or y0.shape[0] == 0:
        raise ValueError(f"batch_axis=0 needs a batch of at least one sample, got y0 of shape {tuple(y0.shape)}")
    rtol, atol, dt0, dtmin, dtmax = check_step_options(rtol, atol, dt0, dtmin, dtmax, max_steps)
    adjoint = sensealg is not None and not isinstance(sensealg, DirectAdjoint)
    solver = check_solver(solver)
    if adjoint:
        check_method(sensealg, solver)  # (refuses what a per-sample solve cannot differentiate with, in one line)
    name = type(solver).__name__
    if not (solver.tableau_steps or solver.loop_steps):
        raise ValueError(
            f"per-sample solves take explicit Runge-Kutta methods and the Rosenbrock methods (Rodas5P, Rosenbrock23); "
            f"{name} is not one"
        )
    why = solver.loop_refusal() if solver.loop_steps else None  # (each step a fresh Jacobian, by jacrev)
    if why is not None:
        raise ValueError(f"per-sample solves take {name} without {why}: pass {name}()")
    controller = controller if controller is not None else solver.default_controller()
    if not isinstance(controller, (PIController, IController, ConstantStepSize)):
        raise ValueError(f"per-sample solves take PIController, IController or ConstantStepSize, not {type(controller).__name__}")
    adaptive = solver.adaptive and controller.adaptive
    if not adaptive and dt0 is None:
        raise ValueError(f"{type(solver).__name__} takes fixed steps: pass dt0= (the step size)")
    f = bind_args(as_field(f, args is not None), args)
    B, dev, dtype = y0.shape[0], y0.device, y0.dtype
    pair = tuple(t_span) if not isinstance(t_span, torch.Tensor) or t_span.dim() != 2 else tuple(t_span.unbind(-1))
    if len(pair) != 2:
        raise ValueError(f"t_span must be a pair (t0, t1), each a number or one per sample, got {t_span!r}")
    t0, t1 = (_per_sample_times(f"t_span[{i}]", v, B, dev) for i, v in enumerate(pair))
    if not bool(torch.isfinite(t0).all() & torch.isfinite(t1).all() & (t0 != t1).all()):
        raise ValueError("t_span's ends must be finite and different for every sample")
    direction = torch.sign(t1 - t0)
    saving = saveat is not None
    if saving:
        taus = torch.as_tensor(saveat.detach() if isinstance(saveat, torch.Tensor) else saveat, dtype=torch.float64).to(dev)
        taus = taus.expand(B, -1).clone() if taus.dim() == 1 else taus.clone()
        if taus.dim() != 2 or taus.shape[0] != B:
            raise ValueError(f"saveat must be (n,) times or (batch, n) times (NaN pads), got shape {tuple(taus.shape)}")
        known = ~torch.isnan(taus)
        lo, hi = torch.minimum(t0, t1).unsqueeze(1), torch.maximum(t0, t1).unsqueeze(1)
        if bool((known & ((taus < lo) | (taus > hi))).any()):
            raise ValueError("a saveat time is outside its sample's t_span")
    else:
        taus = torch.stack([t0, t1], 1) if save_start else t1.unsqueeze(1)
    # (Recorded where autograd differentiates the host loop, as its first evaluation; not where an
    # adjoint run or the compiled reverse pass differentiates: they take it as a value.)
    graph = torch.is_grad_enabled() and not adjoint and not compile
    with contextlib.nullcontext() if graph else torch.no_grad():
        k0 = f(t0.to(dtype), y0)
    if not isinstance(k0, torch.Tensor) or k0.shape != y0.shape:
        raise ValueError(
            f"f(t, y) must return the batch's shape {tuple(y0.shape)} (t has shape ({B},), one time per sample), "
            f"got {getattr(k0, 'shape', type(k0).__name__)}"
        )
    if k0.dtype != dtype:
        raise ValueError(
            f"f(t, y) returned dtype {k0.dtype} for a state of dtype {dtype}: make f return the state's dtype "
            "(or pass y0 in the dtype f computes in)"
        )
    batch = Batch(
        f, solver, controller, adaptive, saving=True, rtol=rtol, atol=atol, dt0=dt0, dtmin=dtmin, dtmax=dtmax,
        max_steps=max_steps,
    )  # fmt: skip
    run = None
    if torch.is_grad_enabled() and (adjoint or compile):
        unbound = f.f if isinstance(f, BoundArgs) else f
        f_params, module_state = module_tensors(unbound)
        params = [p for p in collect_params(f_params or [], args, None) if p.requires_grad]
        if adjoint and (y0.requires_grad or params):
            check_no_training_dropout(sensealg, unbound)
            run = PerSampleAdjointRun(sensealg, batch, y0, k0, t0, t1, taus, params, module_state)
        elif (y0.requires_grad or params) and solver.tableau_steps:  # DirectAdjoint with compile=True: the compiled reverse pass, where it applies
            run = per_sample_reverse_run(batch, y0, k0, t0, t1, taus, params, module_state)
    if run is not None:
        ys = _AdjointFunction.apply(run, y0, *params)
        out, n_f = run.out, run.n_f
        grad = True
    else:
        if torch.is_grad_enabled() and compile and not adjoint:  # (the loop is recorded after all: so is its first evaluation)
            k0 = f(t0.to(dtype), y0)
        grad = torch.is_grad_enabled() and (y0.requires_grad or k0.requires_grad)
        out, n_f = batch.run(y0, k0, t0, t1, taus, compile=compile and not grad)
        ys = out[9]
    t, _h, y, _k, _ctrl, n_steps, n_acc, n_rej, n_ev, _ys, status, _err, _grid = out[:13]
    status = torch.where((status == 0) & (direction * (t1 - t) > 0), int(Status.MAX_STEPS), status)
    # States at saved times a sample never reached: NaN (as its padding).
    unreached = torch.isnan(taus) | (direction.unsqueeze(1) * (taus - t.unsqueeze(1)) > 0)
    if run is None:  # (the adjoints' function masks its own output)
        ys = torch.where(unreached.reshape(unreached.shape + (1,) * (y0.dim() - 1)), math.nan, ys)
    if not saving and save_start:
        ys = torch.cat([y0.unsqueeze(1), ys[:, 1:]], 1)  # (y0 itself at t0: its gradient reaches it)
    counts = torch.stack([n_steps, n_acc, n_rej, n_ev + n_f]).tolist()
    stats = Stats(n_f_evals=sum(counts[3]), n_steps=sum(counts[0]), n_accepted=sum(counts[1]), n_rejected=sum(counts[2]))
    if solver.loop_steps:  # (a Rosenbrock method's linear algebra: each sample's own)
        for key, v in solver.loop_counters(stats.n_steps).items():
            setattr(stats, key, v)
    codes = status.tolist()
    failed = [b for b, c in enumerate(codes) if c != Status.SUCCESS]
    worst = Status(max(codes))
    message = "" if not failed else (
        f"{len(failed)} of {B} samples did not reach t1 (samples {failed[:8]}{'...' if len(failed) > 8 else ''}: "
        f"{', '.join(sorted({Status(codes[b]).name for b in failed}))}); sol.statuses has each sample's status"
    )  # fmt: skip
    sol = Solution(
        ts=taus.to(dtype), ys=ys, stats=stats, status=worst, message=message, statuses=status, t_reached=t,
        sample_stats={"n_steps": n_steps, "n_accepted": n_acc, "n_rejected": n_rej, "n_f_evals": n_ev + n_f},
    )  # fmt: skip
    if grad:
        sol.sensealg = sensealg if sensealg is not None else DirectAdjoint()
    if run is not None:
        sol.backward_stats = run.bstats
    if throw and failed:
        raise SolveError(f"solve failed ({worst.name}): {message}", worst, sol)
    return sol

