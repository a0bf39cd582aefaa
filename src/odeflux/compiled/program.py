"""Compiled loops: which solves get one, the compiled programs kept per process, and running one.

A solve with ``compile=True`` and autograd off (``torch.no_grad()``, inference, the forward
passes of the continuous adjoints) runs its first step size and its whole adaptive loop
(:func:`.start.start_and_run`, as a per-sample solve's) as one
program: ``torch.compile(fullgraph=True)`` with ``torch.while_loop`` carrying the loop, built by
Inductor's C++ wrapper, which runs the loop itself in C++. Nothing crosses to the host until
the solve is done.

Under autograd the solve takes the compiled step instead (one compiled graph per step, the loop
on the host): torch 2.13 differentiates ``torch.while_loop`` wrongly (the gradient through a
carried value that feeds another carried value is lost: measured, a zero gradient for ``y0``),
and has no C++ wrapper for its backward.

:func:`compiled_loop` decides once per solve, from typed facts (autograd, the solver, the
options), and says nothing when it declines: the solve then takes the compiled step. A field
that cannot be traced as one graph (a graph break, an op the compiler refuses) gets one warning
line naming the reason, and the solve runs eagerly; that field's code is not tried again in
this process.
"""

from __future__ import annotations

import dataclasses
import math
import types
import warnings
from typing import TYPE_CHECKING, Any, Callable

import torch

from .. import torch_imports
from ..solution import RecordRows, Status
from .loop import JointField, LoopSpec, module_params, run_loop
from .start import Start, start_and_run, start_inputs

if TYPE_CHECKING:
    from ..integrator import IntegrateOptions, _Integration
    from ..solvers.tableau import Solver

#: Past this many compiled loops in one process a warning says the cache thrashes (each new field
#: class, solver, controller, state shape or dtype compiles for seconds).
PROGRAM_LIMIT = 16

#: Dense output in the compiled loop keeps each accepted step's start and stages in buffers of a
#: fixed capacity (a solve that fills them runs again with four times the room); it is taken while
#: the buffers stay within this many entries, else the solve steps on the host.
RECORD_LIMIT = 1 << 22
#: The record's first capacity: the largest power of 4 up to 64 whose record stays within
#: :data:`FIRST_RECORD_ENTRIES` numbers (at least 4). The loop copies its record once a step (a
#: carried value is never updated in place), so a record sized for a small state would cost a
#: large one more than its steps: the tutorial's (128, 20) state with 64 steps' room took 0.3 ms
#: a step, its field 0.03 ms.
FIRST_RECORD, FIRST_RECORD_ENTRIES = 64, 1 << 16
#: The capacity each loop needed last (a solve that outgrew its first).
_RECORD: dict[Any, int] = {}

#: Inductor's options for every program: its C++ wrapper runs the loop itself in C++; a matrix
#: product of one row (a single state through a dense layer, as a joint solve's field takes it) is
#: written as elementwise products and a sum, fused with the ops around it, not a BLAS call per
#: layer per stage (the spiral benchmark's gradient: 2.5 to 2.1 ms).
PROGRAM_OPTIONS = {"cpp_wrapper": True, "post_grad_fusion_options": {"decompose_mm_pass": {}}}

_PROGRAMS: dict[tuple, Callable] = {}
_REFUSED: dict[Any, str] = {}
#: The fields' code whose compiled step failed (:class:`odeflux.kernels.TorchStepKernel`).
STEP_REFUSED: set = set()
_THRASH_WARNED: list[bool] = []


def loop_refusal(solver: Solver, options: IntegrateOptions) -> str | None:
    """Why the compiled loop cannot run these options (``None`` if it can)."""
    from ..control import ConstantStepSize, IController, PIController

    if solver.loop_steps:  # steps by its loop_step (the Rosenbrock methods)
        own = solver.loop_refusal()
        if own is not None:
            return f"the compiled loop does not take {type(solver).__name__} with {own}"
    elif not solver.tableau_steps:
        return f"{type(solver).__name__} is not an explicit Runge-Kutta method"
    if not isinstance(options.controller, (PIController, IController, ConstantStepSize)):
        return f"the controller {type(options.controller).__name__} has no tensor rule"
    unsupported = [
        name for name, on in (
            ("save_everystep", options.save_everystep),
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
    if torch.is_grad_enabled() or loop_refusal(solver, options) is not None:
        return None
    adaptive = solver.adaptive and options.controller.adaptive
    record, stages = 0, True
    if options.dense:
        first, stages = record_layout(y0.numel(), len(solver.tableau.c), len(options.saveat or ()), options.dense_stages)
        record = max(_RECORD.get((code_key(f), tuple(y0.shape), stages), first), first)
        if not _fits(record, solver, y0):
            return None
    spec = LoopSpec(solver, options.controller, adaptive, options.saveat is not None, options.error_parts, record, stages)
    start = Start("dt0" if options.dt0 is not None else "hairer", options.dtmin is not None, options.dtmax is not None)
    program = LoopProgram(f, spec, start)
    return None if program.key[:2] in _REFUSED else program


def record_layout(numel: int, stages: int, n_saved: int, dense_stages: bool = True) -> tuple[int, bool]:
    """A compiled loop's first record capacity and whether the record keeps each step's stages,
    for a state of ``numel`` entries, a method of ``stages`` stages and ``n_saved`` saved times.
    ``dense_stages=False`` (the caller reads the steps only): no stages, the saved states then
    interpolated in the loop at a cost of each saved time a step, where they are no more than
    the steps the record has room for."""

    def first(per_step: int) -> int:  # (FIRST_RECORD_ENTRIES)
        c = 4
        while c < FIRST_RECORD and 4 * c * per_step <= FIRST_RECORD_ENTRIES:
            c *= 4
        return c

    if not dense_stages and n_saved <= first(numel):
        return first(numel), False
    return first(numel * (stages + 1)), True


def _fits(capacity: int, solver: Solver, y0: torch.Tensor) -> bool:
    """Whether a record of ``capacity`` steps of ``y0`` stays within :data:`RECORD_LIMIT` entries."""
    return capacity * (len(solver.tableau.c) + 1) * y0.numel() <= RECORD_LIMIT


def program_count() -> int:
    """How many distinct compiled loops this process has built."""
    return len(_PROGRAMS)


def code_key(f: Any) -> Any:
    """What a compiled loop of ``f`` depends on besides tensors: its code (a module's class, a
    method's function, a function), not the object, as torch.compile's guards see it."""
    func = getattr(f, "__func__", None)
    if func is not None:
        return func.__code__
    code = getattr(f, "__code__", None)
    if code is not None:  # (a closure made anew for each solve has the same code)
        return code
    inner = getattr(f, "code_key", None)  # a wrapper that says what it wraps (odeflux.problem.BoundArgs)
    return (type(f), inner()) if callable(inner) else type(f)


def _program(key: tuple, source: Callable = run_loop) -> Callable:
    """The compiled program for ``key``: ``source`` (:func:`run_loop`, or the reverse pass's loop)
    compiled by :func:`compile_lifting_scalars`, a code object of its own for each key."""
    fn = _PROGRAMS.get(key)
    if fn is None:
        name = f"{source.__name__}_{len(_PROGRAMS)}"
        fn = _PROGRAMS[key] = compile_lifting_scalars(source, name, fullgraph=True, dynamic=False, options=PROGRAM_OPTIONS)
        if len(_PROGRAMS) > PROGRAM_LIMIT and not _THRASH_WARNED:
            _THRASH_WARNED.append(True)
            warnings.warn(
                f"compile=True: {len(_PROGRAMS)} compiled loops in this process, one per field class, solver, controller, "
                "state shape and dtype, each compiled for seconds: keep shapes fixed (pad the batch) or pass compile=False",
                RuntimeWarning,
                stacklevel=5,
            )
    return fn


def compile_lifting_scalars(source: Callable, name: str, **options: Any) -> Callable:
    """``torch.compile(source, **options)`` as a function of its own code object named ``name``
    (torch.compile's limit on recompilations of one function (8) then bounds one program's
    guards, not how many programs a process runs), whose 0-d tensor arguments cost no second
    trace (:class:`_Program`)."""
    code = _enter.__code__.replace(co_name=name)
    copy = types.FunctionType(code, _enter.__globals__, name)
    torch_imports.compiler()
    return _Program(source, torch.compile(copy, **options))


class _Program:
    """A compiled function's entry: ``source(*args)``, each 0-d CPU float64 or int64 tensor among
    ``args`` (or in a dict or tuple argument) passed in as a one-entry view and made 0-d again
    inside (:func:`_enter`).

    Dynamo takes a 0-d CPU tensor argument for a Python number (a symbolic float read by
    ``.item()``) and then traces the whole program a second time once it finds it cannot make
    that number a tensor again ("Restarting analysis due to _tensorify_python_scalars"): a
    compile's tracing and graph passes twice, 6 of the 31 seconds of a small loop's cold build.
    Inside the program it is a 0-d tensor of the same value and dtype, with the same type
    promotion, that fake tensors do not take for a number."""

    def __init__(self, source: Callable, compiled: Callable):
        self.source, self.compiled = source, compiled

    def __call__(self, *args: Any) -> Any:
        out, where = list(args), []
        for i, a in enumerate(args):
            if _zero_d(a):
                out[i] = a.reshape(1)
                where.append((i, None))
            elif type(a) is dict or type(a) is tuple:  # (not a NamedTuple: rebuilt as a tuple it would lose its names)
                keys = tuple(k for k, v in (a.items() if type(a) is dict else enumerate(a)) if _zero_d(v))
                if keys:
                    out[i] = _replaced(a, keys, lambda v: v.reshape(1))
                    where.append((i, keys))
        return self.compiled(self.source, tuple(where), *out)


def _zero_d(a: Any) -> bool:
    # (The 0-d tensors fake tensors take for numbers: CPU int64 and float64, as far as lifted here.)
    return isinstance(a, torch.Tensor) and a.dim() == 0 and a.dtype in _LIFTED and a.device.type == "cpu"


_LIFTED = (torch.float64, torch.int64)


def _replaced(a: dict | tuple, keys: tuple, fn: Callable[[torch.Tensor], torch.Tensor]) -> dict | tuple:
    """The dict or tuple ``a`` with its entries ``keys`` replaced by ``fn`` of them."""
    inner = dict(a) if type(a) is dict else list(a)
    for k in keys:
        inner[k] = fn(inner[k])
    return inner if type(a) is dict else tuple(inner)


def _enter(source: Callable, where: tuple, *args: Any) -> Any:
    """(What :class:`_Program` compiles.) ``source(*args)`` with the entries ``where`` names
    (an argument, or some entries of one) made 0-d."""
    args = list(args)
    for i, keys in where:
        args[i] = _scalar(args[i]) if keys is None else _replaced(args[i], keys, _scalar)
    return source(*args)


def _scalar(a: torch.Tensor) -> torch.Tensor:
    # (A new buffer, not a view of the input (a reshape, or a clone of one, which Inductor turns
    # into the view): Inductor's C++ wrapper handed such a view into the loop's body segfaulted,
    # in the start's test of test_compiled_loop.py. The sum of one int64 or float64 entry is it.)
    return a.sum()


class LoopProgram:
    """One solve's compiled loop (see the module docstring), its first step size (``dt0`` or
    Hairer's estimate, :func:`.start.start_and_run`) chosen inside it, as a per-sample solve's."""

    def __init__(self, f: Any, spec: LoopSpec, start: Start):
        self.f, self.spec, self.start = f, spec, start
        #: (the field's code, the loop's configuration): what a refusal is remembered by.
        self.key = (code_key(f), (repr(spec.solver), repr(spec.controller), spec.adaptive, spec.saving, spec.parts, start))

    def run(self, it: _Integration) -> Any:
        """The solve from ``it``'s start (``f`` evaluated there) to its end, or the eager loop
        where the program is refused or its record would outgrow its limit."""
        out = self._run(it)
        outcome = None if out is None else _outcome(out)  # (the one synchronisation of the solve)
        while outcome is not None and self.spec.record and self._outgrown(it, outcome):
            # The record filled before t1: again with four times the room (a new program, said
            # nowhere: the capacity is remembered, so the next solve of this loop starts there).
            record = self.spec.record * 4
            _RECORD[(self.key[0], tuple(it.y.shape), self.spec.record_stages)] = record
            if not _fits(record, self.spec.solver, it.y) or record > 4 * it.opts.max_steps:
                return it.start_eagerly()
            self.spec = dataclasses.replace(self.spec, record=record)
            out = self._run(it)
            outcome = None if out is None else _outcome(out)
        if out is None:  # refused: the eager loop with the eager step
            it.kernel.eager()
            return it.start_eagerly()
        return self._finish(it, out, outcome)

    def _outgrown(self, it: _Integration, outcome: list[float]) -> bool:
        t, n_acc, status = outcome[0], outcome[3], outcome[6]
        return n_acc == self.spec.record and status == 0 and it.direction * (it.t1 - t) > 0

    def _run(self, it: _Integration) -> tuple | None:
        y0, k0, opts = it.y, it.k, it.opts
        # One problem of the loop's B = 1: every per-problem value a (1,) tensor.
        one = lambda v: torch.full((1,), float(v), dtype=torch.float64, device=y0.device)  # noqa: E731
        saveat = opts.saveat
        taus = torch.tensor([list(saveat) if saveat else [it.t1]], dtype=torch.float64, device=y0.device)
        joint = JointField(self.f)
        inputs = start_inputs(
            joint, y0.unsqueeze(0), k0.unsqueeze(0), one(it.t0), one(it.t1), taus, opts.rtol, opts.atol, opts.dt0,
            opts.dtmin, opts.dtmax, opts.max_steps, it.controller.init_state(),
        )  # fmt: skip
        args = (self.spec, self.start, *inputs, module_params(joint))
        self.spec.solver.coefficients(y0.dtype, y0.device)  # (made before tracing: see PerSampleProgram.run)
        shapes = (tuple(y0.shape), y0.dtype, y0.device, self.spec.record, self.spec.record_stages)
        return _run(self.key, shapes, args, start_and_run)

    def _finish(self, it: _Integration, out: tuple, outcome: list[float]) -> Any:
        from ..integrator import _nonfinite_message

        saveat = it.opts.saveat
        y, k, ys = out[2].squeeze(0), out[3].squeeze(0), out[9].squeeze(0)
        t_f, h_f, n_steps, n_acc, n_rej, n_f, status, err_f, n_f_start = outcome
        stats = it.stats
        stats.n_steps += int(n_steps)
        stats.n_accepted += int(n_acc)
        stats.n_rejected += int(n_rej)
        stats.n_f_evals += int(n_f) + int(n_f_start) - 1  # (f at t0 was counted by the integrator)
        if self.spec.solver.loop_steps:  # (its linear algebra, added to the stats by it.result)
            for name, v in self.spec.solver.loop_counters(int(n_steps)).items():
                setattr(stats, name, getattr(stats, name) + v)
        it.t, it.y, it.k = t_f, y, k
        if self.spec.record:
            n = int(n_acc)
            rec_t, rec_h, rec_y = (x[0] for x in out[13:16])
            d = it.dense
            d.t, d.dt = rec_t[:n].tolist(), rec_h[:n].tolist()
            d.y = RecordRows(rec_y, n)
            # (Without stages (dense_stages=False) the output keeps the steps only: see DenseOutput.record.)
            d.K = RecordRows(out[16][0], n) if self.spec.record_stages else []
            d.record = (rec_t, rec_h, rec_y)
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
        if status == Status.LINEAR_SOLVE_FAILED:
            from ..solvers.rosenbrock import singular_message

            return it.result(status, singular_message(self.spec.solver, t_f, h_f), h_f)
        if status == Status.NONFINITE and not n_steps:  # (f not finite at the start: no first step size)
            return it.result(Status.NONFINITE, _nonfinite_message(t_f, None), h_f)
        if status == Status.NONFINITE or not math.isfinite(err_f) and status != Status.SUCCESS:
            return it.result(Status.NONFINITE, _nonfinite_message(t_f, h_f), h_f)
        if not it.adaptive and not bool(torch.isfinite(y).all()):
            return it.result(Status.NONFINITE, _nonfinite_message(t_f, h_f, fixed_step=True), h_f)
        return it.result(Status.SUCCESS, "", h_f)


def _outcome(out: tuple) -> list[float]:
    """A joint solve's outcome from its program's result (:func:`.start.start_and_run`), read to
    the host at once: the time reached, the last step size, the steps, accepted, rejected,
    evaluations, status, last error and the start's evaluations."""
    t, h, _y, _k, _ctrl, n_steps, n_acc, n_rej, n_f, _ys, status, err = (x[0] for x in out[:12])
    counts = (n_steps, n_acc, n_rej, n_f, status)
    return torch.stack([t, h, *(c.double() for c in counts), err, out[-1][0].double()]).tolist()


class PerSampleProgram:
    """A per-sample solve's start and loop (:mod:`odeflux.per_sample`,
    :func:`.start.start_and_run`) as one compiled program; a field the compiler cannot take gets
    the one line, and the loop runs on the host."""

    def __init__(self, f: Any, spec: LoopSpec, start: Start):
        self.f, self.spec, self.start = f, spec, start
        self.key = ("per-sample", code_key(f), (repr(spec.solver), repr(spec.controller), spec.adaptive, spec.saving, start))

    def run(self, inputs: tuple) -> tuple:
        y0 = inputs[1]
        # (The solver's coefficients made before tracing: a cache it fills while traced would be
        # guarded as empty, and each new solver instance would compile the loop again.)
        self.spec.solver.coefficients(y0.dtype, y0.device)
        shapes = (tuple(y0.shape), inputs[5].shape, y0.dtype, y0.device, self.spec.record, self.spec.record_stages, self.spec.parts)
        out = _run(self.key, shapes, (self.spec, self.start, *inputs, module_params(self.f)), start_and_run)
        return start_and_run(self.spec, self.start, *inputs, traced=False) if out is None else out


def _run(key: tuple, shapes: tuple, args: tuple, source: Callable = run_loop) -> tuple | None:
    """The compiled program for ``key`` (and these shapes) on ``args``; ``None`` where the field's
    code was refused, now (said in one line) or before."""
    if key in _REFUSED:
        return None
    try:
        return _program((*key, *shapes), source)(*_apart(args))
    except Exception as exc:  # a field the compiler cannot take: said once, then eager
        _REFUSED[key] = _reason(exc)
        STEP_REFUSED.add(key[1] if key[0] == "per-sample" else key[0])  # (its compiled step would fail alike)
        warn_eager(exc, "as one program")
        return None


def _apart(args: tuple) -> tuple:
    """``args`` with each tensor that shares memory with an earlier one copied: a compiled loop
    may not take inputs that alias (a view such as ``t1.unsqueeze(1)`` beside ``t1``)."""
    seen: set[int] = set()
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            ptr = a.untyped_storage().data_ptr()
            if ptr in seen and a.numel():
                a = a.clone()
            seen.add(ptr)
        out.append(a)
    return tuple(out)


def warn_eager(exc: BaseException, what: str) -> None:
    """The one line a solve says when ``compile=True`` cannot compile ``f`` and runs it eagerly."""
    warnings.warn(
        f"compile=True: the field could not be compiled {what} ({type(exc).__name__}: {_reason(exc)}); this solve "
        "runs eagerly (make f traceable by torch.compile(fullgraph=True), or pass compile=False)",
        RuntimeWarning,
        stacklevel=5,
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


