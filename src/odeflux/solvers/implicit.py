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

A tableau with an embedded estimate (``b_err``) makes the solver adaptive: each integration's
:class:`ImplicitStepper` then keeps the Jacobian and the Newton matrices across steps (the reuse
rule is in its docstring), stops the iterations at a fraction of the error tolerance, and a Newton
failure is a rejected step (the integrator retries with a quarter of the step). A tableau with an
explicit companion (``a_explicit``) is an additive (IMEX) method: given an :class:`IMEX` field it
treats the field's ``explicit`` part with ``a_explicit`` and only the ``implicit`` part by Newton.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, NamedTuple, Sequence

import numpy as np
import torch

from ..control import ORDINARYDIFFEQ_PI, StepSizeController
from .tableau import DenseWeights, RungeKutta, StepResult, new_state

VectorField = Callable[[Any, torch.Tensor], torch.Tensor]
#: ``preconditioner(t, y, h_gamma) -> apply``, ``apply(v)`` about ``(I - h_gamma J)^-1 v`` (flat ``v``).
Preconditioner = Callable[[Any, torch.Tensor, float], Callable[[torch.Tensor], torch.Tensor]]

__all__ = [
    "IMEX", "ImplicitRK", "ImplicitStepper", "ImplicitTableau", "JacobianSource", "NewtonFailure", "collocation",
    "factorize", "gmres", "jacobian", "linearization", "solve_factored",
]  # fmt: skip

#: The work counters of implicit steps, as :class:`odeflux.solution.Stats` names them.
COUNTERS = (
    "n_jacobians", "n_factorizations", "n_linear_solves", "n_newton_iterations", "n_krylov_iterations", "n_jvps",
)  # fmt: skip


class NewtonFailure(RuntimeError):
    """An implicit step's Newton iteration did not converge. A fixed-step solve ends with
    ``Status.NEWTON_FAILED`` and this message; an adaptive one rejects the step and retries with a
    smaller one. ``n_evals`` counts the evaluations of ``f`` the failed attempt made."""

    n_evals: int = 0


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

    def jacobian_product(self, t: Any, y: torch.Tensor) -> tuple[int, Callable[[torch.Tensor], torch.Tensor]]:
        """``(m, v -> J v)``: the block :meth:`jacobian` gives, as products on flat vectors of ``m``
        entries, for the matrix-free Newton-Krylov iteration (``linear_solver="gmres"``). This
        default forms ``jacobian(t, y)`` once; a field whose block is too large to form overrides
        it (the continuous adjoints' systems do: their products are VJPs of the forward field)."""
        J = self.jacobian(t, y).detach()
        return J.shape[0], lambda v: J @ v


class IMEX(torch.nn.Module):
    """A field split as ``f(t, y) = explicit(t, y) + implicit(t, y)``: the non-stiff part and the
    stiff part. Every solver sees the sum; an additive method (:class:`odeflux.KenCarp4`) treats
    ``explicit`` explicitly and solves only for ``implicit`` (its Jacobian alone is formed).

    The parts are ``f(t, y)`` callables (modules' parameters are the field's: the adjoints find
    them); ``implicit`` may be a :class:`JacobianSource`. Extra ``args`` of a solve reach both.
    """

    def __init__(self, explicit: Callable[..., torch.Tensor], implicit: Callable[..., torch.Tensor]):
        super().__init__()
        if not (callable(explicit) and callable(implicit)):
            raise TypeError("IMEX(explicit, implicit) needs two callables f(t, y): the non-stiff part, then the stiff part")
        self.explicit, self.implicit = explicit, implicit

    def forward(self, t: Any, y: torch.Tensor, *args: Any) -> torch.Tensor:
        return self.explicit(t, y, *args) + self.implicit(t, y, *args)

    def bind(self, args: Any) -> IMEX:
        """The split with ``args`` passed to both parts (what ``solve(..., args=)`` calls)."""
        return IMEX(lambda t, y: self.explicit(t, y, args), lambda t, y: self.implicit(t, y, args))

    def imex_parts(self) -> tuple[VectorField, VectorField]:
        return self.explicit, self.implicit


def imex_parts(f: Any) -> tuple[VectorField, VectorField] | None:
    """``(explicit, implicit)`` of a split field (:class:`IMEX`, or a wrapper that forwards its
    ``imex_parts``), else ``None``."""
    parts = getattr(f, "imex_parts", None)
    return parts() if callable(parts) else None


#: Newton and Rosenbrock matrices of up to this many rows are inverted once instead of kept as
#: LU factors: each solve is then one matrix-vector product (about 1 us) rather than
#: ``torch.linalg.lu_solve`` (about 16 us on a CPU, with host reads of its checks), and a step
#: makes many solves per factorisation (Rodas5P 8, Kvaerno5 about 20). Past it the inverse costs
#: more than the solves it saves. Both are the exact solution up to rounding.
SMALL_SYSTEM = 64


def factorize(M: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """``(factors, info)`` of the square matrix ``M`` for :func:`solve_factored`: its inverse (one
    tensor) up to :data:`SMALL_SYSTEM` rows, else its LU factors and pivots; ``info`` is nonzero
    (a 0-d tensor, not read here) where ``M`` is singular."""
    if M.shape[-1] <= SMALL_SYSTEM:
        inv, info = torch.linalg.inv_ex(M)
        return (inv,), info
    LU, pivots, info = torch.linalg.lu_factor_ex(M)
    return (LU, pivots), info


def solve_factored(factors: tuple[torch.Tensor, ...], rhs: torch.Tensor) -> torch.Tensor:
    """``M^-1 rhs`` for a vector ``rhs`` given :func:`factorize`'s factors of ``M`` (or for
    ``(B, n)`` vectors given those of a ``(B, n, n)`` batch)."""
    if len(factors) == 1:
        return torch.mv(factors[0], rhs) if rhs.dim() == 1 else (factors[0] @ rhs.unsqueeze(-1)).squeeze(-1)
    return torch.linalg.lu_solve(factors[0], factors[1], rhs.unsqueeze(-1)).squeeze(-1)


class GMRESResult(NamedTuple):
    x: torch.Tensor
    converged: bool
    iterations: int  # Arnoldi steps (one operator product each), over all restarts
    residual: float  # the final residual's 2-norm (estimated by the Givens rotations)


def gmres(
    matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, rtol: float = 1e-8, atol: float = 0.0,
    restart: int = 30, max_iters: int = 300, x0: torch.Tensor | None = None,
) -> GMRESResult:  # fmt: skip
    """Restarted GMRES for ``A x = b``, ``A`` given by ``matvec`` on flat vectors (any dtype and
    device; the Krylov basis lives on ``b``'s device, the small Hessenberg least-squares problem on
    the host, Givens rotations updated one column at a time). Stops once ``||b - A x||_2 <=
    max(rtol ||b||_2, atol)`` or after ``max_iters`` products; ``converged`` says which (a cycle
    that does not reduce the true residual also stops it). Orthogonalisation by classical
    Gram-Schmidt applied twice: one host read per product."""
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    bnorm = float(torch.linalg.vector_norm(b))
    target = max(rtol * bnorm, atol)
    r = b if x0 is None else b - matvec(x)
    beta = float(torch.linalg.vector_norm(r))
    its = 0
    if not math.isfinite(beta):
        return GMRESResult(x, False, its, beta)
    while beta > target and its < max_iters:
        V = torch.empty(restart + 1, b.numel(), dtype=b.dtype, device=b.device)  # the Krylov basis, row by row
        V[0] = r / beta
        H: list[list[float]] = []  # columns of the Hessenberg matrix, rotated
        cs: list[float] = []
        sn: list[float] = []
        g = [beta]
        k = 0
        while k < restart and its < max_iters:
            w = matvec(V[k])
            its += 1
            # Classical Gram-Schmidt twice (CGS2: as stable as modified Gram-Schmidt, in two
            # matrix-vector products and one host read instead of k of each).
            h1 = V[: k + 1] @ w
            w = w - h1 @ V[: k + 1]
            h2 = V[: k + 1] @ w
            w = w - h2 @ V[: k + 1]
            hv = torch.cat([h1 + h2, torch.linalg.vector_norm(w).reshape(1)]).tolist()
            col, hnext = hv[:-1], hv[-1]
            for i in range(k):  # earlier rotations
                a, c = col[i], col[i + 1]
                col[i], col[i + 1] = cs[i] * a + sn[i] * c, -sn[i] * a + cs[i] * c
            d = math.hypot(col[k], hnext)
            if not math.isfinite(d):
                return GMRESResult(x, False, its, math.inf)
            c_, s_ = (1.0, 0.0) if d == 0 else (col[k] / d, hnext / d)
            cs.append(c_), sn.append(s_)
            col[k] = d
            g.append(-s_ * g[k])
            g[k] = c_ * g[k]
            H.append(col)
            k += 1
            if abs(g[k]) <= target or hnext <= 1e-300:
                break
            V[k] = w / hnext
        # Back substitution for the k coefficients, then the update along the basis.
        yk = [0.0] * k
        for i in range(k - 1, -1, -1):
            acc = g[i] - sum(H[j][i] * yk[j] for j in range(i + 1, k))
            yk[i] = acc / H[i][i] if H[i][i] != 0 else 0.0
        x = x + torch.tensor(yk, dtype=b.dtype, device=b.device) @ V[:k]
        est = abs(g[k])
        if est <= target or its >= max_iters:  # converged by the rotations' estimate, or out of products
            beta = est
            break
        r = b - matvec(x)  # restart from the true residual
        rnorm = float(torch.linalg.vector_norm(r))
        stalled = not math.isfinite(rnorm) or rnorm >= beta
        beta = rnorm
        if stalled:  # no progress over a whole cycle (or a NaN)
            break
    return GMRESResult(x, beta <= target, its, beta)


def linearization(
    f: VectorField, t: Any, y: torch.Tensor, want_jvp: bool = True
) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """``(v -> J v, w -> J^T w)`` for ``J = d f(t, y) / d y`` on flat vectors, never formed: one
    graph of ``f(t, y)`` (and, if ``want_jvp``, of ``J^T u``) built here, each product then one
    backward pass through it. ``J v`` by the double-VJP trick, ``J v = d(J^T u)/du . v`` (on a CPU
    5-10x cheaper than a ``torch.func.jvp`` per product, which re-runs ``f`` under a transform).
    Zero where ``f`` does not reach ``y`` through autograd; works under ``torch.no_grad()``."""
    zero = lambda v: torch.zeros_like(v)  # noqa: E731
    if isinstance(t, torch.Tensor):
        t = t.detach()
    with torch.enable_grad():
        x = y.detach().requires_grad_(True)
        out = f(t, x)
        if not out.requires_grad:
            return zero, zero
        u = torch.zeros_like(out, requires_grad=True) if want_jvp else None
        vjp = torch.autograd.grad(out, x, u, create_graph=True, allow_unused=True)[0] if want_jvp else None

    def transposed(w: torch.Tensor) -> torch.Tensor:
        (g,) = torch.autograd.grad(out, x, w.view(out.shape), retain_graph=True, allow_unused=True)
        return torch.zeros_like(w) if g is None else g.reshape(-1)

    if vjp is None or not vjp.requires_grad:  # (not asked, or f affine in y with J^T u not built)
        return zero, transposed

    def product(v: torch.Tensor) -> torch.Tensor:
        (jv,) = torch.autograd.grad(vjp, u, v.view(vjp.shape), retain_graph=True, allow_unused=True)
        return torch.zeros_like(v) if jv is None else jv.reshape(-1)

    return product, transposed


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
    """Coefficients of an implicit Runge-Kutta method.

    ``a`` is the full ``stages x stages`` matrix, row by row. ``interp`` holds the dense-output
    weights on the stage derivatives as in :class:`odeflux.solvers.ButcherTableau`:
    ``y(t0 + theta h) = y0 + h sum_i b_i(theta) K_i`` with ``interp[i][d]`` the coefficient of
    ``theta**(d + 1)`` in ``b_i(theta)``.

    ``b_err`` (optional) are the weights of the error estimate ``h sum_i b_err[i] K_i``, of
    order ``error_order``: the method is then adaptive. ``fsal``: the last stage is ``f(t + h, y1)``
    (stiffly accurate with an explicit first stage). ``a_explicit`` (optional, strictly lower
    triangular, full ``stages x stages``) makes it an additive IMEX pair with ``a``: the same
    ``b``, ``c``, ``b_err`` and dense output for both parts.
    """

    name: str
    order: int
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    interp: tuple[tuple[float, ...], ...]
    interp_order: int
    b_err: tuple[float, ...] | None = None
    error_order: int | None = None
    fsal: bool = False
    a_explicit: tuple[tuple[float, ...], ...] | None = None

    @property
    def adaptive(self) -> bool:
        return self.b_err is not None

    def __post_init__(self) -> None:
        s = len(self.c)
        if len(self.a) != s or any(len(row) != s for row in self.a):
            raise ValueError(f"{self.name}: a must be a full {s} x {s} matrix (one row of {s} per stage)")
        if len(self.b) != s or len(self.interp) != s:
            raise ValueError(f"{self.name}: b and interp need one entry per stage ({s})")
        A = self.a_matrix()
        if not np.triu(A, 1).any() and not np.diag(A).any():
            raise ValueError(f"{self.name}: a is strictly lower triangular: use ButcherTableau and ExplicitRK")
        if self.b_err is not None and (len(self.b_err) != s or self.error_order is None):
            raise ValueError(f"{self.name}: b_err needs one entry per stage ({s}) and an error_order")
        if self.fsal and not (np.allclose(A[-1], self.b, rtol=0, atol=1e-15) and self.c[0] == 0.0 and not A[0].any()):
            raise ValueError(f"{self.name}: fsal needs an explicit first stage and the last row of a equal to b")
        if self.a_explicit is not None:
            AE = np.array(self.a_explicit, dtype=np.float64)
            if AE.shape != (s, s) or np.triu(AE).any() or not self.diagonally_implicit:
                raise ValueError(f"{self.name}: a_explicit must be a strictly lower triangular {s} x {s} matrix (with a lower triangular a)")

    def a_matrix(self) -> np.ndarray:
        return np.array(self.a, dtype=np.float64)

    @functools.cached_property
    def gamma(self) -> float | None:
        """The one nonzero diagonal value of a singly diagonally implicit tableau, else ``None``."""
        diag = {g for g in np.diag(self.a_matrix()) if g != 0.0}
        return float(diag.pop()) if len(diag) == 1 and self.diagonally_implicit else None

    @functools.cached_property
    def embedded_stage(self) -> bool:
        """Whether the embedded solution ``b - b_err`` is one of the stage values (a row of ``a``)."""
        if self.b_err is None:
            return False
        b_hat = np.asarray(self.b) - np.asarray(self.b_err)
        return any(np.allclose(row, b_hat, rtol=0, atol=1e-14) for row in self.a_matrix())

    @functools.cached_property
    def diagonally_implicit(self) -> bool:
        """Whether ``a`` is lower triangular: the stages can then be solved one at a time (cached:
        every step asks)."""
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
    e_row: torch.Tensor | None = None  # (1, s): the error estimate's weights
    AE: torch.Tensor | None = None  # (s, s): an IMEX pair's explicit tableau


#: An adaptive solve refreshes its kept Jacobian before the next step once a Newton iteration
#: contracted by less than this per iteration (the rate a fresh Jacobian has on a mildly
#: nonlinear step is far below it; a stale one's grows with the change of J).
SLOW_RATE = 0.2


@dataclass(eq=False)
class ImplicitRK(RungeKutta):
    """An implicit Runge-Kutta solver defined by its tableau, the stage equations solved by
    simplified Newton with a dense Jacobian of ``f`` (``n x n`` of the flattened state).

    Fixed-step tableaus (give ``dt0``): a fresh Jacobian every step, the iteration stopped at
    ``newton_tol`` relative to the state's scale (default: 32 units of round-off of its dtype),
    and a step that does not converge ends the solve with ``Status.NEWTON_FAILED`` (a
    ``SolveError`` unless ``throw=False``). Adaptive tableaus (with ``b_err``): see
    :class:`ImplicitStepper`; the iteration stops once its update (with the rest of its geometric
    series) is below ``newton_kappa`` times the error tolerance ``atol + rtol |y|``, and a failure
    is a rejected step. ``max_iters`` caps the iterations of a step (or of a stage, stage by stage).

    ``linear_solver="gmres"`` makes the iteration matrix-free (Newton-Krylov, for large states):
    no Jacobian is formed or factorised; each Newton update solves ``(I - h a_ii J) d = r`` (the
    coupled ``I - h A (x) J`` for a full tableau) by restarted GMRES (:func:`gmres`, ``krylov_restart``
    products a cycle, at most ``krylov_max_iters`` in all) with ``J v`` by autograd (the double-VJP
    trick, :meth:`_NewtonStep.linearize`: one graph of ``f`` per update) at the current Newton iterate (full, not simplified, Newton), to a fixed fraction
    ``krylov_rtol`` of the residual in the Newton test's norm (weighted by ``atol + rtol |y|`` when
    adaptive). A GMRES that does not get there is a Newton failure (a rejected step when adaptive).
    Gradients (DirectAdjoint) go through each stage's converged value by the implicit function
    theorem (a transposed GMRES solve with VJPs in the backward pass), not through the iterations.
    A field that gives its own Jacobian (:class:`JacobianSource`: the continuous adjoints' backward
    systems) gives its products instead (:meth:`JacobianSource.jacobian_product`: for an adjoint,
    VJPs of the forward field), so the continuous adjoints run matrix-free too.

    ``preconditioner`` (with ``linear_solver="gmres"``): a callable ``preconditioner(t, y,
    h_gamma) -> apply``, called once per Newton update at the stage's time and current iterate
    (``y`` in the state's shape), where ``apply(v)`` approximates ``(I - h_gamma J)^-1 v`` on flat
    vectors of the state's size (``J`` the Jacobian of ``f``, of its implicit part for an IMEX
    pair); e.g. a banded or multigrid solve of the stiff operator. It is applied on the right,
    so GMRES's residual, its stopping test and the Newton test are those of the unpreconditioned
    system: a poor ``apply`` costs iterations, never accuracy. A full tableau (Radau IIA,
    Gauss-Legendre) applies it block by block, stage ``i`` with ``h_gamma = h a_ii`` (the
    coupled ``I - h A (x) J`` less ``A``'s off-diagonal). The continuous adjoints' backward
    systems (:class:`JacobianSource` fields: their Jacobian is not ``f``'s) run unpreconditioned.
    """

    tableau: ImplicitTableau = field(repr=False)
    max_iters: int = 30
    newton_tol: float | None = None
    newton_kappa: float = 0.01
    linear_solver: str = "lu"
    krylov_rtol: float = 1e-6
    krylov_restart: int = 30
    krylov_max_iters: int = 120
    preconditioner: Preconditioner | None = field(default=None, repr=False)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    explicit: ClassVar[bool] = False
    adaptive_controller: ClassVar[StepSizeController] = ORDINARYDIFFEQ_PI  # (the 0.1 floor is measured on explicit methods)

    def __post_init__(self) -> None:
        if not isinstance(self.max_iters, int) or self.max_iters < 1:
            raise ValueError(f"{type(self).__name__}: max_iters must be a positive integer, got {self.max_iters!r}")
        if self.newton_tol is not None and not (0 < self.newton_tol < 1):
            raise ValueError(f"{type(self).__name__}: newton_tol must lie in (0, 1), got {self.newton_tol!r}")
        if not (0 < self.newton_kappa < 1):
            raise ValueError(f"{type(self).__name__}: newton_kappa must lie in (0, 1), got {self.newton_kappa!r}")
        if self.linear_solver not in ("lu", "gmres"):
            raise ValueError(f"{type(self).__name__}: linear_solver must be 'lu' or 'gmres', got {self.linear_solver!r}")
        if not (0 < self.krylov_rtol < 1):
            raise ValueError(f"{type(self).__name__}: krylov_rtol must lie in (0, 1), got {self.krylov_rtol!r}")
        for name in ("krylov_restart", "krylov_max_iters"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be a positive integer, got {v!r}")
        if self.preconditioner is not None:
            if not callable(self.preconditioner):
                raise TypeError(
                    f"{type(self).__name__}: preconditioner must be a callable (t, y, h_gamma) -> apply, "
                    f"got {type(self.preconditioner).__name__}"
                )
            if not self.krylov:
                raise ValueError(f"{type(self).__name__}: preconditioner= preconditions GMRES: give linear_solver='gmres' with it")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()" if self.linear_solver == "lu" else f"{type(self).__name__}(linear_solver='gmres')"

    @property
    def krylov(self) -> bool:
        return self.linear_solver == "gmres"

    def make_coefficients(self, mk: Callable[[Any], torch.Tensor]) -> _Coefficients:
        tab = self.tableau
        return _Coefficients(
            A=mk([list(r) for r in tab.a]), b_row=mk([list(tab.b)]), c=tab.c, c_col=mk([[v] for v in tab.c]),
            interp=mk([list(r) for r in tab.interp]),
            e_row=None if tab.b_err is None else mk([list(tab.b_err)]),
            AE=None if tab.a_explicit is None else mk([list(r) for r in tab.a_explicit]),
        )

    def stepper(self, rtol: float, atol: float) -> ImplicitStepper:
        return ImplicitStepper(self, rtol, atol)

    def step(
        self, f: VectorField, t: Any, y: torch.Tensor, dt: float, k1: torch.Tensor, co: _Coefficients | None = None
    ) -> StepResult:
        """One step of size ``dt`` from ``(t, y)``, given ``k1 = f(t, y)``, with a fresh Jacobian
        and the fixed-step stopping rule; differentiable through the Newton iterations. Raises
        :class:`NewtonFailure` if they do not converge."""
        return ImplicitStepper(self, None, None).step(f, t, y, dt, k1, co)


class ImplicitStepper:
    """One integration's implicit steps (:meth:`ImplicitRK.stepper`) and their work counters
    (``counters``: :data:`COUNTERS`).

    A fixed-step tableau gets a fresh Jacobian every step (as :meth:`ImplicitRK.step`). An
    adaptive one reuses work, OrdinaryDiffEq's W-reuse in a simple form:

    - the Jacobian ``J`` is computed at a step's start and kept for the following steps; it is
      recomputed before a step when the last Newton iteration contracted slowly (a rate above
      :data:`SLOW_RATE`), and when an iteration fails with a kept ``J``: the same step is then
      tried again, once, with a ``J`` fresh at its start. A failure with a fresh ``J`` is the
      integrator's rejected step (it retries with a quarter of ``dt``);
    - each Newton matrix ``I - h a_ii J`` is factorised once per ``(J, h a_ii)``: a step of the
      same size on the same ``J`` (after a repeated step size) reuses the factors;
    - where the embedded solution is not a stage value (KenCarp4), the error estimate is
      smoothed by the step's Newton matrix, ``(I - h gamma J)^-1 h b_err K`` (Hairer and Wanner
      IV.8, OrdinaryDiffEq's ``smooth_est``): its raw estimate of a stiff component is far larger
      than the error. Where it is a stage value (Kvaerno5: stage 6), both solutions lie on the
      slow manifold of a stiff component and the raw estimate measures the error there: smoothing
      it divided it by ``1 + h gamma |lambda|`` (40x on HIRES past t = 100), and the steps missed
      the tolerance by 10-100x.
    """

    def __init__(self, solver: ImplicitRK, rtol: float | None, atol: float | None):
        self.solver, self.rtol, self.atol = solver, rtol, atol
        self.reuse = solver.tableau.adaptive and rtol is not None
        self.krylov = solver.krylov
        self.J: torch.Tensor | None = None
        self.J_at: tuple[float, torch.Tensor] | None = None  # where the kept J was computed
        self.lus: dict = {}
        self.refresh = True
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.last_evals = 0

    def evaluations(self, K: torch.Tensor) -> int:
        return self.last_evals

    def _new_jacobian(self, f: VectorField, t: Any, y: torch.Tensor) -> int:
        """Compute and keep ``J`` at ``(t, y)``; returns the evaluations of ``f`` it took."""
        if isinstance(f, JacobianSource):
            self.J, evals = f.jacobian(t, y).detach().contiguous(), 0
        else:
            self.J, evals = jacobian(f, t, y), 1  # its forward pass
        self.J_at, self.lus, self.refresh = (float(t), y), {}, False
        self.counters["n_jacobians"] += 1
        return evals

    def step(
        self, f: VectorField, t: Any, y: torch.Tensor, dt: float, k1: torch.Tensor, co: _Coefficients | None = None
    ) -> StepResult:
        """One step of size ``dt`` from ``(t, y)`` given ``k1 = f(t, y)`` (see the class doc)."""
        solver = self.solver
        if co is None:
            co = solver.coefficients(y.dtype, y.device)
        parts = imex_parts(f) if solver.tableau.a_explicit is not None else None
        f_impl = f if parts is None else parts[1]
        evals = 0
        # (Newton-Krylov linearises at each iterate: it keeps no Jacobian to go stale.)
        fresh = self.krylov or (self.J_at is not None and self.J_at[0] == float(t) and self.J_at[1] is y)
        if not self.krylov and (not self.reuse or self.J is None or (self.refresh and not fresh)):
            evals += self._new_jacobian(f_impl, t, y)
            fresh = True
        while True:
            run = _NewtonStep(self, f, parts, t, y, dt, k1, co)
            try:
                result = run.solve()
            except NewtonFailure as exc:
                evals += run.n_evals
                if not fresh:  # the kept Jacobian may be what failed: once more with a fresh one
                    evals += self._new_jacobian(f_impl, t, y)
                    fresh = True
                    continue
                exc.n_evals = evals
                raise
            finally:
                run.count()
            break
        self.last_evals = evals + run.n_evals
        if self.reuse and not self.krylov:
            self.refresh = run.worst_rate > SLOW_RATE
        return result


class _NewtonStep:
    """One implicit step's Newton iterations (state flattened to ``n`` entries, the Jacobian's
    block to the first ``m``)."""

    def __init__(
        self, stepper: ImplicitStepper, f: VectorField, parts: tuple[VectorField, VectorField] | None, t: Any,
        y: torch.Tensor, dt: float, k1: torch.Tensor, co: _Coefficients,
    ):  # fmt: skip
        solver = stepper.solver
        self.solver, self.stepper, self.f, self.parts, self.t, self.dt, self.co = solver, stepper, f, parts, t, dt, co
        self.f_impl = f if parts is None else parts[1]
        self.shape, self.n = y.shape, y.numel()
        self.y, self.k1 = y.reshape(-1), k1.reshape(-1)
        self.J, self.lus = stepper.J, stepper.lus
        self.krylov = stepper.krylov
        self.m = self.n if self.krylov else self.J.shape[0]
        self.n_evals = self.iters = self.solves = self.factors = self.krylov_iters = self.jvps = 0
        self.worst_rate = 0.0
        eps = torch.finfo(y.dtype).eps
        if stepper.reuse:
            # Adaptive: updates measured against the error tolerance, entry by entry.
            yd = self.y.detach().abs()
            self.weights = yd.mul(stepper.rtol).add_(stepper.atol).reciprocal_()
            self.tol = solver.newton_kappa
            self._noise: float | None = None  # read from the device only where needed
        else:
            self.weights = None
            self.tol = solver.newton_tol if solver.newton_tol is not None else 32 * eps
            # Below this the updates are round-off: an iteration that stops contracting there has converged.
            self._noise = max(self.tol, 1024 * eps)
            self.y_scale = float(y.detach().abs().max())
        self.stage_t: dict[int, Any] = {}

    @property
    def noise(self) -> float:
        """Below this the updates are round-off: an iteration that stops contracting there has
        converged (adaptive: 1024 units of round-off of the state, in the error's weights)."""
        if self._noise is None:
            yd = self.y.detach().abs()
            self._noise = max(self.tol, 1024 * torch.finfo(yd.dtype).eps * float((yd * self.weights).max()))
        return self._noise

    def count(self) -> None:
        c = self.stepper.counters
        c["n_factorizations"] += self.factors
        c["n_linear_solves"] += self.solves
        c["n_newton_iterations"] += self.iters
        c["n_krylov_iterations"] += self.krylov_iters
        c["n_jvps"] += self.jvps

    def solve(self) -> StepResult:
        co, dt, n = self.co, self.dt, self.n
        K = self.stages_by_one() if self.solver.tableau.diagonally_implicit else self.coupled()
        y1 = new_state(self.y.reshape(1, n), co.b_row, K.reshape(K.shape[0], n), dt).reshape(self.shape)
        err = None
        if co.e_row is not None:
            with torch.no_grad():
                err = torch.mm(co.e_row, K.reshape(K.shape[0], n).detach()).mul_(dt)
                gamma = self.solver.tableau.gamma
                smooth = gamma is not None and not self.solver.tableau.embedded_stage
                lu = None if not smooth or self.krylov else self.lus.get((dt, gamma))
                if lu is not None:  # smoothed by the Newton matrix (ImplicitStepper's doc)
                    err = self.newton_update(lu, err)
                elif smooth and self.krylov:  # the same, by GMRES with J at (t, y)
                    err = self.krylov_update([self.t], self.y.unsqueeze(0), err, dt * gamma, "the error estimate", strict=False)
            err = err.reshape(self.shape)
        return StepResult(y1, err, K, self.n_evals)

    def evaluate(self, i: int, Y: torch.Tensor, f: VectorField | None = None) -> torch.Tensor:
        self.n_evals += 1
        t = self.stage_t.get(i)
        if t is None:  # once per stage, not per Newton iteration (t may be a tensor: an op each)
            t = self.stage_t[i] = self.t + self.co.c[i] * self.dt
        flat = len(self.shape) == 1
        out = (self.f if f is None else f)(t, Y if flat else Y.reshape(self.shape))
        return out if flat else out.reshape(-1)

    def factor(self, key: Any, M: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        lu = self.lus.get(key)
        if lu is None:
            lu, info = factorize(M)
            self.factors += 1
            if int(info) != 0:
                raise NewtonFailure(self.message(what, "has a singular Newton matrix (I - h a J)"))
            self.lus[key] = lu
        return lu

    def newton_update(self, lu: tuple[torch.Tensor, ...], R: torch.Tensor) -> torch.Tensor:
        """``M^-1 R`` for residuals ``R`` of shape ``(rows, n)``, or ``(n,)`` for one stage: the
        head through the factors of ``M`` (``rows * m`` unknowns), the tail as it is (it has no
        Jacobian)."""
        m = self.m
        self.solves += 1
        if R.dim() == 1:
            return solve_factored(lu, R) if m == self.n else torch.cat([solve_factored(lu, R[:m]), R[m:]])
        rows = R.shape[0]
        head = solve_factored(lu, R[:, :m].reshape(rows * m)).reshape(rows, m)
        return head if m == self.n else torch.cat([head, R[:, m:]], dim=1)

    # -- matrix-free Newton-Krylov (linear_solver="gmres") -------------------------------------
    def linearize(self, t: Any, x: torch.Tensor) -> tuple[int, Callable[[torch.Tensor], torch.Tensor]]:
        """``(m, v -> J v)`` for ``J`` the Jacobian of the implicit field at ``(t, x)`` (``x``
        flat), never formed: a :class:`JacobianSource`'s own products of its ``(m, m)`` block (the
        tail past ``m`` has none, as in :meth:`newton_update`), else the double-VJP trick
        (:func:`linearization`: one graph of ``f`` per call, a backward pass per product)."""
        f = self.f_impl
        if isinstance(f, JacobianSource):
            m, jv = f.jacobian_product(t, x.view(self.shape))
        else:
            m, jv = self.n, linearization(f, t, x.view(self.shape))[0]

        def product(v: torch.Tensor) -> torch.Tensor:
            self.jvps += 1
            return jv(v)

        return m, product

    def krylov_update(
        self, ts: list, Y: torch.Tensor, R: torch.Tensor, hA: Any, what: str, strict: bool = True
    ) -> torch.Tensor:
        """``M^-1 R`` by GMRES for residuals ``R`` of shape ``(rows, n)`` (or ``(n,)``), ``M = I -
        hA (x) J`` with ``J`` at ``(ts[j], Y[j])`` for row ``j`` (``hA`` a number for one stage,
        the ``(rows, rows)`` matrix ``h A`` for coupled stages). The residual is measured in the
        Newton test's weights; ``strict``: a GMRES that misses ``krylov_rtol`` is a Newton failure."""
        solver = self.solver
        self.solves += 1
        shape = R.shape
        R2 = R.detach().reshape(-1, self.n)
        rows = R2.shape[0]
        Yd = Y.detach().reshape(rows, self.n)
        lins = [self.linearize(ts[j], Yd[j]) for j in range(rows)]
        m = lins[0][0]
        lins = [jv for _, jv in lins]
        # A JacobianSource's tail (m < n) has no Jacobian: its rows of M are the identity, the
        # update there the residual itself, and GMRES runs on the head alone.
        tail = R2[:, m:]
        R2 = R2[:, :m]
        w = self.weights[:m] if self.weights is not None else None
        pre = None
        if solver.preconditioner is not None and not isinstance(self.f_impl, JacobianSource):
            # Block by block: stage j's I - h a_jj J (a full tableau's A less its off-diagonal).
            hgs = [hA] if rows == 1 else torch.diagonal(hA).tolist()
            pre = [solver.preconditioner(ts[j], Yd[j].view(self.shape), float(hgs[j])) for j in range(rows)]

        def precondition(x: torch.Tensor) -> torch.Tensor:  # weighted GMRES unknowns -> the update d
            V = x.reshape(rows, m)
            if w is not None:
                V = V / w
            if pre is not None:
                V = torch.stack([pre[j](V[j]).reshape(m) for j in range(rows)])
            return V

        def apply(V: torch.Tensor) -> torch.Tensor:
            JV = torch.stack([lins[j](V[j]) for j in range(rows)])
            if rows == 1:
                return V - hA * JV
            return V - hA @ JV

        def matvec(x: torch.Tensor) -> torch.Tensor:  # the system in the weighted unknowns D d, right-preconditioned
            out = apply(precondition(x))
            return (out if w is None else out * w).reshape(-1)

        b = (R2 if w is None else R2 * w).reshape(-1)
        with torch.no_grad():
            res = gmres(matvec, b, rtol=solver.krylov_rtol, restart=solver.krylov_restart, max_iters=solver.krylov_max_iters)
        self.krylov_iters += res.iterations
        if strict and not res.converged:
            raise NewtonFailure(
                f"{type(solver).__name__}: GMRES for {what} at t={float(self.t):.6g} (dt={self.dt:.3g}) did not reach "
                f"krylov_rtol={solver.krylov_rtol:g} in {res.iterations} products (residual {res.residual:.3g} of "
                f"{float(torch.linalg.vector_norm(b)):.3g}): raise krylov_max_iters or krylov_restart, or use linear_solver='lu'"
            )
        d = precondition(res.x)
        if m < self.n:
            d = torch.cat([d, tail], dim=1)
        return d.reshape(shape)

    def implicit_grad(self, Z: torch.Tensor, G: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``Z`` (a converged fixed point of ``Z = G(Z)``, detached) with the gradient of the
        implicit function theorem: the value is ``Z``, the backward pass sends a cotangent ``g``
        through ``G``'s other inputs (earlier stages, the state, the parameters) as ``(I -
        dG/dZ)^-T g``, solved by GMRES with VJPs of ``G`` at ``Z`` (one evaluation of ``f`` here)."""
        if not torch.is_grad_enabled():
            return Z
        solver = self.solver
        z0 = Z.detach().requires_grad_(True)
        out = G(z0)
        if not out.requires_grad:
            return Z.detach()

        inside = [False]  # the VJPs below run through out's own graph, and this hook: pass them

        def hook(grad: torch.Tensor) -> torch.Tensor | None:
            if inside[0]:
                return None

            def matvec(u: torch.Tensor) -> torch.Tensor:
                u = u.reshape(grad.shape)
                (vjp,) = torch.autograd.grad(out, z0, u, retain_graph=True, allow_unused=True)
                return (u if vjp is None else u - vjp).reshape(-1)

            inside[0] = True
            try:
                with torch.no_grad():
                    rtol = min(solver.krylov_rtol, 1e-10)
                    res = gmres(matvec, grad.detach().reshape(-1), rtol=rtol, restart=solver.krylov_restart,
                                max_iters=10 * solver.krylov_max_iters)  # fmt: skip
            finally:
                inside[0] = False
            if not res.converged:  # (a gradient less accurate than asked: said, not hidden)
                warnings.warn(
                    f"{type(solver).__name__}(linear_solver='gmres'): the gradient's GMRES solve stopped at residual "
                    f"{res.residual:.3g} after {res.iterations} products, short of {rtol:g} relative: raise "
                    "krylov_max_iters or krylov_restart, or use linear_solver='lu'", RuntimeWarning, stacklevel=2,
                )  # fmt: skip
            return res.x.reshape(grad.shape)

        with torch.enable_grad():
            out.register_hook(hook)
            return Z.detach() + (out - out.detach())

    def measure(self, dZ: torch.Tensor, Z: Callable[[], torch.Tensor], prev: list) -> tuple[float, float | None, float | None]:
        """The update's size, its contraction rate and the ratio of its size to the last one's
        (``None`` on the first update), with one host read: against the error tolerance
        (adaptive), or the state's scale.

        Adaptive: the rate is taken entry by entry (the largest over the entries still above
        the tolerance). The ratio of two max-norms understates it where the first update is
        dominated by an entry that converges at once (a predictor's error in a fast variable)
        while a slower one lags: that hid a fixed-point-like iteration on a stale Jacobian
        (ROBER, t > 0 on the Jacobian of t = 0) and left errors of a whole tolerance in y1."""
        if self.weights is not None:
            a = dZ.detach().abs().mul_(self.weights)
            last = prev[-1] if prev else None
            if last is None:
                r = float(a.max())
                prev.append((a, r))
                return r, None, None
            # Entries already below the tolerance cannot hold the iteration back: ratio 0 (also
            # where 0/0 gives NaN; an entry growing from 0 gives inf).
            ratio = (a / last[0]).masked_fill_(a <= self.tol, 0.0)
            r, theta = torch.stack([a.max(), ratio.max()]).tolist()
            prev.append((a, r))
            return r, theta, r / last[1]
        d, z = (float(v) for v in torch.stack([dZ.detach().abs().max(), Z().detach().abs().max()]).tolist())
        scale = max(self.y_scale, z)
        r = d / scale if scale > 0 else d
        last = prev[-1] if prev else None
        prev.append(r)
        growth = None if last is None else r / last
        return r, growth, growth

    def converged(self, it: int, dZ: torch.Tensor, Z: Callable[[], torch.Tensor], prev: list, what: str) -> bool:
        """Whether the iteration has converged after update ``dZ`` (``Z()``: the iterate, less
        the state; ``prev``: the iteration's earlier updates, kept by :meth:`measure`)."""
        self.iters += 1
        r, theta, growth = self.measure(dZ, Z, prev)
        if not math.isfinite(r):
            raise NewtonFailure(self.message(what, f"produced NaN or Inf at iteration {it + 1}"))
        if r <= self.tol:
            return True
        if theta is not None:
            self.worst_rate = max(self.worst_rate, theta)
            if theta < 1 and theta / (1 - theta) * r <= self.tol:  # the rest of a geometric series
                return True
            if theta >= 1 and r <= self.noise:  # round-off: it cannot get closer
                return True
            if growth >= 1:
                if self.growing:
                    raise NewtonFailure(self.message(what, f"diverges (update {r:.3g} of the scale, growing)"))
                self.growing = True
            else:
                self.growing = False
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
        """All stages at once: ``stages * m`` unknowns, one LU factorisation per step; with
        ``linear_solver="gmres"`` each update by GMRES on ``I - h A (x) J`` with each stage's ``J``
        at its current iterate, the iterations detached and the converged stages carrying the
        implicit function theorem's gradient."""
        co, dt, m = self.co, self.dt, self.m
        s = len(co.c)
        A = co.A
        krylov = self.krylov
        if krylov:
            # (Each stage's time as its evaluation above made it.)
            solve = lambda Y, R: self.krylov_update([self.stage_t[i] for i in range(s)], Y, R, dt * A, "the stages")  # noqa: E731
        else:
            lu = self.lus.get(("coupled", dt))
            if lu is None:
                M = torch.eye(s * m, dtype=A.dtype, device=A.device) - dt * torch.kron(A, self.J)
                lu = self.factor(("coupled", dt), M, "the stages")
            solve = lambda Y, R: self.newton_update(lu, R)  # noqa: E731
        y, k1 = (self.y.detach(), self.k1.detach()) if krylov else (self.y, self.k1)
        with torch.no_grad() if krylov else contextlib.nullcontext():
            Z = (co.c_col * dt) * k1.unsqueeze(0)  # explicit Euler to each node
            prev: list = []
            self.growing = False
            for it in range(self.solver.max_iters):
                Y = y.unsqueeze(0) + Z
                F = torch.stack([self.evaluate(i, Y[i]) for i in range(s)])
                R = Z - dt * (A @ F)
                dZ = solve(Y, R)
                Z = Z - dZ
                if self.converged(it, dZ, lambda: Z, prev, "the stages"):
                    break
        if krylov:
            Z = self.implicit_grad(Z, lambda z: dt * (A @ torch.stack([self.evaluate(i, self.y + z[i]) for i in range(s)])))
        Y = self.y.unsqueeze(0) + Z
        return torch.stack([self.evaluate(i, Y[i]) for i in range(s)]).reshape((s,) + tuple(self.shape))

    def stage_newton(
        self, i: int, E: torch.Tensor, Y: torch.Tensor, hg: float, f_imp: VectorField, lu: tuple[torch.Tensor, ...] | None
    ) -> torch.Tensor:  # fmt: skip
        """Stage ``i`` of :meth:`stages_by_one` by Newton from the guess ``Y``: each update by the
        LU ``lu`` of ``I - h a_ii J``, or with ``linear_solver="gmres"`` by GMRES with ``J`` at the
        current iterate, the iterations detached and the converged value carrying the implicit
        function theorem's gradient."""
        krylov, name = self.krylov, f"stage {i + 1}"
        with torch.no_grad() if krylov else contextlib.nullcontext():
            Ei, Y = (E.detach(), Y.detach()) if krylov else (E, Y)
            prev: list = []
            self.growing = False
            for it in range(self.solver.max_iters):
                R = torch.sub(Y, Ei).sub_(self.evaluate(i, Y, f_imp), alpha=hg)
                dY = self.krylov_update([self.stage_t[i]], Y, R, hg, name) if krylov else self.newton_update(lu, R)
                Y = Y - dY
                if self.converged(it, dY, lambda: Y - self.y, prev, name):
                    break
        return self.implicit_grad(Y, lambda z: E + hg * self.evaluate(i, z, f_imp)) if krylov else Y

    def stages_by_one(self) -> torch.Tensor:
        """A diagonally implicit tableau: stage ``i`` solves ``Y_i = E_i + h a_ii f(Y_i)`` with
        ``E_i = y + h sum_{j<i} a_ij K_j``; one LU factorisation per distinct ``a_ii``. An IMEX
        pair (``parts``: the explicit and the implicit field) solves ``Y_i = E_i + h a_ii
        f_I(Y_i)`` with ``E_i = y + h sum_{j<i} (aE_ij f_E(Y_j) + a_ij f_I(Y_j))`` instead, and
        ``K_i = f_E(Y_i) + f_I(Y_i)``."""
        co, dt, m = self.co, self.dt, self.m
        A = co.A
        a = self.solver.tableau.a
        s = len(co.c)
        split = self.parts is not None
        f_exp, f_imp = self.parts if split else (None, self.f)
        Ks: list[torch.Tensor] = []
        KEs: list[torch.Tensor] = []  # an IMEX pair's parts of each stage
        KIs: list[torch.Tensor] = []
        Y_prev = self.y
        for i in range(s):
            if i == 0:
                E = self.y
            elif split:
                E = torch.addmv(self.y, torch.stack(KEs).T, co.AE[i, :i], alpha=dt)
                E = torch.addmv(E, torch.stack(KIs).T, A[i, :i], alpha=dt)
            else:
                E = torch.addmv(self.y, torch.stack(Ks).T, A[i, :i], alpha=dt)
            g = a[i][i]
            if g == 0.0:
                # An explicit stage; the first of an ESDIRK (c_0 = 0, zero row) is f(t, y) = k1.
                first = i == 0 and co.c[0] == 0.0
                if split:  # k1 is the sum: one evaluation of the explicit part splits it
                    kE = self.evaluate(i, E, f_exp)
                    kI = self.k1 - kE if first else self.evaluate(i, E, f_imp)
                    KEs.append(kE), KIs.append(kI), Ks.append(kE + kI)
                else:
                    Ks.append(self.k1 if first else self.evaluate(i, E))
                continue
            key = (dt, g)
            lu = None if self.krylov else self.lus.get(key)
            if lu is None and not self.krylov:
                M = torch.eye(m, dtype=A.dtype, device=A.device) - (dt * g) * self.J
                lu = self.factor(key, M, f"stage {i + 1}")
            if self.weights is None:
                Y = self.y + (co.c[i] * dt) * self.k1
            else:
                # Adaptive: from the previous stage's value. An extrapolation along a derivative
                # (explicit Euler) overshoots far on a stiff step and Newton then diverges.
                Y = Y_prev
            Y = self.stage_newton(i, E, Y, dt * g, f_imp, lu)
            Y_prev = Y
            if self.weights is not None:
                # Adaptive: the stage's implicit derivative from its equation, (Y - E) / (h a_ii),
                # not f(Y) again: f would amplify the iteration's error by h |J| on a stiff
                # component (Hairer and Wanner IV.8), and it saves an evaluation. A stiffly
                # accurate tableau's y1 is then its last stage value.
                kI = (Y - E) / (dt * g)
                kE = self.evaluate(i, Y, f_exp) if split else None
            elif split:
                kE, kI = self.evaluate(i, Y, f_exp), self.evaluate(i, Y, f_imp)
            else:
                kE, kI = None, self.evaluate(i, Y)
            if split:
                KEs.append(kE), KIs.append(kI)
            Ks.append(kI if kE is None else kE + kI)
        return torch.stack(Ks).reshape((s,) + tuple(self.shape))
