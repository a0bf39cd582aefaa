"""Compiled loops: which solves get one, the compiled programs kept per process, and running one.

A solve with ``compile=True`` runs its whole adaptive loop (:func:`.loop.run_loop`) as one
program compiled by ``torch.compile(fullgraph=True)``: ``torch.while_loop`` carries the loop,
and autograd differentiates through it (DirectAdjoint) with the backward pass compiled too.
Without autograd the program is built with Inductor's C++ wrapper, which runs the loop itself
in C++ (torch 2.13 has no C++ wrapper for the loop's backward).

:func:`compiled_loop` decides once per solve, from typed facts (the solver, the options), and
says nothing when it declines: the solve then takes the compiled step as before. A field that
cannot be traced as one graph (a graph break, an op the compiler refuses) gets one warning line
naming the reason, and the solve runs eagerly; that field is not tried again in this process.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..solution import Status
from .loop import LoopSpec, run_loop

if TYPE_CHECKING:
    from ..integrator import IntegrateOptions, _Integration
    from ..solvers.tableau import Solver

#: How many programs (per autograd mode) a process keeps before it warns that they thrash:
#: torch.compile's own limit on recompilations of one function, past which it runs it eagerly.
PROGRAM_LIMIT = 8

_PROGRAMS: dict[tuple, Callable] = {}
_KEYS: dict[bool, set] = {True: set(), False: set()}
_REFUSED: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()
_THRASH_WARNED: set = set()


def loop_refusal(solver: Solver, options: IntegrateOptions) -> str | None:
    """Why the compiled loop cannot run these options (``None`` if it can)."""
    from ..control import ConstantStepSize, IController, PIController

    if not solver.tableau_steps:
        return f"{type(solver).__name__} is not an explicit Runge-Kutta method"
    if not isinstance(options.controller, (PIController, IController, ConstantStepSize)):
        return f"the controller {type(options.controller).__name__} has no tensor rule"
    unsupported = [
        name for name, on in (
            ("dense output", options.dense), ("save_everystep", options.save_everystep),
            ("norm", options.norm is not None),
            ("step_times", bool(options.step_times)), ("jump_times", bool(options.jump_times)),
            ("perturb", options.perturb), ("callbacks", bool(options.callbacks)),
            ("on_accept", options.on_accept is not None), ('first_step="interval"', options.first_step != "hairer"),
            ("dense_budget", options.dense_budget is not None),
        ) if on
    ]  # fmt: skip
    if unsupported:
        return f"the compiled loop does not take {', '.join(unsupported)}"
    return None


def compiled_loop(f: Any, solver: Solver, options: IntegrateOptions, y0: torch.Tensor) -> LoopProgram | None:
    """The compiled loop for this solve, or ``None`` (the compiled step then runs it)."""
    if loop_refusal(solver, options) is not None:
        return None
    try:
        if f in _REFUSED:
            return None
    except TypeError:  # (an unhashable callable: it is simply tried)
        pass
    adaptive = solver.adaptive and options.controller.adaptive
    return LoopProgram(f, LoopSpec(solver, options.controller, adaptive, options.saveat is not None, options.error_parts))


def program_count() -> int:
    """How many distinct compiled loops this process has built (both autograd modes)."""
    return len(_KEYS[True]) + len(_KEYS[False])


def _program(grad: bool) -> Callable:
    fn = _PROGRAMS.get(grad)
    if fn is None:
        # Without autograd the C++ wrapper runs the whole loop in C++; the loop's backward has
        # no C++ wrapper in torch 2.13, so a differentiated loop keeps the Python one.
        options = None if grad else {"cpp_wrapper": True}
        fn = _PROGRAMS[grad] = torch.compile(run_loop, fullgraph=True, dynamic=False, options=options)
    return fn


class LoopProgram:
    """One solve's compiled loop (see the module docstring)."""

    def __init__(self, f: Any, spec: LoopSpec):
        self.f, self.spec = f, spec

    def run(self, it: _Integration, dt: float) -> Any:
        from ..integrator import _nonfinite_message

        y0, k0, opts = it.y, it.k, it.opts
        f64 = dict(dtype=torch.float64, device=y0.device)
        scalar = lambda v: torch.tensor(float(v), **f64)  # noqa: E731
        saveat = opts.saveat
        taus = torch.tensor(list(saveat) if saveat else [it.t1], **f64)
        ys0 = y0.detach().unsqueeze(0).expand((taus.shape[0],) + tuple(y0.shape)).clone()
        if saveat is not None:
            before = (it.direction * (taus - it.t0) <= 0).reshape((-1,) + (1,) * y0.dim())
            ys0 = torch.where(before, y0.unsqueeze(0), ys0)  # (so y0's gradient reaches them)
        ctrl0 = it.controller.init_state()
        args = (
            self.spec, self.f, y0, k0, scalar(it.t0), scalar(it.t1), scalar(dt), taus, ys0, scalar(opts.rtol),
            scalar(opts.atol), scalar(it.dtmin), scalar(it.dtmax), scalar(it.land_tol),
            torch.tensor(opts.max_steps, dtype=torch.int64, device=y0.device), scalar(1.0 if ctrl0 is None else ctrl0),
        )  # fmt: skip
        grad = torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args) or (
            torch.is_grad_enabled() and _has_grad_params(self.f)
        )
        self._note(grad, y0)
        try:
            out = _program(grad)(*args)
        except Exception as exc:  # a field the compiler cannot take: said once, then eager
            reason = _reason(exc)
            try:
                _REFUSED[self.f] = reason
            except TypeError:
                pass
            warnings.warn(
                f"compile=True: the field could not be compiled as one program ({type(exc).__name__}: {reason}); "
                "this solve runs eagerly (make f traceable by torch.compile(fullgraph=True), or pass compile=False)",
                RuntimeWarning,
                stacklevel=2,
            )
            return it.steps(dt, False)
        t, h, y, k, _ctrl, n_steps, n_acc, n_rej, n_f, ys, status, err, _grid = out
        # The one synchronisation of the solve: its outcome.
        t_f, h_f, n_steps, n_acc, n_rej, n_f, status, err_f = torch.stack(
            [t, h, n_steps.double(), n_acc.double(), n_rej.double(), n_f.double(), status.double(), err]
        ).tolist()
        stats = it.stats
        stats.n_steps += int(n_steps)
        stats.n_accepted += int(n_acc)
        stats.n_rejected += int(n_rej)
        stats.n_f_evals += int(n_f)
        it.t, it.y, it.k = t_f, y, k
        status = Status(int(status))
        if saveat is not None:
            reached = sum(1 for s in saveat if it.direction * (s - t_f) <= 0)
            it.saver.ts.extend(saveat[it.saver.si : reached])
            it.saver.ys.extend(ys[it.saver.si : reached].unbind(0))
            it.saver.si = reached
        if status == Status.SUCCESS and it.direction * (it.t1 - t_f) > 0:
            return it.result(Status.MAX_STEPS, it.max_steps_message(h_f), h_f)
        if status == Status.DT_MIN:
            return it.result(status, it.dt_min_message(h_f), h_f)
        if status == Status.NONFINITE or not math.isfinite(err_f) and status != Status.SUCCESS:
            return it.result(Status.NONFINITE, _nonfinite_message(t_f, h_f), h_f)
        if not it.adaptive and not bool(torch.isfinite(y).all()):
            return it.result(Status.NONFINITE, _nonfinite_message(t_f, h_f, fixed_step=True), h_f)
        return it.result(Status.SUCCESS, "", h_f)

    def _note(self, grad: bool, y0: torch.Tensor) -> None:
        """Count a new program, and say once when there are more than the compiler keeps."""
        spec = self.spec
        key = (id(self.f), repr(spec.solver), repr(spec.controller), spec.adaptive, spec.saving, spec.parts, tuple(y0.shape), y0.dtype, y0.device)
        keys = _KEYS[grad]
        if key in keys:
            return
        keys.add(key)
        if len(keys) > PROGRAM_LIMIT and grad not in _THRASH_WARNED:
            _THRASH_WARNED.add(grad)
            warnings.warn(
                f"compile=True: {len(keys)} different compiled loops (fields, solvers, state shapes or dtypes) in this "
                f"process, more than torch.compile keeps ({PROGRAM_LIMIT}): further ones run slowly, uncompiled; keep "
                "shapes fixed (pad the batch) or pass compile=False",
                RuntimeWarning,
                stacklevel=3,
            )


def _reason(exc: BaseException) -> str:
    """The line of a compiler error that names what failed (dynamo's explanation, or the op)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for marker in ("Explanation:", "Developer debug context:", "Got graph break/error:"):
        for i, ln in enumerate(lines):
            if ln.startswith(marker):
                rest = ln[len(marker):].strip() or (lines[i + 1] if i + 1 < len(lines) else "")
                if rest:
                    return rest
    return lines[0] if lines else type(exc).__name__


def _has_grad_params(f: Any) -> bool:
    module = f if isinstance(f, torch.nn.Module) else getattr(f, "__self__", None)
    if isinstance(module, torch.nn.Module):
        return any(p.requires_grad for p in module.parameters())
    return False
