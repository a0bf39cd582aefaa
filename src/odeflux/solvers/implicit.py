"""Implicit Runge-Kutta methods: the tableau as data, and one generic fixed-step solver that
solves the stage equations by simplified Newton.

A step from ``(t, y)`` of size ``h`` solves, for the stage increments ``Z_i = Y_i - y``,

    Z_i = h sum_j a_ij f(t + c_j h, y + Z_j),

then ``K_i = f(t + c_i h, y + Z_i)`` and ``y1 = y + h sum_i b_i K_i``. The Newton matrix is built
once per step from the Jacobian ``J`` of ``f`` at ``(t, y)`` (simplified Newton): ``I - h A (x) J``
for a full tableau (Radau IIA, Gauss-Legendre: one coupled system of ``stages * n`` unknowns),
``I - h a_ii J`` stage by stage for a diagonally implicit one (SDIRK, ESDIRK). ``J`` is a
constant of the iteration (detached), so backpropagating through the iterations (DirectAdjoint)
differentiates the converged stages: the iteration map's fixed point does not depend on ``J``.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, NamedTuple, Sequence

import numpy as np
import torch

from .tableau import DenseWeights, RungeKutta, StepResult

VectorField = Callable[[Any, torch.Tensor], torch.Tensor]

__all__ = [
    "ImplicitRK", "ImplicitTableau", "JacobianSource", "NewtonFailure", "collocation", "jacobian",
]  # fmt: skip


class NewtonFailure(RuntimeError):
    """An implicit step's Newton iteration did not converge; the integrator ends the solve with
    ``Status.NEWTON_FAILED`` and this message."""


class JacobianSource(abc.ABC):
    """A right-hand side that gives implicit steps its own Jacobian (the continuous adjoints'
    systems, whose evaluations autograd cannot differentiate).

    ``jacobian(t, y)`` returns an ``(m, m)`` matrix: the derivatives of the first ``m`` entries of
    ``f(t, y)`` (flattened) with respect to the first ``m`` entries of ``y``. The entries past ``m``
    (the state's tail, an adjoint's parameter block) are taken to have no Jacobian: their
    derivatives must not depend on themselves. An approximation serves: the simplified Newton
    iteration converges to the same stages, only its rate depends on how good ``J`` is.
    """

    @abc.abstractmethod
    def jacobian(self, t: Any, y: torch.Tensor) -> torch.Tensor: ...


def jacobian(f: VectorField, t: Any, y: torch.Tensor) -> torch.Tensor:
    """``d f(t, y) / d y`` as a detached ``(n, n)`` matrix of the flattened state (row ``i``: the
    gradient of ``f``'s entry ``i``), by autograd on a detached copy of ``y``: one forward pass and
    the ``n`` backward passes batched (one at a time where ``f``'s backward cannot be batched).
    Works under ``torch.no_grad()``. Zero where ``f``'s output does not reach ``y`` through
    autograd (a field computed outside torch should say its Jacobian: :class:`JacobianSource`)."""
    n = y.numel()
    if isinstance(t, torch.Tensor):
        t = t.detach()
    with torch.enable_grad():
        x = y.detach().requires_grad_(True)
        out = f(t, x)
        if not out.requires_grad:  # f does not depend on y (nor on anything requiring grad)
            return torch.zeros(n, n, dtype=y.dtype, device=y.device)
        eye = torch.eye(n, dtype=out.dtype, device=out.device).reshape((n,) + tuple(out.shape))
        try:
            (rows,) = torch.autograd.grad(out, x, eye, is_grads_batched=True, allow_unused=True)
        except RuntimeError:  # a backward vmap cannot batch (a custom autograd.Function): row by row
            rows = [torch.autograd.grad(out, x, e, retain_graph=True, allow_unused=True)[0] for e in eye]
            rows = None if rows[0] is None else torch.stack(rows)
    if rows is None:  # out requires grad through parameters alone
        return torch.zeros(n, n, dtype=y.dtype, device=y.device)
    return rows.detach().reshape(n, n)


@dataclass(frozen=True)
class ImplicitTableau(DenseWeights):
    """Coefficients of an implicit Runge-Kutta method (fixed step, no error estimate).

    ``a`` is the full ``stages x stages`` matrix, row by row. ``interp`` holds the dense-output
    weights on the stage derivatives as in :class:`odeflux.solvers.ButcherTableau`:
    ``y(t0 + theta h) = y0 + h sum_i b_i(theta) K_i`` with ``interp[i][d]`` the coefficient of
    ``theta**(d + 1)`` in ``b_i(theta)``.
    """

    name: str
    order: int
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    interp: tuple[tuple[float, ...], ...]
    interp_order: int

    # What the integrator and the tests read of any tableau: no error estimate, no FSAL.
    b_err: ClassVar[None] = None
    error_order: ClassVar[None] = None
    fsal: ClassVar[bool] = False
    adaptive: ClassVar[bool] = False

    def __post_init__(self) -> None:
        s = len(self.c)
        if len(self.a) != s or any(len(row) != s for row in self.a):
            raise ValueError(f"{self.name}: a must be a full {s} x {s} matrix (one row of {s} per stage)")
        if len(self.b) != s or len(self.interp) != s:
            raise ValueError(f"{self.name}: b and interp need one entry per stage ({s})")
        A = self.a_matrix()
        if not np.triu(A, 1).any() and not np.diag(A).any():
            raise ValueError(f"{self.name}: a is strictly lower triangular: use ButcherTableau and ExplicitRK")

    def a_matrix(self) -> np.ndarray:
        return np.array(self.a, dtype=np.float64)

    @property
    def diagonally_implicit(self) -> bool:
        """Whether ``a`` is lower triangular: the stages can then be solved one at a time."""
        return not np.triu(self.a_matrix(), 1).any()


def collocation(c: Sequence[float]) -> tuple[np.ndarray, np.ndarray, tuple[tuple[float, ...], ...]]:
    """``(A, b, interp)`` of the collocation method on the nodes ``c``: with ``l_j`` the Lagrange
    polynomials on ``c``, ``a_ij = int_0^{c_i} l_j``, ``b_j = int_0^1 l_j`` and the dense output
    ``b_j(theta) = int_0^theta l_j`` (the collocation polynomial, of stage order ``len(c)``)."""
    cv = np.asarray(c, dtype=np.float64)
    s = len(cv)
    # Column j of P: l_j's coefficients of tau^0..tau^(s-1) (V P = I, V the Vandermonde matrix).
    P = np.linalg.solve(np.vander(cv, s, increasing=True), np.eye(s))
    interp = P.T / np.arange(1, s + 1)  # row j: coefficients of theta^1..theta^s of int_0^theta l_j
    powers = cv[:, None] ** np.arange(1, s + 1)
    A = powers @ interp.T
    b = interp.sum(axis=1)
    return A, b, tuple(tuple(float(v) for v in row) for row in interp)


class _Coefficients(NamedTuple):
    A: torch.Tensor  # (s, s)
    b_row: torch.Tensor  # (1, s)
    c: tuple[float, ...]
    c_col: torch.Tensor  # (s, 1)
    interp: torch.Tensor  # (s, deg)


@dataclass(eq=False)
class ImplicitRK(RungeKutta):
    """An implicit Runge-Kutta solver defined by its tableau: fixed steps (give ``dt0``), the
    stage equations solved by simplified Newton with a dense Jacobian of ``f`` per step.

    ``max_iters`` caps the Newton iterations of a step (or of a stage, stage by stage);
    ``newton_tol`` is the relative accuracy they stop at, against the state's scale (default:
    32 units of round-off of the state's dtype). A step whose iteration does not converge ends
    the solve with ``Status.NEWTON_FAILED`` (a ``SolveError`` unless ``throw=False``).
    """

    tableau: ImplicitTableau = field(repr=False)
    max_iters: int = 30
    newton_tol: float | None = None
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    explicit: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_iters, int) or self.max_iters < 1:
            raise ValueError(f"{type(self).__name__}: max_iters must be a positive integer, got {self.max_iters!r}")
        if self.newton_tol is not None and not (0 < self.newton_tol < 1):
            raise ValueError(f"{type(self).__name__}: newton_tol must lie in (0, 1), got {self.newton_tol!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def coefficients(self, dtype: torch.dtype, device: torch.device) -> _Coefficients:
        key = (dtype, device)
        co = self._cache.get(key)
        if co is None:
            tab = self.tableau
            mk = lambda v: torch.tensor(v, dtype=dtype, device=device)  # noqa: E731
            co = self._cache[key] = _Coefficients(
                A=mk([list(r) for r in tab.a]), b_row=mk([list(tab.b)]), c=tab.c, c_col=mk([[v] for v in tab.c]),
                interp=mk([list(r) for r in tab.interp]),
            )
        return co

    def step(
        self, f: VectorField, t: Any, y: torch.Tensor, dt: float, k1: torch.Tensor, co: _Coefficients | None = None
    ) -> StepResult:
        """One step of size ``dt`` from ``(t, y)``, given ``k1 = f(t, y)``; differentiable through
        the Newton iterations. Raises :class:`NewtonFailure` if they do not converge."""
        if co is None:
            co = self.coefficients(y.dtype, y.device)
        run = _NewtonStep(self, f, t, y, dt, k1, co)
        K = run.stages_by_one() if self.tableau.diagonally_implicit else run.coupled()
        n = y.numel()
        y1 = torch.addmm(y.reshape(1, n), co.b_row, K.reshape(K.shape[0], n), alpha=dt).reshape(y.shape)
        return StepResult(y1, None, K, run.n_evals)


class _NewtonStep:
    """One implicit step's Newton iterations (state flattened to ``n`` entries, the Jacobian's
    block to the first ``m``)."""

    def __init__(
        self, solver: ImplicitRK, f: VectorField, t: Any, y: torch.Tensor, dt: float, k1: torch.Tensor,
        co: _Coefficients,
    ):  # fmt: skip
        self.solver, self.f, self.t, self.dt, self.co = solver, f, t, dt, co
        self.shape, self.n = y.shape, y.numel()
        self.y, self.k1 = y.reshape(-1), k1.reshape(-1)
        self.n_evals = 0
        if isinstance(f, JacobianSource):
            self.J = f.jacobian(t, y).detach().contiguous()
        else:
            self.J = jacobian(f, t, y)
            self.n_evals += 1  # its forward pass
        self.m = self.J.shape[0]
        eps = torch.finfo(y.dtype).eps
        self.tol = solver.newton_tol if solver.newton_tol is not None else 32 * eps
        # Below this the updates are round-off: an iteration that stops contracting there has converged.
        self.noise = max(self.tol, 1024 * eps)
        self.y_scale = float(y.detach().abs().max())

    def evaluate(self, i: int, Y: torch.Tensor) -> torch.Tensor:
        self.n_evals += 1
        return self.f(self.t + self.co.c[i] * self.dt, Y.reshape(self.shape)).reshape(-1)

    def factor(self, M: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        LU, pivots, info = torch.linalg.lu_factor_ex(M)
        if int(info) != 0:
            raise NewtonFailure(self.message(what, "has a singular Newton matrix (I - h a J)"))
        return LU, pivots

    def newton_update(self, lu: tuple[torch.Tensor, torch.Tensor], R: torch.Tensor) -> torch.Tensor:
        """``M^-1 R`` for residuals ``R`` of shape ``(rows, n)``: the head through the LU factors
        of ``M`` (``rows * m`` unknowns), the tail as it is (it has no Jacobian)."""
        rows, m = R.shape[0], self.m
        head = torch.linalg.lu_solve(*lu, R[:, :m].reshape(rows * m, 1)).reshape(rows, m)
        return head if m == self.n else torch.cat([head, R[:, m:]], dim=1)

    def converged(self, it: int, dZ: torch.Tensor, Z: torch.Tensor, prev: list[float], what: str) -> bool:
        """Whether the iteration has converged after update ``dZ`` (one host read per iteration)."""
        d, z = (float(v) for v in torch.stack([dZ.detach().abs().max(), Z.detach().abs().max()]).tolist())
        scale = max(self.y_scale, z)
        r = d / scale if scale > 0 else d
        if not math.isfinite(r):
            raise NewtonFailure(self.message(what, f"produced NaN or Inf at iteration {it + 1}"))
        if r <= self.tol:
            return True
        if prev:
            theta = r / prev[-1]
            if theta < 1 and theta / (1 - theta) * r <= self.tol:  # the rest of a geometric series
                return True
            if theta >= 1:
                if r <= self.noise:  # round-off: it cannot get closer
                    return True
                if len(prev) >= 2 and prev[-1] / prev[-2] >= 1:
                    raise NewtonFailure(self.message(what, f"diverges (update {r:.3g} of the state's scale, growing)"))
        prev.append(r)
        if it + 1 == self.solver.max_iters:
            why = f"did not converge in max_iters={self.solver.max_iters} iterations (last update {r:.3g} of the scale)"
            raise NewtonFailure(self.message(what, why))
        return False

    def message(self, what: str, why: str) -> str:
        t = float(self.t)
        return (
            f"{type(self.solver).__name__}: Newton's iteration for {what} at t={t:.6g} (dt={self.dt:.3g}) {why}: "
            "reduce dt0, or raise max_iters"
        )

    def coupled(self) -> torch.Tensor:
        """All stages at once: ``stages * m`` unknowns, one LU factorisation per step."""
        co, dt, m = self.co, self.dt, self.m
        s = len(co.c)
        A = co.A
        M = torch.eye(s * m, dtype=A.dtype, device=A.device) - dt * torch.kron(A, self.J)
        lu = self.factor(M, "the stages")
        Z = (co.c_col * dt) * self.k1.unsqueeze(0)  # explicit Euler to each node
        prev: list[float] = []
        for it in range(self.solver.max_iters):
            Y = self.y.unsqueeze(0) + Z
            F = torch.stack([self.evaluate(i, Y[i]) for i in range(s)])
            R = Z - dt * (A @ F)
            dZ = self.newton_update(lu, R)
            Z = Z - dZ
            if self.converged(it, dZ, Z, prev, "the stages"):
                break
        Y = self.y.unsqueeze(0) + Z
        return torch.stack([self.evaluate(i, Y[i]) for i in range(s)]).reshape((s,) + tuple(self.shape))

    def stages_by_one(self) -> torch.Tensor:
        """A diagonally implicit tableau: stage ``i`` solves ``Y_i = E_i + h a_ii f(Y_i)`` with
        ``E_i = y + h sum_{j<i} a_ij K_j``; one LU factorisation per distinct ``a_ii``."""
        co, dt, m = self.co, self.dt, self.m
        A = co.A
        a = self.solver.tableau.a
        s = len(co.c)
        lus: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
        Ks: list[torch.Tensor] = []
        for i in range(s):
            E = self.y if i == 0 else torch.addmv(self.y, torch.stack(Ks).T, A[i, :i], alpha=dt)
            g = a[i][i]
            if g == 0.0:
                # An explicit stage; the first of an ESDIRK (c_0 = 0, zero row) is f(t, y) = k1.
                Ks.append(self.k1 if i == 0 and co.c[0] == 0.0 else self.evaluate(i, E))
                continue
            lu = lus.get(g)
            if lu is None:
                M = torch.eye(m, dtype=A.dtype, device=A.device) - (dt * g) * self.J
                lu = lus[g] = self.factor(M, f"stage {i + 1}")
            Y = self.y + (co.c[i] * dt) * self.k1
            prev: list[float] = []
            for it in range(self.solver.max_iters):
                R = Y - E - (dt * g) * self.evaluate(i, Y)
                dY = self.newton_update(lu, R.unsqueeze(0)).squeeze(0)
                Y = Y - dY
                if self.converged(it, dY, Y - self.y, prev, f"stage {i + 1}"):
                    break
            Ks.append(self.evaluate(i, Y))
        return torch.stack(Ks).reshape((s,) + tuple(self.shape))
