"""The sensitivity-method interface and the autograd bridge shared by the continuous adjoints.

A continuous adjoint runs the forward solve without recording a graph, keeps the states at the
saved times (its checkpoints), and in the backward pass integrates the adjoint ODE

    dlambda/dt = -lambda^T df/dy,      dmu/dt = -lambda^T df/dp,

from the last saved time down to ``t0``, one interval between saved times at a time, adding the
incoming gradient of each saved state to ``lambda`` as it passes it. Subclasses only say how one
interval is integrated.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import nn

from ..autocast import AutocastFunction, AutocastModule
from ..control import ORDINARYDIFFEQ_PI, ConstantStepSize, Parts, StepSizeController
from ..integrator import FIRST_STEPS, IntegrateOptions, IntegrationResult, StepCallbacks, integrate, nudge
from ..kernels import arrays
from ..solution import BackwardStats, DenseOutput, Solution, SolveError, Status, times_tensor
from ..solvers import Solver
from ..solvers.implicit import COUNTERS
from ..tree import TreeField
from ..vector_field import VectorField
from .rhs import LambdaRHS
from .vjp import VJP_BACKENDS, VJPBackend, make_vjp

#: The first steps that go on from the interval before (a per-sample adjoint starts each from Hairer's).
CARRIED_FIRST_STEPS = ("continue", "forward")
#: An adjoint solve's first step on each interval between saved times (see :class:`ContinuousAdjoint`).
ADJOINT_FIRST_STEPS = FIRST_STEPS + CARRIED_FIRST_STEPS

if TYPE_CHECKING:
    from ..problem import Problem


_NO_GUARD = contextlib.nullcontext()
#: How a continuous adjoint's error norm weighs the blocks of its state (see ContinuousAdjoint).
ADJOINT_NORMS = ("mixed", "rms")
#: The continuous adjoints keep the forward's steps up to this many bytes by default...
DEFAULT_STORE_LIMIT = 32 * 2**20
#: ...or up to this many steps' worth of a large state: its re-solve would cost a forward pass.
STORE_STEPS = 8


class SensitivityAlgorithm:
    """How :func:`odeflux.solve` computes gradients of a loss of its solution."""

    def solve(self, problem: "Problem") -> Solution:
        raise NotImplementedError


@dataclass(eq=False)
class ContinuousAdjoint(SensitivityAlgorithm):
    """Common options of the continuous adjoints.

    ``vjp`` picks how vector-Jacobian products of ``f`` are computed: ``"autograd"``
    (``torch.autograd.grad``), ``"func"`` (``torch.func.vjp``), ``"compile"`` (that VJP under
    ``torch.compile``) or ``"jacobian"`` (an explicit forward-mode Jacobian, for small states).
    ``rtol``/``atol``/``solver``/``max_steps`` of the adjoint solve default to the forward's; it
    takes the forward's ``dtmin``. ``controller`` is the adjoint solve's step-size controller
    (an adaptive adjoint solver only; default, whatever the forward's: OrdinaryDiffEq's PI
    controller, ``PIController(qoldinit=1e-4)``, :data:`odeflux.control.ORDINARYDIFFEQ_PI`).
    ``norm`` says how the adjoint solve's error norm weighs the blocks of its state (``y`` for
    backsolve, ``lambda``, ``mu``): ``"mixed"`` (default) takes the largest of their RMS norms,
    as torchdiffeq's adjoint does, so that ``mu``, the parameter gradient, is controlled however
    few entries it has next to a large state; ``"rms"`` takes one RMS norm over them all, as
    SciMLSensitivity's adjoint solves do (the MNIST tutorial's, kept for its reproduction), in
    which a small block's error is diluted by the others' sizes (measured: a one-parameter field
    on a 262,144-entry state got half its gradient, -0.020 for -0.040).
    ``norm`` may also be a function of the adjoint state's blocks (a tuple of flat scaled errors:
    ``y`` for backsolve, ``lambda``, ``mu``) returning a scalar tensor; ``seminorm`` then leaves
    ``mu`` to it. ``callbacks`` (:class:`~odeflux.StepCallbacks`) hear of the adjoint solve's steps. The
    adjoint solve lands on the forward's ``step_times`` and ``jump_times`` too.
    ``seminorm=True`` leaves the parameter adjoint out of the adjoint's error control
    (Kidger, Chen and Lyons, 2021): fewer backward steps, same accuracy in practice.

    Methods that read ``y(t)`` from the forward's interpolant take it from the forward solution's
    dense output when it kept one. Otherwise the forward's steps are kept in memory for the
    backward pass while they take at most ``store_limit`` bytes: exactly what a re-solve from the
    checkpoints would recompute, without recomputing it. Past that (and always with
    ``checkpointing=True``) the forward is re-solved on each interval between saved times, so the
    memory kept is bounded whatever the number of steps. The default limit is 32 MiB or
    ``STORE_STEPS`` steps' worth of the state (its stages and start), whichever is larger, so a
    large state's few steps are kept rather than re-solved. ``store_limit=0`` always re-solves.

    ``first_step`` picks the adjoint solve's first step on each interval between saved times:
    ``"continue"`` (default) starts the first interval from Hairer's estimate and each later one
    from the step the interval before proposed next, with the controller's memory, as one solve
    across the intervals would go on (a proposal within 1% of the interval tries the whole
    interval); ``"hairer"`` starts every interval from Hairer's estimate (one extra evaluation
    each), as SciMLSensitivity's adjoint solves do; ``"interval"`` tries each whole interval as one
    step and, if the error estimate rejects it, goes on from Hairer's estimate. Measured at equal
    gradient error (benchmarks/results/gradient_work_precision.md as of commit 43546d3, one interval per gradient, where
    ``"continue"`` is ``"hairer"``) Hairer's start needs 0.93x the evaluations of the
    whole-interval try, and the try, accepted on an adjoint that is small next to ``atol`` (a mean
    loss), leaves coarse gradients at loose tolerances. With many saved times the carried step
    saves Hairer's restart on each interval: Lotka-Volterra with 100 saved times
    (benchmarks/general.py's ``lv``) takes 246 backward steps and 1576 VJPs against 437 and 2820
    from Hairer's start, with the same gradient; the spiral of benchmarks/small_systems.py (30
    saved times) 38 steps and 258 VJPs against 38 and 286 (benchmarks/results/adjoint_first_step.md).
    The MNIST tutorial keeps ``"interval"``
    (``--adjoint-first-step``), as its runs were recorded. ``"forward"`` is ``"continue"`` whose
    first interval starts from the larger of the forward solve's last two steps (where the forward's
    steps are kept; Hairer's estimate otherwise): on an adjoint far below ``atol`` (a mean loss)
    Hairer's start is small and the step grows slowly, so this takes fewer backward steps (the
    MLP and conv fields of benchmarks/general.py: 2 and 3 against 4 and 10), fewer evaluations at
    equal gradient error, and less accurate gradients at the same tolerance
    (benchmarks/results/gradient_work_precision.md).
    """

    vjp: str = "autograd"
    rtol: float | None = None
    atol: float | None = None
    solver: Solver | None = None
    seminorm: bool = False
    max_steps: int | None = None
    store_limit: int | None = None
    first_step: str = "continue"
    norm: str | Callable[[tuple[torch.Tensor, ...]], torch.Tensor] = "mixed"
    callbacks: StepCallbacks | None = None
    controller: StepSizeController | None = None

    # Whether the backward pass reads y(t) from the forward's interpolant (all but backsolve).
    uses_forward_interpolant = True

    def __post_init__(self) -> None:
        if self.vjp not in VJP_BACKENDS:
            raise ValueError(f"vjp={self.vjp!r} is not a VJP backend: choose one of {sorted(VJP_BACKENDS)}")
        for name in ("rtol", "atol"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{type(self).__name__}: {name} must be positive and finite, got {v}")
        if not callable(self.norm) and self.norm not in ADJOINT_NORMS:
            raise ValueError(f"{type(self).__name__}: norm={self.norm!r} is not one of {', '.join(ADJOINT_NORMS)}")
        if self.first_step not in ADJOINT_FIRST_STEPS:
            raise ValueError(
                f"{type(self).__name__}: first_step={self.first_step!r} is not one of {', '.join(ADJOINT_FIRST_STEPS)}"
            )
        if self.solver is not None and not isinstance(self.solver, Solver):
            raise TypeError(f"{type(self).__name__}: solver must be an odeflux solver such as Tsit5(), got {self.solver!r}")
        if self.controller is not None and not (isinstance(self.controller, StepSizeController) and self.controller.adaptive):
            raise TypeError(
                f"{type(self).__name__}: controller must be an adaptive step-size controller such as "
                f"odeflux.PIController(), got {self.controller!r} (fixed adjoint steps: pass solver= a fixed-step solver)"
            )

    def step_controller(self, solver: Solver) -> StepSizeController:
        """The controller of an adjoint solve by ``solver`` (adaptive)."""
        if self.controller is not None:
            return self.controller
        # (A solver that controls its own steps, such as ScipySolver, takes its default: the only one it accepts.)
        return ORDINARYDIFFEQ_PI if solver.stepwise else solver.default_controller()

    # -- what subclasses provide ------------------------------------------------------------
    @property
    def always_resolve(self) -> bool:
        """Re-solve the forward on each checkpoint interval even when its steps are at hand
        (``checkpointing=True`` on a method that reads the forward's interpolant)."""
        return self.uses_forward_interpolant and bool(getattr(self, "checkpointing", False))

    def integrate_interval(
        self, run: "AdjointRun", t_hi: float, t_lo: float, y_hi: torch.Tensor | None, y_lo: torch.Tensor,
        lam: torch.Tensor, mu: torch.Tensor, dense: DenseOutput | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Carry ``(lambda, mu)`` from ``t_hi`` back to ``t_lo`` (flat tensors). ``y_hi``/``y_lo``
        are the forward states at the ends (``y_hi`` is ``None`` inside a checkpoint interval) and
        ``dense`` the forward's interpolant there (``None`` unless ``uses_forward_interpolant``)."""
        raise NotImplementedError

    # -- the shared machinery ----------------------------------------------------------------
    def solve(self, problem: "Problem") -> Solution:
        params = [p for p in problem.params if p.requires_grad]
        check_hidden_params(problem, params)
        run = AdjointRun(self, problem, params)
        ys = _AdjointFunction.apply(run, problem.y0, *params)
        res = run.forward_result
        dense_fn = None
        if problem.dense and res.dense is not None:

            def dense_fn(times: list[float]) -> torch.Tensor:
                return _AdjointFunction.apply(DenseQuery(run, times), problem.y0, *params)

        return Solution(
            dense_fn=dense_fn,
            ts=times_tensor(res.ts, problem.y0),
            ys=ys,
            stats=res.stats,
            status=res.status,
            message=res.message,
            dense=res.dense if problem.dense else None,
            backward_stats=run.bstats,
            t_final=res.t,
        )


_CHECKED: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()


def check_hidden_params(problem: "Problem", params: list[torch.Tensor]) -> None:
    """Refuse an ``f`` that depends on tensors requiring grad which the adjoint cannot see.

    A continuous adjoint only differentiates with respect to the parameters it was given; a tensor
    that ``f`` captures from its closure would silently get no gradient. Checked once per ``f``
    (by walking the graph of one evaluation) unless ``f`` cannot be weakly referenced. A leaf that
    ``f`` makes for itself during the call (a CNF's exact trace: ``z.requires_grad_()`` and
    ``torch.autograd.grad`` inside ``f``) is no parameter: it is freed with the evaluation's graph,
    where a captured tensor lives on, and that is how the two are told apart.
    """
    y = problem.y0.detach()
    # perturb: f is never evaluated on a step's ends, so neither is it here.
    t0 = nudge(problem.t0, 1.0 if problem.t1 > problem.t0 else -1.0, y.dtype) if problem.perturb else problem.t0

    def evaluate() -> Any:
        # (The random generator left as it was: a field with dropout draws in the solve what it
        # would have drawn without the check.)
        with rng_kept(y.device):
            return problem.f(torch.full((), t0, dtype=y.dtype, device=y.device), y)

    shape = hidden_param(problem.user_f, evaluate, params, problem.module_state)
    if shape is not None:
        raise ValueError(
            f"f depends on a tensor of shape {shape} that requires grad but is not among the "
            "parameters the adjoint differentiates: make f an nn.Module that owns it, pass it inside "
            "args=, list it in params=, or use sensealg=DirectAdjoint()"
        )


def sees_every_param(problem: "Problem", params: list[torch.Tensor]) -> bool:
    """:func:`check_hidden_params` as a question: whether every tensor requiring grad that ``f``
    depends on is among ``params``."""
    try:
        check_hidden_params(problem, params)
    except ValueError:
        return False
    return True


def hidden_param(f: Any, evaluate: Callable[[], Any], params: list[torch.Tensor], module_state: list) -> tuple[int, ...] | None:
    """The shape of a tensor requiring grad that ``f`` depends on but that is not among ``params``
    (see :func:`check_hidden_params`), or ``None``: one evaluation (``evaluate()``) walked, and
    ``f`` remembered (weakly) once found clean, so that later calls cost nothing."""
    f = user_module(f)
    try:
        if _CHECKED.get(f) == len(params):
            return None
    except TypeError:
        f = None
    with torch.enable_grad(), _buffers_kept(module_state), _own_saved_tensors():
        out = evaluate()
    outside = _outside_leaves(out, params) if isinstance(out, torch.Tensor) and out.grad_fn is not None else []
    del out  # frees the evaluation's graph, and with it the leaves f made during the call
    for ref, shape in outside:
        if ref() is not None:
            return shape
    if f is not None:
        _CHECKED[f] = len(params)
    return None


def _own_saved_tensors() -> contextlib.AbstractContextManager:
    """What a throwaway evaluation saves for backward, kept from an enclosing saved-tensors hook
    where there is one: ``torch.utils.checkpoint`` counts what a forward saves against what its
    recomputation saves, and a check done once per field is not done again. (No hook of its own
    otherwise: ``torch.func`` inside a field refuses saved-tensors hooks.)"""
    try:
        with torch.autograd.graph.disable_saved_tensors_hooks("(a probe)"):  # (raises where a hook is active)
            return contextlib.nullcontext()
    except RuntimeError:
        # The value without its autograd history, which autograd keeps apart (the tensor itself
        # would make a saved output and its node a reference cycle, keeping a leaf f made alive).
        return torch.autograd.graph.saved_tensors_hooks(lambda t: t.detach(), lambda t: t)


def user_module(f: Any) -> Any:
    """What ``f`` wraps: solve() wraps a module of ``y``, a structured state's field, or a field
    under autocast afresh per call, so what is remembered of a field per field is remembered of this."""
    while isinstance(f, (VectorField, TreeField, AutocastModule, AutocastFunction)):
        f = f.module if isinstance(f, VectorField) else f.inner
    return f


_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def training_dropout(f: Any) -> str | None:
    """The name of a dropout layer in training mode inside ``f`` (a module), if any: each
    evaluation of ``f`` then draws a new mask."""
    module = user_module(f)
    if not isinstance(module, nn.Module):
        return None
    for name, m in module.named_modules():
        if isinstance(m, _DROPOUTS) and m.training and m.p > 0:
            return f"{type(m).__name__} at {name!r}" if name else type(m).__name__
    return None


def check_no_training_dropout(method: Any, f: Any) -> None:
    """Refuse a continuous adjoint of a field with dropout in training mode: the adjoint solved
    backwards would evaluate ``f`` with other masks than the forward solve drew."""
    name = training_dropout(f)
    if name is not None:
        raise ValueError(
            f"{type(method).__name__} cannot differentiate a field with dropout in training mode ({name}: a new mask at "
            "each evaluation, so the adjoint solved backwards sees another field than the forward solve): use "
            "sensealg=odeflux.DirectAdjoint(), which records the masks, call .eval() on the field, or apply the "
            "dropout outside the ODE"
        )


def rng_kept(device: torch.device) -> contextlib.AbstractContextManager:
    """The random generator ``f`` on ``device`` draws from, left after the block as it was."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def _outside_leaves(out: torch.Tensor, params: list[torch.Tensor]) -> list[tuple[weakref.ref, tuple[int, ...]]]:
    """Weak references to the leaves requiring grad in ``out``'s graph that are not ``params``
    (its own frame holds the only other references, gone when it returns)."""
    known_leaves = {id(p) for p in params if p.grad_fn is None}
    known_nodes = {id(p.grad_fn) for p in params if p.grad_fn is not None}
    stack, seen, found = [out.grad_fn], set(), []
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen or id(node) in known_nodes:
            continue
        seen.add(id(node))
        var = getattr(node, "variable", None)
        if var is not None and id(var) not in known_leaves:
            found.append((weakref.ref(var), tuple(var.shape)))
        stack.extend(n for n, _ in node.next_functions)
    return found


def adjoint_parts(method: ContinuousAdjoint, blocks: tuple[int, ...]) -> Parts | None:
    """The error norm's blocks of an adjoint state made of ``blocks`` (their sizes, in order:
    ``y`` for backsolve, ``lambda``, ``mu`` last), as ``method``'s ``norm`` and ``seminorm`` say."""
    m = method
    if callable(m.norm):
        return None
    kept = blocks[:-1] if m.seminorm and len(blocks) > 1 else blocks  # seminorm: mu left out
    if m.norm == "rms":
        return None if kept == blocks else ((0, sum(kept)),)
    bounds, at = [], 0
    for size in kept:
        if size:
            bounds.append((at, at + size))
        at += size
    return None if len(bounds) == 1 and kept == blocks else tuple(bounds)


class AdjointRun:
    """The state one solve shares between its forward and backward passes."""

    def __init__(self, method: ContinuousAdjoint, problem: "Problem", params: list[torch.Tensor]):
        check_no_training_dropout(method, problem.user_f)
        self.method = method
        self.problem = problem
        self.params = params
        self.bstats = BackwardStats()
        self.forward_result: IntegrationResult | None = None
        self.y = problem.y0.detach()
        self.n = self.y.numel()
        self.n_params = sum(p.numel() for p in params)
        self.solver = method.solver or problem.solver
        if not self.solver.adaptive and problem.dt0 is None:
            raise ValueError(
                f"{type(method).__name__}'s adjoint solve uses {type(self.solver).__name__}, which takes fixed steps, "
                "and the forward solve has no dt0 for them: pass dt0= to solve, or give the adjoint an adaptive "
                "solver (solver=Tsit5())"
            )
        self.rtol = method.rtol if method.rtol is not None else problem.rtol
        self.atol = method.atol if method.atol is not None else problem.atol
        self.max_steps = method.max_steps or problem.max_steps
        self.dense: DenseOutput | None = None
        self.solution_dense: DenseOutput | None = None
        self.backsolve_y: torch.Tensor | None = None
        self.module_state = problem.module_state
        self._vjp: VJPBackend | None = None
        self._carry: tuple[float, Any] | None = None  # the last interval's next step and controller memory ("continue")
        self.store_limit = method.store_limit
        if self.store_limit is None:
            per_step = (problem.solver.tableau.stages + 1) * self.n * self.y.element_size()
            self.store_limit = max(DEFAULT_STORE_LIMIT, STORE_STEPS * per_step)

    # forward ---------------------------------------------------------------------------------
    def forward(self) -> torch.Tensor:
        p, m = self.problem, self.method
        want = m.uses_forward_interpolant and not m.always_resolve
        with torch.no_grad():
            if p.dense or not want or self.store_limit <= 0:
                res = p.integrate(y0=self.y)
            else:
                res = p.integrate(y0=self.y, dense=True, dense_budget=self.store_limit)
        self.forward_result = res
        self.dense = res.dense if want else None
        self.solution_dense = res.dense if p.dense else None
        if not res.ys:
            return self.y.new_empty((0,) + tuple(self.y.shape))
        return torch.stack(res.ys)

    # backward --------------------------------------------------------------------------------
    @property
    def vjp(self) -> VJPBackend:
        if self._vjp is None:
            self._vjp = make_vjp(self.method, self.problem, self.params, self.bstats)
        return self._vjp

    def time(self, t: float) -> torch.Tensor:
        return torch.full((), t, dtype=self.y.dtype, device=self.y.device)

    def adjoint_integrate(self, g: Callable, z: torch.Tensor, t_hi: float, t_lo: float, blocks: tuple[int, ...], **kw: Any) -> "IntegrationResult":
        """Integrate an adjoint system ``dz/dt = g(t, z)`` from ``t_hi`` back to ``t_lo``; ``z``
        is made of ``blocks`` (their sizes, in order: ``y`` for backsolve, ``lambda``, and for a
        method that integrates it, ``mu`` last), which the error norm weighs as ``norm`` says."""
        # A fixed-step method steps the adjoint back with the forward's step size (as the forward's
        # dt carries over to the adjoint solve in SciMLSensitivity); an adaptive one controls its own.
        controller, dt0 = (self.method.step_controller(self.solver), None) if self.solver.adaptive else (ConstantStepSize(), self.problem.dt0)
        first, memory = self.method.first_step, None
        if first in CARRIED_FIRST_STEPS:  # on from the interval before, as one solve across them would go on
            carry = self._carry
            if carry is None and first == "forward":  # (the first interval: from the forward's last steps)
                carry = self.forward_step()
            first = "hairer"  # (the first interval, otherwise)
            if self.solver.adaptive and carry is not None:
                h, memory = carry
                if h >= 0.99 * abs(t_hi - t_lo):
                    first = "interval"  # (the whole interval exactly, not a step just short of it and a sliver after)
                else:
                    dt0 = h
        p = self.problem
        opts = IntegrateOptions(
            rtol=self.rtol, atol=self.atol, controller=controller, dt0=dt0, dtmin=p.dtmin, max_steps=self.max_steps,
            save_start=False, save_end=True, error_parts=self.error_parts(blocks), norm=self.block_norm(blocks),
            float_time=True, first_step=first, step_times=p.step_times, jump_times=p.jump_times,
            perturb=p.perturb, callbacks=self.method.callbacks, controller_state=memory, **kw,
        )  # fmt: skip
        res = integrate(g, z, t_hi, t_lo, self.solver, opts)
        if math.isfinite(res.dt_next) and res.dt_next != 0:
            self._carry = (abs(res.dt_next), res.controller_state)
        # Adjoint right-hand-side evaluations are counted as VJPs by the backend, not as f evaluations.
        self.bstats.n_steps += res.stats.n_steps
        self.bstats.n_accepted += res.stats.n_accepted
        self.bstats.n_rejected += res.stats.n_rejected
        for name in COUNTERS:  # an implicit adjoint solve's Newton and Jacobian work
            setattr(self.bstats, name, getattr(self.bstats, name) + getattr(res.stats, name))
        if res.status != Status.SUCCESS:
            raise SolveError(
                f"the adjoint solve of {type(self.method).__name__} failed ({res.status.name}): {res.message}", res.status
            )
        return res

    def forward_step(self) -> tuple[float, None] | None:
        """The larger of the forward solve's last two steps (``first_step="forward"``), where they are kept."""
        steps = [] if self.dense is None else [abs(h) for h in self.dense.dts[-2:]]
        h = max(steps, default=0.0)
        return (h, None) if math.isfinite(h) and h > 0 else None

    def block_norm(self, blocks: tuple[int, ...]) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """A user's adjoint norm (a function of the blocks) as a norm of the flat adjoint state."""
        norm = self.method.norm
        if not callable(norm):
            return None
        sizes = list(blocks)
        return lambda z: norm(tuple(z.reshape(-1).split(sizes)))

    def error_parts(self, blocks: tuple[int, ...]) -> Parts | None:
        """The adjoint solve's error norm over ``blocks`` (see :meth:`adjoint_integrate`)."""
        return adjoint_parts(self.method, blocks)

    def pieces(self, t_lo: float, t_hi: float, y_lo: torch.Tensor) -> Iterator[tuple[float, float, torch.Tensor, DenseOutput | None]]:
        """The interval ``[t_lo, t_hi]`` as ``(a, b, y(a), dense output on [a, b])`` pieces, last first.

        The dense output is the forward's own (kept within ``store_limit``, or the solution's), or
        a re-solve from the checkpoint ``y(t_lo)``. A re-solve whose dense output would take more
        than ``max(store_limit, 1 MiB)`` keeps only the state every so many steps instead, and the
        pieces between those are re-solved one at a time: the memory held is bounded whatever the
        number of steps. Methods that do not read ``y(t)`` get ``None``.
        """
        if not self.method.uses_forward_interpolant:
            yield t_lo, t_hi, y_lo, None
            return
        if self.dense is not None:
            yield t_lo, t_hi, y_lo, self.dense
            return
        budget = max(self.store_limit, 2**20)
        per_step = (self.problem.solver.tableau.stages + 1) * y_lo.numel() * y_lo.element_size()
        every = max(1, budget // per_step)
        marks: list[tuple[float, torch.Tensor]] = []
        end_tol = 1e-12 * max(1.0, abs(t_lo), abs(t_hi))
        accepted = 0

        def mark(t: float, h: float, y: torch.Tensor, y1: torch.Tensor, K: torch.Tensor) -> None:
            nonlocal accepted
            accepted += 1
            if accepted % every == 0 and abs(t + h - t_hi) > end_tol:
                marks.append((t + h, y1))

        dense = self._resolve(t_lo, t_hi, y_lo, dense_budget=budget, on_accept=mark)
        if dense is not None:
            yield t_lo, t_hi, y_lo, dense
            return
        bounds = [(t_lo, y_lo)] + marks + [(t_hi, None)]
        for j in range(len(bounds) - 2, -1, -1):
            (a, ya), (b, _) = bounds[j], bounds[j + 1]
            yield a, b, ya, self._resolve(a, b, ya)

    def _resolve(self, t_lo: float, t_hi: float, y_lo: torch.Tensor, **kw: Any) -> DenseOutput | None:
        """Re-solve the forward from the checkpoint ``y(t_lo)`` with dense output."""
        p = self.problem
        res = p.integrate(y0=y_lo, t0=t_lo, t1=t_hi, saveat=None, save_everystep=False, save_start=False, save_end=False, dense=True, **kw)
        self.bstats.n_checkpoints += 1
        self.bstats.n_f_evals += res.stats.n_f_evals
        if res.status != Status.SUCCESS:
            raise SolveError(f"re-solving the forward on [{t_lo}, {t_hi}] failed ({res.status.name}): {res.message}", res.status)
        return res.dense

    def lambda_rhs(
        self, dense: DenseOutput, t_known: float | None = None, y_known: torch.Tensor | None = None
    ) -> Callable[[float, torch.Tensor], torch.Tensor]:
        """``dlambda/dt = -lambda^T df/dy`` with ``y(t)`` from ``dense`` (lambda alone, flat), or
        ``y_known`` at ``t_known``."""
        return LambdaRHS(self, dense, t_known, y_known)

    def backward(self, grad_ys: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        res = self.forward_result
        assert res is not None
        return self.backward_at(res.ts, res.ys, list(grad_ys.unbind(0)))

    def backward_at(
        self, ts: list[float], ys: list[torch.Tensor], grads: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Gradients of a loss whose gradient with respect to ``y(ts[i]) = ys[i]`` is ``grads[i]``
        (``ts`` in the direction of integration)."""
        res = self.forward_result
        assert res is not None
        if res.status != Status.SUCCESS:
            raise SolveError(
                f"cannot differentiate a solve that failed ({res.status.name}): {res.message}", res.status
            )
        with _restored(self.module_state), _buffers_kept(self.module_state), (
            arrays.one_blas_thread if self._numpy_sized else _NO_GUARD
        ):
            return self._backward_at(ts, ys, grads)

    @property
    def _numpy_sized(self) -> bool:
        return arrays.small_state(self.y)

    def recorded(self, y0: torch.Tensor) -> torch.Tensor:
        """The forward's saved states again, recorded in a graph from ``y0`` (for
        ``create_graph=True``: see :class:`_AdjointFunction`)."""
        res = self.problem.integrate(y0=y0)
        return _stack_like(res, self.forward_result)

    def _backward_at(self, ts, ys, grads):
        p = self.problem
        direction = 1.0 if p.t1 > p.t0 else -1.0
        # Knots: t0 and every saved time, with the forward state there (the checkpoints).
        knots: list[tuple[float, torch.Tensor, torch.Tensor | None]] = [(p.t0, self.y, None)]
        for t, y, g in zip(ts, ys, grads):
            if knots[-1][0] == t:
                prev = knots[-1][2]
                knots[-1] = (t, knots[-1][1], g if prev is None else prev + g)
            else:
                knots.append((t, y, g))
        lam = torch.zeros(self.n, dtype=self.y.dtype, device=self.y.device)
        mu = torch.zeros(self.n_params, dtype=self.y.dtype, device=self.y.device)
        with torch.no_grad():
            for k in range(len(knots) - 1, 0, -1):
                t_hi, y_hi, g = knots[k]
                if g is not None:
                    lam = lam + g.reshape(-1)
                t_lo, y_lo, _ = knots[k - 1]
                if direction * (t_hi - t_lo) > 0:
                    for a, b, ya, dense in self.pieces(t_lo, t_hi, y_lo):
                        yb = y_hi if b == t_hi else None
                        lam, mu = self.method.integrate_interval(self, b, a, yb, ya, lam, mu, dense)
                        del dense  # one piece's dense output alive at a time
            g0 = knots[0][2]
            if g0 is not None:
                lam = lam + g0.reshape(-1)
        return lam.view_as(self.y), split_like(mu, self.params)


def split_like(flat: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """``flat`` cut into views shaped as ``params``, in order (their gradients, concatenated)."""
    if flat.device.type == "cpu" and not flat.requires_grad and arrays.readable(flat):  # cut on NumPy: a third of torch's per-view cost
        arr, out, at = flat.numpy(), [], 0
        for p in params:
            n = p.numel()
            out.append(torch.from_numpy(arr[at : at + n].reshape(p.shape)))
            at += n
        return out
    return [chunk.view_as(p) for p, chunk in zip(params, torch.split(flat, [p.numel() for p in params]))]


@contextlib.contextmanager
def _buffers_kept(state: list[tuple[nn.Module, str, str, torch.Tensor]]):
    """Give the module's buffers back their values after the block: the adjoint's own
    evaluations of ``f`` (its VJPs, re-solves, this check) must not count as forward passes in
    running statistics (a BatchNorm in training mode), as DirectAdjoint's backward pass does not."""
    kept = buffer_values(state)
    try:
        yield
    finally:
        put_back(kept)


def buffer_values(state: list[tuple[nn.Module, str, str, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A copy of the module's buffers' values, for :func:`put_back`."""
    return [(t, t.clone()) for _, kind, _, t in state if kind == "_buffers"]


def put_back(kept: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for t, value in kept:
            t.copy_(value)


@contextlib.contextmanager
def _restored(state: list[tuple[nn.Module, str, str, torch.Tensor]]):
    """Put back, for the backward pass, the tensors the module held during the forward pass.

    Under ``torch.func.functional_call`` (a flat parameter vector, say) the module holds other
    tensors while the forward runs than when autograd later calls the backward.
    """
    swapped = []
    for mod, kind, name, t in state:
        slots = getattr(mod, kind)
        if slots.get(name) is not t:
            swapped.append((slots, name, slots.get(name)))
            slots[name] = t
    try:
        yield
    finally:
        for slots, name, old in reversed(swapped):
            slots[name] = old


def run_solution(run: Any, problem: "Problem") -> Solution:
    """The solve through a discrete reverse pass's ``run`` (its ``forward`` keeps the
    :class:`IntegrationResult` as ``run.result``), differentiable through :class:`_AdjointFunction`."""
    ys = _AdjointFunction.apply(run, problem.y0, *run.params)
    res = run.result
    return Solution(
        ts=times_tensor(res.ts, problem.y0), ys=ys, stats=res.stats, status=res.status, message=res.message,
        backward_stats=run.bstats, t_final=res.t,
    )  # fmt: skip


class DenseQuery:
    """``sol(t)`` of a continuous-adjoint solve, made differentiable: the adjoint runs from the
    queried times (sorted, duplicates merged) as it runs from saved ones."""

    def __init__(self, run: AdjointRun, times: list[float]):
        self.run = run
        direction = 1.0 if run.problem.t1 > run.problem.t0 else -1.0
        self.times = times
        self.order = sorted(range(len(times)), key=lambda i: direction * times[i])

    def forward(self) -> torch.Tensor:
        return self.run.solution_dense.evaluate(self.times)

    @property
    def module_state(self) -> list:
        return self.run.module_state

    def recorded(self, y0: torch.Tensor) -> torch.Tensor:
        res = self.run.problem.integrate(y0=y0, dense=True)
        return res.dense.evaluate(self.times)

    def backward(self, grad: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        ts = [self.times[i] for i in self.order]
        ys = list(self.run.solution_dense.evaluate(ts).unbind(0))
        return self.run.backward_at(ts, ys, [grad[i] for i in self.order])


def _stack_like(res: IntegrationResult, first: IntegrationResult) -> torch.Tensor:
    if res.ts != first.ts:
        raise RuntimeError(
            "differentiating with create_graph=True re-solves with a recorded graph, and that solve saved other "
            "times than the first (its steps differed): pass saveat= times, or use sensealg=DirectAdjoint()"
        )
    return torch.stack(res.ys)


class _AdjointFunction(torch.autograd.Function):
    """Connects a sensitivity run to autograd: forward solves, backward runs the adjoint.

    The inputs are saved with ``save_for_backward``, so autograd's own version check refuses a
    backward pass after any of them was modified in place, as it does for a recorded graph.
    Under ``create_graph=True`` (a gradient penalty, Hessian-vector products) the backward pass
    records the solve's own graph from the inputs and differentiates it: the gradient is then
    DirectAdjoint's, and it can be differentiated again.
    """

    @staticmethod
    def forward(ctx: Any, run: "AdjointRun | DenseQuery", y0: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.run = run
        ctx.save_for_backward(y0, *params)
        return run.forward()

    @staticmethod
    def backward(ctx: Any, grad_ys: torch.Tensor) -> tuple:
        y0, *params = ctx.saved_tensors  # raises autograd's error if one was modified in place
        run = ctx.run
        if torch.is_grad_enabled():  # create_graph=True
            with _restored(run.module_state), _buffers_kept(run.module_state):
                out = run.recorded(y0)
            inputs = [y0, *params]
            wanted = [x for x in inputs if x.requires_grad]  # (y0 need not be differentiated)
            found = iter(torch.autograd.grad(out, wanted, grad_ys, create_graph=True, allow_unused=True))
            grads = [next(found) if x.requires_grad else None for x in inputs]
            grads = [torch.zeros_like(x) if g is None and x.requires_grad else g for g, x in zip(grads, inputs)]
            return (None, *grads)
        grad_y0, grad_params = run.backward(grad_ys)
        return (None, grad_y0, *grad_params)
