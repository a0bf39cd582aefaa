"""solve()'s control of the steps: step_times, jump_times, perturb, callbacks, a user's norm,
gradients with respect to saved times, and IController's torchdiffeq rules."""

from __future__ import annotations

import math

import pytest
import torch

import odeflux

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (conftest.py: tiny ops)

D = torch.float64


class Switch:
    """``x' = -x/2`` before ``t = 0.5``, ``x' = x^2`` from it: a jump of f."""

    def __init__(self, p: torch.Tensor | None = None):
        self.n = 0
        self.p = p

    def __call__(self, t, x):
        self.n += 1
        scale = 1.0 if self.p is None else self.p
        return -0.5 * x * scale if float(t) < 0.5 else x**2


def switch_exact(x0: float, t: float) -> float:
    x_half = x0 * math.exp(-0.25)
    return x_half / (1 - x_half * (t - 0.5))


def test_step_times_are_landed_on():
    stops = [0.123, 0.5, 0.77]
    sol = odeflux.solve(lambda t, y: torch.cos(3 * t) * y, torch.ones(2, dtype=D), (0.0, 1.0), save_everystep=True, step_times=stops)
    ts = sol.ts.tolist()
    for s in stops:
        assert s in ts
    # backwards too, and times outside the span are ignored
    back = odeflux.solve(lambda t, y: -y, torch.ones(1, dtype=D), (1.0, 0.0), save_everystep=True, step_times=[0.25, 3.0])
    assert 0.25 in back.ts.tolist()


def test_jump_times_save_work_and_match_the_piecewise_solution():
    x0 = torch.tensor([1.0, 1.5], dtype=D)
    plain, jumped = Switch(), Switch()
    a = odeflux.solve(plain, x0, (0.0, 1.0), rtol=1e-8, atol=1e-8)
    b = odeflux.solve(jumped, x0, (0.0, 1.0), rtol=1e-8, atol=1e-8, jump_times=[0.5])
    exact = torch.tensor([switch_exact(1.0, 1.0), switch_exact(1.5, 1.0)], dtype=D)
    assert torch.allclose(b.ys[-1], exact, rtol=1e-6)
    assert jumped.n < plain.n / 2
    assert (b.ys[-1] - exact).abs().max() <= (a.ys[-1] - exact).abs().max()


@pytest.mark.parametrize(
    "sensealg",
    [odeflux.DirectAdjoint(), odeflux.InterpolatingAdjoint(), odeflux.BacksolveAdjoint(), odeflux.QuadratureAdjoint(), odeflux.GaussAdjoint()],
    ids=lambda a: type(a).__name__,
)
def test_gradients_across_a_jump(sensealg):
    # x(1) for x' = -p x / 2 then x^2: d/dx0 and d/dp in closed form by the chain rule.
    x0 = torch.tensor([0.8], dtype=D, requires_grad=True)
    p = torch.tensor(1.3, dtype=D, requires_grad=True)
    sol = odeflux.solve(Switch(p), x0, (0.0, 1.0), rtol=1e-9, atol=1e-9, jump_times=[0.5], params=[p], sensealg=sensealg)
    gx, gp = torch.autograd.grad(sol.ys[-1].sum(), [x0, p])
    xh = 0.8 * math.exp(-0.25 * 1.3)
    dx1_dxh = 1 / (1 - 0.5 * xh) ** 2
    assert gx.item() == pytest.approx(dx1_dxh * math.exp(-0.25 * 1.3), rel=1e-6)
    assert gp.item() == pytest.approx(dx1_dxh * xh * -0.25, rel=1e-6)


def test_perturb_never_evaluates_on_a_step_boundary():
    seen = []

    def f(t, x):
        seen.append(float(t))
        return -x

    x0 = torch.tensor([1.0, 2.0], dtype=D, requires_grad=True)
    for solver in (odeflux.Euler(), odeflux.Midpoint(), odeflux.RK4()):
        seen.clear()
        sol = odeflux.solve(f, x0, (0.0, 1.0), solver=solver, dt0=0.25, perturb=True, sensealg=odeflux.BacksolveAdjoint())
        assert not {0.0, 0.25, 0.5, 0.75, 1.0} & set(seen)
        assert min(seen) > 0 and min(seen) < 1e-300  # just after the start
        seen.clear()
        sol.ys[-1].sum().backward()
        assert seen and not {0.0, 0.25, 0.5, 0.75, 1.0} & set(seen)
        seen.clear()
        odeflux.solve(f, x0.detach(), (0.0, 1.0), solver=solver, dt0=0.25)
        assert {0.0, 0.25, 0.5, 0.75} <= set(seen)


@pytest.mark.parametrize("solver", [odeflux.Tsit5(), odeflux.RK4()], ids=["adaptive", "fixed"])
def test_callbacks_hear_every_step(solver):
    calls = {"step": [], "accept": [], "reject": []}
    cb = odeflux.StepCallbacks(**{k: (lambda k: lambda t, y, dt: calls[k].append((float(t), float(dt))))(k) for k in calls})
    f = lambda t, y: torch.sin(8 * t) * y  # noqa: E731
    sol = odeflux.solve(f, torch.ones(3, dtype=D), (0.0, 2.0), solver=solver, dt0=0.1 if not solver.adaptive else 0.5, callbacks=cb)
    assert len(calls["step"]) == sol.stats.n_steps
    assert len(calls["accept"]) == sol.stats.n_accepted and len(calls["reject"]) == sol.stats.n_rejected
    assert sorted(calls["accept"] + calls["reject"]) == sorted(calls["step"])
    if solver.adaptive:
        assert calls["reject"]  # dt0=0.5 is too large for this tolerance
    adjoint = []
    y0 = torch.ones(3, dtype=D, requires_grad=True)
    sa = odeflux.InterpolatingAdjoint(callbacks=odeflux.StepCallbacks(step=lambda t, y, dt: adjoint.append(float(dt))))
    s2 = odeflux.solve(f, y0, (0.0, 2.0), solver=solver, dt0=0.1, sensealg=sa)
    s2.ys[-1].sum().backward()
    assert adjoint and all(dt < 0 for dt in adjoint)  # the adjoint runs backwards


def test_gradients_with_respect_to_saved_times():
    y0 = torch.tensor([1.0, 0.3], dtype=D, requires_grad=True)
    ts = torch.tensor([0.0, 0.35, 0.9, 1.4], dtype=D, requires_grad=True)
    A = torch.tensor([[-0.2, 1.0], [-1.0, -0.1]], dtype=D)
    f = lambda t, y: A @ y * (1 + 0.5 * t)  # noqa: E731
    assert torch.autograd.gradcheck(
        lambda y, t: odeflux.solve(f, y, (t[0], t[-1]), saveat=t, rtol=1e-11, atol=1e-12).ys, (y0, ts)
    )
    # A fixed saved time and a moving start: y(T) shifts by -Phi(T, t0) f(t0, y0) per unit of t0.
    t0 = torch.tensor(0.1, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: odeflux.solve(f, y0.detach(), (t, 1.0), saveat=[0.5, 0.8], rtol=1e-11, atol=1e-12).ys, (t0,)
    )


def test_icontroller_min_step_accepts_whatever_the_error():
    A = torch.tensor([[-0.2, 3.0], [-3.0, -0.1]], dtype=D)
    f = lambda t, y: A @ y  # noqa: E731
    y0 = torch.tensor([1.0, 0.0], dtype=D)
    free = odeflux.solve(f, y0, (0.0, 8.0), rtol=1e-9, atol=1e-9, controller=odeflux.IController())
    floor = odeflux.solve(f, y0, (0.0, 8.0), rtol=1e-9, atol=1e-9, controller=odeflux.IController(min_step=2.0))
    assert floor.stats.n_steps <= 5 < free.stats.n_steps
    assert floor.stats.n_rejected == 0


def test_icontroller_shrink_accepted_false_never_shrinks_after_an_accept():
    c = odeflux.IController(shrink_accepted=False)
    accept, dt, _ = c.propose(0.1, 0.9, None, 5)
    assert accept and dt >= 0.1
    accept, dt, _ = odeflux.IController().propose(0.1, 0.9, None, 5)
    assert accept and dt < 0.1
    with pytest.raises(ValueError, match="min_step"):
        odeflux.IController(min_step=-1.0)


def test_bad_step_options_are_named():
    f = lambda t, y: -y  # noqa: E731
    y0 = torch.ones(1)
    with pytest.raises(ValueError, match="jump_times must be finite"):
        odeflux.solve(f, y0, (0.0, 1.0), jump_times=[float("nan")])
    with pytest.raises(TypeError, match="step_times must be a sequence of times"):
        odeflux.solve(f, y0, (0.0, 1.0), step_times=0.5)
    with pytest.raises(TypeError, match="callbacks must be odeflux.StepCallbacks"):
        odeflux.solve(f, y0, (0.0, 1.0), callbacks=lambda *a: None)
    with pytest.raises(TypeError, match="norm must be a function"):
        odeflux.solve(f, y0, (0.0, 1.0), norm=2)
