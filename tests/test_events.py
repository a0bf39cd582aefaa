"""Events in odeflux.solve, against independent references: closed forms (exponential decay, the
bouncing ball), scipy's solve_ivp hand-stitched across jumps, torchdiffeq's odeint_event, and
finite differences for the event-time gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import odeflux
from odeflux import Event

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GRAV = 9.81
F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-12)
SOLVERS = [
    pytest.param(odeflux.Tsit5(), {}, id="Tsit5"),
    pytest.param(odeflux.Dopri5(), {}, id="Dopri5"),
    pytest.param(odeflux.BS3(), {}, id="BS3"),
    pytest.param(odeflux.RK4(), {"dt0": 0.01}, id="RK4"),
    pytest.param(odeflux.Midpoint(), {"dt0": 0.001}, id="Midpoint"),
]
ADJOINTS = [
    pytest.param(None, id="Direct"),
    pytest.param(odeflux.DirectAdjoint(hand_written=False), id="Direct-graph"),
    pytest.param(odeflux.InterpolatingAdjoint(), id="Interpolating"),
    pytest.param(odeflux.BacksolveAdjoint(), id="Backsolve"),
    pytest.param(odeflux.QuadratureAdjoint(), id="Quadrature"),
    pytest.param(odeflux.GaussAdjoint(), id="Gauss"),
]


def decay(t, y, a):
    return -a * y


def ball(t, y):
    return torch.stack([y[1], torch.full_like(y[1], -GRAV)])


def bounce_times(h0: float, v0: float, e: float, n: int) -> list[float]:
    """The first ``n`` bounce times of a ball dropped from ``h0`` at speed ``v0`` (closed form)."""
    t = (v0 + math.sqrt(v0 * v0 + 2 * GRAV * h0)) / GRAV
    v_up = -e * (v0 - GRAV * t)
    out = [t]
    for _ in range(n - 1):
        t += 2 * v_up / GRAV
        v_up *= e
        out.append(t)
    return out


def bounce_event(e: float | torch.Tensor) -> Event:
    return Event(lambda t, y: y[0], terminal=False, direction=-1, jump=lambda t, y: torch.stack([y[0], -e * y[1]]))


# -- location ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("solver, kw", SOLVERS)
@pytest.mark.parametrize("backwards", [False, True], ids=["forward", "reverse"])
def test_terminal_event_time_against_the_analytic_root(dtype, solver, kw, backwards):
    # y' = -y from y(0) = 1 crosses 1/2 at ln 2 (forward) and 2 at -ln 2 (reverse time).
    level, t_ref, t1 = (2.0, -math.log(2), -3.0) if backwards else (0.5, math.log(2), 3.0)
    tol = {} if kw else (dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else TIGHT)
    sol = odeflux.solve(
        decay, torch.tensor([1.0], dtype=dtype), (0.0, t1), args=1.0, solver=solver, event=lambda t, y: y[0] - level,
        saveat=torch.linspace(0.0, t1, 7, dtype=torch.float64), **kw, **tol,
    )  # fmt: skip
    err = 1e-4 if (kw or dtype == torch.float32) else 1e-9
    assert sol.status == odeflux.Status.SUCCESS
    assert sol.event_t.dtype == dtype and abs(sol.event_t.item() - t_ref) < err
    assert sol.t_final == pytest.approx(t_ref, abs=err)
    assert abs(sol.event_y.item() - level) < 10 * err
    # saveat is truncated at the event: only the times before it come back.
    assert sol.ts.tolist() == pytest.approx([0.0, t1 / 6])
    assert len(sol.events) == 1 and sol.events[0].index == 0


@pytest.mark.parametrize("t1, level, t_ref", [(math.inf, 0.5, math.log(2)), (-math.inf, 2.0, -math.log(2))])
@pytest.mark.parametrize("solver, kw", [SOLVERS[0], SOLVERS[3]])
def test_an_infinite_end_runs_until_the_terminal_event(t1, level, t_ref, solver, kw):
    y0 = torch.tensor([1.0], dtype=F64)
    sol = odeflux.solve(decay, y0, (0.0, t1), args=1.0, solver=solver, event=Event(lambda t, y: y[0] - level), **kw, **TIGHT)
    assert abs(sol.event_t.item() - t_ref) < (1e-7 if kw else 1e-9)
    assert sol.ts.tolist() == pytest.approx([0.0, t_ref], abs=1e-7) and sol.ys[-1].item() == pytest.approx(level, abs=1e-7)
    # A late event (y' = 1 reaching 1000 either way): the windows double until it is reached.
    late = lambda t, y: y[0] ** 2 - 1e6  # noqa: E731
    step = {"dt0": 1.0} if kw else {}
    sol = odeflux.solve(lambda t, y: torch.ones_like(y), y0, (0.0, t1), solver=solver, event=late, **step)
    assert sol.event_t.item() == pytest.approx(math.copysign(1000.0, t1) - 1.0, abs=1e-6)


def test_an_event_that_never_fires_on_an_infinite_span_ends_at_max_steps():
    with pytest.raises(odeflux.SolveError, match="no terminal event occurred within max_steps=300"):
        odeflux.solve(decay, torch.tensor([1.0]), (0.0, math.inf), args=1.0, event=lambda t, y: y[0] + 1.0, max_steps=300)
    sol = odeflux.solve(
        decay, torch.tensor([1.0]), (0.0, math.inf), args=1.0, event=lambda t, y: y[0] + 1.0, max_steps=300, throw=False
    )
    assert sol.status == odeflux.Status.MAX_STEPS and sol.event_t is None


def test_against_torchdiffeq_odeint_event():
    torchdiffeq = pytest.importorskip("torchdiffeq")

    def vdp(t, y):
        return torch.stack([y[1], 2.0 * (1 - y[0] ** 2) * y[1] - y[0]])

    y0 = torch.tensor([2.0, 0.0], dtype=F64)
    g = lambda t, y: y[0] - 1.0  # noqa: E731
    t_ref, y_ref = torchdiffeq.odeint_event(vdp, y0, torch.tensor(0.0, dtype=F64), event_fn=g, rtol=1e-10, atol=1e-11)
    sol = odeflux.solve(vdp, y0, (0.0, math.inf), event=g, **TIGHT)
    assert sol.event_t.item() == pytest.approx(t_ref.item(), abs=1e-8)
    torch.testing.assert_close(sol.event_y, y_ref[-1], atol=1e-7, rtol=0)


def test_a_solve_starting_on_the_zero_of_g_does_not_fire_there():
    # Thrown up from the ground: the terminal event (falling through 0) is the landing at 2 v / g.
    sol = odeflux.solve(ball, torch.tensor([0.0, 3.0], dtype=F64), (0.0, math.inf), event=lambda t, y: y[0], **TIGHT)
    assert sol.event_t.item() == pytest.approx(2 * 3.0 / GRAV, abs=1e-9)


# -- non-terminal events and jumps ----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("solver, kw", [SOLVERS[0], SOLVERS[2], SOLVERS[3]])
def test_bouncing_ball_against_the_closed_form(dtype, solver, kw):
    tol = {} if kw else (dict(rtol=1e-6, atol=1e-8) if dtype == torch.float32 else TIGHT)
    y0 = torch.tensor([1.0, 0.5], dtype=dtype)
    sol = odeflux.solve(ball, y0, (0.0, 2.5), solver=solver, event=bounce_event(0.8), **kw, **tol)
    ref = bounce_times(1.0, 0.5, 0.8, 5)
    got = [r.t.item() for r in sol.events]
    assert len(got) == 4 and ref[3] < 2.5 < ref[4]
    assert got == pytest.approx(ref[:4], abs=1e-5 if (kw or dtype == torch.float32) else 1e-10)
    assert all(r.index == 0 and abs(r.y[0].item()) < 1e-4 and r.y[1].item() < 0 for r in sol.events)
    assert sol.event_t is None and sol.t_final == 2.5 and sol.ts.tolist() == [0.0, 2.5]


def test_jumps_against_scipy_stitched_by_hand():
    # A ball with drag, bouncing: scipy's DOP853 to each bounce (its own terminal event), the jump
    # applied by hand, restarted; the saved states compared at the saveat times.
    from scipy.integrate import solve_ivp

    k, e, t_end = 0.3, 0.7, 2.0
    saveat = np.linspace(0.0, t_end, 21)

    def rhs(t, y):
        return [y[1], -GRAV - k * y[1]]

    def hit(t, y):
        return y[0]

    hit.terminal, hit.direction = True, -1
    t, y, bounces, states = 0.0, [1.0, 0.0], [], {}
    while True:
        left = saveat[saveat >= t]
        r = solve_ivp(rhs, (t, t_end), y, method="DOP853", rtol=1e-12, atol=1e-12, events=hit, dense_output=True)
        t_stop = r.t[-1]
        for tau in left[left <= t_stop]:
            states.setdefault(float(tau), r.sol(tau))
        if r.status != 1:
            break
        t, y = r.t_events[0][0], r.y_events[0][0].copy()
        bounces.append(t)
        y[1] = -e * y[1]
        y[0] = 0.0  # scipy may stop an ulp below zero: start on the ground
    ref = np.array([states[float(tau)] for tau in saveat])

    f = lambda t, y: torch.stack([y[1], -GRAV - k * y[1]])  # noqa: E731
    sol = odeflux.solve(f, torch.tensor([1.0, 0.0], dtype=F64), (0.0, t_end), event=bounce_event(e), saveat=saveat, **TIGHT)
    assert [r.t.item() for r in sol.events] == pytest.approx(bounces, abs=1e-9)
    np.testing.assert_allclose(sol.ys.numpy(), ref, atol=1e-8)
    np.testing.assert_allclose(sol.ts.numpy(), saveat)


def test_save_everystep_and_dense_output_are_stitched_across_jumps():
    ev = bounce_event(0.8)
    sol = odeflux.solve(ball, torch.tensor([1.0, 0.0], dtype=F64), (0.0, 1.5), event=ev, save_everystep=True, **TIGHT)
    ts = sol.ts.tolist()
    assert ts == sorted(ts) and ts[0] == 0.0 and ts[-1] == 1.5
    for r in sol.events:  # the state before and after the jump, both at the event time
        i = ts.index(r.t.item())
        assert ts[i + 1] == ts[i]
        assert sol.ys[i, 1].item() == pytest.approx(r.y[1].item())
        assert sol.ys[i + 1, 1].item() == pytest.approx(-0.8 * r.y[1].item())
    tb = bounce_times(1.0, 0.0, 0.8, 2)
    # Dense output: the parabola of each flight on either side of the bounce (closed form).
    t_mid = 0.5 * (tb[0] + tb[1])
    v_up = 0.8 * GRAV * tb[0]
    assert sol(t_mid)[0].item() == pytest.approx(v_up * (t_mid - tb[0]) - 0.5 * GRAV * (t_mid - tb[0]) ** 2, abs=1e-9)
    assert sol(0.3)[0].item() == pytest.approx(1.0 - 0.5 * GRAV * 0.09, abs=1e-9)


def test_non_terminal_events_without_jump_are_recorded_and_the_solve_goes_on():
    # cos t: zeros at pi/2 + k pi, falling at even k and rising at odd k.
    f = lambda t, y: torch.stack([y[1], -y[0]])  # noqa: E731
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    saveat = torch.linspace(0.0, 10.0, 11, dtype=F64)
    both = Event(lambda t, y: y[0], terminal=False)
    sol = odeflux.solve(f, y0, (0.0, 10.0), event=both, saveat=saveat, **TIGHT)
    assert [r.t.item() for r in sol.events] == pytest.approx([math.pi / 2 + k * math.pi for k in range(3)], abs=1e-10)
    torch.testing.assert_close(sol.ys[:, 0], torch.cos(saveat), atol=1e-9, rtol=0)
    rising = odeflux.solve(f, y0, (0.0, 10.0), event=Event(lambda t, y: y[0], terminal=False, direction=1), **TIGHT)
    falling = odeflux.solve(f, y0, (0.0, 10.0), event=Event(lambda t, y: y[0], terminal=False, direction=-1), **TIGHT)
    assert [r.t.item() for r in rising.events] == pytest.approx([1.5 * math.pi], abs=1e-10)
    assert [r.t.item() for r in falling.events] == pytest.approx([0.5 * math.pi, 2.5 * math.pi], abs=1e-10)
    assert rising.ys[-1, 0].item() == pytest.approx(math.cos(10.0), abs=1e-9)


def test_direction_filters_a_terminal_event_and_several_events_fire_in_time_order():
    f = lambda t, y: torch.stack([y[1], -y[0]])  # noqa: E731
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    sol = odeflux.solve(f, y0, (0.0, 10.0), event=Event(lambda t, y: y[0], direction=1), **TIGHT)
    assert sol.event_t.item() == pytest.approx(1.5 * math.pi, abs=1e-10)
    quarter = Event(lambda t, y: y[0] - 0.5, terminal=False)  # cos t = 1/2 at pi/3, 5pi/3
    stop = Event(lambda t, y: y[1] - 0.5, direction=1)  # -sin t = 1/2 rising at 7pi/6
    sol = odeflux.solve(f, y0, (0.0, 10.0), event=[quarter, stop], **TIGHT)
    assert [r.index for r in sol.events] == [0, 1]
    assert [r.t.item() for r in sol.events] == pytest.approx([math.pi / 3, 7 * math.pi / 6], abs=1e-9)
    assert sol.event_t is sol.events[-1].t


# -- gradients -----------------------------------------------------------------------------------
def _fd(fn, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    out = torch.zeros_like(x)
    for i in range(x.numel()):
        d = torch.zeros_like(x).reshape(-1)
        d[i] = eps
        d = d.view_as(x)
        out.reshape(-1)[i] = (fn(x + d) - fn(x - d)) / (2 * eps)
    return out


@pytest.mark.parametrize("sensealg", ADJOINTS)
def test_event_time_gradient_against_finite_differences(sensealg):
    # y' = -a y, event y = c: t* = ln(y0 / c) / a; a loss of t* and of the state at the event.
    y0 = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    a = torch.tensor(1.3, dtype=F64, requires_grad=True)

    def run(y0, a, sensealg=sensealg):
        sol = odeflux.solve(
            decay, y0, (0.0, 5.0), args=a, event=lambda t, y: y[0] * y[1] - 0.5, sensealg=sensealg, **TIGHT
        )
        return sol.event_t + (sol.event_y**2).sum()

    gy, ga = torch.autograd.grad(run(y0, a), (y0, a))
    with torch.no_grad():
        fd_y = _fd(lambda y: run(y, a, None), y0.detach())
        fd_a = _fd(lambda v: run(y0.detach(), v, None), a.detach())
    torch.testing.assert_close(gy, fd_y, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ga, fd_a, atol=1e-6, rtol=1e-6)
    # And the closed form of dt*/da = -ln(y0_0 y0_1 / 0.5) / (2 a^2).
    sol = odeflux.solve(decay, y0, (0.0, 5.0), args=a, event=lambda t, y: y[0] * y[1] - 0.5, sensealg=sensealg, **TIGHT)
    (ta,) = torch.autograd.grad(sol.event_t, a)
    assert ta.item() == pytest.approx(-math.log(4.0) / (2 * 1.3**2), abs=1e-8)


@pytest.mark.parametrize("sensealg", [ADJOINTS[0], ADJOINTS[2], ADJOINTS[3], ADJOINTS[5]])
def test_gradients_through_jumps_against_finite_differences(sensealg):
    # The ball with drag (a parameter of an nn.Module field) and a restitution coefficient that is
    # itself a tensor in the jump: the second bounce time and saved states after the bounces.
    class Drag(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.k = torch.nn.Parameter(torch.tensor(0.2, dtype=F64))

        def forward(self, t, y):
            return torch.stack([y[1], -GRAV - self.k * y[1]])

    field = Drag()
    y0 = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
    e = torch.tensor(0.8, dtype=F64, requires_grad=True)

    def loss(y0, e, sensealg=sensealg):
        sol = odeflux.solve(field, y0, (0.0, 1.5), event=bounce_event(e), saveat=[0.3, 1.0, 1.5], sensealg=sensealg, **TIGHT)
        assert len(sol.events) >= 2
        return sol.events[1].t + sol.ys.sum()

    grads = torch.autograd.grad(loss(y0, e), (y0, e, field.k))
    with torch.no_grad():
        fd_y = _fd(lambda y: loss(y, e, None), y0.detach())
        fd_e = _fd(lambda v: loss(y0.detach(), v, None), e.detach())

        def with_k(k):
            old = field.k.clone()
            field.k.copy_(k)
            try:
                return loss(y0.detach(), e.detach(), None)
            finally:
                field.k.copy_(old)

        fd_k = _fd(with_k, field.k.detach().clone())
    for g, ref in zip(grads, (fd_y, fd_e, fd_k)):
        torch.testing.assert_close(g, ref, atol=1e-6, rtol=1e-6)


def test_event_function_parameters_and_bounce_times_get_the_closed_form_gradient():
    # Bounce n of the ideal ball against e: t_n = t_1 (1 + 2 sum_{k<n} e^k) for a drop from rest.
    e = torch.tensor(0.8, dtype=F64, requires_grad=True)
    sol = odeflux.solve(ball, torch.tensor([1.0, 0.0], dtype=F64), (0.0, 2.0), event=bounce_event(e), **TIGHT)
    t1 = math.sqrt(2 / GRAV)
    (g,) = torch.autograd.grad(sol.events[2].t, e)
    assert g.item() == pytest.approx(t1 * 2 * (1 + 2 * 0.8), abs=1e-8)
    # A threshold inside g: dt*/dc = -1 / y'(t*) for y' = -y, y = c.
    c = torch.tensor(0.25, dtype=F64, requires_grad=True)
    sol = odeflux.solve(decay, torch.tensor([1.0], dtype=F64), (0.0, 5.0), args=1.0, event=lambda t, y: y[0] - c, **TIGHT)
    (g,) = torch.autograd.grad(sol.event_t, c)
    assert g.item() == pytest.approx(-1 / 0.25, abs=1e-8)


# -- errors --------------------------------------------------------------------------------------
def test_clear_errors():
    y0 = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match=r"g\(t, y\) must return a scalar, got a tensor of shape \(2,\)"):
        odeflux.solve(decay, y0, (0.0, 1.0), args=1.0, event=lambda t, y: y)
    with pytest.raises(TypeError, match=r"g\(t, y\) must return a scalar tensor"):
        odeflux.solve(decay, y0, (0.0, 1.0), args=1.0, event=lambda t, y: "no")
    bad_jump = Event(lambda t, y: y[0] - 0.5, terminal=False, jump=lambda t, y: y[:1])
    with pytest.raises(ValueError, match=r"jump\(t, y\) returned \(1,\)"):
        odeflux.solve(decay, y0, (0.0, 3.0), args=1.0, event=bad_jump)
    with pytest.raises(ValueError, match="an infinite end needs a terminal event"):
        odeflux.solve(decay, y0, (0.0, math.inf), args=1.0, event=Event(lambda t, y: y[0], terminal=False))
    with pytest.raises(ValueError, match="t_span must be finite"):
        odeflux.solve(decay, y0, (0.0, math.inf), args=1.0)
    with pytest.raises(ValueError, match="a jump needs terminal=False"):
        Event(lambda t, y: y[0], jump=lambda t, y: y)
    with pytest.raises(ValueError, match="direction must be -1, 0 or"):
        Event(lambda t, y: y[0], direction=2)
    with pytest.raises(TypeError, match="event must be an odeflux.Event"):
        odeflux.solve(decay, y0, (0.0, 1.0), args=1.0, event=3)


@pytest.mark.parametrize("save", [dict(saveat=[0.0, 0.5, 1.0]), {}, dict(save_everystep=True), dict(save_start=False)])
def test_no_event_firing_leaves_the_solution_as_without_events(save):
    y0 = torch.tensor([1.0, 2.0], dtype=F64)
    ref = odeflux.solve(decay, y0, (0.0, 1.0), args=1.0, **save)
    sol = odeflux.solve(decay, y0, (0.0, 1.0), args=1.0, event=lambda t, y: y[0] + 1, **save)
    assert sol.ts.tolist() == ref.ts.tolist()
    torch.testing.assert_close(sol.ys, ref.ys, rtol=0, atol=0)
    assert sol.events == [] and sol.event_t is None and sol.stats == ref.stats


@pytest.mark.parametrize("save", [dict(saveat=np.linspace(0.0, 2.0, 9)), dict(save_everystep=True)])
def test_solves_with_and_without_a_graph_agree(save):
    # Without a graph the locating pass is the solve (only the event's step is solved again);
    # with one, each segment is solved again by the sensitivity method: the same saved times, the
    # same states and event times to the tolerance.
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    with torch.no_grad():
        a = odeflux.solve(ball, y0, (0.0, 2.0), event=bounce_event(0.8), **save, **TIGHT)
    b = odeflux.solve(ball, y0.clone().requires_grad_(), (0.0, 2.0), event=bounce_event(0.8), **save, **TIGHT)
    assert [r.t.item() for r in a.events] == pytest.approx([r.t.item() for r in b.events], abs=1e-10)
    if "saveat" in save:
        assert a.ts.tolist() == b.ts.tolist()
        torch.testing.assert_close(a.ys, b.ys.detach(), atol=1e-9, rtol=0)
    else:  # other steps, the same trajectory (away from the jumps, where the velocity flips)
        away = [k for k, t in enumerate(b.ts.tolist()) if min(abs(t - r.t.item()) for r in b.events) > 1e-6]
        torch.testing.assert_close(b.ys.detach()[away], a(b.ts[away]), atol=1e-9, rtol=0)
    assert a.stats.n_f_evals < b.stats.n_f_evals


@pytest.mark.parametrize("sensealg", [ADJOINTS[0], ADJOINTS[2]])
def test_gradients_with_respect_to_t0_and_a_time_dependent_g(sensealg):
    # The event time moves with t0 one for one.
    t0 = torch.tensor(0.3, dtype=F64, requires_grad=True)
    t_span = torch.stack([t0, torch.tensor(5.0, dtype=F64)])
    y0 = torch.tensor([1.0], dtype=F64)
    sol = odeflux.solve(decay, y0, t_span, args=1.0, event=lambda t, y: y[0] - 0.5, sensealg=sensealg, **TIGHT)
    assert sol.event_t.item() == pytest.approx(0.3 + math.log(2), abs=1e-9)
    assert torch.autograd.grad(sol.event_t, t0)[0].item() == pytest.approx(1.0, abs=1e-9)
    # y' = 1 from y0: g = t^2 / 2 - y - 1 vanishes at t* = 1 + sqrt(3 + 2 y0); dt*/dy0 = 1 / sqrt(3) at y0 = 0.
    y0 = torch.tensor([0.0], dtype=F64, requires_grad=True)
    g = lambda t, y: 0.5 * t**2 - y[0] - 1.0  # noqa: E731
    sol = odeflux.solve(lambda t, y: torch.ones_like(y), y0, (0.0, 5.0), event=g, sensealg=sensealg, **TIGHT)
    assert sol.event_t.item() == pytest.approx(1 + math.sqrt(3), abs=1e-9)
    assert torch.autograd.grad(sol.event_t, y0)[0].item() == pytest.approx(1 / math.sqrt(3), abs=1e-9)
