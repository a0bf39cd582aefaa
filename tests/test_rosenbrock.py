"""The Rosenbrock solvers (Rosenbrock23, Rodas5P): their tableaus against the order conditions,
observed orders, L-stability, stiff benchmarks against scipy's Radau, gradients against finite
differences, dense output, counters and failure statuses."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from conftest import ROBER_K, hires, hires_np, rober, rober_np

import odeflux
from odeflux import ConstantStepSize, Rodas5P, Rosenbrock23, Status
from odeflux.solvers import SOLVERS, JacobianSource
from odeflux.solvers.rodas5p import RODAS5P
from odeflux.solvers.rosenbrock23 import ROSENBROCK23

pytestmark = pytest.mark.usefixtures("one_torch_thread")

F64 = torch.float64


# -- the tableaus -------------------------------------------------------------------------------


def _conditions(tab, w: np.ndarray) -> list[float]:
    """Residuals of the Rosenbrock order conditions up to order 4 (Hairer-Wanner II, Table IV.7.1)
    for weights ``w`` on the classical stages: ``beta = alpha + Gamma`` below the diagonal,
    ``beta'_j = sum_k beta_jk``, ``alpha_j = sum_k alpha_jk``."""
    alpha, G, _, _ = tab.classical()
    g = tab.gamma
    a = alpha.sum(1)
    B = alpha + np.tril(G, -1)
    bp = B.sum(1)
    return [
        w.sum() - 1,  # order 1
        w @ bp - (1 / 2 - g),  # order 2
        w @ a**2 - 1 / 3, w @ (B @ bp) - (1 / 6 - g + g * g),  # order 3
        w @ a**3 - 1 / 4, w @ (a * (alpha @ bp)) - (1 / 8 - g / 3), w @ (B @ a**2) - (1 / 12 - g / 3),
        w @ (B @ (B @ bp)) - (1 / 24 - g / 2 + 1.5 * g * g - g**3),  # order 4
    ]  # fmt: skip


@pytest.mark.parametrize("tab, p, p_hat", [(RODAS5P, 4, 4), (ROSENBROCK23, 2, 3)], ids=["rodas5p", "rosenbrock23"])
def test_order_conditions(tab, p, p_hat):
    """The conditions of the claimed orders hold (Rodas5P's fifth order: the convergence tests);
    the next ones fail, so the check has teeth. Stage times and time-derivative coefficients are
    the row sums of alpha and Gamma."""
    alpha, G, b, b_hat = tab.classical()
    np.testing.assert_allclose(alpha.sum(1), tab.c, atol=1e-13)
    np.testing.assert_allclose(G.sum(1), tab.d, atol=1e-13)
    np.testing.assert_allclose(np.diag(G), tab.gamma, rtol=1e-14)
    count = {1: 1, 2: 2, 3: 4, 4: 8}
    for w, q in ((b, p), (b_hat, p_hat)):
        r = np.abs(_conditions(tab, w))
        assert r[: count[q]].max() < 1e-12, r
        if q < 4:
            assert r[count[q] : count[q + 1]].max() > 1e-3, r


def test_rosenbrock23_is_a_w_method_and_rodas5p_is_stiffly_accurate():
    alpha, G, b, _ = ROSENBROCK23.classical()
    # W-method conditions of order 2: sum b_j alpha_j = 1/2 and sum b_j gamma_j = 0 (any J).
    assert abs(b @ alpha.sum(1) - 0.5) < 1e-15 and abs(b @ G.sum(1)) < 1e-15
    assert ROSENBROCK23.w_method and not RODAS5P.w_method
    # Rodas5P: y1 is the last stage's input plus its increment; the error estimate is that increment.
    assert RODAS5P.m == RODAS5P.a[-1] + (1.0,) and RODAS5P.m_err == (0.0,) * 7 + (1.0,)
    with pytest.raises(ValueError, match="not a W-method"):
        Rodas5P(max_jacobian_age=3)


def test_registered_and_declined_where_they_do_not_apply():
    assert SOLVERS["rosenbrock23"] is Rosenbrock23 and SOLVERS["rodas5p"] is Rodas5P
    assert odeflux.solvers.Rodas5P is Rodas5P
    s = Rodas5P()
    assert (s.order, s.error_order, s.adaptive, s.fsal, s.tableau_steps) == (5, 5, True, False, False)
    assert (Rosenbrock23().order, Rosenbrock23().error_order) == (2, 3)
    assert s.compiled_steps  # compile=True compiles its steps (test_compiled_steps_match_eager)
    with pytest.raises(ValueError, match="time_derivative"):
        Rodas5P(time_derivative="symbolic")


# -- orders and stability -----------------------------------------------------------------------


def _slope(ns, errs) -> float:
    return -np.polyfit(np.log(ns), np.log(errs), 1)[0]


@pytest.mark.parametrize("solver, p", [(Rodas5P, 5), (Rosenbrock23, 2)])
def test_convergence_on_a_nonstiff_nonautonomous_problem(solver, p):
    """Fixed steps on a nonlinear, time-dependent problem: the observed order is the method's
    (Rodas5P's fifth order conditions and the df/dt terms included)."""

    def f(t, y):
        return torch.stack([y[1], -y[0] + 0.1 * torch.cos(t) * y[0] ** 2])

    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    ref = odeflux.solve(f, y0, (0.0, 2.0), solver=odeflux.Dopri8(), rtol=1e-13, atol=1e-13).ys[-1]
    ns = [10, 20, 40]
    errs = [(odeflux.solve(f, y0, (0.0, 2.0), solver=solver(), dt0=2.0 / n, controller=ConstantStepSize()).ys[-1] - ref).abs().max().item() for n in ns]
    assert abs(_slope(ns, errs) - p) < 0.2, errs


@pytest.mark.parametrize("solver, lam, p", [(Rodas5P, 1.0, 5), (Rodas5P, 1e6, 3), (Rosenbrock23, 1.0, 2), (Rosenbrock23, 1e6, 2)])
def test_prothero_robinson_order(solver, lam, p):
    """y' = -lambda (y - sin t) + cos t, y = sin t. Nonstiff, the methods' orders; in the stiff
    limit (h lambda >> 1) Rosenbrock23 keeps order 2 and Rodas5P reduces to 3, the order
    Steinebach designed it to keep on this problem (classical Rodas methods drop lower)."""
    ns = [8, 16, 32]
    errs = []
    for n in ns:
        sol = odeflux.solve(lambda t, y: -lam * (y - torch.sin(t)) + torch.cos(t), torch.zeros(1, dtype=F64), (0.0, 2.0),
                            solver=solver(), dt0=2.0 / n, controller=ConstantStepSize())  # fmt: skip
        errs.append(abs(sol.ys[-1].item() - math.sin(2.0)))
    assert abs(_slope(ns, errs) - p) < 0.2, errs


@pytest.mark.parametrize("solver", [Rodas5P, Rosenbrock23])
def test_l_stable_with_large_steps(solver):
    """y' = -1e6 (y - cos t) from y(0) = 0: an initial layer of width 1e-6, then y ~ cos t. Steps of
    0.1 (h lambda = 1e5) damp the layer at once (L-stability: R(inf) = 0) and follow cos t; the
    A-stable trapezoid rule (|R(inf)| = 1) carries the layer's jump of 1 along undamped."""
    lam = 1e6
    ts = np.arange(1, 21) * 0.1
    exact = (lam**2 * np.cos(ts) + lam * np.sin(ts)) / (lam**2 + 1)  # (the layer's e^(-lambda t) is gone)

    def error(s):
        sol = odeflux.solve(lambda t, y: -lam * (y - torch.cos(t)), torch.zeros(1, dtype=F64), (0.0, 2.0), solver=s,
                            dt0=0.1, controller=ConstantStepSize(), save_everystep=True)  # fmt: skip
        return np.abs(sol.ys[1:, 0].numpy() - exact).max()

    # Measured: 1.3e-4 (Rodas5P), 7.8e-4 (Rosenbrock23; stiff order 3 and 2 at h = 0.1), 1.0 (trapezoid).
    assert error(solver()) < 1e-3
    assert error(odeflux.Trapezoid()) > 0.5
    # Adaptive, it resolves the layer, then takes steps that only the accuracy of cos t limits.
    rtol = 1e-6 if solver is Rodas5P else 1e-3
    sol = odeflux.solve(lambda t, y: -lam * (y - torch.cos(t)), torch.zeros(1, dtype=F64), (0.0, 2.0), solver=solver(), rtol=rtol, atol=rtol)
    assert sol.stats.n_steps < 100, sol.stats
    assert abs(sol.ys[-1].item() - (lam**2 * math.cos(2) + lam * math.sin(2)) / (lam**2 + 1)) < 10 * rtol


# -- stiff benchmarks ---------------------------------------------------------------------------

def radau(f, y0, span, ts):
    from scipy.integrate import solve_ivp

    r = solve_ivp(f, span, y0, method="Radau", rtol=1e-12, atol=1e-14, t_eval=ts, dense_output=False)
    assert r.success
    return r.y.T


@pytest.mark.parametrize("solver, rtol", [(Rodas5P, 1e-6), (Rosenbrock23, 1e-3)])
def test_robertson_against_radau(solver, rtol):
    """ROBER on [0, 1e5]: within 10x the tolerance of scipy's Radau at rtol 1e-12 (error scaled by
    atol + rtol |y|); Tsit5 at the same tolerance runs into max_steps at 100x the steps."""
    atol = rtol * 1e-4
    ts = np.array([0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5])
    ref = radau(rober_np, [1.0, 0.0, 0.0], (0.0, 1e5), ts)
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    sol = odeflux.solve(rober, y0, (0.0, 1e5), solver=solver(), rtol=rtol, atol=atol, saveat=ts.tolist())
    scaled = np.abs(sol.ys.numpy() - ref) / (atol + rtol * np.abs(ref))
    assert scaled.max() < 10, scaled.max()
    assert sol.stats.n_steps < 300  # measured: 152 (Rodas5P), 90 (Rosenbrock23)


@pytest.mark.slow
def test_robertson_is_out_of_reach_of_explicit_methods():
    """Tsit5 at Rodas5P's tolerance runs into max_steps at 20x Rodas5P's steps, far from 1e5."""
    rtol, atol = 1e-6, 1e-10
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    n = odeflux.solve(rober, y0, (0.0, 1e5), solver=Rodas5P(), rtol=rtol, atol=atol).stats.n_steps
    tsit = odeflux.solve(rober, y0, (0.0, 1e5), solver=odeflux.Tsit5(), rtol=rtol, atol=atol, max_steps=20 * n, throw=False)
    assert tsit.status == Status.MAX_STEPS and float(tsit.ts[-1]) < 1e3


@pytest.mark.slow
def test_hires_against_radau():
    """HIRES on [0, 321.8122] at rtol 1e-6: within 10x the tolerance of Radau at rtol 1e-12."""
    rtol, atol = 1e-6, 1e-10
    y0 = [1.0, 0, 0, 0, 0, 0, 0, 0.0057]
    ts = np.array([1.0, 10.0, 100.0, 321.8122])

    ref = radau(hires_np, y0, (0.0, 321.8122), ts)
    sol = odeflux.solve(hires, torch.tensor(y0, dtype=F64), (0.0, 321.8122), solver=Rodas5P(), rtol=rtol, atol=atol, saveat=ts.tolist())
    scaled = np.abs(sol.ys.numpy() - ref) / (atol + rtol * np.abs(ref))
    assert scaled.max() < 10, scaled.max()


def test_dense_output_on_robertson():
    """sol(t) between steps, on ROBER's fast transient and slow tail, against Radau."""
    rtol, atol = 1e-6, 1e-10
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    sol = odeflux.solve(rober, y0, (0.0, 100.0), solver=Rodas5P(), rtol=rtol, atol=atol, dense=True)
    tq = np.sort(np.concatenate([np.geomspace(1e-5, 1.0, 15), np.random.default_rng(0).uniform(1.0, 100.0, 15)]))
    ref = radau(rober_np, [1.0, 0.0, 0.0], (0.0, 100.0), tq)
    scaled = np.abs(sol(tq.tolist()).numpy() - ref) / (atol + rtol * np.abs(ref))
    assert scaled.max() < 10, scaled.max()


# -- gradients ----------------------------------------------------------------------------------

GRAD_T = [0.5, 1.0, 2.0]
GRAD_W = torch.tensor([1.0, 1e4, 1.0], dtype=F64)  # y2 is ~1e-5: weigh it in


def _rober_loss(k, solver=Rodas5P, sensealg=None, rtol=1e-8, **kw):
    sol = odeflux.solve(lambda t, y, k: rober(t, y, k), torch.tensor([1.0, 0.0, 0.0], dtype=F64), (0.0, GRAD_T[-1]), args=k,
                        solver=solver(), rtol=rtol, atol=rtol * 1e-4, saveat=GRAD_T, sensealg=sensealg, **kw)  # fmt: skip
    return (sol.ys * GRAD_W).sum()


def _central(loss, k0: np.ndarray, rel: float = 1e-4) -> np.ndarray:
    g = np.zeros(len(k0))
    for i in range(len(k0)):
        kp, km = k0.copy(), k0.copy()
        kp[i] *= 1 + rel
        km[i] *= 1 - rel
        with torch.no_grad():
            g[i] = (loss(torch.tensor(kp)).item() - loss(torch.tensor(km)).item()) / (2 * rel * k0[i])
    return g


@pytest.fixture(scope="module")
def rober_gradient_reference():
    """Central differences of ROBER's loss in its three rate constants, each solve scipy's Radau
    at rtol 1e-12 (independent of odeflux)."""
    from scipy.integrate import solve_ivp

    w = GRAD_W.numpy()

    def loss(k):
        k = tuple(k.tolist())
        r = solve_ivp(lambda t, y: rober_np(t, y, k), (0.0, GRAD_T[-1]), [1.0, 0.0, 0.0], method="Radau", rtol=1e-12,
                      atol=1e-18, t_eval=GRAD_T)  # fmt: skip
        assert r.success
        return torch.tensor(float((r.y.T * w).sum()), dtype=F64)

    return _central(loss, np.array(ROBER_K))


@pytest.mark.parametrize(
    "sensealg",
    [
        odeflux.DirectAdjoint(), odeflux.GaussAdjoint(),
        pytest.param(odeflux.InterpolatingAdjoint(), marks=pytest.mark.slow),
        pytest.param(odeflux.QuadratureAdjoint(), marks=pytest.mark.slow),
    ],
    ids=["direct", "gauss", "interpolating", "quadrature"],
)  # fmt: skip
def test_rober_gradients_against_finite_differences(sensealg, rober_gradient_reference):
    """d loss / d (k1, k2, k3) through Rodas5P at rtol 1e-7 within 1e-5 relative of central
    differences of the ODE's solution (measured at rtol 1e-8: 1e-8 to 1e-9 relative for all four;
    Rosenbrock23 at rtol 1e-6: 2e-6 direct and interpolating, 5e-5 quadrature and Gauss)."""
    k = torch.tensor(ROBER_K, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(_rober_loss(k, sensealg=sensealg, rtol=1e-7), k)
    np.testing.assert_allclose(g.numpy(), rober_gradient_reference, rtol=1e-5)


def test_direct_gradient_is_the_discrete_solves():
    """Fixed steps: the discrete solution is a smooth function of the parameters, and DirectAdjoint
    (through the LU solves, J and df/dt included) gives its gradient to 1e-7 of its central
    differences, for both methods, on a non-autonomous field."""
    for solver in (Rodas5P, Rosenbrock23):

        def loss(p):
            f = lambda t, y, p: -p[0] * (y - torch.sin(p[1] * t)) * (1 + y**2)  # noqa: E731
            sol = odeflux.solve(f, torch.tensor([0.5, -0.2], dtype=F64), (0.0, 1.0), args=p, solver=solver(), dt0=0.1,
                                controller=ConstantStepSize())  # fmt: skip
            return sol.ys[-1].square().sum()

        p0 = np.array([30.0, 2.0])
        p = torch.tensor(p0, requires_grad=True)
        (g,) = torch.autograd.grad(loss(p), p)
        np.testing.assert_allclose(g.numpy(), _central(loss, p0, rel=1e-6), rtol=1e-7)


def test_backsolve_adjoint_on_a_moderately_stiff_problem():
    """BacksolveAdjoint integrates y backwards, which a stiff decay makes explosive (see the next
    test); on a moderately stiff linear problem its gradient matches the matrix exponential's."""
    from scipy.linalg import expm

    A0 = np.array([[-20.0, 1.0], [0.5, -1.0]])
    ts = [0.25, 0.5, 1.0]
    y0 = np.array([1.0, 1.0])
    a = torch.tensor(A0, requires_grad=True)
    sol = odeflux.solve(lambda t, y, a: a @ y, torch.tensor(y0, dtype=F64), (0.0, 1.0), args=a, solver=Rodas5P(), rtol=1e-8,
                        atol=1e-8, saveat=ts, sensealg=odeflux.BacksolveAdjoint())  # fmt: skip
    (g,) = torch.autograd.grad(sol.ys.sum(), a)
    ref = _central(lambda x: torch.tensor(sum((expm(x.numpy().reshape(2, 2) * t) @ y0).sum() for t in ts)), A0.reshape(-1), 1e-6)
    np.testing.assert_allclose(g.numpy(), ref.reshape(2, 2), rtol=1e-5)


@pytest.mark.slow
def test_backsolve_adjoint_fails_on_robertson_with_a_status():
    # Integrated backwards, the fast decay explodes within 0.01 of the end at any tolerance: the
    # step size collapses to dtmin (about 3000 steps at rtol 1e-6, 20 s; 400 at rtol 1e-4, 3 s).
    k = torch.tensor(ROBER_K, dtype=F64, requires_grad=True)
    with pytest.raises(odeflux.SolveError, match="adjoint solve of BacksolveAdjoint failed"):
        torch.autograd.grad(_rober_loss(k, sensealg=odeflux.BacksolveAdjoint(), rtol=1e-4), k)


# -- Jacobians, counters, failures ---------------------------------------------------------------


def test_counters_and_jacobian_reuse():
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    sol = odeflux.solve(rober, y0, (0.0, 10.0), solver=Rodas5P(), rtol=1e-6, atol=1e-10)
    st = sol.stats
    # One Jacobian per point the steps start from (a rejected step's retry keeps it), one LU per step.
    assert st.n_rejected > 0 and st.n_jacobians == st.n_accepted and st.n_factorizations == st.n_steps
    assert st.n_linear_solves == 8 * st.n_steps
    # f: 7 stages a step, the Jacobian's forward pass; f(t0, y0), Hairer's first step, f at each
    # accepted step's end but the last.
    assert st.n_f_evals == 7 * st.n_steps + st.n_jacobians + 2 + st.n_accepted - 1
    assert "n_linear_solves" in repr(st)
    # A W-method may keep its Jacobian for several steps; a rejected step gets a fresh one.
    fresh = odeflux.solve(rober, y0, (0.0, 10.0), solver=Rosenbrock23(), rtol=1e-4, atol=1e-8).stats
    reused = odeflux.solve(rober, y0, (0.0, 10.0), solver=Rosenbrock23(max_jacobian_age=5), rtol=1e-4, atol=1e-8)
    assert fresh.n_jacobians == fresh.n_accepted and reused.stats.n_jacobians < reused.stats.n_steps / 2
    assert reused.stats.n_factorizations == reused.stats.n_steps
    ref = radau(rober_np, [1.0, 0.0, 0.0], (0.0, 10.0), [10.0])[0]
    np.testing.assert_allclose(reused.ys[-1].numpy(), ref, rtol=1e-3, atol=1e-8)
    # Explicit solvers do no linear algebra.
    assert odeflux.solve(rober, y0, (0.0, 1e-3)).stats.n_jacobians == 0


class _Linear(JacobianSource):
    """A field that gives its own Jacobian (and counts how often it is asked)."""

    def __init__(self, A):
        self.A, self.calls = A, 0

    def __call__(self, t, y):
        return self.A @ y

    def jacobian(self, t, y):
        self.calls += 1
        return self.A


def test_jacobian_sources_user_jac_and_finite_differences_agree():
    A = torch.tensor([[-100.0, 1.0], [0.0, -0.5]], dtype=F64)
    y0 = torch.tensor([1.0, 2.0], dtype=F64)
    auto = odeflux.solve(lambda t, y: A @ y, y0, (0.0, 3.0), solver=Rodas5P(), rtol=1e-8, atol=1e-10)
    src = _Linear(A)
    own = odeflux.solve(src, y0, (0.0, 3.0), solver=Rodas5P(), rtol=1e-8, atol=1e-10)
    assert src.calls == own.stats.n_jacobians > 0
    user = odeflux.solve(lambda t, y: A @ y, y0, (0.0, 3.0), solver=Rodas5P(jac=lambda t, y: A), rtol=1e-8, atol=1e-10)
    for s in (own, user):
        torch.testing.assert_close(s.ys[-1], auto.ys[-1], rtol=1e-12, atol=1e-14)
    # df/dt by autograd or by a finite difference: the same solution to the difference's accuracy.
    f = lambda t, y: -50.0 * (y - torch.cos(3 * t))  # noqa: E731
    a = odeflux.solve(f, torch.ones(1, dtype=F64), (0.0, 2.0), solver=Rodas5P(), rtol=1e-8, atol=1e-10)
    d = odeflux.solve(f, torch.ones(1, dtype=F64), (0.0, 2.0), solver=Rodas5P(time_derivative="finite_difference"), rtol=1e-8, atol=1e-10)
    assert abs(a.ys[-1].item() - d.ys[-1].item()) < 1e-8 and abs(a.ys[-1].item() - (2500 * math.cos(6) + 150 * math.sin(6)) / 2509) < 1e-7
    with pytest.raises(ValueError, match=r"jac\(t, y\) must return an \(2, 2\)"):
        odeflux.solve(lambda t, y: A @ y, y0, (0.0, 1.0), solver=Rodas5P(jac=lambda t, y: A[0]))


def test_singular_and_nonfinite_matrices_end_with_a_status():
    h = 0.1
    g = RODAS5P.gamma
    # J = I / (h gamma): W = 0 on the first step.
    sol = odeflux.solve(lambda t, y: y / (h * g), torch.ones(2, dtype=F64), (0.0, 1.0), solver=Rodas5P(), dt0=h,
                        controller=ConstantStepSize(), throw=False)  # fmt: skip
    assert sol.status == Status.LINEAR_SOLVE_FAILED and "singular" in sol.message
    sol = odeflux.solve(lambda t, y: -torch.sqrt(y), torch.zeros(1, dtype=F64), (0.0, 1.0), solver=Rosenbrock23(), throw=False)
    assert sol.status == Status.NONFINITE and "Jacobian" in sol.message
    with pytest.raises(odeflux.SolveError, match="singular"):
        odeflux.solve(lambda t, y: y / (h * g), torch.ones(2, dtype=F64), (0.0, 1.0), solver=Rodas5P(), dt0=h,
                      controller=ConstantStepSize())  # fmt: skip


@pytest.mark.parametrize("solver", [Rodas5P, Rosenbrock23])
def test_float32_batched_state_devices_and_events(solver, device):
    """A (2, 3) float32 state on each device (the Jacobian is 6 x 6 of the flattened state); a
    terminal event located on the dense output."""
    lam = torch.tensor([[-1.0, -1e3, -1e4], [-2.0, -10.0, -5e3]], device=device)
    y0 = torch.ones(2, 3, device=device)
    sol = odeflux.solve(lambda t, y: lam * y, y0, (0.0, 1.0), solver=solver(), rtol=1e-4, atol=1e-6)
    assert sol.ys.dtype == torch.float32 and sol.ys.device.type == device.type and sol.status == Status.SUCCESS
    torch.testing.assert_close(sol.ys[-1], torch.exp(lam), rtol=1e-3, atol=1e-5)
    ev = odeflux.solve(lambda t, y: -y, torch.ones(1, dtype=F64), (0.0, 5.0), solver=solver(), rtol=1e-8, atol=1e-10,
                       event=odeflux.Event(lambda t, y: y[0] - 0.5, terminal=True))  # fmt: skip
    assert abs(float(ev.ts[-1]) - math.log(2)) < (1e-6 if solver is Rodas5P else 1e-4)


def _forced(t, y):
    """A stiff mode forced in time (so that df/dt enters the step) driving a slow one."""
    return torch.stack([-50.0 * (y[0] - torch.cos(t)), y[0] - y[1]])


class _Breaks(torch.nn.Module):
    """A field torch.compile cannot trace as one graph (it reads a value on the host)."""

    def forward(self, t, y):
        return -y * float(y.abs().sum() > -1.0)


def test_compiled_steps_match_eager(monkeypatch):
    """``compile=True``: each step with a fresh Jacobian is one compiled graph (the Jacobian by
    ``torch.func.jacrev``, ``W``'s inverse unrolled); the same steps, counts and results as eager.
    Compiled here with the ``eager`` backend: dynamo traces the whole step (fullgraph) without
    Inductor's seconds of C++ code generation (the benchmark runs Inductor)."""
    from odeflux.compiled import program
    from odeflux.solvers import rosenbrock

    monkeypatch.setattr(rosenbrock, "_COMPILED_FRESH", torch.compile(rosenbrock.fresh_step, fullgraph=True, backend="eager"))
    monkeypatch.setattr(program, "loop_refusal", lambda solver, options: "the compiled step here")  # (not the whole loop)
    y0 = torch.tensor([0.0, 1.0], dtype=torch.float64)
    kw = dict(solver=Rosenbrock23(), rtol=1e-4, atol=1e-7, saveat=[1.0, 2.0])
    with torch.no_grad():
        eager = odeflux.solve(_forced, y0, (0.0, 2.0), **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            compiled = odeflux.solve(_forced, y0, (0.0, 2.0), compile=True, **kw)
    assert compiled.stats == eager.stats and compiled.stats.n_rejected == eager.stats.n_rejected
    torch.testing.assert_close(compiled.ys, eager.ys, rtol=1e-12, atol=1e-14)


def test_compiled_steps_fall_back_eagerly_once():
    """A field that cannot be compiled (as the whole loop, which ``compile=True`` takes under
    ``no_grad``): one warning line, the eager steps' results, no second try (nor of its steps)."""
    y0 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    kw = dict(solver=Rodas5P(), rtol=1e-6, atol=1e-9)
    with torch.no_grad():
        eager = odeflux.solve(_Breaks(), y0, (0.0, 1.0), **kw)
        with pytest.warns(RuntimeWarning, match=r"compile=True: the field could not be compiled as one program") as rec:
            compiled = odeflux.solve(_Breaks(), y0, (0.0, 1.0), compile=True, **kw)
        assert len([w for w in rec if "compile=True" in str(w.message)]) == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again = odeflux.solve(_Breaks(), y0, (0.0, 1.0), compile=True, **kw)
    assert compiled.stats == eager.stats == again.stats
    torch.testing.assert_close(compiled.ys, eager.ys, rtol=0, atol=0)


def _eager_backend_programs(monkeypatch) -> None:
    """Compiled loops on torch.compile's ``eager`` backend: dynamo traces the whole loop
    (``torch.while_loop``, fullgraph) in seconds, without Inductor's code generation."""
    from odeflux.compiled import program

    def compiled(key, source=program.run_loop):
        fn = program._PROGRAMS.get(key)
        if fn is None:
            fn = program._PROGRAMS[key] = torch.compile(source, fullgraph=True, dynamic=False, backend="eager")
        return fn

    monkeypatch.setattr(program, "_PROGRAMS", {})
    monkeypatch.setattr(program, "_program", compiled)


def test_compiled_loop_matches_eager_on_robertson(monkeypatch):
    """``compile=True`` under ``no_grad``: the whole loop one program, every attempted step with a
    fresh Jacobian (``Rodas5P.loop_step``), the states saved by the method's dense output: the
    eager solve's accepted and rejected steps, its saved states to 1e-10. Its counts of what it
    computes differ where eager keeps the Jacobian for a retried step: the loop takes it again."""
    _eager_backend_programs(monkeypatch)
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    kw = dict(solver=Rodas5P(), rtol=1e-6, atol=1e-10, saveat=[1e-3, 0.5, 1.0, 100.0, 1e4, 1e5])
    with torch.no_grad():
        eager = odeflux.solve(rober, y0, (0.0, 1e5), **kw)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="compile=True", category=RuntimeWarning)  # (no eager fallback)
            loop = odeflux.solve(rober, y0, (0.0, 1e5), compile=True, **kw)
    e, c = eager.stats, loop.stats
    assert (c.n_steps, c.n_accepted, c.n_rejected) == (e.n_steps, e.n_accepted, e.n_rejected) and e.n_rejected > 0
    assert c.n_jacobians == c.n_factorizations == e.n_factorizations == e.n_jacobians + e.n_rejected
    assert c.n_f_evals == e.n_f_evals + e.n_rejected  # (each retry's Jacobian forward pass)
    assert loop.status == Status.SUCCESS
    torch.testing.assert_close(loop.ys, eager.ys, rtol=1e-10, atol=0)
    # A singular W ends the loop's solve with the eager one's status.
    h = 0.1
    args = (lambda t, y: y / (h * RODAS5P.gamma), torch.ones(2, dtype=F64), (0.0, 1.0))
    with torch.no_grad():
        sol = odeflux.solve(*args, solver=Rodas5P(), dt0=h, controller=ConstantStepSize(), throw=False, compile=True)
    assert sol.status == Status.LINEAR_SOLVE_FAILED and "singular" in sol.message and sol.stats.n_steps == 0


def test_compiled_loop_refuses_what_it_cannot_match():
    """Options whose steps the loop's fresh autograd Jacobian would change take the compiled step."""
    from odeflux.compiled.program import loop_refusal
    from odeflux.integrator import IntegrateOptions

    opts = IntegrateOptions(rtol=1e-6, atol=1e-9, controller=odeflux.PIController())
    assert loop_refusal(Rodas5P(), opts) is None and loop_refusal(Rosenbrock23(), opts) is None
    for solver in (Rosenbrock23(max_jacobian_age=3), Rodas5P(jac=lambda t, y: -torch.eye(3, dtype=F64)),
                   Rodas5P(time_derivative="finite_difference")):  # fmt: skip
        assert "does not take" in loop_refusal(solver, opts)
