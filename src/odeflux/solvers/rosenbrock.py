"""Rosenbrock (linearly implicit Runge-Kutta) methods: the tableau as data and one generic adaptive
stepper.

A Rosenbrock step solves linear systems instead of nonlinear ones. In the transformed form of
Hairer and Wanner (Solving ODEs II, IV.7) that every method here runs, with ``J = df/dy(t, y)``,
``T = df/dt(t, y)`` and ``W = I / (h gamma) - J``::

    W U_i = f(t + c_i h, y + sum_{j<i} a_ij U_j) + sum_{j<i} (C_ij / h) U_j + d_i h T
    y1    = y + sum_i m_i U_i,          err = sum_i e_i U_i

so a step costs one Jacobian, one LU factorisation of ``W`` (reused by every stage) and one
triangular solve per stage. The classical coefficients ``(alpha, Gamma, b)`` of
``(I - h gamma J) k_i = f(t + alpha_i h, y + h sum alpha_ij k_j) + h J sum_{j<i} gamma_ij k_j
+ gamma_i h T`` map onto these by ``U = h Gamma k``: ``a = alpha Gamma^-1``,
``C = diag(1/gamma) - Gamma^-1``, ``m = b Gamma^-1``, ``c_i = sum_j alpha_ij``,
``d_i = sum_j gamma_ij`` (:meth:`RosenbrockTableau.from_classical` and
:meth:`RosenbrockTableau.classical`).

The stages ``K_i = U_i / h`` are what a step hands the integrator, so dense output is the usual
``y(t0 + theta h) = y0 + h sum_i b_i(theta) K_i`` of :class:`~odeflux.solvers.tableau.DenseWeights`.

The Jacobian, in this order of precedence:

- the field's own, where it is a :class:`~odeflux.solvers.implicit.JacobianSource` (the continuous
  adjoints' systems); ``T`` is then a forward finite difference in ``t`` (one more evaluation);
- the solver's ``jac(t, y)`` where one was given (an ``(n, n)`` matrix of the flattened state);
- autograd otherwise: ``J`` and ``T`` from one forward pass and one batched backward pass (``T``
  is zero where the field ignores time: a host-float ``t``, or one that does not reach the output
  through autograd; ``time_derivative="finite_difference"`` takes a difference instead).

Gradients (DirectAdjoint): while a graph is recorded, the autograd Jacobian is built with
``create_graph=True``, so backpropagation differentiates through ``J`` and ``T`` as well as through
the LU solves: the gradient is that of the discrete solution the solver computed. (A given
``jac`` or a JacobianSource's ``J`` enters the graph as it is; a finite-difference ``df/dt`` as a
constant.) Under the continuous adjoints the forward runs without a graph and all of it is detached.

Limits: ``J`` is dense, ``n x n`` of the flattened state (memory ``n^2``, factorisation ``n^3``):
meant for stiff systems of up to a few thousand unknowns, not for a large neural field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, NamedTuple, Sequence

import numpy as np
import torch

from ..control import ORDINARYDIFFEQ_PI, StepSizeController
from .implicit import JacobianSource, factorize, solve_factored
from .tableau import DenseWeights, Solver, StepResult, new_state, polynomial_weights

VectorField = Callable[[Any, torch.Tensor], torch.Tensor]
JacobianFn = Callable[[Any, torch.Tensor], torch.Tensor]

#: How ``df/dt`` is computed for a field given tensor times (see the module docstring).
TIME_DERIVATIVES = ("autograd", "finite_difference")

__all__ = ["TIME_DERIVATIVES", "LinearSolveFailure", "Rosenbrock", "RosenbrockStepper", "RosenbrockTableau", "rodas_interp"]


class LinearSolveFailure(RuntimeError):
    """A Rosenbrock step's matrix ``I / (h gamma) - J`` is singular, or ``J`` is not finite: the
    integrator ends the solve with ``status`` and this message."""

    def __init__(self, message: str, status: Any):
        super().__init__(message)
        self.status = status


def _lower(rows: Sequence[Sequence[float]], s: int) -> np.ndarray:
    M = np.zeros((s, s))
    for i, row in enumerate(rows):
        M[i, : len(row)] = row
    return M


def _rows(M: np.ndarray) -> tuple[tuple[float, ...], ...]:
    """A strictly lower triangular matrix as rows (row ``i`` holds ``i`` entries)."""
    return tuple(tuple(float(v) for v in M[i, :i]) for i in range(M.shape[0]))


@dataclass(frozen=True)
class RosenbrockTableau(DenseWeights):
    """Coefficients of a Rosenbrock method in the transformed form (see the module docstring).

    ``a`` and ``C`` are strictly lower triangular, row ``i`` holding ``i`` entries; ``m`` weighs
    the stages into the solution, ``m_err`` into the error estimate; ``c`` are the stage times,
    ``d`` the coefficients of ``h df/dt``. ``interp[i][k]`` is the coefficient of ``theta**(k+1)``
    in the dense-output weight ``b_i(theta)`` of ``K_i = U_i / h``. ``w_method``: the solution keeps
    its order with any approximation of ``J`` (a W-method), so a Jacobian may be reused across steps.
    """

    name: str
    order: int
    error_order: int
    gamma: float
    a: tuple[tuple[float, ...], ...]
    C: tuple[tuple[float, ...], ...]
    m: tuple[float, ...]
    m_err: tuple[float, ...]
    c: tuple[float, ...]
    d: tuple[float, ...]
    interp: tuple[tuple[float, ...], ...]
    interp_order: int
    w_method: bool = False

    # What the integrator and the tests read of any tableau.
    fsal: ClassVar[bool] = False
    adaptive: ClassVar[bool] = True

    def __post_init__(self) -> None:
        s = len(self.c)
        if len(self.a) != s or any(len(r) != i for i, r in enumerate(self.a)):
            raise ValueError(f"{self.name}: a must be strictly lower triangular with {s} rows")
        if len(self.C) != s or any(len(r) != i for i, r in enumerate(self.C)):
            raise ValueError(f"{self.name}: C must be strictly lower triangular with {s} rows")
        if not (len(self.m) == len(self.m_err) == len(self.d) == len(self.interp) == s):
            raise ValueError(f"{self.name}: m, m_err, d and interp need one entry per stage ({s})")
        if not self.gamma > 0:
            raise ValueError(f"{self.name}: gamma must be positive")

    @classmethod
    def from_classical(
        cls, name: str, order: int, error_order: int, alpha: Sequence[Sequence[float]], Gamma: Sequence[Sequence[float]],
        b: Sequence[float], b_hat: Sequence[float], interp: tuple[tuple[float, ...], ...], interp_order: int,
        w_method: bool = False,
    ) -> RosenbrockTableau:  # fmt: skip
        """The transformed tableau of the classical coefficients: ``alpha`` strictly lower,
        ``Gamma`` lower triangular with a constant diagonal ``gamma``, ``b`` the solution's weights,
        ``b_hat`` the embedded solution's (the error estimate is ``y1 - y1_hat``). ``interp`` weighs
        the classical stages ``k`` (``y0 + h sum_j b_j(theta) k_j``); with ``h k = Gamma^-1 U`` it
        becomes ``Gamma^-T interp`` on ``K = U / h``."""
        A, G = np.asarray(alpha, dtype=np.float64), np.asarray(Gamma, dtype=np.float64)
        gamma = float(G[0, 0])
        if not np.allclose(np.diag(G), gamma) or np.triu(G, 1).any() or np.triu(A).any():
            raise ValueError(f"{name}: Gamma must be lower triangular with a constant diagonal, alpha strictly lower")
        Gi = np.linalg.inv(G)
        m = np.asarray(b) @ Gi
        m_err = (np.asarray(b) - np.asarray(b_hat)) @ Gi
        return cls(
            name=name, order=order, error_order=error_order, gamma=gamma, a=_rows(A @ Gi),
            C=_rows(np.eye(len(G)) / gamma - Gi), m=tuple(map(float, m)), m_err=tuple(map(float, m_err)),
            c=tuple(map(float, A.sum(1))), d=tuple(map(float, G.sum(1))),
            interp=tuple(tuple(float(v) for v in row) for row in Gi.T @ np.asarray(interp, dtype=np.float64)),
            interp_order=interp_order,
            w_method=w_method,
        )  # fmt: skip

    def classical(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(alpha, Gamma, b, b_hat)`` of the classical form (for the order conditions):
        ``Gamma^-1 = diag(1/gamma) - C``, ``alpha = a Gamma``, ``b = m Gamma``."""
        s = self.stages
        G = np.linalg.inv(np.eye(s) / self.gamma - _lower(self.C, s))
        b = np.asarray(self.m) @ G
        return _lower(self.a, s) @ G, G, b, b - np.asarray(self.m_err) @ G


def rodas_interp(m: Sequence[float], H: Sequence[Sequence[float]]) -> tuple[tuple[float, ...], ...]:
    """The dense output of the Rodas family, ``y(theta) = (1 - theta) y0 + theta (y1 + (1 - theta)
    (D_1 + theta (D_2 + theta D_3 ...)))`` with ``D_r = sum_i H[r][i] U_i``, as ``interp`` rows for
    ``K = U / h``: ``b_i(theta) = theta m_i + sum_r (theta^r - theta^(r+1)) H[r][i]``."""
    s = len(m)
    terms: list[tuple[list[float], np.ndarray]] = [([1.0], np.asarray(m, dtype=np.float64))]
    for r, row in enumerate(H):
        poly = [0.0] * (r + 2)
        poly[r], poly[r + 1] = 1.0, -1.0  # theta^(r+1) - theta^(r+2)
        terms.append((poly, np.asarray(row, dtype=np.float64)))
    return polynomial_weights(terms, s)


class _Coefficients(NamedTuple):
    a_rows: tuple[torch.Tensor, ...]  # a_rows[i]: (1, i)
    C_rows: tuple[torch.Tensor, ...]  # C_rows[i]: (1, i)
    m_row: torch.Tensor  # (1, s)
    e_row: torch.Tensor  # (1, s)
    c: tuple[float, ...]
    d: tuple[float, ...]
    interp: torch.Tensor  # (s, deg)
    a_full: torch.Tensor  # (s, s): a, strictly lower triangular
    C_full: torch.Tensor  # (s, s): C, strictly lower triangular
    a_full_rows: tuple[torch.Tensor, ...]  # a_full's rows, (s,) each (made once, not indexed per stage)


class LoopStep(NamedTuple):
    """What :meth:`Rosenbrock.loop_step` hands the compiled loop."""

    y1: torch.Tensor
    err: torch.Tensor  # the error estimate (a vector, normed by the loop)
    K: torch.Tensor  # the stages ``U / h``, ``(stages, *y.shape)``: the dense output's
    k_end: torch.Tensor  # ``f(t + dt, y1)``
    flags: torch.Tensor  # (B,): 2 where ``J`` is not finite, plus 1 where ``W`` is singular (:func:`_flags`)


@dataclass(eq=False)
class Rosenbrock(Solver):
    """An adaptive Rosenbrock solver defined by its tableau (subclasses supply the data).

    ``jac``: an optional ``jac(t, y) -> (n, n)`` Jacobian of the flattened state (autograd by
    default). ``time_derivative``: ``"autograd"`` (default) or ``"finite_difference"`` for
    ``df/dt`` (see :mod:`odeflux.solvers.rosenbrock`). ``max_jacobian_age``: how many accepted
    steps one Jacobian may serve; above 1 only for a W-method (its order does not depend on ``J``);
    a rejected step always gets a fresh one.
    """

    tableau: RosenbrockTableau = field(repr=False)
    jac: JacobianFn | None = field(default=None, repr=False)
    time_derivative: str = "autograd"
    max_jacobian_age: int = 1
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    stepwise: ClassVar[bool] = True
    tableau_steps: ClassVar[bool] = False  # its steps are not explicit RK steps: no NumPy kernel or reverse pass
    compiled_steps: ClassVar[bool] = True  # compile=True: its stepper compiles the steps with a fresh Jacobian
    loop_steps: ClassVar[bool] = True  # compile=True without autograd: the whole loop compiled, by loop_step
    adaptive_controller: ClassVar[StepSizeController] = ORDINARYDIFFEQ_PI  # (the 0.1 floor is measured on explicit methods)
    adaptive: ClassVar[bool] = True
    fsal: ClassVar[bool] = False

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.time_derivative not in TIME_DERIVATIVES:
            raise ValueError(f"{name}: time_derivative must be one of {', '.join(TIME_DERIVATIVES)}, got {self.time_derivative!r}")
        if isinstance(self.max_jacobian_age, bool) or not isinstance(self.max_jacobian_age, int) or self.max_jacobian_age < 1:
            raise ValueError(f"{name}: max_jacobian_age must be a positive integer, got {self.max_jacobian_age!r}")
        if self.max_jacobian_age > 1 and not self.tableau.w_method:
            raise ValueError(
                f"{name} is not a W-method: its order needs the exact Jacobian of each step (max_jacobian_age=1)"
            )
        if self.jac is not None and not callable(self.jac):
            raise TypeError(f"{name}: jac must be a function jac(t, y) returning the (n, n) Jacobian, got {self.jac!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    @property
    def order(self) -> int:
        return self.tableau.order

    @property
    def error_order(self) -> int:
        return self.tableau.error_order

    def make_coefficients(self, mk: Callable[[Any], torch.Tensor]) -> _Coefficients:
        tab = self.tableau
        return _Coefficients(
            a_rows=tuple(mk([list(r)]) for r in tab.a), C_rows=tuple(mk([list(r)]) for r in tab.C),
            m_row=mk([list(tab.m)]), e_row=mk([list(tab.m_err)]), c=tab.c, d=tab.d,
            interp=mk([list(r) for r in tab.interp]),
            a_full=mk(_lower(tab.a, tab.stages).tolist()), C_full=mk(_lower(tab.C, tab.stages).tolist()),
            a_full_rows=tuple(mk(row) for row in _lower(tab.a, tab.stages).tolist()),
        )  # fmt: skip

    # -- the compiled whole loop (odeflux.compiled.loop.run_loop) ------------------------------
    def loop_refusal(self) -> str | None:
        """Why the compiled loop, which takes a fresh Jacobian by ``torch.func.jacrev`` every
        attempted step, cannot run this solver's steps as the eager integrator does (``None``: it can)."""
        if self.jac is not None:
            return "a user jac"
        if self.time_derivative != "autograd":
            return f'time_derivative="{self.time_derivative}"'
        if self.max_jacobian_age > 1:
            return "Jacobian reuse (max_jacobian_age > 1)"
        return None

    def loop_step(self, f: VectorField, t: torch.Tensor, y: torch.Tensor, dt: torch.Tensor, k1: torch.Tensor, co: _Coefficients) -> LoopStep:
        """One attempted step of :func:`~odeflux.compiled.loop.run_loop` for its ``B`` problems
        (``t``, ``dt`` of shape ``(B,)``, ``y`` ``(B, ...)``; a joint solve is ``B = 1``): the step
        :func:`fresh_step` compiles, with a fresh Jacobian for each problem (``(B, n, n)``, each
        ``W`` factorised apart), and ``f`` at its end; ``flags`` per problem."""
        y1, err, K, flags, _J, _T, k_end = _fresh(f, t, y, dt, k1, co, self.tableau.gamma, batch=True)
        return LoopStep(y1, err, K, k_end, flags)

    def loop_evaluations(self) -> int:
        """Evaluations of ``f`` an attempted loop step costs, as the eager stepper counts them: the
        Jacobian's forward pass and the stages after the first (``f`` at its end is counted by
        the loop where a step is accepted, as the eager integrator counts it)."""
        return self.tableau.stages

    def loop_counters(self, n_steps: int) -> dict[str, int]:
        """The linear-algebra counters of ``n_steps`` attempted loop steps: each one Jacobian, one
        factorisation and a solve per stage."""
        return {"n_jacobians": n_steps, "n_factorizations": n_steps, "n_linear_solves": n_steps * self.tableau.stages}

    def stepper(self, rtol: float, atol: float) -> RosenbrockStepper:
        """A fresh stepper per integration: it keeps the Jacobian it may reuse and the counters."""
        return RosenbrockStepper(self, rtol, atol)


class RosenbrockStepper:
    """One integration's Rosenbrock steps: the Jacobian (kept for reuse by a W-method) and the
    linear-algebra counters, which :class:`~odeflux.kernels.torch_step.TorchStepKernel` hands the
    integrator's :class:`~odeflux.solution.Stats`."""

    def __init__(self, solver: Rosenbrock, rtol: float | None = None, atol: float | None = None):
        self.solver, self.rtol, self.atol = solver, rtol, atol
        self.counters = {"n_jacobians": 0, "n_factorizations": 0, "n_linear_solves": 0}
        self._evals = 0
        self._J: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._age = 0
        self._J_at: torch.Tensor | None = None  # the state the Jacobian was computed at
        self._last_y: torch.Tensor | None = None  # the state the last step returned
        self._last_start: torch.Tensor | None = None  # the state the last step started from
        self._eye: torch.Tensor | None = None
        self._compile_f: VectorField | None = None  # the field whose steps are compiled (compile())
        self._k_end: torch.Tensor | None = None  # f(t + h, y1) of the last compiled step (end_derivative)
        self._refuse_key: Any = None

    def evaluations(self, K: torch.Tensor) -> int:
        return self._evals

    # -- the Jacobian and the time derivative --------------------------------------------------
    def _derivatives(self, f: VectorField, t: Any, y: torch.Tensor, dt: float, k1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(J, T)``: ``J`` ``(m, m)`` (``m <= n``: a JacobianSource's block), ``T`` flat or
        ``None`` (zero)."""
        solver, n = self.solver, y.numel()
        self.counters["n_jacobians"] += 1
        if isinstance(f, JacobianSource):
            J = f.jacobian(t, y).detach()
            return J, self._fd_time(f, t, y, dt, k1)
        if solver.jac is not None:
            J = solver.jac(t, y)
            if not isinstance(J, torch.Tensor) or J.shape != (n, n):
                got = tuple(J.shape) if isinstance(J, torch.Tensor) else type(J).__name__
                raise ValueError(f"{type(solver).__name__}: jac(t, y) must return an ({n}, {n}) tensor, got {got}")
            J = J.to(dtype=y.dtype)
            T = self._fd_time(f, t, y, dt, k1) if isinstance(t, torch.Tensor) else None
            return J, T
        fd = solver.time_derivative == "finite_difference" and isinstance(t, torch.Tensor)
        J, T = _autograd_derivatives(f, t, y, k1, with_time=not fd)
        self._evals += 1  # its forward pass
        return J, (self._fd_time(f, t, y, dt, k1) if fd else T)

    def _fd_time(self, f: VectorField, t: Any, y: torch.Tensor, dt: float, k1: torch.Tensor) -> torch.Tensor:
        """``df/dt`` by a forward difference into the step (one evaluation of ``f``)."""
        eps = torch.finfo(y.dtype).eps
        tf = float(t)
        delta = math.copysign(math.sqrt(eps) * max(abs(tf), abs(dt)), dt)
        delta = (tf + delta) - tf  # a step representable in t's precision
        t2 = tf + delta if not isinstance(t, torch.Tensor) else t + delta
        self._evals += 1
        with torch.no_grad():
            return ((f(t2, y) - k1) / delta).reshape(-1)

    # -- one step ------------------------------------------------------------------------------
    def compile(self, f: VectorField, refuse_key: Any) -> None:
        """Take the compiled step (``solve(compile=True)``) for the steps of ``f`` that get a fresh
        Jacobian outside autograd (see :func:`compiled_fresh_step`); ``refuse_key`` is what
        :data:`odeflux.compiled.program.STEP_REFUSED` records where ``f`` cannot be compiled."""
        self._compile_f, self._refuse_key = f, refuse_key

    def _compilable(self, f: VectorField, t: Any) -> bool:
        solver = self.solver
        return (
            f is self._compile_f and isinstance(t, torch.Tensor) and not torch.is_grad_enabled()
            and solver.jac is None and solver.time_derivative == "autograd" and not isinstance(f, JacobianSource)
        )  # fmt: skip

    def step(self, f: VectorField, t: Any, y: torch.Tensor, dt: float, k1: torch.Tensor, co: _Coefficients | None = None) -> StepResult:
        """One Rosenbrock step of size ``dt`` from ``(t, y)`` given ``k1 = f(t, y)``: the new state,
        its error estimate and the stages ``K = U / h``. Raises :class:`LinearSolveFailure` where
        ``I / (h gamma) - J`` is singular or ``J`` not finite."""
        return self._step(f, t, y, dt, k1, co, False)[0]

    def step_with_error(
        self, f: VectorField, t: Any, y: torch.Tensor, dt: float, k1: torch.Tensor, co: _Coefficients | None,
        rtol: float, atol: float, parts: Any, norm: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """:meth:`step` and its scaled error norm (:func:`odeflux.control.error_ratio`), what
        :func:`odeflux.kernels.torch_step.own_step_with_error` takes (``compiled_steps``): a
        compiled step computes the norm in its graph."""
        from ..control import error_ratio

        fused = norm is None and rtol == self.rtol and atol == self.atol
        res, e = self._step(f, t, y, dt, k1, co, parts if fused else False)
        if e is None:
            with torch.no_grad():
                e = error_ratio(res.err, y, res.y1, rtol, atol, parts, norm)
        return res.y1, res.K, e

    def _step(
        self, f: VectorField, t: Any, y: torch.Tensor, dt: float, k1: torch.Tensor, co: _Coefficients | None, parts: Any
    ) -> tuple[StepResult, torch.Tensor | None]:  # fmt: skip
        """The step, and its error norm where a compiled step computed it (``parts``: the norm's
        blocks, ``False`` for no norm)."""
        solver = self.solver
        if co is None:
            co = solver.coefficients(y.dtype, y.device)
        self._evals = 0
        retry = y is self._last_start  # the integrator rejected the last step and tries again from y
        if y is self._last_y:
            self._age += 1  # the last step was accepted
        self._last_start = y
        # A retry from the point the Jacobian was computed at keeps it (it is that point's); a retry
        # with an older one, or one past its age, gets a fresh one.
        fresh = self._J is None or (self._J_at is not y and (retry or self._age >= solver.max_jacobian_age))
        self._k_end = None
        s, n = len(co.c), y.numel()
        if fresh and self._compile_f is not None and self._compilable(f, t):
            out = self._compiled_step(f, t, y, dt, k1, co, parts)
            if out is not None:
                y1, err, K, flags, J, T, e, self._k_end = out
                self.counters["n_jacobians"] += 1
                self._J, self._J_at, self._age = (J, T), y, 0
                self._evals += s  # the Jacobian's forward pass and the stages after the first
                return self._finish(t, dt, flags, y1, err, K, s), e
        if fresh:
            self._J, self._J_at, self._age = self._derivatives(f, t, y, dt, k1), y, 0
        J, T = self._J
        if J.shape[0] == n and not torch.is_grad_enabled():
            y1, err, K, flags = rosenbrock_stages(f, t, y, dt, k1, co, solver.tableau.gamma, J, T)
            self._evals += s - 1
            return self._finish(t, dt, flags, y1, err, K, s), None
        return self._graph_step(f, t, y, dt, k1, co, J, T), None

    def end_derivative(self, y1: torch.Tensor) -> torch.Tensor | None:
        """``f(t + h, y1)`` where ``y1`` is the state the last step returned and a compiled step
        computed it in its graph (the next step's ``k1``, for
        :meth:`odeflux.kernels.torch_step.TorchStepKernel.evaluate`, which checks the time), else ``None``."""
        k = self._k_end
        return k if k is not None and y1 is self._last_y else None

    def _compiled_step(
        self, f: VectorField, t: torch.Tensor, y: torch.Tensor, dt: float, k1: torch.Tensor, co: _Coefficients, parts: Any
    ) -> tuple[torch.Tensor, ...] | None:  # fmt: skip
        """:func:`compiled_fresh_step`, or ``None`` where ``f`` cannot be compiled (said once, then
        every step eagerly)."""
        # dt, rtol and atol as one tensor: no recompilation as they change, and one input to guard
        scalars = torch.tensor((dt, self.rtol, self.atol), dtype=y.dtype, device=y.device)
        try:
            return compiled_fresh_step()(f, t, y, scalars, k1, co, self.solver.tableau.gamma, parts)
        except Exception as exc:  # f cannot be compiled
            from ..compiled.program import STEP_REFUSED, warn_eager

            STEP_REFUSED.add(self._refuse_key)
            warn_eager(exc, "in one step")
            self._compile_f = None
            return None

    def _finish(
        self, t: Any, dt: float, flags: torch.Tensor, y1: torch.Tensor, err: torch.Tensor, K: torch.Tensor, s: int
    ) -> StepResult:  # fmt: skip
        """The step's one host read (a singular ``W``, a Jacobian that is not finite), then its result."""
        self.counters["n_factorizations"] += 1
        self._raise_if(int(flags), t, dt)
        self.counters["n_linear_solves"] += s
        self._last_y = y1
        return StepResult(y1, err, K, self._evals)

    def _raise_if(self, flags: int, t: Any, dt: float) -> None:
        """``flags``: 2 where ``J`` is not finite, plus 1 where ``W`` is singular."""
        if not flags:
            return
        from ..solution import Status

        solver, tf = self.solver, float(t)
        if flags & 2:
            raise LinearSolveFailure(
                f"{type(solver).__name__}: the Jacobian of f at t={tf:.6g} has NaN or Inf entries: check f (or jac) "
                "for overflow or division by zero there, or use float64", Status.NONFINITE,
            )  # fmt: skip
        raise LinearSolveFailure(singular_message(solver, tf, dt), Status.LINEAR_SOLVE_FAILED)

    def _graph_step(
        self, f: VectorField, t: Any, y: torch.Tensor, dt: float, k1: torch.Tensor, co: _Coefficients,
        J: torch.Tensor, T: torch.Tensor | None,
    ) -> StepResult:  # fmt: skip
        """The step while autograd records a graph (no in-place writes), or with a JacobianSource's
        block ``J`` smaller than the state (the tail coupled by :meth:`_tail_coupling`)."""
        solver = self.solver
        shape, n = y.shape, y.numel()
        mj = J.shape[0]
        hg = dt * solver.tableau.gamma
        eye = self._eye
        if eye is None or eye.shape[0] != mj:
            eye = self._eye = torch.eye(mj, dtype=y.dtype, device=y.device)
        factors, info = factorize(eye / hg - J)
        self.counters["n_factorizations"] += 1
        # One host read per step: a singular W, or a Jacobian that is not finite.
        self._raise_if(int(_flags(info, J)), t, dt)
        yrow = y.reshape(1, n)
        s = len(co.c)
        Us: list[torch.Tensor] = []
        for i in range(s):
            if i == 0:
                F = k1.reshape(n)
            else:
                U = torch.stack(Us)
                Yi = torch.addmm(yrow, co.a_rows[i], U).reshape(shape)
                F = f(t + co.c[i] * dt, Yi).reshape(n)
                self._evals += 1
            rhs = F
            if i > 0:
                rhs = torch.addmm(F.unsqueeze(0), co.C_rows[i], U, alpha=1.0 / dt).squeeze(0)
            if T is not None and co.d[i] != 0.0:
                rhs = rhs + (co.d[i] * dt) * T
            Ui = self._solve(factors, rhs, mj, hg)
            if mj < n:
                Ui = self._tail_coupling(f, t, y, k1, Ui, mj, hg)
            Us.append(Ui)
        U = torch.stack(Us)
        self.counters["n_linear_solves"] += s
        y1 = new_state(yrow, co.m_row, U, 1.0).reshape(shape)
        err = torch.mm(co.e_row, U).reshape(shape)
        self._last_y = y1
        return StepResult(y1, err, (U / dt).reshape((s,) + tuple(shape)), self._evals)

    def _tail_coupling(
        self, f: VectorField, t: Any, y: torch.Tensor, k1: torch.Tensor, U: torch.Tensor, mj: int, hg: float
    ) -> torch.Tensor:  # fmt: skip
        """The tail's share of ``W^-1``: ``W`` is block lower triangular, ``[[I/(h gamma) - J, 0],
        [-B, I/(h gamma)]]`` with ``B`` the tail's derivatives' dependence on the head (an adjoint's
        ``mu`` on ``lambda``), so the tail's increment gains ``h gamma B U_head``. Left out, the
        method would run with an inexact Jacobian and lose its order in the tail (measured: 160x the
        steps of the interpolating adjoint on ROBER). ``B U_head`` is a difference of ``f`` along
        ``U_head`` (one evaluation; exact up to rounding where the tail is linear in the head, as
        an adjoint's is). As in every use of a JacobianSource's block, the head's derivatives do not
        depend on the tail."""
        u = U[:mj].detach()
        yf = y.reshape(-1).detach()
        if mj == 0:
            return U
        ymax, unorm = (float(v) for v in torch.stack([yf[:mj].abs().max(), u.abs().max()]).tolist())
        if unorm == 0.0:
            return U
        scale = max(ymax, unorm)
        eps = math.sqrt(torch.finfo(y.dtype).eps) * max(scale, 1.0) / unorm
        z = torch.cat([yf[:mj] + eps * u, yf[mj:]]).reshape(y.shape)
        self._evals += 1
        BU = (f(t, z).reshape(-1)[mj:] - k1.reshape(-1)[mj:].detach()) / eps
        return torch.cat([U[:mj], U[mj:] + hg * BU])

    @staticmethod
    def _solve(factors: tuple[torch.Tensor, ...], rhs: torch.Tensor, mj: int, hg: float) -> torch.Tensor:
        """``W^-1 rhs``: the Jacobian's block through ``W``'s factors (:func:`factorize`); the tail
        past it (no Jacobian: its ``W`` is ``I / (h gamma)``) scaled."""
        head = solve_factored(factors, rhs[:mj] if mj < rhs.shape[0] else rhs)
        if mj == rhs.shape[0]:
            return head
        return torch.cat([head, rhs[mj:] * hg])


def singular_message(solver: Solver, t: float, dt: float) -> str:
    """What a solve says where ``W = I/(h gamma) - J`` is singular (eagerly, or in the compiled loop)."""
    return (
        f"{type(solver).__name__}: the matrix I/(h gamma) - J is singular at t={t:.6g} (dt={dt:.3g}): "
        "J has the eigenvalue 1/(h gamma); pass another dt0 or dtmax"
    )


def _flags(info: torch.Tensor, J: torch.Tensor) -> torch.Tensor:
    """A step's failure flags, 0-d (``(B,)`` for a batch's ``(B, n, n)`` Jacobians; read on the host
    once): 1 where ``W`` is singular (``info`` nonzero), plus 2 where ``J`` has a NaN or Inf entry."""
    return info.ne(0).to(torch.int64) + torch.isfinite(J).flatten(-2).all(-1).logical_not().to(torch.int64) * 2


#: Under ``torch.compile``, ``W`` of up to this many rows is inverted by Gauss-Jordan elimination
#: with partial pivoting written out in tensor ops (one loop iteration per row, fused by the
#: compiler) instead of LAPACK's ``inv_ex``, which a compiled graph calls as an external kernel
#: (measured: most of a compiled ROBER step). Both are the inverse up to rounding.
UNROLLED_INVERSE = 16


def _unrolled_inverse(M: torch.Tensor) -> tuple[tuple[torch.Tensor], torch.Tensor]:
    """``((M^-1,), info)`` as :func:`factorize` gives them (``info`` nonzero where a pivot is zero:
    ``M`` singular), by Gauss-Jordan elimination with partial pivoting on ``[M | I]``; ``M`` is
    ``(n, n)`` or a batch ``(B, n, n)``, each inverted with its own pivots."""
    n, batch = M.shape[-1], M.shape[:-2]
    idx = torch.arange(n, device=M.device)
    A = torch.cat([M, torch.eye(n, dtype=M.dtype, device=M.device).expand(batch + (n, n))], -1)
    zero = torch.zeros(batch, dtype=torch.bool, device=M.device)
    for k in range(n):
        p = (torch.argmax(A[..., k:, k].abs(), dim=-1) + k).unsqueeze(-1)  # the pivot's row
        perm = torch.where(idx == k, p, torch.where(idx == p, k, idx))
        A = A.gather(-2, perm.unsqueeze(-1).expand(A.shape))
        pivot = A[..., k, k]
        zero = zero | (pivot == 0)
        row = A[..., k, :] / pivot.unsqueeze(-1)
        A = torch.where((idx == k).unsqueeze(-1), row.unsqueeze(-2), A - A[..., :, k : k + 1] * row.unsqueeze(-2))
    return (A[..., n:],), zero.to(torch.int32)


def rosenbrock_stages(
    f: VectorField, t: Any, y: torch.Tensor, dt: float | torch.Tensor, k1: torch.Tensor, co: _Coefficients,
    gamma: float, J: torch.Tensor, T: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """One Rosenbrock step without autograd, given the ``(n, n)`` Jacobian ``J`` and ``df/dt`` ``T``
    (flat, or ``None``: zero): ``(y1, err, K, flags)`` (:func:`_flags`, not read here).

    A batch of ``B`` independent systems (a per-sample solve's problems) gives ``J`` as ``(B, n,
    n)``, ``T`` as ``(B, n)``, ``y`` as ``(B, ...)`` and ``dt`` as ``(B,)``: each problem's ``W``
    factorised apart, the stages' combinations (the same coefficients for all) over the whole batch.

    Pure tensor code with no host read, the same eagerly and under ``torch.compile`` (``dt`` a
    host float or a tensor): ``W = I / (h gamma) - J`` factorised once (:func:`factorize`),
    the stages written in place into one ``(s, B n)`` buffer whose rows not yet computed are zero,
    so that each stage's combinations of the earlier ones are one ``addmv`` with a full row of
    ``a`` or ``C``."""
    shape, N, s = y.shape, y.numel(), len(co.c)
    n = J.shape[-1]
    B = N // n
    host = not isinstance(dt, torch.Tensor)  # (addmv's alpha takes a host number only)
    eye = torch.eye(n, dtype=y.dtype, device=y.device)
    W = eye / (dt * gamma) - J if host or J.dim() == 2 else eye / (dt * gamma).reshape(B, 1, 1) - J
    if n <= UNROLLED_INVERSE and torch.compiler.is_compiling():
        factors, info = _unrolled_inverse(W)
    else:
        factors, info = factorize(W)
    U = torch.zeros(s, N, dtype=y.dtype, device=y.device)
    UT = U.T
    per = None if host else dt.reshape(-1, 1)  # each problem's step, against its (n,) block
    yf = y.reshape(N)
    # Eagerly the rows made once (no indexing op per stage); compiled, indexing is free and one
    # tensor is one guard on each call, not s.
    a_rows = co.a_full if torch.compiler.is_compiling() else co.a_full_rows
    for i in range(s):
        if i == 0:
            rhs = k1.reshape(N)
        else:
            Yi = torch.addmv(yf, UT, a_rows[i])
            F = f(t + co.c[i] * dt, Yi.reshape(shape)).reshape(N)
            if host:
                rhs = torch.addmv(F, UT, co.C_full[i], alpha=1.0 / dt)
            else:
                rhs = F + (torch.mv(UT, co.C_full[i]).reshape(-1, n) / per).reshape(N)
        if T is not None and co.d[i] != 0.0:
            rhs = rhs + (co.d[i] * (dt if host else per) * T.reshape(-1, n)).reshape(N)
        U[i] = solve_factored(factors, rhs if J.dim() == 2 else rhs.reshape(B, n)).reshape(N)
    y1 = new_state(yf.reshape(1, N), co.m_row, U, 1.0).reshape(shape)
    err = torch.mm(co.e_row, U).reshape(shape)
    K = U / dt if host else (U.reshape(s, -1, n) / per.unsqueeze(0)).reshape(s, N)
    return y1, err, K.reshape((s,) + tuple(shape)), _flags(info, J)


def _func_derivatives(
    f: VectorField, t: Any, y: torch.Tensor, with_time: bool = True, batch: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """``(df/dy, df/dt)`` of the flattened state by ``torch.func.jacrev``: what ``torch.compile``
    traces, and what a step recording a graph through ``y`` takes (see
    :func:`_autograd_derivatives`). ``df/dt`` is zero where ``f`` ignores ``t``, ``None`` without
    ``with_time`` or a tensor ``t`` (the time is not differentiated).

    ``batch``: ``y`` is ``(B, ...)``, ``B`` independent systems at their own times ``t`` (``(B,)``),
    and the result each one's ``(B, n, n)`` and ``(B, n)``. Since no problem's derivative depends
    on another's state, the Jacobian of the batch's sum ``sum_b f_b`` holds them all: ``n``
    backward passes whatever ``B``, not ``B n``."""
    B = y.shape[0] if batch else 1
    n = y.numel() // B
    out = (lambda v: v.reshape(B, n).sum(0)) if batch else (lambda v: v.reshape(n))  # noqa: E731
    if with_time and isinstance(t, torch.Tensor):
        J, T = torch.func.jacrev(lambda tt, x: out(f(tt, x)), argnums=(1, 0))(t.detach(), y)
    else:
        J, T = torch.func.jacrev(lambda x: out(f(t, x)))(y), None
    return _per_system(J, T, B, n, batch)


def _per_system(
    J: torch.Tensor, T: torch.Tensor | None, B: int, n: int, batch: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Derivative rows ``d f_i`` (``J``: ``(n, *y.shape)``; ``T``: ``(n, *t.shape)`` or ``None``) as
    the ``(n, n)`` Jacobian and ``(n,)`` time derivative, or with ``batch`` each of the ``B``
    systems' ``(B, n, n)`` and ``(B, n)`` (row ``i`` of every system's at once: ``(n, B, n)``)."""
    if not batch:
        return J.reshape(n, n), None if T is None else T.reshape(n)
    return J.reshape(n, B, n).transpose(0, 1), None if T is None else T.reshape(n, B).T


def fresh_step(
    f: VectorField, t: torch.Tensor, y: torch.Tensor, scalars: torch.Tensor, k1: torch.Tensor, co: _Coefficients,
    gamma: float, parts: Any = False,
) -> tuple[torch.Tensor | None, ...]:  # fmt: skip
    """A step with a fresh Jacobian, no autograd, ``scalars = (dt, rtol, atol)`` a tensor:
    ``(y1, err, K, flags, J, T, e, k_end)`` (:func:`rosenbrock_stages` after
    :func:`_func_derivatives`; ``e`` the error norm :func:`odeflux.control.error_ratio` over
    ``parts``, ``None`` where ``parts`` is ``False``; ``k_end = f(t + dt, y1)``, the next step's
    ``k1`` if this one is accepted, in the same graph). What ``compile=True`` compiles."""
    from ..control import error_ratio

    dt, rtol, atol = scalars.unbind()
    y1, err, K, flags, J, T, k_end = _fresh(f, t, y, dt, k1, co, gamma)
    e = None if parts is False else error_ratio(err, y, y1, rtol, atol, parts)
    return y1, err, K, flags, J, T, e, k_end


def _fresh(
    f: VectorField, t: torch.Tensor, y: torch.Tensor, dt: torch.Tensor, k1: torch.Tensor, co: _Coefficients, gamma: float,
    batch: bool = False,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """The step of :func:`fresh_step` and of :meth:`Rosenbrock.loop_step`: ``(y1, err, K, flags,
    J, T, k_end)``, the Jacobian (each problem's, with ``batch``) by :func:`_func_derivatives`
    where compiled, else by :func:`_autograd_derivatives`; ``k_end = f(t + dt, y1)``."""
    if torch.compiler.is_compiling():
        J, T = _func_derivatives(f, t, y, batch=batch)
    else:  # (a per-sample solve's host loop: one forward and one batched backward pass, faster than jacrev eagerly)
        J, T = _autograd_derivatives(f, t, y, k1, True, batch)
    y1, err, K, flags = rosenbrock_stages(f, t, y, dt, k1, co, gamma, J, T)
    return y1, err, K, flags, J, T, f(t + dt, y1)


_COMPILED_FRESH: Callable | None = None


def compiled_fresh_step() -> Callable:
    """:func:`fresh_step` under ``torch.compile(fullgraph=True)``, built once per process (the
    step size a 0-d tensor: no recompilation as it changes)."""
    global _COMPILED_FRESH
    if _COMPILED_FRESH is None:
        from ..compiled.program import compile_lifting_scalars  # (a 0-d time traced once, not twice)

        _COMPILED_FRESH = compile_lifting_scalars(fresh_step, "fresh_step", fullgraph=True, dynamic=False, options={"cpp_wrapper": True})
    return _COMPILED_FRESH


def _autograd_derivatives(
    f: VectorField, t: Any, y: torch.Tensor, k1: torch.Tensor, with_time: bool, batch: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(df/dy, df/dt)`` of the flattened state by autograd: one forward pass, the ``n`` backward
    passes batched (row by row where ``f``'s backward cannot be batched). While a graph is being
    recorded (grad mode on, and ``k1 = f(t, y)`` or ``y`` part of it) they are built with ``create_graph=True`` and stay differentiable in
    ``y`` and the field's parameters; otherwise detached. ``batch``: each of ``B`` independent
    systems' ``(B, n, n)`` and ``(B, n)``, as :func:`_func_derivatives` gives them."""
    B = y.shape[0] if batch else 1
    n = y.numel() // B
    graph = torch.is_grad_enabled() and (y.requires_grad or k1.requires_grad)
    time_tensor = with_time and isinstance(t, torch.Tensor)
    if graph and y.requires_grad:
        # (torch.autograd.grad walks the whole graph behind its outputs before it runs: from a y
        # that carries the solve's history each step would cost as much as all the steps before
        # it. torch.func.jacrev differentiates f at a level of its own, its Jacobian still
        # recorded in y's and the parameters' graph.)
        try:
            return _func_derivatives(f, t, y, time_tensor, batch)
        except Exception:  # (a field torch.func cannot take, such as an autograd.Function without vmap: as below)
            pass
    with torch.enable_grad():
        x = y if (graph and y.requires_grad) else y.detach().requires_grad_(True)
        tt = t.detach().requires_grad_(True) if time_tensor else t
        out = f(tt, x)
        inputs = (x, tt) if time_tensor else (x,)
        if not out.requires_grad:
            return torch.zeros((B, n, n) if batch else (n, n), dtype=y.dtype, device=y.device), None
        # (row i of every system at once: e_i in each system's block, as its derivative reaches no other)
        eye = torch.eye(n, dtype=out.dtype, device=out.device).unsqueeze(1).expand(n, B, n).reshape((n,) + tuple(out.shape))
        try:
            grads = torch.autograd.grad(out, inputs, eye, is_grads_batched=True, allow_unused=True, create_graph=graph)
        except RuntimeError:  # a backward vmap cannot batch (a custom autograd.Function): row by row
            per_row = [torch.autograd.grad(out, inputs, e, retain_graph=True, allow_unused=True, create_graph=graph) for e in eye]
            grads = tuple(None if per_row[0][k] is None else torch.stack([r[k] for r in per_row]) for k in range(len(inputs)))
    Jrows = grads[0] if grads[0] is not None else torch.zeros((n,) + tuple(y.shape), dtype=y.dtype, device=y.device)
    J, T = _per_system(Jrows, grads[1] if time_tensor else None, B, n, batch)
    if not graph:
        J = J.detach()
        T = None if T is None else T.detach()
    return J, T
