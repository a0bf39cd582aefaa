"""The fixed-step Adams solvers against independent references: textbook weights, the matrix
exponential (observed order, dense output), scipy's DOP853 at tight tolerances, finite differences
(gradcheck), and fresh solver objects (the history belongs to one integration)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from conftest import LINEAR_Y0, PROBLEMS, exact_linear, linear_f
from torch import nn

import odeflux
from odeflux import AdamsBashforth, AdamsMoulton
from odeflux.kernels import TorchStepKernel, choose_step_kernel
from odeflux.solvers import SOLVERS
from odeflux.solvers.adams import adams_weights


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):  # (conftest.py: tiny ops)
    pass




Y0 = torch.tensor(LINEAR_Y0, dtype=torch.float64)


def test_weights_are_the_textbook_ones():
    F = Fraction
    # Hairer, Norsett and Wanner I, III.1 (Adams-Bashforth) and the Adams-Moulton table beside it.
    assert adams_weights([0]) == (1,)
    assert adams_weights([0, -1]) == (F(3, 2), F(-1, 2))
    assert adams_weights([0, -1, -2]) == (F(23, 12), F(-16, 12), F(5, 12))
    assert adams_weights([0, -1, -2, -3]) == (F(55, 24), F(-59, 24), F(37, 24), F(-9, 24))
    assert adams_weights([1]) == (1,)
    assert adams_weights([1, 0]) == (F(1, 2), F(1, 2))
    assert adams_weights([1, 0, -1]) == (F(5, 12), F(8, 12), F(-1, 12))
    assert adams_weights([1, 0, -1, -2]) == (F(9, 24), F(19, 24), F(-5, 24), F(1, 24))


def test_registry_names_and_exports():
    assert SOLVERS["explicit_adams"] is AdamsBashforth
    assert SOLVERS["implicit_adams"] is AdamsMoulton and SOLVERS["fixed_adams"] is AdamsMoulton
    s = SOLVERS["explicit_adams"]()
    assert s.order == 4 and not s.adaptive and s.stepwise and not s.tableau_steps
    assert repr(AdamsMoulton(order=3)) == "AdamsMoulton(order=3, max_iters=4, until_converged=True)"


ORDERS = [
    (AdamsBashforth, 1, [200, 400, 800]),
    (AdamsBashforth, 2, [50, 100, 200]),
    (AdamsBashforth, 3, [50, 100, 200]),
    (AdamsBashforth, 4, [50, 100, 200]),
    (AdamsBashforth, 5, [50, 100, 200]),
    (AdamsMoulton, 1, [200, 400, 800]),
    (AdamsMoulton, 2, [50, 100, 200]),
    (AdamsMoulton, 3, [50, 100, 200]),
    (AdamsMoulton, 4, [25, 50, 100]),
    (AdamsMoulton, 5, [25, 50, 100]),
]


@pytest.mark.parametrize("cls,order,ns", ORDERS, ids=[f"{c.__name__}{p}" for c, p, _ in ORDERS])
def test_observed_order_on_a_linear_system(cls, order, ns):
    """The global error at t = 5 against the matrix exponential, as the step halves (float64)."""
    # (The corrector iterated to a fixed number of corrections, far below the tolerance: the order
    # is the method's, not the iteration's.)
    solver = cls(order=order) if cls is AdamsBashforth else cls(order=order, max_iters=6, until_converged=False)
    errs = []
    for n in ns:
        sol = odeflux.solve(linear_f, Y0, (0.0, 5.0), solver=solver, dt0=5.0 / n)
        errs.append(np.abs(sol.ys[-1].numpy() - exact_linear(5.0)[0]).max())
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.2, f"observed order {slope:.3f}, claimed {order} ({errs})"


@pytest.mark.parametrize("solver", [AdamsBashforth(), AdamsMoulton(), AdamsMoulton(max_iters=1, until_converged=False)],
                         ids=["bashforth", "moulton", "pece"])  # fmt: skip
def test_agrees_with_scipy_at_small_steps(solver):
    p = PROBLEMS["van_der_pol"]
    ts = [0.5, 1.7, 3.0]
    sol = odeflux.solve(p.f, p.y0_tensor(), (0.0, 3.0), solver=solver, dt0=2e-3, saveat=ts)
    np.testing.assert_allclose(sol.ys.numpy(), p.reference(ts), rtol=1e-8, atol=1e-9)


def test_backwards_in_time_and_a_last_step_of_another_size():
    # 5.0 / 0.03 is no whole number of steps: the last one is shorter, and starts afresh.
    sol = odeflux.solve(linear_f, torch.tensor(exact_linear(5.0)[0]), (5.0, 0.0), solver=AdamsMoulton(), dt0=0.03)
    np.testing.assert_allclose(sol.ys[-1].numpy(), LINEAR_Y0, rtol=1e-5, atol=1e-6)


def test_function_evaluations_are_counted():
    calls = [0]

    def f(t, y):
        calls[0] += 1
        return linear_f(t, y)

    for solver in (AdamsBashforth(), AdamsMoulton(), AdamsMoulton(max_iters=2, until_converged=False)):
        calls[0] = 0
        sol = odeflux.solve(f, Y0, (0.0, 1.05), solver=solver, dt0=0.1)  # (a shorter last step: RK4)
        assert sol.stats.n_f_evals == calls[0] and sol.stats.n_steps == 11
    # Adams-Bashforth: one evaluation per step once the history is built (3 RK4 steps of 4 first).
    assert odeflux.solve(linear_f, Y0, (0.0, 1.0), solver=AdamsBashforth(), dt0=0.1).stats.n_f_evals == 1 + 3 * 4 + 7
    # PE(CE)^2: three per step.
    sol = odeflux.solve(linear_f, Y0, (0.0, 1.0), solver=AdamsMoulton(max_iters=2, until_converged=False), dt0=0.1)
    assert sol.stats.n_f_evals == 1 + 3 * 4 + 7 * 3


def test_corrector_stops_once_converged():
    tight = odeflux.solve(linear_f, Y0, (0.0, 1.0), solver=AdamsMoulton(max_iters=5), dt0=0.1, rtol=1e-15, atol=1e-15)
    loose = odeflux.solve(linear_f, Y0, (0.0, 1.0), solver=AdamsMoulton(max_iters=5), dt0=0.1, rtol=1e-2, atol=1e-2)
    assert tight.stats.n_f_evals == 1 + 3 * 4 + 7 * 6  # never within 1e-15: every correction taken
    assert loose.stats.n_f_evals == 1 + 3 * 4 + 7 * 2  # within 1e-2 after the first


def test_dense_output_and_saveat_converge_at_fourth_order():
    """Between steps the cubic Hermite interpolant: sol(t) and interpolated saveat states
    converge at order 4 against the matrix exponential."""
    tq = np.linspace(0.013, 4.99, 37)
    ns = np.array([40, 80, 160])
    dense_errs, save_errs = [], []
    for n in ns:
        sol = odeflux.solve(linear_f, Y0, (0.0, 5.0), solver=AdamsBashforth(), dt0=5.0 / n, dense=True)
        dense_errs.append(np.abs(sol(tq.tolist()).numpy() - exact_linear(tq)).max())
        saved = odeflux.solve(linear_f, Y0, (0.0, 5.0), solver=AdamsBashforth(), dt0=5.0 / n, saveat=tq.tolist())
        assert saved.ys.shape == (len(tq), 3, 2)
        save_errs.append(np.abs(saved.ys.numpy() - exact_linear(tq)).max())
    for errs in (dense_errs, save_errs):
        slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
        assert abs(slope - 4) < 0.3, (slope, errs)
    assert dense_errs[-1] < 1e-6


class Field(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = nn.Parameter(torch.randn(2, 2, generator=g, dtype=torch.float64) * 0.7)

    def forward(self, t, y):
        return torch.tanh(y @ self.w) * torch.cos(t)


@pytest.mark.parametrize("solver", [AdamsBashforth(order=3), AdamsMoulton(max_iters=2, until_converged=False)],
                         ids=["bashforth", "moulton"])  # fmt: skip
def test_direct_adjoint_gradcheck(solver):
    """Backpropagation through the steps (RK4 start, Adams steps, a shorter last step) is the
    derivative of the discrete solution: finite differences agree."""
    y0 = torch.tensor([[0.4, -0.3], [0.1, 0.5]], dtype=torch.float64, requires_grad=True)
    w = Field().w.detach().clone().requires_grad_()

    def run(y, w):
        f = lambda t, z: torch.tanh(z @ w) * torch.cos(t)  # noqa: E731
        return odeflux.solve(f, y, (0.0, 0.85), solver=solver, dt0=0.1, saveat=[0.33, 0.85]).ys

    assert torch.autograd.gradcheck(run, (y0, w))


def test_declined_by_the_numpy_kernel_and_the_hand_written_reverse_pass():
    layers = [nn.Linear(2, 5), nn.Linear(5, 2)]
    m = odeflux.MLP(layers, "tanh").double()
    field = odeflux.VectorField(m)
    y = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kw = dict(rtol=1e-3, atol=1e-6, parts=None, float_time=True, compiled=False)
    with torch.no_grad():
        assert isinstance(choose_step_kernel(field, y, AdamsBashforth(), **kw), TorchStepKernel)
        assert not isinstance(choose_step_kernel(field, y, odeflux.RK4(), **kw), TorchStepKernel)  # the NumPy one
    grads = []
    for hand_written in (True, False):
        y0 = y.clone().requires_grad_()
        m.zero_grad()
        sol = odeflux.solve(field, y0, (0.0, 1.0), solver=AdamsMoulton(), dt0=0.1,
                            sensealg=odeflux.DirectAdjoint(hand_written=hand_written))  # fmt: skip
        (sol.ys**2).sum().backward()
        grads.append(torch.cat([y0.grad.reshape(-1)] + [p.grad.reshape(-1) for p in m.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-14)


def test_history_belongs_to_each_integration():
    """One solver object in two solves, inside its own right-hand side (a solve nested in each
    evaluation of another) and in a continuous adjoint's backward pass gives what fresh objects do."""
    shared = AdamsMoulton(order=4)

    def inner(y, solver):
        # A small solve of its own, from the state: its history interleaves with the outer one's.
        return odeflux.solve(lambda t, z: -z, y, (0.0, 0.3), solver=solver, dt0=0.05).ys[-1]

    def outer_f(solver_inner):
        return lambda t, y: linear_f(t, y) + 0.1 * inner(y, solver_inner)

    first = odeflux.solve(linear_f, Y0, (0.0, 2.0), solver=shared, dt0=0.05, saveat=[1.0, 2.0]).ys
    again = odeflux.solve(linear_f, Y0, (0.0, 2.0), solver=shared, dt0=0.05, saveat=[1.0, 2.0]).ys
    assert torch.equal(first, again)
    nested = odeflux.solve(outer_f(shared), Y0, (0.0, 1.0), solver=shared, dt0=0.1).ys
    fresh = odeflux.solve(outer_f(AdamsMoulton(order=4)), Y0, (0.0, 1.0), solver=AdamsMoulton(order=4), dt0=0.1).ys
    assert torch.equal(nested, fresh)

    def grads(forward_solver, adjoint_solver, method):
        f = Field()
        y0 = Y0[:, :2].clone().requires_grad_()
        sol = odeflux.solve(f, y0, (0.0, 1.0), solver=forward_solver, dt0=0.05, saveat=[0.5, 1.0],
                            sensealg=method(solver=adjoint_solver))  # fmt: skip
        (sol.ys**2).sum().backward()
        return torch.cat([y0.grad.reshape(-1), f.w.grad.reshape(-1)])

    for method in (odeflux.BacksolveAdjoint, odeflux.InterpolatingAdjoint):
        one = AdamsBashforth()
        fresh = grads(AdamsBashforth(), AdamsBashforth(), method)
        torch.testing.assert_close(grads(one, one, method), fresh, rtol=0, atol=0)
    # And the adjoint agrees with backpropagation through the same steps, to the method's accuracy.
    direct = grads(AdamsBashforth(), None, lambda solver: odeflux.DirectAdjoint())
    torch.testing.assert_close(grads(AdamsBashforth(), None, odeflux.BacksolveAdjoint), direct, rtol=1e-4, atol=1e-6)


def test_bad_input_is_a_one_line_error():
    with pytest.raises(ValueError, match="order must be an integer from 1 to 8"):
        AdamsBashforth(order=0)
    with pytest.raises(ValueError, match="order must be an integer from 1 to 8"):
        AdamsMoulton(order=9)
    with pytest.raises(ValueError, match="max_iters must be a positive integer"):
        AdamsMoulton(max_iters=0)
    with pytest.raises(ValueError, match="pass dt0="):
        odeflux.solve(linear_f, Y0, (0.0, 1.0), solver=AdamsBashforth())
    with pytest.raises(ValueError, match="no error estimate"):
        odeflux.solve(linear_f, Y0, (0.0, 1.0), solver=AdamsBashforth(), controller=odeflux.PIController())
    with pytest.raises(ValueError, match="pass compile=False"):
        odeflux.solve(linear_f, Y0, (0.0, 1.0), solver=AdamsBashforth(), dt0=0.1, compile=True)
    with pytest.raises(TypeError, match="not the class"):
        odeflux.solve(linear_f, Y0, (0.0, 1.0), solver=AdamsBashforth, dt0=0.1)


def test_float32_and_higher_orders_run():
    sol = odeflux.solve(linear_f, Y0.float(), (0.0, 5.0), solver=AdamsBashforth(order=8), dt0=0.02)
    assert sol.ys.dtype == torch.float32
    np.testing.assert_allclose(sol.ys[-1].numpy(), exact_linear(5.0)[0], rtol=1e-4, atol=1e-5)
    err8 = np.abs(odeflux.solve(linear_f, Y0, (0.0, 5.0), solver=AdamsMoulton(order=8), dt0=0.1).ys[-1].numpy()
                  - exact_linear(5.0)[0]).max()  # fmt: skip
    assert err8 < 1e-9, err8
    assert math.isfinite(err8)
