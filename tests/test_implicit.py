"""The implicit Runge-Kutta solvers against independent references: their tableaus against the
collocation conditions, Gauss's and Radau's nodes and their stability functions; convergence
orders and dense output against Kepler's equation; a stiff problem against its closed form;
gradients against finite differences (gradcheck) and the continuous adjoints against
DirectAdjoint; and the places that run explicit tableaus only declining them cleanly.

The rooted-tree order conditions of every registered tableau, these included, are checked in
``tests/test_tableaus.py`` (``b . Phi(t) = 1/gamma(t)`` up to the order, and not beyond).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import kepler_exact, two_body_f

import odeflux
from odeflux import SolveError, Status
from odeflux.kernels import ImplicitStepKernel, NumpyStepKernel, choose_step_kernel
from odeflux.solvers import RK_SOLVERS, SOLVERS, ImplicitRK, ImplicitTableau, JacobianSource
from odeflux.solvers.implicit import SMALL_SYSTEM, collocation, factorize, jacobian, solve_factored

IMPLICIT = sorted(n for n in SOLVERS if not getattr(SOLVERS[n], "explicit", True) and not SOLVERS[n]().adaptive)  # fixed step (the adaptive ESDIRKs: test_esdirk.py)
NAMES = {  # torchdiffeq's names, as the brief and torchdiffeq spell them
    "implicit_euler": "ImplicitEuler", "implicit_midpoint": "ImplicitMidpoint", "trapezoid": "Trapezoid",
    "radauiia3": "RadauIIA3", "radauiia5": "RadauIIA5", "gl4": "GaussLegendre4", "gl6": "GaussLegendre6",
    "sdirk2": "SDIRK2", "trbdf2": "TRBDF2",
}  # fmt: skip
L_STABLE = ["implicit_euler", "radauiia3", "radauiia5", "sdirk2", "trbdf2"]
COLLOCATION = ["implicit_euler", "implicit_midpoint", "trapezoid", "radauiia3", "radauiia5", "gl4", "gl6"]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny states: a second intra-op thread only waits."""


def as_np(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().cpu().numpy()


def tableau(name: str) -> ImplicitTableau:
    return SOLVERS[name]().tableau


# -- the tableaus ----------------------------------------------------------------------------


def test_registry_and_exports():
    assert sorted(NAMES) == IMPLICIT
    for key, cls_name in NAMES.items():
        cls = SOLVERS[key]
        assert cls.__name__ == cls_name and getattr(odeflux, cls_name) is cls
        solver = cls()
        assert isinstance(solver, ImplicitRK) and isinstance(solver, odeflux.RungeKutta)
        assert not solver.explicit and not solver.adaptive and not solver.fsal and repr(solver) == f"{cls_name}()"
    assert all(SOLVERS[n]().explicit for n in RK_SOLVERS)


@pytest.mark.parametrize("name", IMPLICIT)
def test_simplifying_assumptions(name):
    """B(p): b . c^(k-1) = 1/k for k <= order, and row sums of A = c (C(1))."""
    tab = tableau(name)
    A, b, c = tab.a_matrix(), np.array(tab.b), np.array(tab.c)
    np.testing.assert_allclose(A.sum(axis=1), c, rtol=0, atol=1e-15)
    for k in range(1, tab.order + 1):
        assert b @ c ** (k - 1) == pytest.approx(1 / k, abs=1e-14), f"B({k})"


@pytest.mark.parametrize("name", COLLOCATION)
def test_collocation_methods_are_their_collocation_tableau(name):
    """A and b written out in the method's file equal the collocation method on its nodes
    (a_ij = int_0^c_i l_j), and the dense output is the collocation polynomial."""
    tab = tableau(name)
    A, b, interp = collocation(tab.c)
    np.testing.assert_allclose(tab.a_matrix(), A, rtol=0, atol=1e-14)
    np.testing.assert_allclose(tab.b, b, rtol=0, atol=1e-14)
    np.testing.assert_allclose(np.array(tab.interp), np.array(interp), rtol=0, atol=1e-14)


@pytest.mark.parametrize("name, s", [("implicit_midpoint", 1), ("gl4", 2), ("gl6", 3)])
def test_gauss_nodes(name, s):
    x, w = np.polynomial.legendre.leggauss(s)  # on [-1, 1]
    np.testing.assert_allclose(tableau(name).c, (x + 1) / 2, rtol=0, atol=1e-15)
    np.testing.assert_allclose(tableau(name).b, w / 2, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name, s", [("implicit_euler", 1), ("radauiia3", 2), ("radauiia5", 3)])
def test_radau_nodes(name, s):
    """Radau IIA's nodes: the zeros of P_s(2x - 1) - P_{s-1}(2x - 1) (1 among them)."""
    from numpy.polynomial import legendre as L

    coef = np.zeros(s + 1)
    coef[s] = 1.0
    coef[s - 1] -= 1.0
    roots = np.sort((L.legroots(coef) + 1) / 2)
    np.testing.assert_allclose(tableau(name).c, roots, rtol=0, atol=1e-14)


def stability(tab: ImplicitTableau, z: np.ndarray) -> np.ndarray:
    """R(z) = 1 + z b^T (I - z A)^-1 1, the step's factor on y' = lambda y (z = h lambda)."""
    A, b = tab.a_matrix(), np.array(tab.b)
    s = len(b)
    return np.array([1 + zi * b @ np.linalg.solve(np.eye(s) - zi * A, np.ones(s)) for zi in z])


@pytest.mark.parametrize("name", IMPLICIT)
def test_stability_function(name):
    """A-stable (|R| <= 1 on the imaginary axis and on the negative real axis); L-stable ones
    also damp the infinitely stiff mode (R(-inf) = 0). R matches exp(z) to the method's order."""
    tab = tableau(name)
    iy = 1j * np.logspace(-2, 6, 60)
    assert np.abs(stability(tab, iy)).max() <= 1 + 1e-12
    assert np.abs(stability(tab, -np.logspace(-2, 6, 60))).max() <= 1 + 1e-12
    r_inf = abs(stability(tab, np.array([-1e8]))[0])  # (far out, R's own round-off grows as |z| eps)
    if name in L_STABLE:
        assert r_inf < 1e-6
    else:
        assert r_inf > 0.5  # Gauss, midpoint and trapezoid: |R(-inf)| = 1
    z0 = 0.02 * 2 ** max(0, tab.order - 3)  # the local error C z^(order+1) well above round-off
    err = np.abs(stability(tab, np.array([z0, z0 / 2])) - np.exp([z0, z0 / 2]))
    assert math.log(err[0] / err[1], 2) == pytest.approx(tab.order + 1, abs=0.2)


@pytest.mark.parametrize("name", ["sdirk2", "trbdf2"])
def test_singly_diagonally_implicit(name):
    tab = tableau(name)
    A = tab.a_matrix()
    assert tab.diagonally_implicit and not np.triu(A, 1).any()
    diag = {d for d in np.diag(A) if d != 0}
    assert len(diag) == 1  # one Newton matrix per step
    gamma = {"sdirk2": 1 - math.sqrt(2) / 2, "trbdf2": (2 - math.sqrt(2)) / 2}[name]
    assert diag.pop() == pytest.approx(gamma, abs=1e-16)
    if name == "trbdf2":  # an explicit first stage, then the trapezoidal stage to gamma = 2 - sqrt(2)
        assert tab.c == pytest.approx((0.0, 2 - math.sqrt(2), 1.0), abs=1e-16) and not A[0].any()
    np.testing.assert_allclose(A[-1], tab.b, rtol=0, atol=1e-16)  # stiffly accurate


def test_tableau_rejects_malformed_data():
    with pytest.raises(ValueError, match="full 2 x 2"):
        ImplicitTableau(name="bad", order=1, c=(0.0, 1.0), a=((0.0,), (0.5, 0.5)), b=(0.5, 0.5), interp=((1.0,), (1.0,)), interp_order=1)
    with pytest.raises(ValueError, match="one entry per stage"):
        ImplicitTableau(name="bad", order=1, c=(1.0,), a=((1.0,),), b=(1.0, 0.0), interp=((1.0,),), interp_order=1)
    with pytest.raises(ValueError, match="ButcherTableau"):
        ImplicitTableau(name="bad", order=1, c=(0.0, 1.0), a=((0.0, 0.0), (1.0, 0.0)), b=(0.5, 0.5), interp=((1.0,), (1.0,)), interp_order=1)
    with pytest.raises(ValueError, match="max_iters"):
        odeflux.RadauIIA5(max_iters=0)
    with pytest.raises(ValueError, match="newton_tol"):
        odeflux.RadauIIA5(newton_tol=2.0)


# -- accuracy --------------------------------------------------------------------------------

KEPLER_E, T_END = 0.3, 1.0


def kepler_y0(dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(kepler_exact([0.0], KEPLER_E)[0], dtype=dtype)


def step_counts(order: int) -> tuple[int, ...]:
    # Errors well inside the asymptotic range and above round-off for each order.
    return {1: (20, 40, 80), 2: (10, 20, 40), 3: (10, 20, 40)}.get(order, (5, 10, 20))


@pytest.mark.parametrize("name", IMPLICIT)
def test_convergence_order(name):
    """The error at T on the Kepler orbit (nonlinear, closed form by Kepler's equation) falls as
    dt^order."""
    solver = SOLVERS[name]()
    ns = np.array(step_counts(solver.order))
    exact = kepler_exact([T_END], KEPLER_E)[0]
    errs = []
    for n in ns:
        sol = odeflux.solve(two_body_f, kepler_y0(), (0.0, T_END), solver=solver, dt0=T_END / n)
        assert sol.stats.n_accepted == n
        errs.append(np.abs(as_np(sol.ys[-1]) - exact).max())
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert abs(slope - solver.order) < 0.2, (slope, errs)


@pytest.mark.parametrize("name", IMPLICIT)
def test_dense_output_between_steps(name):
    """saveat times inside the steps come from the method's dense output: against the exact
    orbit their error falls at least as dt^min(order, interp_order + 1), and sol(t) agrees."""
    solver = SOLVERS[name]()
    expected = min(solver.order, solver.tableau.interp_order + 1)
    tq = np.linspace(0.013, T_END - 0.013, 41)  # never on a step's end
    ns = np.array((10, 20, 40) if expected > 1 else (20, 40, 80))
    errs = []
    for n in ns:
        sol = odeflux.solve(two_body_f, kepler_y0(), (0.0, T_END), solver=solver, dt0=T_END / n, saveat=tq, dense=True)
        errs.append(np.abs(as_np(sol.ys) - kepler_exact(tq, KEPLER_E)).max())
        torch.testing.assert_close(sol(tq.tolist()), sol.ys, rtol=1e-13, atol=1e-13)
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert slope > expected - 0.25, (slope, errs)
    assert errs[-1] < {1: 0.1, 2: 5e-3, 3: 1e-4}.get(expected, 1e-6)


LAM = 1000.0


def stiff_f(t, y):
    return -LAM * (y - torch.cos(t))


def stiff_exact(t: np.ndarray, y0: float) -> np.ndarray:
    """y' = -lam (y - cos t): the slow solution plus the fast transient exp(-lam t)."""
    slow = (LAM**2 * np.cos(t) + LAM * np.sin(t)) / (LAM**2 + 1)
    return slow + (y0 - LAM**2 / (LAM**2 + 1)) * np.exp(-LAM * t)


@pytest.mark.parametrize("name", IMPLICIT + ["euler", "rk4"])
def test_stiff_problem(name):
    """h * lambda = -50: explicit Euler and RK4 blow up; every implicit method follows the slow
    solution from a start on it, and the L-stable ones also damp a transient at once."""
    solver = SOLVERS[name]()
    ts = np.linspace(0.05, 1.0, 20)
    errors = {}
    for y0 in (0.0, LAM**2 / (LAM**2 + 1)):  # with a transient of size 1; on the slow solution
        sol = odeflux.solve(stiff_f, torch.tensor([y0], dtype=torch.float64), (0.0, 1.0), solver=solver, dt0=0.05, saveat=ts, throw=False)
        ys = as_np(sol.ys[:, 0])
        late = ts >= 0.5
        errors[y0] = np.abs(ys[late] - stiff_exact(ts[late], y0)).max() if np.isfinite(ys).all() else np.inf
    if solver.explicit:
        assert min(errors.values()) > 1e10
        return
    assert errors[LAM**2 / (LAM**2 + 1)] < 1e-3
    if name in L_STABLE:
        assert errors[0.0] < 1e-3
    else:  # A-stable only: |R(-50)| is near 1, the transient lingers (the reason for L-stability)
        assert errors[0.0] > 1e-3


def test_float32_and_no_grad():
    solver = odeflux.RadauIIA5()
    with torch.no_grad():
        sol = odeflux.solve(two_body_f, kepler_y0(torch.float32), (0.0, T_END), solver=solver, dt0=0.1)
    assert sol.ys.dtype == torch.float32
    np.testing.assert_allclose(as_np(sol.ys[-1]), kepler_exact([T_END], KEPLER_E)[0], atol=1e-5)


def test_batched_state_matches_rows_solved_alone():
    """A (B, n) state is one state of B * n entries (one dense Jacobian); each row's solution
    is the one it gets alone."""
    y0 = torch.tensor([[1.0, 0.0], [0.5, -0.3], [2.0, 0.1]], dtype=torch.float64)

    def f(t, y):
        return torch.stack([y[..., 1], -torch.sin(y[..., 0]) - 0.1 * t * y[..., 1]], dim=-1)

    for solver in (odeflux.RadauIIA5(), odeflux.TRBDF2()):
        sol = odeflux.solve(f, y0, (0.0, 1.5), solver=solver, dt0=0.1, saveat=[0.33, 1.5])
        assert sol.ys.shape == (2, 3, 2)
        for i in range(3):
            alone = odeflux.solve(f, y0[i], (0.0, 1.5), solver=solver, dt0=0.1, saveat=[0.33, 1.5])
            torch.testing.assert_close(sol.ys[:, i], alone.ys, rtol=1e-12, atol=1e-12)


def test_counts_every_evaluation():
    calls = 0

    def f(t, y):
        nonlocal calls
        calls += 1
        return -y**3 + torch.sin(t)

    for name in IMPLICIT:
        calls = 0
        sol = odeflux.solve(f, torch.tensor([1.0, 2.0], dtype=torch.float64), (0.0, 1.0), solver=SOLVERS[name](), dt0=0.1)
        assert sol.stats.n_f_evals == calls, name


# -- Newton's iteration ----------------------------------------------------------------------


def test_jacobian_against_closed_form():
    A = torch.tensor([[0.3, -1.2], [2.0, 0.1]], dtype=torch.float64)

    def f(t, y):
        return torch.tanh(A @ y) * t

    y, t = torch.tensor([0.4, -0.7], dtype=torch.float64), torch.tensor(1.5, dtype=torch.float64)
    with torch.no_grad():
        J = jacobian(f, t, y)
    expected = t * (1 - torch.tanh(A @ y) ** 2)[:, None] * A
    torch.testing.assert_close(J, expected, rtol=1e-14, atol=1e-14)
    assert not J.requires_grad


@pytest.mark.parametrize("m", [3, SMALL_SYSTEM, SMALL_SYSTEM + 1])
def test_factorize_small_by_inverse_large_by_lu(m):
    """Up to SMALL_SYSTEM rows a matrix is inverted once, past it kept as LU factors; either way
    solve_factored is M^-1 b (against numpy's solve), and info flags a singular matrix."""
    g = torch.Generator().manual_seed(m)
    M = torch.randn(m, m, dtype=torch.float64, generator=g) + m * torch.eye(m, dtype=torch.float64)
    b = torch.randn(m, dtype=torch.float64, generator=g)
    factors, info = factorize(M)
    assert len(factors) == (1 if m <= SMALL_SYSTEM else 2) and int(info) == 0
    np.testing.assert_allclose(solve_factored(factors, b).numpy(), np.linalg.solve(M.numpy(), b.numpy()), rtol=1e-12, atol=1e-14)
    _, info = factorize(torch.zeros(m, m, dtype=torch.float64))
    assert int(info) != 0


@pytest.mark.parametrize("solver", [odeflux.Kvaerno5, odeflux.Rodas5P])
def test_stiff_system_past_the_inverse_size(solver):
    """A linear stiff system of SMALL_SYSTEM + 6 states (its Newton or Rosenbrock matrix kept as LU
    factors) against the matrix exponential."""
    from scipy.linalg import expm

    n = SMALL_SYSTEM + 6
    rates = np.logspace(0, 4, n)
    A = -np.diag(rates) + np.diag(np.full(n - 1, 0.5), 1)  # upper bidiagonal: eigenvalues -rates
    y0 = np.ones(n)
    At = torch.from_numpy(A)
    sol = odeflux.solve(lambda t, y: At @ y, torch.from_numpy(y0), (0.0, 1.0), solver=solver(), rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(sol.ys[-1].numpy(), expm(A) @ y0, rtol=1e-5, atol=1e-8)


def test_jacobian_of_a_backward_vmap_cannot_batch():
    class Cube(torch.autograd.Function):  # a backward through NumPy: no batching rule
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x**3

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return torch.from_numpy(3 * x.detach().numpy() ** 2 * g.numpy())

    y = torch.tensor([0.5, -2.0], dtype=torch.float64)
    J = jacobian(lambda t, x: Cube.apply(x), 0.0, y)
    torch.testing.assert_close(J, torch.diag(3 * y**2))
    sol = odeflux.solve(lambda t, x: -Cube.apply(x), y, (0.0, 1.0), solver=odeflux.RadauIIA3(), dt0=0.1)
    exact = y / torch.sqrt(1 + 2 * y**2)  # y' = -y^3
    torch.testing.assert_close(sol.ys[-1], exact, rtol=1e-3, atol=1e-4)


def test_a_field_can_give_its_own_jacobian():
    class Linear(JacobianSource):
        def __init__(self):
            self.M = torch.tensor([[-2.0, 1.0], [0.0, -30.0]], dtype=torch.float64)
            self.jacobians = 0

        def __call__(self, t, y):
            return self.M @ y

        def jacobian(self, t, y):
            self.jacobians += 1
            return self.M

    f = Linear()
    y0 = torch.tensor([1.0, 1.0], dtype=torch.float64)
    sol = odeflux.solve(f, y0, (0.0, 1.0), solver=odeflux.RadauIIA5(), dt0=0.1)
    assert f.jacobians == 10
    exact = torch.linalg.matrix_exp(f.M) @ y0
    torch.testing.assert_close(sol.ys[-1], exact, rtol=1e-6, atol=1e-8)


def test_newton_failure_is_a_status_not_nan():
    """y' = y^2 from 1 blows up at t = 1; an implicit Euler step of h > 1/4 has no real
    solution (h Z^2 + (2h - 1) Z + h = 0), and at h = 1/2 its Newton matrix 1 - 2h is singular."""

    def f(t, y):
        return y**2

    y0 = torch.tensor([1.0], dtype=torch.float64)
    sol = odeflux.solve(f, y0, (0.0, 1.0), solver=odeflux.ImplicitEuler(), dt0=0.4, throw=False)
    assert sol.status == Status.NEWTON_FAILED and not sol.success
    assert "Newton" in sol.message and "dt0" in sol.message
    assert torch.isfinite(sol.ys).all() and sol.t_final == 0.0
    with pytest.raises(SolveError, match="NEWTON_FAILED.*Newton's iteration") as info:
        odeflux.solve(f, y0, (0.0, 1.0), solver=odeflux.ImplicitEuler(), dt0=0.4)
    assert info.value.status == Status.NEWTON_FAILED
    with pytest.raises(SolveError, match="singular"):
        odeflux.solve(f, y0, (0.0, 1.0), solver=odeflux.ImplicitEuler(), dt0=0.5)
    # Too few iterations allowed fails the same way, with the cap named.
    with pytest.raises(SolveError, match="max_iters=1"):
        odeflux.solve(f, y0, (0.0, 0.5), solver=odeflux.RadauIIA5(max_iters=1), dt0=0.1)
    # With small enough steps it converges.
    sol = odeflux.solve(f, y0, (0.0, 0.5), solver=odeflux.RadauIIA5(), dt0=0.05)
    assert float(sol.ys[-1]) == pytest.approx(2.0, rel=1e-6)


def test_clear_errors():
    y0 = torch.tensor([1.0])
    with pytest.raises(ValueError, match="pass dt0="):
        odeflux.solve(lambda t, y: -y, y0, (0.0, 1.0), solver=odeflux.RadauIIA5())
    with pytest.raises(ValueError, match="no error estimate"):
        odeflux.solve(lambda t, y: -y, y0, (0.0, 1.0), solver=odeflux.SDIRK2(), controller=odeflux.PIController())
    with pytest.raises(ValueError, match="compile=False"):
        odeflux.solve(lambda t, y: -y, y0, (0.0, 1.0), solver=odeflux.RadauIIA5(), dt0=0.1, compile=True)
    with pytest.raises(TypeError, match="instance"):
        odeflux.solve(lambda t, y: -y, y0, (0.0, 1.0), solver=odeflux.RadauIIA5, dt0=0.1)


# -- the explicit-only paths decline ---------------------------------------------------------


def test_explicit_only_kernels_decline():
    field = odeflux.VectorField(odeflux.MLP([torch.nn.Linear(3, 8), torch.nn.Linear(8, 3)]), time_dependent=False)
    y0 = torch.randn(4, 3)
    with torch.no_grad():
        explicit = choose_step_kernel(field, y0, odeflux.RK4(), rtol=1e-3, atol=1e-6, parts=None, float_time=True, compiled=False)
        implicit = choose_step_kernel(field, y0, odeflux.RadauIIA5(), rtol=1e-3, atol=1e-6, parts=None, float_time=True, compiled=False)
    assert isinstance(explicit, NumpyStepKernel)  # (the premise: this field and state get the NumPy kernel)
    assert isinstance(implicit, ImplicitStepKernel)
    with pytest.raises(TypeError, match="explicit tableaus only"):
        NumpyStepKernel(field, odeflux.RadauIIA5(), y0, 1e-3, 1e-6, None, True, None, None)
    with pytest.raises(ValueError, match="compile=False"):
        choose_step_kernel(field, y0, odeflux.SDIRK2(), rtol=1e-3, atol=1e-6, parts=None, float_time=True, compiled=True)


def test_hand_written_reverse_pass_declines():
    """DirectAdjoint writes its reverse pass out for explicit tableaus and a field with a VJP
    rule; with an implicit solver it records the graph, and the gradient is the graph's."""
    from odeflux.problem import make_problem
    from odeflux.sensitivity.rk_reverse import reverse_pass_rule

    torch.manual_seed(0)
    mlp = odeflux.MLP([torch.nn.Linear(2, 6), torch.nn.Linear(6, 2)]).double()
    field = odeflux.VectorField(mlp, time_dependent=False)
    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    args = (field, y0, (0.0, 1.0))
    kw = dict(args=None, params=None, rtol=1e-3, atol=1e-6, saveat=None, save_everystep=False, save_start=True,
              save_end=True, dense=False, dt0=0.1, dtmin=None, dtmax=None, max_steps=100, controller=None, compile=False)  # fmt: skip
    assert reverse_pass_rule(make_problem(*args, odeflux.RK4(), **kw)[0]) is not None  # (the premise)
    assert reverse_pass_rule(make_problem(*args, odeflux.RadauIIA3(), **kw)[0]) is None
    grads = []
    for alg in (odeflux.DirectAdjoint(), odeflux.DirectAdjoint(hand_written=False)):
        sol = odeflux.solve(field, y0, (0.0, 1.0), solver=odeflux.RadauIIA3(), dt0=0.1, sensealg=alg)
        assert sol.backward_stats is None  # recorded, not ReverseRun's
        grads.append(torch.autograd.grad(sol.ys[-1].square().sum(), [y0, *mlp.parameters()]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- gradients -------------------------------------------------------------------------------


def param_field(t, y, theta):
    return torch.stack([theta[0] * y[1] - y[0] ** 3, -theta[1] * torch.sin(y[0]) + 0.2 * torch.cos(t) * y[1]])


@pytest.mark.parametrize("name", IMPLICIT)
def test_gradcheck_through_the_newton_iterations(name):
    """DirectAdjoint backpropagates through the iterations (the Newton matrix a constant):
    the gradient matches finite differences of the same discrete solve."""
    solver = SOLVERS[name]()

    def run(y0, theta):
        return odeflux.solve(param_field, y0, (0.0, 1.0), args=theta, solver=solver, dt0=0.25, saveat=[0.3, 1.0]).ys

    y0 = torch.tensor([0.8, -0.4], dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([1.3, 0.7], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(run, (y0, theta), eps=1e-6, atol=1e-7, rtol=1e-5)


class Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([[-0.5, 1.0], [-1.0, -0.3]], dtype=torch.float64))

    def forward(self, t, y):
        return torch.tanh(y @ self.w.T) + 0.1 * torch.sin(t) * y


ADJOINTS = [odeflux.InterpolatingAdjoint, odeflux.BacksolveAdjoint, odeflux.QuadratureAdjoint, odeflux.GaussAdjoint]


@pytest.mark.parametrize("name, tol", [("radauiia5", 1e-7), ("gl4", 1e-6), ("trbdf2", 2e-3)])
@pytest.mark.parametrize("adjoint", ADJOINTS, ids=lambda a: a.__name__)
def test_continuous_adjoints_agree_with_direct(name, tol, adjoint):
    """The continuous adjoints solve their backward systems with the problem's implicit solver
    and dt0 (their own Jacobians: odeflux.solvers.JacobianSource): their gradients agree with
    DirectAdjoint's to the method's accuracy at that dt."""
    torch.manual_seed(0)
    f = Field()
    y0 = torch.tensor([[1.0, 0.5], [0.2, -0.4]], dtype=torch.float64, requires_grad=True)
    grads = []
    for alg in (odeflux.DirectAdjoint(), adjoint()):
        sol = odeflux.solve(f, y0, (0.0, 1.0), solver=SOLVERS[name](), dt0=0.05, saveat=[0.5, 1.0], sensealg=alg)
        g = torch.autograd.grad(sol.ys.square().sum(), [y0, f.w])
        grads.append(torch.cat([x.reshape(-1) for x in g]))
    direct, cont = grads
    assert (cont - direct).abs().max() <= tol * direct.abs().max()


def test_neural_ode_with_an_mlp_field():
    """A NeuralODE layer on odeflux's MLP (whose VJPs the adjoints take on NumPy arrays, which
    autograd cannot differentiate: the adjoint systems give their Jacobians) with RadauIIA5:
    the default InterpolatingAdjoint's parameter gradient is DirectAdjoint's."""
    torch.manual_seed(0)
    mlp = odeflux.MLP([torch.nn.Linear(3, 8), torch.nn.Linear(8, 3)]).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    grads = []
    for alg in ("default", odeflux.DirectAdjoint()):
        node = odeflux.NeuralODE(mlp, solver=odeflux.RadauIIA5(), sensealg=alg, dt0=0.1)
        out = node(x)
        grads.append(torch.autograd.grad(out.square().sum(), list(mlp.parameters())))
        assert node.last_stats.n_accepted == 10
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
