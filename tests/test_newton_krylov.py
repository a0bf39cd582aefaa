"""Matrix-free Newton-Krylov implicit steps (``linear_solver="gmres"``): GMRES alone, against the
dense-LU Newton on a stiff system, on a large-state heat equation with its exact solution, a
gradient through it against central differences, the continuous adjoints' backward systems
solved matrix-free (against the dense LU and central differences), and preconditioning."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from conftest import ROBER_K, T_GRAD, W_GRAD, rober_fd_gradient
from conftest import rober as conftest_rober
from scipy.integrate import solve_ivp

import odeflux
from odeflux.solvers.implicit import gmres

F64 = torch.float64


def test_gmres_matches_dense_solve():
    g = torch.Generator().manual_seed(0)
    n = 60
    A = 4 * torch.eye(n, dtype=F64) + torch.randn(n, n, dtype=F64, generator=g) / math.sqrt(n)
    b = torch.randn(n, dtype=F64, generator=g)
    for restart in (8, 60):  # restarted and not
        res = gmres(lambda v: A @ v, b, rtol=1e-12, restart=restart, max_iters=500)
        assert res.converged and res.iterations < 500
        torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=0, atol=1e-10)
    res = gmres(lambda v: A @ v, b, rtol=1e-12, restart=5, max_iters=5)  # out of products: reported
    assert not res.converged and res.iterations == 5


def rober(t, y):
    y1, y2, y3 = y[0], y[1], y[2]
    return torch.stack([-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2**2, 3e7 * y2**2])


def test_kvaerno5_gmres_matches_lu_on_rober():
    """Tight linear solves (krylov_rtol 1e-10): the same solution within the tolerance and the
    same accepted steps, give or take a few (full Newton at the iterate vs the LU path's kept
    Jacobian stop the iterations at different points); no Jacobian formed."""
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    kw = dict(rtol=1e-6, atol=1e-10)
    with torch.no_grad():
        lu = odeflux.solve(rober, y0, (0.0, 40.0), solver=odeflux.Kvaerno5(), **kw)
        kr = odeflux.solve(rober, y0, (0.0, 40.0), solver=odeflux.Kvaerno5(linear_solver="gmres", krylov_rtol=1e-10), **kw)
    assert kr.status == odeflux.Status.SUCCESS
    tol = 1e-6 * lu.ys[-1].abs() + 1e-10
    assert ((kr.ys[-1] - lu.ys[-1]).abs() <= 10 * tol).all()
    assert abs(kr.stats.n_accepted - lu.stats.n_accepted) <= max(3, lu.stats.n_accepted // 10)
    s = kr.stats
    assert s.n_jacobians == 0 and s.n_factorizations == 0
    assert s.n_krylov_iterations > 0 and s.n_jvps >= s.n_krylov_iterations and s.n_linear_solves == s.n_newton_iterations


def heat(n: int):
    dx = 1.0 / (n + 1)
    x = torch.arange(1, n + 1, dtype=F64) * dx
    modes = ((1, 1.0), (3, 0.5), (12, 0.2))
    lam = {k: -4 / dx**2 * math.sin(k * math.pi * dx / 2) ** 2 for k, _ in modes}  # D2's eigenvalues

    def f(t, y):  # y' = D2 y, zero at both ends
        pad = torch.nn.functional.pad(y, (1, 1))
        return (pad[2:] - 2 * y + pad[:-2]) / dx**2

    def exact(t):
        return sum(a * math.exp(lam[k] * t) * torch.sin(k * math.pi * x) for k, a in modes)

    return f, exact


@pytest.mark.parametrize(("solver", "n"), [(odeflux.Kvaerno5, 200), (odeflux.KenCarp4, 100)])
def test_heat_equation_large_state(solver, n):
    """200 points (stiffness h |lambda_max| ~ 1.6e5 h): matches the semi-discrete exact solution
    with no Jacobian formed (Kvaerno5 measured: 25 steps, 296 Newton updates, 4988 GMRES steps,
    error 1.4e-7 of a max of 1.0)."""
    f, exact = heat(n)
    with torch.no_grad():
        sol = odeflux.solve(f, exact(0.0), (0.0, 0.05), solver=solver(linear_solver="gmres"), rtol=1e-5, atol=1e-9)
    assert sol.status == odeflux.Status.SUCCESS
    err = float((sol.ys[-1] - exact(0.05)).abs().max())
    assert err < 1e-5 * float(exact(0.05).abs().max()), err
    assert sol.stats.n_jacobians == 0 and sol.stats.n_factorizations == 0 and sol.stats.n_jvps > 0


@pytest.mark.parametrize("name", ["sdirk2", "radauiia5"])
def test_fixed_step_solvers(name):
    """The fixed-step tableaus (stage by stage, and coupled) give the LU path's solution."""
    f, exact = heat(40)
    cls = odeflux.solvers.SOLVERS[name]
    with torch.no_grad():
        a = odeflux.solve(f, exact(0.0), (0.0, 0.05), solver=cls(), dt0=0.005)
        b = odeflux.solve(f, exact(0.0), (0.0, 0.05), solver=cls(linear_solver="gmres", krylov_rtol=1e-12), dt0=0.005)
    torch.testing.assert_close(b.ys[-1], a.ys[-1], rtol=0, atol=1e-10)
    assert b.stats.n_jacobians == 0


class Decay(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor([50.0, 2.0], dtype=F64))

    def forward(self, t, y):
        return torch.stack([-self.k[0] * (y[0] - torch.cos(t) * y[1]), -self.k[1] * y[1] ** 2])


@pytest.mark.parametrize("name", ["sdirk2", "radauiia5"])
def test_gradient_direct_adjoint_against_finite_differences(name):
    """DirectAdjoint through GMRES-solved stages (the implicit function theorem's gradient, a
    transposed GMRES with VJPs), stage by stage and coupled, against central differences of the
    same fixed-step solve."""
    model = Decay()
    y0 = torch.tensor([0.0, 1.0], dtype=F64)
    kw = dict(solver=odeflux.solvers.SOLVERS[name](linear_solver="gmres", krylov_rtol=1e-10), dt0=0.05)

    def loss(k):
        with torch.no_grad():
            model.k.copy_(k)
            return float(odeflux.solve(model, y0, (0.0, 0.5), **kw).ys[-1].sum())

    sol = odeflux.solve(model, y0, (0.0, 0.5), sensealg=odeflux.DirectAdjoint(), **kw)
    (g,) = torch.autograd.grad(sol.ys[-1].sum(), [model.k])
    k0 = model.k.detach().clone()
    fd = []
    for i in range(2):
        e = torch.zeros(2, dtype=F64)
        e[i] = 1e-5 * k0[i]
        fd.append((loss(k0 + e) - loss(k0 - e)) / (2 * e[i]))
    torch.testing.assert_close(g, torch.tensor(fd, dtype=F64), rtol=1e-6, atol=1e-10)


class Damped(torch.nn.Module):
    """A forced, nonlinear damped pair (rates 12 and 2): backward-integrable over [0, 0.5] (its
    fast mode grows by e^6 backwards), for BacksolveAdjoint as well as the others."""

    def __init__(self):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor([12.0, 2.0, 0.5], dtype=F64))

    def forward(self, t, y):
        k = self.k
        return torch.stack([-k[0] * (y[0] - torch.cos(t) * y[1]), -k[1] * y[1] + k[2] * y[0] ** 2])


DAMPED_Y0, DAMPED_T, DAMPED_W = (0.0, 1.0), (0.25, 0.5), ((1.0, 2.0), (0.5, -1.0))


@functools.lru_cache(maxsize=1)
def damped_fd() -> np.ndarray:
    """Central differences (step 1e-5 relative) of the loss on scipy's Radau solution at rtol 1e-12."""

    def loss(k):
        rhs = lambda t, y: [-k[0] * (y[0] - math.cos(t) * y[1]), -k[1] * y[1] + k[2] * y[0] ** 2]  # noqa: E731
        sol = solve_ivp(rhs, (0.0, DAMPED_T[-1]), DAMPED_Y0, method="Radau", t_eval=DAMPED_T, rtol=1e-12, atol=1e-14)
        return float((sol.y.T * np.array(DAMPED_W)).sum())

    k0 = Damped().k.detach().numpy()
    out = []
    for i in range(len(k0)):
        e = np.zeros_like(k0)
        e[i] = 1e-5 * k0[i]
        out.append((loss(k0 + e) - loss(k0 - e)) / (2 * e[i]))
    return np.array(out)


def damped_gradient(adjoint, solver, **kw) -> tuple[torch.Tensor, odeflux.solution.BackwardStats]:
    model = Damped()
    sol = odeflux.solve(model, torch.tensor(DAMPED_Y0, dtype=F64), (0.0, DAMPED_T[-1]), saveat=list(DAMPED_T), solver=solver,
                        sensealg=adjoint(), **kw)  # fmt: skip
    (g,) = torch.autograd.grad((sol.ys * torch.tensor(DAMPED_W, dtype=F64)).sum(), [model.k])
    return g, sol.backward_stats


def no_dense_jacobian(monkeypatch):
    """Make every adjoint system's dense Jacobian an error: a matrix-free solve never asks for one."""
    from odeflux.sensitivity.backsolve import BacksolveRHS
    from odeflux.sensitivity.rhs import _PlannedRHS

    def formed(self, t, z):
        raise AssertionError("the adjoint system's Jacobian was formed")

    for cls in (_PlannedRHS, BacksolveRHS):
        monkeypatch.setattr(cls, "jacobian", formed)


ADJOINTS = [odeflux.InterpolatingAdjoint, odeflux.QuadratureAdjoint, odeflux.GaussAdjoint, odeflux.BacksolveAdjoint]


@pytest.mark.parametrize("adjoint", ADJOINTS, ids=lambda a: a.__name__)
def test_continuous_adjoints_matrix_free(adjoint, monkeypatch):
    """Each continuous adjoint with Kvaerno5(linear_solver="gmres") (the adjoint takes the
    forward's solver): each backward Newton update by GMRES with products of the adjoint system's
    Jacobian (VJPs of f; BacksolveAdjoint's y block by JVPs), none formed; the gradient agrees with
    the dense-LU Kvaerno5's to the solve tolerance and with central differences of scipy's Radau
    (measured at rtol 1e-8: 3e-9 from the dense path's, 6e-8 BacksolveAdjoint; 7e-7 from the
    differences, 2e-6 BacksolveAdjoint, as the dense path's)."""
    kw = dict(rtol=1e-8, atol=1e-11)
    dense, dense_stats = damped_gradient(adjoint, odeflux.Kvaerno5(), **kw)
    no_dense_jacobian(monkeypatch)
    g, stats = damped_gradient(adjoint, odeflux.Kvaerno5(linear_solver="gmres"), **kw)
    assert stats.n_jacobians == 0 and stats.n_factorizations == 0
    assert stats.n_krylov_iterations > 0 and stats.n_jvps >= stats.n_krylov_iterations
    # Products of the true Jacobian (Newton at each iterate): no more iterations than the dense
    # path's simplified Newton (a wrong product converges slowly or not at all).
    assert stats.n_newton_iterations <= dense_stats.n_newton_iterations
    torch.testing.assert_close(g, dense, rtol=1e-6, atol=0)
    np.testing.assert_allclose(g.numpy(), damped_fd(), rtol=5e-6)


@pytest.mark.parametrize("adjoint", ADJOINTS, ids=lambda a: a.__name__)
def test_continuous_adjoints_matrix_free_coupled(adjoint, monkeypatch):
    """The same with a full tableau (RadauIIA5, fixed steps: each update one GMRES on the coupled
    I - h A (x) J_aug): the dense-LU RadauIIA5's gradient at the same dt0 (measured: within 6e-15),
    and central differences (3e-8, BacksolveAdjoint 2e-7)."""
    dense, dense_stats = damped_gradient(adjoint, odeflux.RadauIIA5(), dt0=0.0125)
    no_dense_jacobian(monkeypatch)
    g, stats = damped_gradient(adjoint, odeflux.RadauIIA5(linear_solver="gmres", krylov_rtol=1e-10), dt0=0.0125)
    assert stats.n_jacobians == 0 and stats.n_krylov_iterations > 0
    assert stats.n_newton_iterations <= dense_stats.n_newton_iterations
    torch.testing.assert_close(g, dense, rtol=1e-10, atol=0)
    np.testing.assert_allclose(g.numpy(), damped_fd(), rtol=1e-6)


class Rober(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(ROBER_K, dtype=F64))

    def forward(self, t, y):
        return conftest_rober(t, y, self.k)


@pytest.mark.parametrize("adjoint", ADJOINTS[:3], ids=lambda a: a.__name__)
def test_rober_rate_constants_matrix_free(adjoint, monkeypatch):
    """ROBER's rate-constant gradients with the backward solve matrix-free (the forward dense
    Kvaerno5, the adjoint Kvaerno5(linear_solver="gmres")): within 1e-5 relative of central
    differences of scipy's Radau, as the dense-LU adjoints are in test_esdirk (measured: 4e-8
    InterpolatingAdjoint, 4e-6 the quadrature adjoints through Kvaerno5's cubic dense output)."""
    no_dense_jacobian(monkeypatch)
    model = Rober()
    sol = odeflux.solve(model, torch.tensor([1.0, 0.0, 0.0], dtype=F64), (0.0, T_GRAD), solver=odeflux.Kvaerno5(), rtol=1e-6,
                        atol=1e-14, sensealg=adjoint(solver=odeflux.Kvaerno5(linear_solver="gmres")))  # fmt: skip
    (g,) = torch.autograd.grad(sol.ys[-1] @ torch.from_numpy(W_GRAD), [model.k])
    assert sol.backward_stats.n_jacobians == 0 and sol.backward_stats.n_krylov_iterations > 0
    np.testing.assert_allclose(g.numpy(), rober_fd_gradient(), rtol=1e-5)


def laplacian_preconditioner(n: int, calls: list | None = None):
    """``(I - h_gamma D2)^-1`` exactly (D2 the heat equation's tridiagonal Laplacian), by one LU a call."""
    dx = 1.0 / (n + 1)
    D2 = (torch.diag(torch.full((n,), -2.0, dtype=F64)) + torch.diag(torch.ones(n - 1, dtype=F64), 1)
          + torch.diag(torch.ones(n - 1, dtype=F64), -1)) / dx**2  # fmt: skip

    def preconditioner(t, y, h_gamma):
        if calls is not None:
            calls.append(h_gamma)
        LU, pivots = torch.linalg.lu_factor(torch.eye(n, dtype=F64) - h_gamma * D2)
        return lambda v: torch.linalg.lu_solve(LU, pivots, v.unsqueeze(-1)).squeeze(-1)

    return preconditioner


def test_preconditioner_cuts_krylov_iterations(one_torch_thread):
    """The 200-point heat equation with Kvaerno5: an exact tridiagonal preconditioner (right
    preconditioning: the same residuals and Newton tests) takes the same steps and Newton updates
    and the same solution (measured: 25 steps, 296 updates; the solutions 8e-14 apart) in one
    GMRES step per update instead of 17 (296 instead of 4988; 0.3 s instead of 1.3 s)."""
    n = 200
    f, exact = heat(n)
    calls: list = []
    with torch.no_grad():
        kw = dict(rtol=1e-5, atol=1e-9)
        plain = odeflux.solve(f, exact(0.0), (0.0, 0.05), solver=odeflux.Kvaerno5(linear_solver="gmres"), **kw)
        solver = odeflux.Kvaerno5(linear_solver="gmres", preconditioner=laplacian_preconditioner(n, calls))
        pre = odeflux.solve(f, exact(0.0), (0.0, 0.05), solver=solver, **kw)
    a, b = plain.stats, pre.stats
    assert b.n_krylov_iterations * 5 <= a.n_krylov_iterations, (a.n_krylov_iterations, b.n_krylov_iterations)
    assert b.n_steps == a.n_steps and b.n_newton_iterations == a.n_newton_iterations
    assert len(calls) == b.n_linear_solves  # one preconditioner a Newton update
    torch.testing.assert_close(pre.ys[-1], plain.ys[-1], rtol=0, atol=1e-5 * 1e-3)
    assert float((pre.ys[-1] - exact(0.05)).abs().max()) < 1e-5


def test_preconditioner_blockwise_on_a_full_tableau(one_torch_thread):
    """RadauIIA5 (the coupled I - h A (x) J): the preconditioner block by block, stage i's
    (I - h a_ii D2)^-1, 14x fewer GMRES steps (measured 347 against 4962, which needs
    krylov_max_iters raised), the dense LU's solution (3e-14 apart)."""
    n = 200
    f, exact = heat(n)
    calls: list = []
    tab = odeflux.RadauIIA5().tableau
    with torch.no_grad():
        lu = odeflux.solve(f, exact(0.0), (0.0, 0.05), solver=odeflux.RadauIIA5(), dt0=0.0025)
        plain = odeflux.solve(f, exact(0.0), (0.0, 0.05), dt0=0.0025,
                              solver=odeflux.RadauIIA5(linear_solver="gmres", krylov_max_iters=3000, krylov_restart=100))  # fmt: skip
        solver = odeflux.RadauIIA5(linear_solver="gmres", preconditioner=laplacian_preconditioner(n, calls))
        pre = odeflux.solve(f, exact(0.0), (0.0, 0.05), solver=solver, dt0=0.0025)
    assert pre.stats.n_krylov_iterations * 5 <= plain.stats.n_krylov_iterations
    assert sorted(set(round(c / 0.0025, 12) for c in calls)) == sorted(round(tab.a[i][i], 12) for i in range(3))
    torch.testing.assert_close(pre.ys[-1], lu.ys[-1], rtol=0, atol=1e-10)


def test_preconditioner_leaves_the_adjoint_systems_alone():
    """A continuous adjoint taking the forward's preconditioned solver: the preconditioner (of
    I - h_gamma df/dy) serves the forward solve only; the backward system, whose Jacobian is not
    f's, runs unpreconditioned, and the gradient is the unpreconditioned one's."""
    calls: list = []

    def exact_inverse(t, y, h_gamma):
        calls.append(t)
        M = torch.eye(2, dtype=F64) - h_gamma * odeflux.solvers.implicit.jacobian(Damped(), t, y)
        return lambda v: torch.linalg.solve(M, v)

    plain, _ = damped_gradient(odeflux.GaussAdjoint, odeflux.Kvaerno5(linear_solver="gmres"), rtol=1e-8, atol=1e-11)
    model = Damped()
    solver = odeflux.Kvaerno5(linear_solver="gmres", preconditioner=exact_inverse)
    sol = odeflux.solve(model, torch.tensor(DAMPED_Y0, dtype=F64), (0.0, DAMPED_T[-1]), saveat=list(DAMPED_T), solver=solver,
                        rtol=1e-8, atol=1e-11, sensealg=odeflux.GaussAdjoint())  # fmt: skip
    assert len(calls) == sol.stats.n_linear_solves > 0
    # The exact inverse: each forward update's GMRES converges in one step.
    assert sol.stats.n_krylov_iterations == sol.stats.n_linear_solves
    (g,) = torch.autograd.grad((sol.ys * torch.tensor(DAMPED_W, dtype=F64)).sum(), [model.k])
    assert len(calls) == sol.stats.n_linear_solves and sol.backward_stats.n_krylov_iterations > 0
    torch.testing.assert_close(g, plain, rtol=1e-6, atol=0)


def test_options_checked():
    with pytest.raises(ValueError, match="linear_solver"):
        odeflux.Kvaerno5(linear_solver="cg")
    with pytest.raises(ValueError, match="krylov_rtol"):
        odeflux.Kvaerno5(linear_solver="gmres", krylov_rtol=0.0)
    with pytest.raises(TypeError, match=r"preconditioner must be a callable \(t, y, h_gamma\) -> apply, got ndarray"):
        odeflux.Kvaerno5(linear_solver="gmres", preconditioner=np.eye(3))
    with pytest.raises(ValueError, match="give linear_solver='gmres' with it"):
        odeflux.Kvaerno5(preconditioner=lambda t, y, hg: lambda v: v)


def test_a_gradient_solve_short_of_its_tolerance_is_said(monkeypatch):
    """The backward pass's transposed GMRES (the implicit function theorem's solve) that stops
    short of its tolerance warns in one line rather than returning a coarse gradient silently."""
    from odeflux.solvers import implicit

    real = implicit.gmres

    def short(matvec, b, rtol=1e-8, **kw):  # the backward's solve (rtol <= 1e-10) stops at once
        res = real(matvec, b, rtol=rtol, **kw)
        return res._replace(converged=False) if rtol <= 1e-10 else res

    monkeypatch.setattr(implicit, "gmres", short)
    model = Decay()
    kw = dict(solver=odeflux.solvers.SOLVERS["sdirk2"](linear_solver="gmres", krylov_rtol=1e-6), dt0=0.1)
    sol = odeflux.solve(model, torch.tensor([0.0, 1.0], dtype=F64), (0.0, 0.2), sensealg=odeflux.DirectAdjoint(), **kw)
    with pytest.warns(RuntimeWarning, match=r"the gradient's GMRES solve stopped at residual .*use linear_solver='lu'"):
        torch.autograd.grad(sol.ys[-1].sum(), [model.k])


def test_a_jacobian_source_field_by_its_default_products():
    """A user's JacobianSource that gives only ``jacobian`` runs under GMRES by the default
    ``jacobian_product`` (the block formed once per linearisation, products by it)."""

    class Linear(odeflux.solvers.JacobianSource):
        M = torch.tensor([[-2.0, 1.0], [0.0, -30.0]], dtype=F64)

        def __call__(self, t, y):
            return self.M @ y

        def jacobian(self, t, y):
            return self.M

    y0 = torch.tensor([1.0, 1.0], dtype=F64)
    with torch.no_grad():
        sol = odeflux.solve(Linear(), y0, (0.0, 1.0), solver=odeflux.RadauIIA5(linear_solver="gmres", krylov_rtol=1e-12), dt0=0.1)
    torch.testing.assert_close(sol.ys[-1], torch.linalg.matrix_exp(Linear.M) @ y0, rtol=1e-6, atol=1e-8)
    assert sol.stats.n_jacobians == 0 and sol.stats.n_krylov_iterations > 0
