"""Per-sample solves (``solve(..., batch_axis=0)``): each sample its own problem, against a
Python loop of single solves, finite differences, and the failure of one sample."""

import math

import pytest
import torch
from torch import nn

import odeflux
from odeflux.solution import Status

D = torch.float64
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (conftest.py: tiny ops)


class VdP(nn.Module):
    """Van der Pol oscillators, one ``mu`` per sample (elementwise: a sample's result does not
    depend on the batch it is in, to the last bit)."""

    def __init__(self, mu):
        super().__init__()
        self.mu = nn.Parameter(torch.as_tensor(mu, dtype=D))

    def forward(self, t, y):
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, self.mu * (1 - x * x) * v - x], -1)


MU = [0.1, 0.5, 1.0, 3.0, 10.0]


def _batch():
    return VdP(MU), torch.tensor([[2.0, 0.0]] * len(MU), dtype=D)


def test_each_sample_takes_the_steps_of_its_own_solve():
    f, y0 = _batch()
    saveat = torch.linspace(0.0, 8.0, 9, dtype=D)
    with torch.no_grad():
        sol = odeflux.solve(f, y0, (0.0, 8.0), saveat=saveat, batch_axis=0, rtol=1e-6, atol=1e-8)
        singles = [
            odeflux.solve(VdP(MU[b : b + 1]), y0[b : b + 1], (0.0, 8.0), saveat=saveat, rtol=1e-6, atol=1e-8)
            for b in range(len(MU))
        ]
        joint = odeflux.solve(f, y0, (0.0, 8.0), saveat=saveat, rtol=1e-6, atol=1e-8)
    assert sol.ys.shape == (len(MU), 9, 2) and sol.ts.shape == (len(MU), 9)
    assert sol.statuses.tolist() == [0] * len(MU) and sol.status == Status.SUCCESS
    for b, s in enumerate(singles):
        assert int(sol.sample_stats["n_steps"][b]) == s.stats.n_steps
        assert int(sol.sample_stats["n_rejected"][b]) == s.stats.n_rejected
        assert int(sol.sample_stats["n_f_evals"][b]) == s.stats.n_f_evals
        torch.testing.assert_close(sol.ys[b], s.ys[:, 0], rtol=0, atol=1e-9)
    # The stiffest sample sets the joint batch's steps; each sample alone takes no more.
    steps = sol.sample_stats["n_steps"]
    assert int(steps.max()) <= joint.stats.n_steps
    assert sol.stats.n_steps == sum(s.stats.n_steps for s in singles)


def test_per_sample_spans_and_saveat_rows_of_different_lengths():
    f, y0 = _batch()
    t1 = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=D)
    nan = math.nan
    saveat = torch.tensor(
        [[0.25, 1.0, nan], [0.5, 1.0, 2.0], [0.5, nan, nan], [1.0, 2.0, 3.0], [0.0, 1.5, nan]], dtype=D
    )  # fmt: skip
    with torch.no_grad():
        sol = odeflux.solve(f, y0, (0.0, t1), saveat=saveat, batch_axis=0, rtol=1e-8, atol=1e-10)
        for b in range(len(MU)):
            times = saveat[b][~torch.isnan(saveat[b])]
            s = odeflux.solve(VdP(MU[b : b + 1]), y0[b : b + 1], (0.0, float(t1[b])), saveat=times, rtol=1e-8, atol=1e-10)
            torch.testing.assert_close(sol.ys[b, : len(times)], s.ys[:, 0], rtol=0, atol=1e-9)
            assert bool(torch.isnan(sol.ys[b, len(times) :]).all())


def test_one_sample_blowing_up_leaves_the_others_to_finish():
    class Quadratic(nn.Module):
        def forward(self, t, y):
            return y * y * torch.tensor([0.1, 1.0, 0.2], dtype=D).unsqueeze(-1)

    y0 = torch.ones(3, 1, dtype=D)  # the middle sample: y = 1 / (1 - t), infinite at t = 1
    with torch.no_grad():
        sol = odeflux.solve(Quadratic(), y0, (0.0, 2.0), batch_axis=0, throw=False)
    assert sol.statuses[1] != Status.SUCCESS and sol.statuses[[0, 2]].tolist() == [0, 0]
    assert sol.status == Status(int(sol.statuses[1]))
    torch.testing.assert_close(sol.ys[[0, 2], -1, 0], 1 / (1 - 2.0 * torch.tensor([0.1, 0.2], dtype=D)), rtol=1e-4, atol=0)
    assert bool(torch.isnan(sol.ys[1, -1]).all()) and float(sol.t_reached[1]) < 1.0
    with pytest.raises(odeflux.SolveError, match=r"1 of 3 samples did not reach t1 \(samples \[1\]"):
        with torch.no_grad():
            odeflux.solve(Quadratic(), y0, (0.0, 2.0), batch_axis=0)


def test_a_sample_whose_derivative_is_not_finite_at_its_start_fails_at_once():
    # Hairer's first step is NaN there: before, that sample retried NaN steps until max_steps
    # (100,000 steps, 38 s) and reported MAX_STEPS; the joint solve says NONFINITE at once.
    f = lambda t, y: torch.where(y > 0.5, torch.full_like(y, math.nan), -y)  # noqa: E731
    y0 = torch.tensor([[1.0], [0.1]], dtype=D)
    with torch.no_grad():
        sol = odeflux.solve(f, y0, (0.0, 1.0), batch_axis=0, throw=False, max_steps=1000)
        joint = odeflux.solve(f, y0[:1], (0.0, 1.0), throw=False)
    assert sol.statuses.tolist() == [int(Status.NONFINITE), int(Status.SUCCESS)] == [int(joint.status), 0]
    assert sol.sample_stats["n_steps"][0] == 0 == joint.stats.n_steps
    torch.testing.assert_close(sol.ys[1, -1], 0.1 * torch.exp(torch.tensor([-1.0], dtype=D)), rtol=1e-3, atol=0)


def test_gradients_per_sample_against_finite_differences():
    f, y0 = _batch()
    y0 = y0.clone().requires_grad_(True)
    saveat = torch.linspace(0.0, 3.0, 4, dtype=D)

    def loss(f_, y0_):
        sol = odeflux.solve(f_, y0_, (0.0, 3.0), saveat=saveat, batch_axis=0, rtol=1e-10, atol=1e-12)
        return (sol.ys**2).sum()

    g_mu, g_y0 = torch.autograd.grad(loss(f, y0), [f.mu, y0])
    eps = 1e-4  # (the solves' own error, 1e-10, over eps stays below the 1e-5 asked)
    with torch.no_grad():
        for b in range(len(MU)):
            e = torch.zeros(len(MU), dtype=D)
            e[b] = eps
            fd = (loss(VdP(f.mu + e), y0) - loss(VdP(f.mu - e), y0)) / (2 * eps)
            assert float(g_mu[b]) == pytest.approx(float(fd), rel=1e-5)
            e2 = torch.zeros_like(y0)
            e2[b, 1] = eps
            fd = (loss(f, y0 + e2) - loss(f, y0 - e2)) / (2 * eps)
            assert float(g_y0[b, 1]) == pytest.approx(float(fd), rel=1e-5)
    # A shared parameter's gradient is the sum over the samples.
    shared = nn.Parameter(torch.tensor(1.0, dtype=D))
    sol = odeflux.solve(lambda t, y: -shared * y, torch.ones(3, 1, dtype=D), (0.0, torch.tensor([1.0, 2.0, 3.0])), batch_axis=0)
    (g,) = torch.autograd.grad(sol.ys[:, -1].sum(), [shared])
    assert float(g) == pytest.approx(sum(-t * math.exp(-t) for t in (1.0, 2.0, 3.0)), rel=1e-3)
    assert isinstance(sol.sensealg, odeflux.DirectAdjoint)


def test_compiled_per_sample_loop_matches_the_host_loop():
    f, y0 = _batch()
    saveat = torch.linspace(0.0, 4.0, 5, dtype=D)
    with torch.no_grad():
        eager = odeflux.solve(f, y0, (0.0, 4.0), saveat=saveat, batch_axis=0, rtol=1e-6, atol=1e-8)
        compiled = odeflux.solve(f, y0, (0.0, 4.0), saveat=saveat, batch_axis=0, rtol=1e-6, atol=1e-8, compile=True)
    assert compiled.sample_stats["n_steps"].tolist() == eager.sample_stats["n_steps"].tolist()
    torch.testing.assert_close(compiled.ys, eager.ys, rtol=0, atol=1e-10)


def test_refusals_name_the_option():
    f, y0 = _batch()
    with pytest.raises(ValueError, match=r"per-sample solves \(batch_axis=\) do not take dense, event: drop them"):
        odeflux.solve(f, y0, (0.0, 1.0), batch_axis=0, dense=True, event=lambda t, y: y[..., 0])
    with pytest.raises(ValueError, match=r"differentiate with sensealg=None, DirectAdjoint, BacksolveAdjoint, Interpol"):
        odeflux.solve(f, y0, (0.0, 1.0), batch_axis=0, sensealg=odeflux.ForwardSensitivity())
    with pytest.raises(ValueError, match=r"t_span\[1\] must be a number or one per sample"):
        odeflux.solve(f, y0, (0.0, torch.ones(3)), batch_axis=0)
    with pytest.raises(ValueError, match="per-sample solves take explicit Runge-Kutta methods and the Rosenbrock methods .*; Kvaerno5 is not one"):
        odeflux.solve(f, y0, (0.0, 1.0), batch_axis=0, solver=odeflux.Kvaerno5())
    with pytest.raises(ValueError, match=r"f\(t, y\) returned dtype torch.float32 for a state of dtype torch.float64"):
        odeflux.solve(lambda t, y: y.float(), y0, (0.0, 1.0), batch_axis=0)
    with pytest.raises(ValueError, match=r"f\(t, y\) must return the batch's shape"):
        odeflux.solve(lambda t, y: y.sum(-1), y0, (0.0, 1.0), batch_axis=0)
    # The options solve() checks for one problem are checked alike (before, a negative rtol or
    # dtmin ran silently here, and dtmin above dtmax failed every sample at its first step).
    for kw, match in [(dict(rtol=-1.0), "rtol must be positive and finite"), (dict(dtmin=-1.0), "dtmin must be positive"),
                      (dict(dtmin=0.1, dtmax=0.01), "dtmin=0.1 is above dtmax=0.01"),
                      (dict(max_steps=0), "max_steps must be a positive integer")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            odeflux.solve(f, y0, (0.0, 1.0), batch_axis=0, **kw)
    with pytest.raises(TypeError, match=r"pass Tsit5\(\), not the class"):
        odeflux.solve(f, y0, (0.0, 1.0), batch_axis=0, solver=odeflux.Tsit5)


def test_neural_ode_per_sample():
    torch.manual_seed(0)
    field = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    model = odeflux.NeuralODE(field, sensealg=odeflux.DirectAdjoint(), batch_axis=0, rtol=1e-8, atol=1e-10)
    x = torch.randn(4, 2, dtype=D)
    out = model(x)
    with torch.no_grad():
        for b in range(4):
            ref = odeflux.solve(field, x[b], (0.0, 1.0), rtol=1e-8, atol=1e-10).y_final
            torch.testing.assert_close(out[b], ref, rtol=0, atol=1e-7)
    out.sum().backward()
    assert field[0].weight.grad is not None


def test_the_traced_loop_takes_a_batch_of_one_broadcast_from_numbers_and_records_its_steps():
    """A batch of one whose times were broadcast from numbers (stride 0, as ``t_span=(0.0, 1.0)``
    gives them) is carried by ``torch.while_loop`` as the body returns it: it refused the
    carried inputs' strides once (the MNIST app's ``--per-sample --compile`` fell back to eager).
    Traced with torch.while_loop's eager backend here (no compiler): same result as the host loop."""
    from odeflux.compiled.loop import LoopSpec
    from odeflux.compiled.start import start_and_run
    from odeflux.per_sample import Batch

    f = VdP([2.0])
    b = Batch(f, odeflux.Tsit5(), odeflux.PIController(), True, saving=True, rtol=1e-6, atol=1e-6, dt0=None,
              dtmin=None, dtmax=None, max_steps=100)  # fmt: skip
    t0, t1 = (torch.tensor(v, dtype=D).expand(1).clone() for v in (0.0, 1.0))
    assert t0.stride() == (0,)
    y0 = torch.tensor([[2.0, 0.0]], dtype=D)
    with torch.no_grad():
        k0 = f(t0, y0)
        taus = torch.tensor([[0.3, 0.65, 1.0]], dtype=D)  # (inside steps, and on the end)
        host, _ = b.run(y0, k0, t0, t1, taus)
        nan = torch.tensor(math.nan, dtype=D)
        inputs = (f, y0, k0, t0, t1, taus, torch.tensor(1e-6, dtype=D), torch.tensor(1e-6, dtype=D),
                  nan, nan, nan, torch.tensor(100), torch.full_like(t0, b.controller.init_state()))  # fmt: skip
        traced = start_and_run(LoopSpec(b.solver, b.controller, True, True), b.start, *inputs, traced=True)
        # With a record of the accepted steps, with and without their stages (the saved states
        # then interpolated after the loop, or inside it).
        recorded = [
            start_and_run(LoopSpec(b.solver, b.controller, True, True, None, 32, stages), b.start, *inputs, traced=True)
            for stages in (True, False)
        ]  # fmt: skip
    assert int(traced[5]) == int(host[5]) > 3
    torch.testing.assert_close(traced[9], host[9], rtol=1e-12, atol=1e-12)
    with_stages, without = recorded
    assert len(with_stages) == len(without) + 1  # (the stages' buffer)
    for out in recorded:
        torch.testing.assert_close(out[9], host[9], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out[13:16], with_stages[13:16], rtol=0, atol=0)


def test_states_of_any_shape_behind_the_batch_axis():
    """A (batch, 2, 3) state (each 2-vector column rotating, at its own rate per sample): each
    sample's steps and states as its own solve of a (2, 3) state, and the exact rotation."""
    rates = torch.tensor([0.5, 2.0, 6.0], dtype=D)

    def rotation(w):  # w broadcasts against y[..., 0, :]: one rate per sample, or a number
        return lambda t, y: torch.stack([-w * y[..., 1, :], w * y[..., 0, :]], -2)

    y0 = torch.arange(18, dtype=D).reshape(3, 2, 3) / 10 + 0.1
    with torch.no_grad():
        sol = odeflux.solve(rotation(rates.reshape(3, 1)), y0, (0.0, 2.0), batch_axis=0, rtol=1e-7, atol=1e-9)
        for b in range(3):
            w = float(rates[b])
            alone = odeflux.solve(rotation(w), y0[b], (0.0, 2.0), rtol=1e-7, atol=1e-9)
            assert int(sol.sample_stats["n_steps"][b]) == alone.stats.n_steps
            torch.testing.assert_close(sol.ys[b, -1], alone.ys[-1], rtol=0, atol=1e-12)
            c, s_ = math.cos(2 * w), math.sin(2 * w)
            exact = torch.stack([y0[b, 0] * c - y0[b, 1] * s_, y0[b, 0] * s_ + y0[b, 1] * c])
            torch.testing.assert_close(alone.ys[-1], exact, rtol=1e-5, atol=1e-6)
    assert len(set(sol.sample_stats["n_steps"].tolist())) == 3  # (each its own steps)
