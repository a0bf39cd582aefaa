"""Dense output: the interpolant's order against a closed form, consistency with the saved states
and saveat, accuracy against scipy, and the ``sol(t)`` interface."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import PROBLEMS, kepler_exact, two_body_f

import odeflux
from odeflux import ConstantStepSize
from odeflux.solvers import SOLVERS

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (conftest.py: tiny ops)

ALL = sorted(name for name, cls in SOLVERS.items() if cls().stepwise)  # (ScipySolver has tests of its own)
FIXED_KW = {"euler": {"dt0": 0.01}, "midpoint": {"dt0": 0.02}, "rk4": {"dt0": 0.05},
            "heun2": {"dt0": 0.02}, "heun3": {"dt0": 0.05}, "rk38": {"dt0": 0.05},
            "explicit_adams": {"dt0": 0.01}, "implicit_adams": {"dt0": 0.02}, "fixed_adams": {"dt0": 0.02},
            **{name: {"dt0": 0.05} for name in SOLVERS if not getattr(SOLVERS[name], "explicit", True)}}  # fmt: skip


def as_np(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().cpu().numpy()


def solver_kwargs(name: str) -> dict:
    rtol = {"heun": 1e-3, "adaptive_heun": 1e-3, "fehlberg2": 1e-3, "bs3": 1e-4}.get(name, 1e-6)
    return FIXED_KW.get(name, {"rtol": rtol, "atol": rtol * 1e-2})


@pytest.mark.parametrize("name", ALL)
def test_interpolant_order_inside_one_step(name, device):
    """One step from an exact state on an e = 0.3 Kepler orbit: inside the step the interpolant's
    error is its own local error, O(h^(q+1)) for an interpolant of order q."""
    solver = SOLVERS[name]()
    q = solver.tableau.interp_order
    t_start = 0.7
    y0 = torch.tensor(kepler_exact([t_start], 0.3)[0], dtype=torch.float64, device=device)
    theta = np.linspace(0.05, 0.95, 19)
    hs = np.array([0.1, 0.05, 0.025])
    errs = []
    for h in hs:
        sol = odeflux.solve(two_body_f, y0, (t_start, t_start + h), solver=solver, dt0=h, controller=ConstantStepSize(), dense=True)
        assert len(sol.dense) == 1
        tq = t_start + theta * h
        errs.append(np.abs(as_np(sol(torch.tensor(tq))) - kepler_exact(tq, 0.3)).max())
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    assert abs(slope - (q + 1)) < 0.25, f"{name}: interpolation error slope {slope:.3f}, expected {q + 1} ({errs})"


@pytest.mark.parametrize("name", ALL)
def test_sol_at_step_ends_equals_saved_states(name, device, dtype):
    p = PROBLEMS["van_der_pol"]
    y0 = p.y0_tensor(dtype, device)
    sol = odeflux.solve(p.f, y0, (0.0, 3.0), solver=SOLVERS[name](), save_everystep=True, **solver_kwargs(name))
    assert sol.dense is not None and len(sol.dense) == sol.stats.n_accepted
    ts = sol.dense.t_starts + [3.0]
    assert len(ts) == len(sol.ts)
    dense = sol(ts)
    # A step's start is its saved state, bit for bit (theta = 0).
    torch.testing.assert_close(dense[:-1], sol.ys[:-1], rtol=0, atol=0)
    # At t1 (theta = 1) the interpolant reproduces the step's result up to round-off.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(dense[-1], sol.ys[-1], rtol=64 * eps, atol=64 * eps)
    assert dense.dtype == dtype and dense.device.type == device.type


@pytest.mark.parametrize("name", ["tsit5", "dopri5", "bs3", "heun", "rk4"])
@pytest.mark.parametrize("backward", [False, True])
def test_saveat_matches_dense_output(name, backward, device, dtype):
    p = PROBLEMS["lotka_volterra"]
    t1 = -3.0 if backward else 5.0
    save = np.linspace(0.0, t1, 23)[1:]
    sol = odeflux.solve(p.f, p.y0_tensor(dtype, device), (0.0, t1), solver=SOLVERS[name](), saveat=save, dense=True, **solver_kwargs(name))
    np.testing.assert_array_equal(as_np(sol.ts), save.astype(np.float32) if dtype == torch.float32 else save)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(sol(save.tolist()), sol.ys, rtol=16 * eps, atol=16 * eps)


@pytest.mark.parametrize("name", ["tsit5", "dopri5", "bs3"])
@pytest.mark.parametrize("problem", ["van_der_pol", "two_body", "linear"])
def test_dense_output_accuracy_against_reference(name, problem, device):
    p = PROBLEMS[problem]
    rtol = 1e-8 if name != "bs3" else 1e-6
    sol = odeflux.solve(p.f, p.y0_tensor(device=device), p.t_span, solver=SOLVERS[name](), rtol=rtol, atol=rtol * 1e-2, dense=True)
    rng = np.random.default_rng(0)
    tq = np.sort(rng.uniform(*p.t_span, size=60))
    ref = p.reference(tq)
    err = np.abs(as_np(sol(tq.tolist())) - ref).max() / np.abs(ref).max()
    assert err < 100 * rtol


def test_backward_dense_output_and_unsorted_queries():
    p = PROBLEMS["van_der_pol"]
    sol = odeflux.solve(p.f, p.y0_tensor(), (0.0, -2.5), rtol=1e-9, atol=1e-11, dense=True)
    assert sol.dense.direction == -1.0
    tq = [-0.3, -2.5, -1.1, 0.0, -2.0, -0.7]
    out = sol(tq)
    np.testing.assert_allclose(as_np(out), p.reference(tq), rtol=1e-6, atol=1e-7)
    # The order of the answer follows the order of the question.
    for i, t in enumerate(tq):
        torch.testing.assert_close(out[i], sol(t), rtol=1e-14, atol=1e-14)


def test_sol_call_forms_and_errors():
    p = PROBLEMS["brusselator"]
    y0 = p.y0_tensor()
    sol = odeflux.solve(p.f, y0, (0.0, 2.0), save_everystep=True)
    assert sol(1.0).shape == (2,)
    assert sol(1).shape == (2,)
    assert sol(torch.tensor(1.0)).shape == (2,)
    assert sol([0.5, 1.0]).shape == (2, 2)
    assert sol(torch.tensor([0.5, 1.0, 1.5])).shape == (3, 2)
    assert sol(np.array([0.5, 1.0])).shape == (2, 2)
    torch.testing.assert_close(sol(torch.tensor([1.0]))[0], sol(1.0))
    torch.testing.assert_close(sol(0.0), y0, rtol=0, atol=0)
    with pytest.raises(ValueError, match="outside the solved span"):
        sol(2.5)
    with pytest.raises(ValueError, match="outside the solved span"):
        sol([-0.1, 1.0])
    with pytest.raises(ValueError, match="1-d tensor"):
        sol(torch.ones(2, 2))
    plain = odeflux.solve(p.f, y0, (0.0, 2.0))
    assert plain.dense is None
    with pytest.raises(ValueError, match="dense=True"):
        plain(1.0)


def test_dense_output_is_off_with_saveat_unless_asked():
    p = PROBLEMS["brusselator"]
    sol = odeflux.solve(p.f, p.y0_tensor(), (0.0, 2.0), saveat=[0.5, 1.0])
    assert sol.dense is None
    sol = odeflux.solve(p.f, p.y0_tensor(), (0.0, 2.0), saveat=[0.5, 1.0], dense=True)
    assert sol.dense is not None and sol.dense.t0 == 0.0 and sol.dense.t1 == pytest.approx(2.0, abs=1e-15)


def test_dense_output_of_batched_state():
    p = PROBLEMS["linear"]
    sol = odeflux.solve(p.f, p.y0_tensor(), p.t_span, rtol=1e-9, atol=1e-11, dense=True)
    tq = [0.25, 1.5, 4.9]
    out = sol(tq)
    assert out.shape == (3, 3, 2)
    np.testing.assert_allclose(as_np(out), p.reference(tq), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["tsit5", "rk4"])
def test_dense_output_converges_with_fixed_steps(name):
    """Globally, sol(t) between steps converges at min(order, interp_order + 1) as dt halves."""
    solver = SOLVERS[name]()
    expected = min(solver.order, solver.tableau.interp_order + 1)
    y0 = torch.tensor(kepler_exact([0.0], 0.3)[0], dtype=torch.float64)
    tq = np.linspace(0.013, math.pi - 0.013, 41)
    ns = np.array([50, 100, 200])
    errs = []
    for n in ns:
        sol = odeflux.solve(two_body_f, y0, (0.0, math.pi), solver=solver, dt0=math.pi / n, controller=ConstantStepSize(), dense=True)
        errs.append(np.abs(as_np(sol(tq.tolist())) - kepler_exact(tq, 0.3)).max())
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert abs(slope - expected) < 0.25, (slope, errs)
