"""Butcher tableaus as data, the :class:`Solver` interface every solver implements, and the one
generic explicit Runge-Kutta stepper that runs the tableaus.

:class:`RungeKutta` is the Runge-Kutta kind of solver: :class:`ExplicitRK` runs explicit
tableaus, :class:`odeflux.solvers.implicit.ImplicitRK` implicit ones. Code that only handles
explicit tableaus checks ``solver.tableau_steps`` (or, for a Runge-Kutta solver, ``explicit``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, NamedTuple, Protocol, Sequence

import numpy as np
import torch

from ..control import DEFAULT_PI, ConstantStepSize, StepSizeController

VectorField = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class DenseWeights:
    """The dense-output weights ``interp`` of a tableau (``interp[i][d]``: the coefficient of
    ``theta**(d + 1)`` in ``b_i(theta)``) in the forms dense output and the adjoints use."""

    interp: tuple[tuple[float, ...], ...]
    c: tuple[float, ...]

    @property
    def stages(self) -> int:
        return len(self.c)

    @functools.cached_property
    def interp_reversed(self) -> list[tuple[float, ...]]:
        """Each stage's interpolant coefficients, highest power first (for Horner's rule)."""
        return [row[::-1] for row in self.interp]

    @functools.cached_property
    def _interp_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(exponents 1..deg, interp^T)`` as arrays, made once: the adjoints evaluate the
        weights on every step."""
        P = np.asarray(self.interp, dtype=np.float64)  # (s, deg)
        return np.arange(1, P.shape[1] + 1), P.T.copy()

    def interp_matrix(self, dtype: np.dtype) -> np.ndarray:
        """``interp^T`` (degree x stages) as an array of ``dtype`` (made once per dtype)."""
        cache = self.__dict__.setdefault("_interp_by_dtype", {})
        m = cache.get(dtype)
        if m is None:
            m = cache[dtype] = self._interp_arrays[1].astype(dtype)
        return m

    def dense_weights(self, theta: np.ndarray | float) -> np.ndarray:
        """``b_i(theta)`` for each stage (shape ``(..., stages)``), evaluated in float64."""
        exponents, PT = self._interp_arrays
        return np.asarray(theta, dtype=np.float64)[..., None] ** exponents @ PT


@dataclass(frozen=True)
class ButcherTableau(DenseWeights):
    """Coefficients of an explicit Runge-Kutta method.

    ``a[i]`` holds the ``i`` coefficients of stage ``i`` (row 0 is empty). ``b_err`` holds the
    weights of the error estimate ``dt * sum(b_err[i] * k[i])`` (``None`` for fixed-step methods).
    ``interp[i][d]`` is the coefficient of ``theta**(d + 1)`` in the dense-output weight
    ``b_i(theta)``, so that ``y(t0 + theta * dt) = y0 + dt * sum_i b_i(theta) * k_i``.
    """

    name: str
    order: int
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    b_err: tuple[float, ...] | None
    interp: tuple[tuple[float, ...], ...]
    interp_order: int
    error_order: int | None = None
    fsal: bool = False

    def __post_init__(self) -> None:
        s = len(self.c)
        if len(self.a) != s or any(len(row) != i for i, row in enumerate(self.a)):
            raise ValueError(f"{self.name}: a must be strictly lower triangular with {s} rows")
        if len(self.b) != s or (self.b_err is not None and len(self.b_err) != s) or len(self.interp) != s:
            raise ValueError(f"{self.name}: b, b_err and interp need one entry per stage ({s})")
        if self.fsal and (tuple(self.a[-1]) + (0.0,) != tuple(self.b) or self.c[-1] != 1.0):
            raise ValueError(f"{self.name}: FSAL needs the last stage to be the solution (a[-1] == b, c[-1] == 1)")

    @property
    def adaptive(self) -> bool:
        return self.b_err is not None

    def a_matrix(self) -> np.ndarray:
        s = self.stages
        A = np.zeros((s, s))
        for i, row in enumerate(self.a):
            A[i, : len(row)] = row
        return A


def polynomial_weights(terms: Sequence[tuple[Sequence[float], np.ndarray]], stages: int) -> tuple[tuple[float, ...], ...]:
    """Build ``interp`` rows from a sum of ``polynomial(theta) * stage_weights`` terms.

    Each term is ``(poly, w)``: ``poly`` the coefficients of theta**1, theta**2, ... and ``w`` a
    vector of per-stage weights. Lets an interpolant written in Hermite or Horner form become data.
    """
    deg = max(len(p) for p, _ in terms)
    P = np.zeros((stages, deg))
    for poly, w in terms:
        P[:, : len(poly)] += np.outer(np.asarray(w, dtype=np.float64), poly)
    return tuple(tuple(float(v) for v in row) for row in P)


def hermite_interp(b: Sequence[float], fsal_stage: int) -> tuple[tuple[float, ...], ...]:
    """Cubic Hermite dense output through y0, y1, f(y0) = k_0 and f(y1) = k_{fsal_stage}."""
    s = len(b)
    bv = np.asarray(b, dtype=np.float64)
    e0 = np.eye(s)[0]
    e1 = np.eye(s)[fsal_stage]
    # y(theta) = y0 + theta*D + theta(theta-1)[(1-2theta) D + (theta-1) h f0 + theta h f1],  D = h b.k
    # = y0 + h[ theta b + (-theta + 3theta^2 - 2theta^3)... ] expanded per power below.
    return polynomial_weights(
        [
            ([1.0, 0.0, 0.0], bv),
            ([-1.0, 3.0, -2.0], bv),  # theta(theta-1)(1-2theta) D
            ([1.0, -2.0, 1.0], e0),  # theta(theta-1)^2 h f0
            ([0.0, -1.0, 1.0], e1),  # theta^2(theta-1) h f1
        ],
        s,
    )


class _Coefficients(NamedTuple):
    a_rows: tuple[torch.Tensor, ...]  # a_rows[i]: (1, i) for stage i >= 1
    b_row: torch.Tensor  # (1, s)
    e_row: torch.Tensor | None  # (1, s)
    c: tuple[float, ...]
    interp: torch.Tensor  # (s, deg)


class StepResult(NamedTuple):
    """One Runge-Kutta step: the new state, its error estimate (``None`` for fixed-step methods)
    and the stage derivatives stacked as ``(stages, *state_shape)`` (for dense output and FSAL).
    ``n_evals`` counts the evaluations of ``f`` the step made (``None``: one per stage after the
    first, an explicit step's count)."""

    y1: torch.Tensor
    err: torch.Tensor | None
    K: torch.Tensor
    n_evals: int | None = None


class Stepper(Protocol):
    """How one integration takes its steps (:meth:`Solver.stepper`): an explicit Runge-Kutta
    solver is its own, stateless stepper; a multistep method hands each integration a fresh
    one that keeps that integration's history."""

    def step(
        self, f: VectorField, t: torch.Tensor, y: torch.Tensor, dt: float, k1: torch.Tensor, co: Any
    ) -> StepResult:
        """One step of size ``dt`` from ``(t, y)`` given ``k1 = f(t, y)`` (see :meth:`ExplicitRK.step`)."""
        ...

    def evaluations(self, K: torch.Tensor) -> int:
        """How many evaluations of ``f`` the step that returned ``K`` made (``k1`` not counted)."""
        ...


class Solver:
    """What the integrator, dense output and the sensitivity methods ask of a solver.

    A solver has an ``order``, says whether it is ``adaptive`` (has an error estimate, with
    ``error_order`` for step-size control) and ``fsal`` (the last row of a step's ``K`` is
    ``f(t1, y1)``), and a ``tableau``: the layout of a step's stage matrix ``K`` and its dense
    output ``y(t0 + theta h) = y0 + h sum_i b_i(theta) K_i`` (for a Runge-Kutta method its
    Butcher tableau). Two typed facts say how a solve may run it:

    - ``stepwise``: the integrator's loop takes its steps through :meth:`stepper` (one
      :class:`Stepper` per integration). A solver that integrates whole spans itself (a wrapper
      of another library's integrator) sets it ``False`` and implements :meth:`integrate_span`.
    - ``tableau_steps``: each step is the explicit Runge-Kutta step of ``tableau`` and nothing
      else. The code that re-implements that arithmetic (the NumPy step kernel, the hand-written
      reverse pass, the compiled step) applies only where it is ``True``.
    - ``compiled_steps``: its stepper compiles its own steps under ``compile=True`` (the
      Rosenbrock methods: :meth:`odeflux.solvers.rosenbrock.RosenbrockStepper.compile`).
    - ``adaptive_controller``: the step-size controller of an adaptive solve that names none
      (:meth:`default_controller`).
    - ``loop_steps``: the compiled whole loop (:func:`odeflux.compiled.loop.run_loop`) takes its
      steps through ``loop_step``, ``loop_evaluations``, ``loop_counters`` and ``loop_refusal``
      (the Rosenbrock methods: :meth:`odeflux.solvers.rosenbrock.Rosenbrock.loop_step`).
    """

    stepwise: ClassVar[bool] = True
    tableau_steps: ClassVar[bool] = False
    compiled_steps: ClassVar[bool] = False
    loop_steps: ClassVar[bool] = False

    order: int
    adaptive: bool
    fsal: bool
    error_order: int
    tableau: ButcherTableau
    _cache: dict

    #: The controller of an adaptive solve that names none (the stiff methods: OrdinaryDiffEq's).
    adaptive_controller: ClassVar[StepSizeController] = DEFAULT_PI

    def default_controller(self) -> StepSizeController:
        """The step-size controller of a solve that names none: :attr:`adaptive_controller` for an
        adaptive method, fixed steps of ``dt0`` otherwise."""
        return self.adaptive_controller if self.adaptive else ConstantStepSize()

    def stepper(self, rtol: float, atol: float) -> Stepper:
        """The stepper of one integration at tolerances ``rtol``/``atol`` (``stepwise`` solvers)."""
        raise NotImplementedError(f"{type(self).__name__} takes no steps of odeflux's loop")

    def integrate_span(self, f: VectorField, y0: torch.Tensor, t0: float, t1: float, options: Any) -> Any:
        """The whole integration (``stepwise = False`` solvers): :func:`odeflux.integrator.integrate`'s
        contract, returning an :class:`~odeflux.integrator.IntegrationResult`."""
        raise NotImplementedError(f"{type(self).__name__} is stepped by odeflux's loop")

    def coefficients(self, dtype: torch.dtype, device: torch.device) -> Any:
        """The tableau as tensors of ``dtype`` on ``device``: made once per pair for every
        instance of a solver class with the same tableau (``solve()`` without ``solver=`` makes a
        new ``Tsit5()`` each call; its tensors made anew cost a small compiled solve 0.03 ms)."""
        key = (dtype, device)
        co = self._cache.get(key)
        if co is None:
            tab = self.tableau  # (what make_coefficients reads; a solver's module holds it)
            shared = (type(self), id(tab), dtype, device)
            kept = _SHARED_COEFFICIENTS.get(shared)
            if kept is None or kept[0] is not tab:
                if len(_SHARED_COEFFICIENTS) >= 256:  # (bounded: tableaus made anew for each solver)
                    _SHARED_COEFFICIENTS.clear()
                kept = _SHARED_COEFFICIENTS[shared] = (tab, self.make_coefficients(lambda v: torch.tensor(v, dtype=dtype, device=device)))
            co = self._cache[key] = kept[1]
        return co

    def make_coefficients(self, mk: Callable[[Any], torch.Tensor]) -> Any:
        """The tableau's tensors, ``mk`` making each (a solver with other coefficients overrides this)."""
        tab = self.tableau
        return _Coefficients(
            a_rows=(mk([[0.0]]),) + tuple(mk([list(r)]) for r in tab.a[1:]),
            b_row=mk([list(tab.b)]),
            e_row=None if tab.b_err is None else mk([list(tab.b_err)]),
            c=tab.c,
            interp=mk([list(r) for r in tab.interp]),
        )

    def dense_weights(self, theta: torch.Tensor, co: _Coefficients) -> torch.Tensor:
        """``b_i(theta)`` as a ``(m, stages)`` tensor for fractions ``theta`` of shape ``(m,)``."""
        deg = co.interp.shape[1]
        powers = theta.unsqueeze(-1) ** torch.arange(1, deg + 1, device=theta.device, dtype=theta.dtype)
        return powers @ co.interp.T

    @staticmethod
    def interpolate(y0: torch.Tensor, dt: float, K: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Dense output inside one step: ``y0 + dt * weights @ K`` for ``weights`` of shape
        ``(m, stages)``, returned as ``(m, *state_shape)``."""
        s = K.shape[0]
        out = torch.addmm(y0.reshape(1, -1), weights, K.reshape(s, -1), alpha=dt)
        return out.reshape((weights.shape[0],) + tuple(y0.shape))


#: :meth:`Solver.coefficients` of each (solver class, tableau, dtype, device): the tableau and its tensors.
_SHARED_COEFFICIENTS: dict[tuple, Any] = {}


class RungeKutta(Solver):
    """A Runge-Kutta method: its ``tableau`` (``c``, ``b``, ``stages``, ``order`` and the
    dense-output weights of :class:`DenseWeights`) gives ``order``, ``adaptive``, ``fsal`` and
    the dense output; it is the stateless stepper of every integration it runs.

    ``explicit`` is the one fact that code written for explicit, strictly lower triangular
    tableaus (stage plans; through ``tableau_steps`` the NumPy step kernel, the hand-written
    reverse pass and the compiled step) checks before it takes a solver on.
    """

    tableau: Any
    explicit: ClassVar[bool]

    @property
    def order(self) -> int:
        return self.tableau.order

    @property
    def adaptive(self) -> bool:
        return self.tableau.adaptive

    @property
    def fsal(self) -> bool:
        return self.tableau.fsal

    @property
    def error_order(self) -> int:
        """The order used by step-size control (OrdinaryDiffEq uses the method's order)."""
        return self.tableau.order

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def stepper(self, rtol: float, atol: float) -> RungeKutta:
        return self

    def evaluations(self, K: torch.Tensor) -> int:
        return K.shape[0] - 1  # one per stage after the first (k1 is given)

    def step(
        self, f: VectorField, t: torch.Tensor, y: torch.Tensor, dt: float, k1: torch.Tensor, co: Any = None
    ) -> StepResult:
        """One step of size ``dt`` from ``(t, y)``, given ``k1 = f(t, y)``."""
        raise NotImplementedError


@dataclass(eq=False)
class ExplicitRK(RungeKutta):
    """An explicit Runge-Kutta solver defined by its tableau. Subclasses only supply the data."""

    tableau: ButcherTableau = field(repr=False)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    tableau_steps: ClassVar[bool] = True
    explicit: ClassVar[bool] = True

    __repr__ = RungeKutta.__repr__  # (not the dataclass's)

    def step(
        self,
        f: VectorField,
        t: torch.Tensor,
        y: torch.Tensor,
        dt: float,
        k1: torch.Tensor,
        co: _Coefficients | None = None,
        solution_only: bool = False,
    ) -> StepResult:
        """Take one step of size ``dt`` from ``(t, y)``, given ``k1 = f(t, y)``.

        ``solution_only``: the new state is all the caller reads (a reverse pass taking the step
        again), so an FSAL method's last stage, ``f`` at the new state, is not evaluated: ``K``
        then lacks it and the error estimate is ``None``.

        ``t`` is a 0-d tensor, ``dt`` a Python float. Pure tensor code (no host synchronisation,
        no in-place writes), so it is differentiable and traces under
        ``torch.compile(fullgraph=True)``. Each stage costs one ``f`` call, one stack and one
        fused multiply-add over all previous stages.
        """
        if co is None:
            co = self.coefficients(y.dtype, y.device)
        shape = y.shape
        n = y.numel()
        yrow = y.reshape(1, n)
        ks = [k1]
        s = len(co.c)
        yi = y
        # Eager mode passes dt as addmm's alpha (no extra op per stage). torch.compile would have to
        # specialise on a Python-number alpha and recompile for every new step size, so there dt
        # scales the coefficient rows instead.
        compiling = _is_compiling()
        fsal = self.tableau.fsal
        if compiling or isinstance(dt, torch.Tensor):
            return self._traced_step(f, t, y, dt, ks, co)
        for i in range(1, s):
            K = torch.stack(ks).reshape(i, n)
            if fsal and i == s - 1:  # the new state itself
                yi = new_state(yrow, co.a_rows[i], K, dt, compiling).reshape(shape)
                if solution_only:
                    return StepResult(yi, None, torch.stack(ks))
            elif compiling:
                yi = torch.addmm(yrow, co.a_rows[i] * dt, K).reshape(shape)
            else:
                yi = torch.addmm(yrow, co.a_rows[i], K, alpha=dt).reshape(shape)
            ks.append(f(t + co.c[i] * dt, yi))
        K = torch.stack(ks)
        Kf = K.reshape(s, n)
        if fsal:
            y1 = yi
        else:
            y1 = new_state(yrow, co.b_row, Kf, dt, compiling).reshape(shape)
        err = None
        if co.e_row is not None:
            if compiling:
                err = torch.mm(co.e_row * dt, Kf).reshape(shape)
            else:
                err = torch.addmm(yrow, co.e_row, Kf, beta=0.0, alpha=dt).reshape(shape)
        return StepResult(y1, err, K)


    def _traced_step(self, f: VectorField, t: torch.Tensor, y: torch.Tensor, dt: Any, ks: list, co: _Coefficients) -> StepResult:
        """:meth:`step` as ``torch.compile`` traces it: each stage's sum written out over the
        tableau's nonzero coefficients (constants of the graph), which the compiler fuses with
        ``f``'s pointwise work, where an ``addmm`` per stage would be a separate library call. Also
        the step for a tensor ``dt`` (0-d, or ``(B,)`` for the loop's ``B`` problems), outside
        the compiler too."""
        tab = self.tableau
        # A (B,) dt (the compiled loop's B problems, y of shape (B, ...)) scales each problem's state.
        dy = dt.reshape(dt.shape + (1,) * (y.dim() - 1)) if isinstance(dt, torch.Tensor) and dt.dim() == 1 else dt
        yi = y
        for i in range(1, len(co.c)):
            yi = _plus(y, dy, ks, tab.a[i])
            ks.append(f(t + co.c[i] * dt, yi))
        y1 = yi if tab.fsal else _plus(y, dy, ks, tab.b)
        err = None if tab.b_err is None else dy * _stage_sum(ks, tab.b_err, y)
        return StepResult(y1, err, torch.stack(ks))


def _stage_sum(ks: list, row: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """``sum_j row[j] k_j`` over the nonzero coefficients."""
    out = None
    for k, c in zip(ks, row):
        if c != 0.0:
            out = k * c if out is None else out + k * c
    return torch.zeros_like(like) if out is None else out


def _plus(y: torch.Tensor, dt: Any, ks: list, row: Sequence[float]) -> torch.Tensor:
    """``y + dt * sum_j row[j] k_j``: the stages summed apart from ``y`` (one rounding at its scale)."""
    return y + dt * _stage_sum(ks, row, y)


def new_state(yrow: torch.Tensor, row: torch.Tensor, K: torch.Tensor, dt: float, compiling: bool = False) -> torch.Tensor:
    """``y + dt * (row @ K)`` with the stages summed apart from ``y``: one rounding at ``y``'s
    scale. An ``addmm`` into ``y`` may round at that scale once per stage, and a float32 state
    then drifts by up to stages x ulp(y) a step (4x a fixed-step RK4's drift, measured)."""
    if compiling:
        return yrow + torch.mm(row * dt, K)
    return torch.add(yrow, torch.mm(row, K), alpha=dt)


def _not_compiling() -> bool:
    return False


# torch.compiler.is_compiling is public from torch 2.3; the package supports torch >= 2.2.
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", _not_compiling)
