"""Bad input to ``odeflux.solve`` gets one clear error that names the problem (and the fix)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import HAS_CUDA

import odeflux
from odeflux import RK4, ConstantStepSize, Euler, PIController, Tsit5

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (conftest.py: tiny ops)


def decay(t, y):
    return -y


Y0 = torch.ones(3, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# y0


@pytest.mark.parametrize("y0", [[1.0, 2.0], np.ones(3), 1.0, (1.0,)], ids=["list", "numpy", "float", "tuple"])
def test_y0_not_a_tensor(y0):
    # (a list or tuple is a structured state: its entries must be tensors)
    with pytest.raises(TypeError, match=r"(y0 must be a torch.Tensor, got \w+|y0\[0\] is a float: a state is a tensor).*torch.as_tensor"):
        odeflux.solve(decay, y0, (0.0, 1.0))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.float16, torch.bfloat16])
def test_y0_not_float32_or_float64(dtype):
    y0 = torch.ones(3).to(dtype)
    with pytest.raises(TypeError, match=rf"y0 has dtype {dtype}.*float32 or float64.*y0.float\(\)"):
        odeflux.solve(decay, y0, (0.0, 1.0))
    # (complex64 and complex128 states are integrated on their real view: tests/test_trees.py)
    with pytest.raises(TypeError, match=r"y0 has dtype torch.complex32; odeflux integrates complex64 or complex128"):
        odeflux.solve(decay, torch.ones(3, dtype=torch.complex32), (0.0, 1.0))


def test_y0_empty_or_not_finite():
    with pytest.raises(ValueError, match="y0 is empty"):
        odeflux.solve(decay, torch.ones(0), (0.0, 1.0))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="y0 contains NaN or Inf"):
            odeflux.solve(decay, torch.tensor([1.0, bad]), (0.0, 1.0))


def test_float32_and_float64_accepted():
    for dtype in (torch.float32, torch.float64):
        sol = odeflux.solve(decay, torch.ones(2, dtype=dtype), (0, 1))  # integer times are fine
        assert sol.ys.dtype == dtype
        np.testing.assert_allclose(sol.ys[-1].double().numpy(), math.exp(-1.0), rtol=1e-3)


# ------------------------------------------------------------------------------------------------
# t_span


@pytest.mark.parametrize("t_span", [(1.0, 1.0), (0, 0.0), torch.tensor([2.0, 2.0])])
def test_t_span_equal_ends(t_span):
    with pytest.raises(ValueError, match="t_span has equal ends.*nonzero length"):
        odeflux.solve(decay, Y0, t_span)


@pytest.mark.parametrize("t_span", [(0.0, math.inf), (-math.inf, 0.0), (0.0, math.nan), torch.tensor([0.0, math.nan])])
def test_t_span_not_finite(t_span):
    with pytest.raises(ValueError, match="t_span must be finite"):
        odeflux.solve(decay, Y0, t_span)


@pytest.mark.parametrize("t_span", [(0.0, 1.0, 2.0), (1.0,), [], np.array([0.0, 0.5, 1.0])])
def test_t_span_wrong_length(t_span):
    with pytest.raises(ValueError, match=r"t_span must be a pair \(t0, t1\), got \d values"):
        odeflux.solve(decay, Y0, t_span)


def test_t_span_other_bad_forms():
    with pytest.raises(ValueError, match=r"t_span must hold two times.*shape \(3,\)"):
        odeflux.solve(decay, Y0, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(TypeError, match="t_span must be a pair"):
        odeflux.solve(decay, Y0, 1.0)
    with pytest.raises(TypeError, match=r"t_span\[0\] must be a real number, got 'a'"):
        odeflux.solve(decay, Y0, ("a", 1.0))
    with pytest.raises(ValueError, match=r"t_span\[1\] must be a scalar"):
        odeflux.solve(decay, Y0, (0.0, torch.ones(2)))


# ------------------------------------------------------------------------------------------------
# Tolerances and step options


@pytest.mark.parametrize("name", ["rtol", "atol"])
@pytest.mark.parametrize("value", [0.0, -1e-6, math.nan, math.inf])
def test_bad_tolerances(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be positive and finite, got {value}"):
        odeflux.solve(decay, Y0, (0.0, 1.0), **{name: value})


def test_tolerance_not_a_number():
    with pytest.raises(TypeError, match="rtol must be a real number"):
        odeflux.solve(decay, Y0, (0.0, 1.0), rtol="tight")


@pytest.mark.parametrize("dt0", [0.0, -0.1, math.nan, math.inf])
def test_bad_dt0(dt0):
    with pytest.raises(ValueError, match=r"dt0 must be positive and finite \(its sign follows t_span\)"):
        odeflux.solve(decay, Y0, (0.0, 1.0), solver=RK4(), dt0=dt0)


@pytest.mark.parametrize("name", ["dtmin", "dtmax"])
@pytest.mark.parametrize("value", [0.0, -1.0, math.nan])
def test_bad_dtmin_dtmax(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be positive"):
        odeflux.solve(decay, Y0, (0.0, 1.0), **{name: value})


def test_dtmin_above_dtmax():
    # (Before this check the solve ran and failed at its first step with DT_MIN.)
    with pytest.raises(ValueError, match=r"dtmin=0.1 is above dtmax=0.01: no step size is allowed"):
        odeflux.solve(decay, Y0, (0.0, 1.0), dtmin=0.1, dtmax=0.01)


@pytest.mark.parametrize("compile", ["yes", 1, None])
def test_compile_not_a_bool(compile):
    with pytest.raises(TypeError, match=r"compile must be True or False, got"):
        odeflux.solve(decay, Y0, (0.0, 1.0), compile=compile)
    with pytest.raises(TypeError, match=r"compile must be True or False, got"):
        odeflux.solve(decay, Y0.reshape(3, 1), (0.0, 1.0), batch_axis=0, compile=compile)


def test_params_not_a_sequence_of_tensors():
    lin = torch.nn.Linear(3, 3).double()
    with pytest.raises(TypeError, match=r"got a Linear module: pass list\(module.parameters\(\)\)"):
        odeflux.solve(lambda t, y: lin(y), Y0, (0.0, 1.0), params=lin)
    with pytest.raises(TypeError, match=r"got a Parameter: pass \[p\] for one tensor p"):
        odeflux.solve(lambda t, y: lin(y), Y0, (0.0, 1.0), params=lin.weight)
    with pytest.raises(TypeError, match="params must be a sequence of tensors, got an element of type float"):
        odeflux.solve(lambda t, y: lin(y), Y0, (0.0, 1.0), params=[1.0])


@pytest.mark.parametrize("max_steps", [0, -5, 10.5, "100"])
def test_bad_max_steps(max_steps):
    with pytest.raises(ValueError, match="max_steps must be a positive integer"):
        odeflux.solve(decay, Y0, (0.0, 1.0), max_steps=max_steps)


# ------------------------------------------------------------------------------------------------
# Solver and controller


@pytest.mark.parametrize("solver", [Euler(), RK4()])
def test_fixed_step_solver_without_dt0(solver):
    name = type(solver).__name__
    with pytest.raises(ValueError, match=rf"{name} with ConstantStepSize takes fixed steps: pass dt0="):
        odeflux.solve(decay, Y0, (0.0, 1.0), solver=solver)


def test_constant_step_controller_without_dt0():
    with pytest.raises(ValueError, match="pass dt0="):
        odeflux.solve(decay, Y0, (0.0, 1.0), solver=Tsit5(), controller=ConstantStepSize())


def test_fixed_step_solver_with_adaptive_controller():
    with pytest.raises(ValueError, match="RK4 has no error estimate, so it cannot adapt its step: pass dt0="):
        odeflux.solve(decay, Y0, (0.0, 1.0), solver=RK4(), controller=PIController(), dt0=0.1)


@pytest.mark.parametrize("cls", [Tsit5, RK4])
def test_solver_passed_as_class(cls):
    with pytest.raises(TypeError, match=rf"solver must be an instance: pass {cls.__name__}\(\), not the class"):
        odeflux.solve(decay, Y0, (0.0, 1.0), solver=cls, dt0=0.1)


@pytest.mark.parametrize("solver", ["tsit5", object(), torch.optim.SGD])
def test_solver_not_a_solver(solver):
    with pytest.raises(TypeError, match="solver must be an odeflux solver such as odeflux.Tsit5()"):
        odeflux.solve(decay, Y0, (0.0, 1.0), solver=solver)


def test_controller_not_a_controller():
    with pytest.raises(TypeError, match="controller must be a step-size controller"):
        odeflux.solve(decay, Y0, (0.0, 1.0), controller="pi")
    with pytest.raises(TypeError, match="controller must be a step-size controller"):
        odeflux.solve(decay, Y0, (0.0, 1.0), controller=PIController)


def test_sensealg_not_an_algorithm():
    with pytest.raises(TypeError, match="sensealg must be a sensitivity algorithm"):
        odeflux.solve(decay, Y0.clone().requires_grad_(), (0.0, 1.0), sensealg="adjoint")


# ------------------------------------------------------------------------------------------------
# The vector field


def test_f_not_callable():
    with pytest.raises(TypeError, match="f must be callable as f\\(t, y\\), got Tensor"):
        odeflux.solve(Y0, Y0, (0.0, 1.0))


@pytest.mark.parametrize(
    "f,match",
    [
        (lambda t, y: [1.0, 2.0, 3.0], r"f\(t, y\) must return a tensor, got list"),
        (lambda t, y: y.numpy(), r"f\(t, y\) must return a tensor, got ndarray"),
        (lambda t, y: 1.0, r"f\(t, y\) must return a tensor, got float"),
        (lambda t, y: None, r"f\(t, y\) must return a tensor, got NoneType"),
    ],
    ids=["list", "numpy", "float", "none"],
)
def test_f_returns_non_tensor(f, match):
    with pytest.raises(TypeError, match=match):
        odeflux.solve(f, Y0, (0.0, 1.0))


@pytest.mark.parametrize(
    "f,shape",
    [(lambda t, y: y[:2], r"\(2,\)"), (lambda t, y: y.reshape(3, 1), r"\(3, 1\)"), (lambda t, y: y.sum(), r"\(\)")],
)
def test_f_returns_other_shape(f, shape):
    with pytest.raises(ValueError, match=rf"f\(t, y\) returned shape {shape} for a state of shape \(3,\).*state's shape"):
        odeflux.solve(f, Y0, (0.0, 1.0))


def test_f_returns_other_dtype():
    with pytest.raises(ValueError, match=r"f\(t, y\) returned dtype torch.float32 for a state of dtype torch.float64"):
        odeflux.solve(lambda t, y: (-y).float(), Y0, (0.0, 1.0))
    with pytest.raises(ValueError, match=r"returned dtype torch.float64 for a state of dtype torch.float32"):
        odeflux.solve(lambda t, y: (-y).double(), Y0.float(), (0.0, 1.0))


def test_f_checked_for_fixed_step_solvers_too():
    with pytest.raises(ValueError, match=r"f\(t, y\) returned shape"):
        odeflux.solve(lambda t, y: y[:1], Y0, (0.0, 1.0), solver=Euler(), dt0=0.1)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_f_returns_other_device():
    with pytest.raises(ValueError, match="f\\(t, y\\) returned a tensor on cpu for a state on cuda"):
        odeflux.solve(lambda t, y: (-y).cpu(), Y0.cuda(), (0.0, 1.0))


def test_args_are_passed_to_f():
    sol = odeflux.solve(lambda t, y, k: -k * y, Y0, (0.0, 1.0), args=2.0, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(sol.ys[-1].numpy(), math.exp(-2.0), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# saveat


@pytest.mark.parametrize("saveat,t_span", [([0.5, 1.5], (0.0, 1.0)), ([-0.1, 0.5], (0.0, 1.0)), ([0.5, 1.0], (1.0, 0.6))])
def test_saveat_outside_span(saveat, t_span):
    with pytest.raises(ValueError, match=r"saveat time -?[\d.]+ is outside t_span"):
        odeflux.solve(decay, Y0, t_span, saveat=saveat)


@pytest.mark.parametrize(
    "saveat,t_span",
    [([0.5, 0.2], (0.0, 1.0)), ([0.2, 0.2, 0.5], (0.0, 1.0)), ([0.2, 0.5], (1.0, 0.0)), (torch.tensor([0.9, 0.1]), (0.0, 1.0))],
)
def test_saveat_not_monotone(saveat, t_span):
    with pytest.raises(ValueError, match="saveat times must be strictly increasing in the direction of integration"):
        odeflux.solve(decay, Y0, t_span, saveat=saveat)


def test_saveat_other_errors():
    with pytest.raises(ValueError, match="saveat is empty"):
        odeflux.solve(decay, Y0, (0.0, 1.0), saveat=[])
    with pytest.raises(ValueError, match="saveat must be a 1-d sequence of times"):
        odeflux.solve(decay, Y0, (0.0, 1.0), saveat=torch.ones(2, 2))
    with pytest.raises(ValueError, match="either saveat= or save_everystep=True, not both"):
        odeflux.solve(decay, Y0, (0.0, 1.0), saveat=[0.5], save_everystep=True)
    with pytest.raises(ValueError, match=r"saveat time nan is outside t_span"):
        odeflux.solve(decay, Y0, (0.0, 1.0), saveat=[0.5, math.nan])


def test_errors_are_one_line():
    # The errors above are single lines: no multi-line dumps.
    for kwargs in ({"rtol": 0.0}, {"saveat": [2.0]}, {"solver": Tsit5}):
        with pytest.raises((TypeError, ValueError)) as info:
            odeflux.solve(decay, Y0, (0.0, 1.0), **kwargs)
        assert "\n" not in str(info.value)


def test_saveat_in_float32_snaps_onto_the_span_ends():
    """torch.linspace(0, 6.28, n) ends at float32(6.28) > 6.28: that is the end, not outside it."""
    sol = odeflux.solve(lambda t, y: torch.stack([y[1], -y[0]]), torch.tensor([1.0, 0.0]), (0.0, 6.28),
                        saveat=torch.linspace(0, 6.28, 50), rtol=1e-6, atol=1e-8)  # fmt: skip
    assert sol.ts.shape == (50,) and float(sol.ts[-1]) == pytest.approx(6.28)
    with pytest.raises(ValueError, match="outside t_span"):
        odeflux.solve(lambda t, y: -y, torch.ones(1), (0.0, 1.0), saveat=[0.5, 1.001])


def test_saveat_near_an_end_snaps_by_that_ends_scale_only():
    # float32's round trip of the end 6.28 is snapped onto it; a time near 0 on a long span is kept.
    t32 = float(torch.tensor(6.28, dtype=torch.float32))
    sol = odeflux.solve(decay, Y0, (0.0, 6.28), saveat=[0.0, t32])
    assert sol.ts.tolist() == [0.0, 6.28]
    # (A slow decay: y' = -y over 1e5 would take 30,000 steps, bounded by Tsit5's stability.)
    slow = lambda t, y: -1e-3 * y  # noqa: E731
    sol = odeflux.solve(slow, Y0, (0.0, 1e5), saveat=[1e-2, 1.0], rtol=1e-8, atol=1e-10)
    assert sol.ts.tolist() == [1e-2, 1.0]
    assert sol.ys[0][0].item() == pytest.approx(math.exp(-1e-5), rel=1e-9)


def test_whether_a_module_takes_time_is_read_from_the_forward_it_has_now():
    # (The answer is kept per class function; an instance's own forward is read each time.)
    from odeflux.vector_field import takes_time

    class TY(torch.nn.Module):
        def forward(self, t, y):
            return -y

    m = TY()
    assert takes_time(m) and takes_time(TY())
    m.forward = lambda y: -2 * y
    assert not takes_time(m)
    sol = odeflux.solve(m, torch.ones(2, dtype=torch.float64), (0.0, 1.0), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(sol.ys[-1], torch.full((2,), math.exp(-2.0), dtype=torch.float64), rtol=1e-6, atol=0)


def test_a_solve_under_vmap_is_refused_in_one_line():
    # (Before this check it failed from inside: "Cannot access data pointer of Tensor that doesn't
    # have storage" for an adaptive solve, vmap's data-dependent control flow error for fixed steps.)
    match = r"odeflux.solve cannot run under torch.func.vmap: .* batch_axis=0$"
    with pytest.raises(ValueError, match=match):
        torch.func.vmap(lambda y: odeflux.solve(decay, y, (0.0, 1.0)).y_final)(torch.ones(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=match):  # batched through args
        torch.func.vmap(lambda a: odeflux.solve(lambda t, y, a: -a * y, Y0, (0.0, 1.0), args=a).y_final)(torch.ones(4, dtype=torch.float64))
    # torch.func.grad (no batching) runs, and gives the closed form's gradient.
    g = torch.func.grad(lambda y: odeflux.solve(decay, y, (0.0, 1.0), rtol=1e-10, atol=1e-12).y_final.sum())(Y0)
    torch.testing.assert_close(g, torch.full_like(Y0, math.exp(-1.0)), rtol=1e-8, atol=0)
