"""The generic step kernel: every step on torch's ops, for any field, device and autograd mode."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from ..control import Parts, error_ratio, part_rms
from ..solvers.implicit import JacobianSource, imex_parts
from ..solvers.tableau import Solver, Stepper

VectorField = Callable[[Any, torch.Tensor], torch.Tensor]


def rk_step_with_error(
    solver: Stepper, f: VectorField, t: torch.Tensor, y: torch.Tensor, dt: float, k: torch.Tensor, co: Any,
    rtol: float, atol: float, parts: Parts | None, norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """One step of ``solver`` (an explicit Runge-Kutta solver, or an integration's
    :class:`~odeflux.solvers.tableau.Stepper`) and its scaled error norm (``None`` if fixed-step).

    Pure tensor code with no host synchronisation: this is what ``torch.compile`` traces.
    """
    y1, err, K, _ = solver.step(f, t, y, dt, k, co)
    if err is None:
        return y1, K, None
    if torch.is_grad_enabled():
        with torch.no_grad():
            e = error_ratio(err, y, y1, rtol, atol, parts, norm)
    else:
        e = error_ratio(err, y, y1, rtol, atol, parts, norm)
    return y1, K, e


def own_step_with_error(
    solver: Any, f: VectorField, t: torch.Tensor, y: torch.Tensor, dt: float, k: torch.Tensor, co: Any,
    rtol: float, atol: float, parts: Parts | None, norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """:func:`rk_step_with_error` for a stepper that computes its step and norm itself (a
    Rosenbrock stepper, ``Solver.compiled_steps``: its compiled step takes the norm in its graph)."""
    return solver.step_with_error(f, t, y, dt, k, co, rtol, atol, parts, norm)


_COMPILED_STEP: Callable | None = None


def compiled_step() -> Callable:
    """:func:`rk_step_with_error` under ``torch.compile(fullgraph=True)``, built once per process."""
    global _COMPILED_STEP
    if _COMPILED_STEP is None:
        from ..compiled.program import compile_lifting_scalars

        _COMPILED_STEP = compile_lifting_scalars(rk_step_with_error, "rk_step_with_error", fullgraph=True)
    return _COMPILED_STEP


class TorchNorms:
    """:class:`odeflux.control.HairerNorms` on tensors."""

    def __init__(self, kernel: TorchStepKernel, y0: torch.Tensor, f0: torch.Tensor):
        self.kernel, self.y0, self.f0, self.parts = kernel, y0.detach(), f0.detach(), kernel.parts
        self.end = None if self.parts is None else self.parts[-1][1]
        yf, ff = self.y0.reshape(-1)[: self.end], self.f0.reshape(-1)[: self.end]
        self.scale = yf.abs().mul(kernel.rtol).add_(kernel.atol)
        self.d0, self.d1 = self._norms([yf / self.scale, ff / self.scale])

    def _norms(self, xs: list[torch.Tensor]) -> list[float]:
        norm = self.kernel.norm
        if norm is None:
            return part_rms(xs, self.parts)
        return torch.stack([norm(x.reshape(self.y0.shape)).reshape(()) for x in xs]).tolist()

    def change(self, t: float, h: float) -> float:
        f1 = self.kernel.evaluate(t, torch.add(self.y0, self.f0, alpha=h))
        df = (f1 - self.f0).reshape(-1)[: self.end]
        return self._norms([df / self.scale])[0]


class TorchStepKernel:
    """Steps on torch's ops (:func:`rk_step_with_error`; compiled with ``compiled=True``), through
    the solver's stepper for this integration (:meth:`~odeflux.solvers.tableau.Solver.stepper`:
    a multistep method's history lives there, never on the solver).

    ``norm`` replaces the RMS error norm (of the scaled error); with ``perturb`` the stages
    that fall on a step's end are evaluated just before it (the integrator evaluates the start
    just after it)."""

    arrays = False

    def __init__(
        self, f: VectorField, solver: Solver, y0: torch.Tensor, rtol: float, atol: float, parts: Parts | None,
        float_time: bool, compiled: bool, norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
        perturb: bool = False,
    ):  # fmt: skip
        self.f, self.solver, self.rtol, self.atol, self.parts = f, solver, rtol, atol, parts
        self.dtype, self.device = y0.dtype, y0.device
        self.co = solver.coefficients(y0.dtype, y0.device)
        self.float_time = float_time
        self.norm, self.perturb = norm, perturb
        own = compiled and not solver.tableau_steps  # a stepper that compiles its own steps (Rosenbrock)
        if own and not solver.compiled_steps:
            raise ValueError(
                f"compile=True compiles the Runge-Kutta step; {type(solver).__name__} takes others: drop compile=True"
            )
        self.stepper = solver.stepper(rtol, atol)
        #: The eager step, chosen once: the generic one, or the stepper's own (Rosenbrock).
        self._eager_step = own_step_with_error if solver.compiled_steps else rk_step_with_error
        self._step = compiled_step() if compiled and not own else self._eager_step
        self._step_end: float | None = None
        self._end_derivatives = own and not float_time and not perturb and y0.dtype == torch.float64
        if compiled:
            from ..compiled.program import STEP_REFUSED, code_key

            if code_key(f) in STEP_REFUSED:  # (said when it was refused)
                self.eager()
            elif own:
                self.stepper.compile(f, code_key(f))

    def running(self) -> contextlib.nullcontext:
        return contextlib.nullcontext()

    def time(self, t: float) -> torch.Tensor | float:
        return t if self.float_time else torch.full((), t, dtype=self.dtype, device=self.device)

    def evaluate(self, t: float, y: torch.Tensor) -> torch.Tensor:
        if t == self._step_end:  # the end of the last step: a compiled Rosenbrock step evaluated f there
            k = self.stepper.end_derivative(y)
            if k is not None:
                return k
        return self.f(self.time(t), y)

    def step(
        self, t: float, y: torch.Tensor, h: float, k: torch.Tensor, inside_end: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
        f = self._inside(t, t + h) if self.perturb or inside_end else self.f
        # Where the stepper evaluates f at the step's end in its compiled graph (float64: the graph's
        # t + h is the host's), evaluate() takes that value at exactly that time.
        self._step_end = t + h if self._end_derivatives and not inside_end else None
        args = (self.stepper, f, self.time(t), y, h, k, self.co, self.rtol, self.atol, self.parts, self.norm)
        if self._step is self._eager_step:
            return self._eager_step(*args)
        try:
            return self._step(*args)
        except Exception as exc:  # f cannot be compiled: said once, then every step eagerly
            from ..compiled.program import STEP_REFUSED, code_key, warn_eager

            STEP_REFUSED.add(code_key(self.f))
            warn_eager(exc, "in one step")
            self.eager()
            return self._eager_step(*args)

    def eager(self) -> None:
        """Step with the eager step from now on (``f`` could not be compiled)."""
        self._step = self._eager_step
        if self.solver.compiled_steps:  # (nor its stepper's own compiled steps)
            self.stepper.compile(None, None)

    def _inside(self, start: float, end: float) -> VectorField:
        """``f`` with evaluations on the step's ends (a stage, an implicit step's Jacobian) moved
        just inside the step (``perturb``, or a step ending on a jump of ``f``)."""
        from ..integrator import nudge

        forward = 1.0 if end > start else -1.0
        after, before = self.time(nudge(start, forward, self.dtype)), self.time(nudge(end, -forward, self.dtype))
        kind = _InsideWithJacobian if isinstance(self.f, JacobianSource) else _Inside
        return kind(self.f, start, end, after, before, 4 * torch.finfo(self.dtype).eps)

    def evaluations(self, K: torch.Tensor) -> int:
        return self.stepper.evaluations(K)

    @property
    def counters(self) -> dict[str, int] | None:
        """The stepper's linear-algebra counters (``Stats`` field names), where it keeps any."""
        return getattr(self.stepper, "counters", None)

    def norms(self, t: float, y: torch.Tensor, k: torch.Tensor) -> TorchNorms:
        with torch.no_grad():
            return TorchNorms(self, y, k)


class _Inside:
    """``f`` with times on a step's ends replaced by the times just inside it."""

    def __init__(self, f: VectorField, start: float, end: float, after: Any, before: Any, eps: float):
        self.f, self.start, self.end, self.after, self.before, self.eps = f, start, end, after, before, eps

    def inside(self, t: Any) -> Any:
        tf = float(t)
        if abs(tf - self.end) <= self.eps * max(1.0, abs(self.end)):
            return self.before
        if abs(tf - self.start) <= self.eps * max(1.0, abs(self.start)):
            return self.after
        return t

    def __call__(self, t: Any, y: torch.Tensor) -> torch.Tensor:
        return self.f(self.inside(t), y)

    def imex_parts(self) -> tuple[VectorField, VectorField] | None:
        """An :class:`~odeflux.solvers.IMEX` field's parts, each moved inside the step as ``f`` is."""
        parts = imex_parts(self.f)
        if parts is None:
            return None
        kind = lambda g: _InsideWithJacobian if isinstance(g, JacobianSource) else _Inside  # noqa: E731
        return tuple(kind(g)(g, self.start, self.end, self.after, self.before, self.eps) for g in parts)


class _InsideWithJacobian(_Inside, JacobianSource):
    """:class:`_Inside` of a field that gives its own Jacobian (an adjoint's system)."""

    def jacobian(self, t: Any, y: torch.Tensor) -> torch.Tensor:
        return self.f.jacobian(self.inside(t), y)

    def jacobian_product(self, t: Any, y: torch.Tensor) -> tuple[int, Callable[[torch.Tensor], torch.Tensor]]:
        return self.f.jacobian_product(self.inside(t), y)


class ImplicitStepKernel(TorchStepKernel):
    """Steps of an implicit solver (:class:`odeflux.solvers.ImplicitRK`: Newton iterations whose
    count varies, never compiled) on torch's ops, through the integration's
    :class:`~odeflux.solvers.implicit.ImplicitStepper` (the kept Jacobian, the work counters)."""

    def step(self, t: float, y: torch.Tensor, h: float, k: torch.Tensor, inside_end: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        f = self._inside(t, t + h) if self.perturb or inside_end else self.f
        return rk_step_with_error(self.stepper, f, self.time(t), y, h, k, self.co, self.rtol, self.atol, self.parts, self.norm)

    def evaluations(self, K: torch.Tensor) -> int:
        return self.stepper.last_evals

