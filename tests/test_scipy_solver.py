"""ScipySolver against independent references: the matrix exponential of a linear system for every
solve_ivp method, finite differences for BacksolveAdjoint's gradient, and its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import LINEAR_M, LINEAR_Y0, exact_linear as exact, linear_f
from torch import nn

import odeflux
from odeflux import ScipySolver, Status
from odeflux.solvers import SOLVERS
from odeflux.solvers.scipy_solver import METHODS, _block_tolerances, require_cpu


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):  # (conftest.py: tiny ops)
    pass




Y0 = torch.tensor(LINEAR_Y0, dtype=torch.float64)
SAVE = [0.0, 0.7, 2.5, 5.0]


def test_registry_and_defaults():
    assert SOLVERS["scipy_solver"] is ScipySolver
    s = SOLVERS["scipy_solver"]()
    assert s.method == "LSODA" and s.adaptive and not s.stepwise and not s.tableau_steps
    assert ScipySolver("bdf").method == "BDF"  # scipy's names, any case
    assert repr(ScipySolver("Radau")) == "ScipySolver(method='Radau')"


@pytest.mark.parametrize("method", METHODS)
def test_each_method_matches_the_matrix_exponential(method):
    sol = odeflux.solve(linear_f, Y0, (0.0, 5.0), solver=ScipySolver(method), rtol=1e-8, atol=1e-10, saveat=SAVE)
    assert sol.ys.shape == (len(SAVE), 3, 2) and sol.ys.dtype == torch.float64
    assert sol.ts.tolist() == SAVE
    np.testing.assert_allclose(sol.ys.numpy(), exact(SAVE), rtol=0, atol=2e-6)
    assert torch.equal(sol.ys[0], Y0)
    assert sol.stats.n_f_evals > 0 and sol.stats.n_steps == sol.stats.n_accepted > 0


@pytest.mark.parametrize("method", ["RK45", "BDF"])
def test_backwards_float32_and_every_step(method):
    calls = []

    def f(t, y):
        calls.append((type(t), y.dtype, tuple(y.shape)))
        return linear_f(t, y)

    y5 = torch.tensor(exact(5.0)[0], dtype=torch.float32)
    sol = odeflux.solve(f, y5, (5.0, 0.0), solver=ScipySolver(method), rtol=1e-6, atol=1e-8, save_everystep=True)
    assert set(calls) == {(torch.Tensor, torch.float32, (3, 2))}  # f sees the state's dtype and shape
    assert sol.ys.dtype == torch.float32 and sol.ts[0] == 5.0 and sol.ts[-1] == 0.0
    assert len(sol.ts) == sol.stats.n_accepted + 1 and bool((sol.ts[1:] < sol.ts[:-1]).all())
    np.testing.assert_allclose(sol.ys[-1].numpy(), LINEAR_Y0, rtol=0, atol=1e-3)
    assert sol.stats.n_f_evals == len(calls)
    # Dense output between the steps (scipy's interpolant, sampled): sol(t) anywhere.
    tq = np.linspace(4.9, 0.1, 9)
    np.testing.assert_allclose(sol(tq.tolist()).numpy(), exact(tq), rtol=0, atol=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_dense_output_reproduces_scipys_interpolant(method):
    from scipy.integrate import solve_ivp

    sol = odeflux.solve(linear_f, Y0, (0.0, 5.0), solver=ScipySolver(method), rtol=1e-6, atol=1e-8, dense=True)
    ref = solve_ivp(lambda t, y: (LINEAR_M @ y.reshape(3, 2)).reshape(-1), (0.0, 5.0), LINEAR_Y0.reshape(-1),
                    method=method, rtol=1e-6, atol=1e-8, dense_output=True)  # fmt: skip
    tq = np.linspace(0.01, 4.99, 23)
    got = sol(tq.tolist()).numpy().reshape(len(tq), -1)
    tol = 1e-5 if method == "LSODA" else 1e-12  # (LSODA's interpolant can have a higher degree than the 5 samples')
    np.testing.assert_allclose(got, ref.sol(tq).T, rtol=0, atol=tol)
    assert len(sol.dense) == ref.t.size - 1


class Field(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.w = nn.Parameter(torch.randn(2, 2, generator=g, dtype=torch.float64) * 0.8)
        self.b = nn.Parameter(torch.randn(2, generator=g, dtype=torch.float64) * 0.2)

    def forward(self, t, y):
        return torch.tanh(y @ self.w) + self.b * torch.cos(t)


Y0_2 = torch.tensor([[0.5, -0.2], [0.3, 0.8]], dtype=torch.float64)


def _loss(f, y0, method, sensealg=None):
    sol = odeflux.solve(f, y0, (0.0, 1.5), solver=ScipySolver(method), rtol=1e-10, atol=1e-12, saveat=[0.6, 1.5],
                        sensealg=sensealg)  # fmt: skip
    return (sol.ys**2).sum() + sol.ys[-1, 0, 1]


@pytest.mark.parametrize("method", ["LSODA", "DOP853"])
def test_backsolve_gradient_matches_finite_differences(method):
    f = Field()
    y0 = Y0_2.clone().requires_grad_()
    _loss(f, y0, method, odeflux.BacksolveAdjoint()).backward()
    grad = torch.cat([y0.grad.reshape(-1)] + [p.grad.reshape(-1) for p in f.parameters()])
    leaves = [Y0_2.clone()] + [p.detach().clone() for p in f.parameters()]
    fd, eps = [], 1e-5
    with torch.no_grad():
        for i, x in enumerate(leaves):
            for j in range(x.numel()):
                vals = []
                for s in (1, -1):
                    x.view(-1)[j] += s * eps
                    g = Field()
                    g.w.copy_(leaves[1])
                    g.b.copy_(leaves[2])
                    vals.append(float(_loss(g, leaves[0], method)))
                    x.view(-1)[j] -= s * eps
                fd.append((vals[0] - vals[1]) / (2 * eps))
    np.testing.assert_allclose(grad.numpy(), np.array(fd), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("adjoint", [odeflux.InterpolatingAdjoint, odeflux.QuadratureAdjoint, odeflux.GaussAdjoint,
                                     lambda: odeflux.BacksolveAdjoint(seminorm=True)],
                         ids=["interpolating", "quadrature", "gauss", "backsolve-seminorm"])  # fmt: skip
def test_other_continuous_adjoints_agree(adjoint):
    def grads(sensealg, method):
        f = Field()
        y0 = Y0_2.clone().requires_grad_()
        _loss(f, y0, method, sensealg).backward()
        return torch.cat([y0.grad.reshape(-1)] + [p.grad.reshape(-1) for p in f.parameters()])

    ref = grads(odeflux.BacksolveAdjoint(), "RK45")
    torch.testing.assert_close(grads(adjoint(), "RK45"), ref, rtol=1e-6, atol=1e-8)


def test_mixed_norm_tolerances_never_loosen_a_block():
    rng = np.random.default_rng(0)
    parts, n, rtol, atol = ((0, 40), (40, 80), (80, 83)), 90, 1e-4, 1e-6
    r, a = _block_tolerances(parts, n, rtol, atol)
    assert a.shape == (n,) and (a[83:] >= 1e299).all()  # left out of the norm
    for _ in range(200):
        y, e = rng.normal(size=n) * rng.exponential(size=n), rng.normal(size=n) * 1e-5
        scipy_norm = np.sqrt(np.mean((e / (a + r * np.abs(y))) ** 2))
        blocks = max(np.sqrt(np.mean((e[i:j] / (atol + rtol * np.abs(y[i:j]))) ** 2)) for i, j in parts)
        assert blocks <= scipy_norm * (1 + 1e-12)


def test_max_steps_and_failures_become_a_status():
    sol = odeflux.solve(linear_f, Y0, (0.0, 5.0), solver=ScipySolver("RK45"), rtol=1e-10, atol=1e-12, max_steps=5,
                        throw=False, save_everystep=True)  # fmt: skip
    assert sol.status == Status.MAX_STEPS and sol.stats.n_steps == 5 and "max_steps=5" in sol.message
    assert len(sol.ts) == 6 and sol.t_final == float(sol.ts[-1]) < 5.0
    with pytest.raises(odeflux.SolveError, match="MAX_STEPS"):
        odeflux.solve(linear_f, Y0, (0.0, 5.0), solver=ScipySolver("LSODA"), max_steps=3)
    # A solution that blows up: scipy cannot step on, and says so.
    sol = odeflux.solve(lambda t, y: y**2, torch.ones(1, dtype=torch.float64), (0.0, 2.0), solver=ScipySolver("RK45"),
                        throw=False)  # fmt: skip
    assert sol.status in (Status.DT_MIN, Status.NONFINITE) and "RK45" in sol.message and sol.t_final < 1.0 + 1e-3


def test_steps_options_reach_scipy():
    kw = dict(rtol=1e-6, atol=1e-8)
    capped = odeflux.solve(linear_f, Y0, (0.0, 5.0), solver=ScipySolver("RK45"), dtmax=0.1, save_everystep=True, **kw)
    assert np.diff(capped.ts.numpy()).max() <= 0.1 + 1e-12
    first = odeflux.solve(linear_f, Y0, (0.0, 5.0), solver=ScipySolver("RK45"), dt0=1e-3, save_everystep=True, **kw)
    assert abs(float(first.ts[1]) - 1e-3) < 1e-15
    sol = odeflux.solve(linear_f, Y0, (0.0, 5.0), solver=ScipySolver("LSODA"), dtmin=1e-4, **kw)
    np.testing.assert_allclose(sol.ys[-1].numpy(), exact(5.0)[0], atol=1e-5)


def test_clear_errors():
    with pytest.raises(ValueError, match="ScipySolver runs on the CPU.*y0.cpu()"):
        require_cpu(torch.device("cuda", 0))
    require_cpu(torch.device("cpu"))
    with pytest.raises(ValueError, match="ScipySolver runs on the CPU"):  # any state off the CPU
        odeflux.solve(lambda t, y: -y, torch.ones(2, device="meta"), (0.0, 1.0), solver=ScipySolver())
    with pytest.raises(ValueError, match="not one of solve_ivp's"):
        ScipySolver("Euler")
    y0 = Y0_2.clone().requires_grad_()
    with pytest.raises(ValueError, match=r"sensealg=odeflux.BacksolveAdjoint\(\)"):
        odeflux.solve(lambda t, y: -y, y0, (0.0, 1.0), solver=ScipySolver())
    f = Field()
    with pytest.raises(ValueError, match="rather than DirectAdjoint"):  # parameters that require grad, y0 not
        odeflux.solve(f, Y0_2, (0.0, 1.0), solver=ScipySolver(), sensealg=odeflux.DirectAdjoint())
    sol = odeflux.solve(f, y0, (0.0, 1.0), solver=ScipySolver(), sensealg=odeflux.BacksolveAdjoint())
    with pytest.raises(ValueError, match="create_graph=True use an odeflux solver"):
        torch.autograd.grad(sol.ys.sum(), y0, create_graph=True)
    with torch.no_grad():  # no gradient wanted: fine
        odeflux.solve(f, Y0_2, (0.0, 1.0), solver=ScipySolver())
    with pytest.raises(ValueError, match="only LSODA has"):
        odeflux.solve(linear_f, Y0, (0.0, 1.0), solver=ScipySolver("RK45"), dtmin=1e-3)
    with pytest.raises(ValueError, match="leave controller= unset"):
        odeflux.solve(linear_f, Y0, (0.0, 1.0), solver=ScipySolver(), controller=odeflux.IController())
    with pytest.raises(ValueError, match="pass compile=False"):
        odeflux.solve(linear_f, Y0, (0.0, 1.0), solver=ScipySolver(), compile=True)
    with pytest.raises(ValueError, match="shape"):
        odeflux.solve(lambda t, y: y[0], Y0, (0.0, 1.0), solver=ScipySolver())
