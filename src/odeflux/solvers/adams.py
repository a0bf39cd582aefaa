"""Fixed-step Adams methods: explicit Adams-Bashforth, and the Adams-Moulton predictor-corrector.

An Adams method of order ``p`` integrates the polynomial through the last ``p`` derivative values
over the next step. Its weights are computed here, exactly (in rationals), from that definition:
no table. The methods are multistep, so the derivative history belongs to one integration: each
integration gets its own :class:`AdamsStepper` (:meth:`Solver.stepper`), and one solver object may
run in several solves at once (a forward solve and an adjoint's backward solve, say).

Steps, with ``h`` fixed (``dt0``):

- the first ``p - 1`` steps, while the history builds, and any step of another size (the last
  step, shortened to land on ``t1``, unless only round-off shortened it) are Runge-Kutta steps:
  classic RK4 for ``p <= 5``, whose local error ``O(h^5)`` on a bounded number of steps keeps the
  global order ``p``; Dopri8's 8th-order step above;
- then Adams-Bashforth: ``y1 = y0 + h sum_j beta_j f_{n-j}`` (one evaluation, ``f(t1, y1)``);
- or Adams-Moulton: predict with Adams-Bashforth of order ``p``, then correct
  ``y1 = y0 + h (beta*_0 f(t1, y1) + sum_j beta*_j f_{n+1-j})`` by fixed-point iteration (see
  :class:`AdamsMoulton`), and evaluate ``f(t1, y1)`` once more for the history (PE(CE)^m).

Dense output: the cubic Hermite interpolant through ``(y_n, f_n)`` and ``(y_{n+1}, f_{n+1})``,
written as ``y_n + h sum_i b_i(theta) K_i`` with ``K = [f_n, (y_{n+1} - y_n) / h, f_{n+1}]``
(4th-order accurate between steps, whatever ``p``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from ..control import error_ratio
from .dopri8 import Dopri8
from .rk4 import RK4
from .tableau import ButcherTableau, ExplicitRK, Solver, StepResult, VectorField, new_state, polynomial_weights

#: The highest order offered (the Dopri8 start keeps up to order 8).
MAX_ORDER = 8
# Steps whose sizes differ by less than this, relatively, count as equal (round-off of the times).
_SAME_STEP = 1e-12

__all__ = ["MAX_ORDER", "AdamsBashforth", "AdamsMoulton", "AdamsStepper", "adams_weights"]


def adams_weights(nodes: Sequence[int]) -> tuple[Fraction, ...]:
    """Weights ``w_j`` with ``int_0^1 q(s) ds = sum_j w_j q(nodes[j])`` for every polynomial ``q`` of
    degree below ``len(nodes)`` (``s`` in steps from ``t_n``): the moment equations
    ``sum_j w_j s_j^k = 1 / (k + 1)``, solved exactly by Gaussian elimination on rationals.

    Adams-Bashforth of order ``p`` takes the nodes ``0, -1, ..., -(p - 1)``; Adams-Moulton
    ``1, 0, ..., -(p - 2)``.
    """
    p = len(nodes)
    rows = [[Fraction(s) ** k for s in nodes] + [Fraction(1, k + 1)] for k in range(p)]
    for col in range(p):
        pivot = next(r for r in range(col, p) if rows[r][col] != 0)
        rows[col], rows[pivot] = rows[pivot], rows[col]
        for r in range(p):
            if r != col and rows[r][col] != 0:
                ratio = rows[r][col] / rows[col][col]
                rows[r] = [a - ratio * b for a, b in zip(rows[r], rows[col])]
    return tuple(rows[j][p] / rows[j][j] for j in range(p))


def _hermite_tableau(name: str, order: int) -> ButcherTableau:
    """The layout of an Adams step's ``K = [f_n, D, f_{n+1}]`` (``D = (y_{n+1} - y_n) / h``) and
    its cubic Hermite dense output ``y_n + h [(θ - 2θ² + θ³) f_n + (3θ² - 2θ³) D + (θ³ - θ²) f_{n+1}]``.
    (``c`` only places the rows in the step; ``b`` reads ``y_{n+1} = y_n + h D`` back.)"""
    e = np.eye(3)
    interp = polynomial_weights([([1.0, -2.0, 1.0], e[0]), ([0.0, 3.0, -2.0], e[1]), ([0.0, -1.0, 1.0], e[2])], 3)
    return ButcherTableau(
        name=name, order=order, c=(0.0, 1.0, 1.0), a=((), (0.0,), (0.0, 0.0)), b=(0.0, 1.0, 0.0), b_err=None,
        interp=interp, interp_order=3,
    )  # fmt: skip


@dataclass(eq=False)
class _Adams(Solver):
    """What the two Adams solvers share: order, start, dense output, the stepper hook."""

    order: int = 4
    tableau: ButcherTableau = field(init=False, repr=False)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    adaptive: ClassVar[bool] = False
    fsal: ClassVar[bool] = True  # K[-1] is f(t1, y1): the next step's f_n and the history's newest entry

    def __post_init__(self) -> None:
        name = type(self).__name__
        if isinstance(self.order, bool) or not isinstance(self.order, int) or not 1 <= self.order <= MAX_ORDER:
            raise ValueError(f"{name}: order must be an integer from 1 to {MAX_ORDER}, got {self.order!r}")
        self.tableau = _hermite_tableau(name, self.order)
        # Each step of the start must be accurate enough to keep the method's global order.
        self._starter: ExplicitRK = RK4() if self.order <= 5 else Dopri8()
        self._bashforth = adams_weights([-j for j in range(self.order)])

    @property
    def error_order(self) -> int:
        return self.order

    def weights(self, key: str, values: Sequence[Fraction], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``values`` as a ``(1, len)`` tensor, made once per dtype and device."""
        ck = ("adams", key, dtype, device)
        w = self._cache.get(ck)
        if w is None:
            w = self._cache[ck] = torch.tensor([[float(v) for v in values]], dtype=dtype, device=device)
        return w

    def stepper(self, rtol: float, atol: float) -> AdamsStepper:
        """A fresh stepper, with an empty history, for one integration."""
        return AdamsStepper(self, rtol, atol)

    def correct(
        self, stepper: AdamsStepper, f: VectorField, t1: Any, y: torch.Tensor, dt: float, y_pred: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        """The corrected state from the predicted one, and the evaluations it took."""
        return y_pred, 0


@dataclass(eq=False)
class AdamsBashforth(_Adams):
    """Explicit Adams-Bashforth of order ``order`` (1 to 8; torchdiffeq's ``explicit_adams``), fixed
    steps of ``dt0``: one evaluation of ``f`` per step once the history is built (see
    :mod:`odeflux.solvers.adams` for the start). Cheap per step, but its stability region shrinks
    with the order: not for stiff problems."""


@dataclass(eq=False)
class AdamsMoulton(_Adams):
    """The Adams-Bashforth-Moulton predictor-corrector of order ``order`` (1 to 8; torchdiffeq's
    ``implicit_adams`` and ``fixed_adams``), fixed steps of ``dt0``.

    The Adams-Bashforth prediction is corrected by fixed-point iteration of the implicit
    Adams-Moulton formula, each correction one evaluation of ``f``: with ``until_converged=True``
    (default) up to ``max_iters`` corrections, stopping once a correction changes the state by
    less than the solve's ``rtol``/``atol`` (scaled RMS norm at most 1; one host read per
    correction); with ``until_converged=False`` exactly ``max_iters`` (``max_iters=1``: the classic
    PECE scheme, no host read). Either way ``f(t1, y1)`` is evaluated once more for the history.
    The iteration converges for ``|h| * beta*_0 * Lipschitz(f) < 1``: not for stiff problems.
    """

    max_iters: int = 4
    until_converged: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.max_iters, bool) or not isinstance(self.max_iters, int) or self.max_iters < 1:
            raise ValueError(f"AdamsMoulton: max_iters must be a positive integer, got {self.max_iters!r}")
        self._moulton = adams_weights([1 - j for j in range(self.order)])

    def correct(
        self, stepper: AdamsStepper, f: VectorField, t1: Any, y: torch.Tensor, dt: float, y_pred: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        p, n = self.order, y.numel()
        beta0 = float(self._moulton[0])
        # The part of the corrector the iteration leaves fixed: y_n + h sum_{j>=1} beta*_j f_{n+1-j}.
        if p > 1:
            w = self.weights("moulton", self._moulton[1:], y.dtype, y.device)
            F = torch.stack(stepper.history[: p - 1]).reshape(p - 1, n)
            base = torch.addmm(y.reshape(1, n), w, F, alpha=dt).reshape(y.shape)
        else:
            base = y
        y_it, evals = y_pred, 0
        for _ in range(self.max_iters):
            y_new = base + (dt * beta0) * f(t1, y_it)
            evals += 1
            if self.until_converged:
                with torch.no_grad():
                    change = float(error_ratio(y_new - y_it, y_it, y_new, stepper.rtol, stepper.atol))
                y_it = y_new
                if change <= 1.0:
                    break
            else:
                y_it = y_new
        return y_it, evals


class AdamsStepper:
    """One integration's Adams steps: the derivative history (newest first, spaced by ``h``)
    lives here. The history applies only to the step that continues the last one (from the very
    ``y1`` it returned) with the same step size; any other step starts it afresh."""

    def __init__(self, solver: _Adams, rtol: float, atol: float):
        self.solver, self.rtol, self.atol = solver, rtol, atol
        self.history: list[torch.Tensor] = []
        self.h = math.nan
        self._last_y: torch.Tensor | None = None
        self._evals = 0

    def step(self, f: VectorField, t: Any, y: torch.Tensor, dt: float, k1: torch.Tensor, co: Any = None) -> StepResult:
        solver, p = self.solver, self.solver.order
        # (A last step that lands on t1 differs from the others by the rounding of t0 + n h alone:
        # it keeps the history, at a relative error far below any step's.)
        if y is not self._last_y or abs(dt - self.h) > _SAME_STEP * abs(self.h):
            self.history, self.h = [k1], dt
        t1 = t + dt
        if len(self.history) >= p:
            n = y.numel()
            w = solver.weights("bashforth", solver._bashforth, y.dtype, y.device)
            F = torch.stack(self.history[:p]).reshape(p, n)
            y1 = new_state(y.reshape(1, n), w, F, dt).reshape(y.shape)
            y1, evals = solver.correct(self, f, t1, y, dt, y1)
            f1 = f(t1, y1)
            evals += 1
        else:  # building the history (or a step of another size): a Runge-Kutta step
            starter = solver._starter
            res = starter.step(f, t, y, dt, k1)
            y1, evals = res.y1, starter.evaluations(res.K)
            if starter.fsal:
                f1 = res.K[-1]
            else:
                f1 = f(t1, y1)
                evals += 1
        self.history = [f1] + self.history[: p - 1]
        self._last_y, self._evals = y1, evals
        K = torch.stack([k1, (y1 - y) / dt, f1])
        return StepResult(y1, None, K)

    def evaluations(self, K: torch.Tensor) -> int:
        return self._evals
