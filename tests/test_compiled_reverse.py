"""DirectAdjoint with ``compile=True``: the compiled loop forward (its steps recorded) and the
compiled reverse pass (:mod:`odeflux.compiled.reverse`), against the eager DirectAdjoint, which
records the solve's graph, and against central finite differences.

Programs compile for seconds each, so the cases share one field class, state shape and number
of saved times (a new instance, another span or direction reuses the programs).
"""

import math
import warnings

import pytest
import torch
from torch import nn

import odeflux
from conftest import LotkaVolterraRates
from odeflux.compiled import program
from odeflux.compiled.reverse import capacity, cotangents, run_reverse
from odeflux.problem import make_problem
from odeflux.sensitivity.auto import choose_sensealg
from odeflux.sensitivity.step_reverse import GRAPH_BUDGET


_LotkaVolterra = LotkaVolterraRates

SAVE = 40  # saved times in every case here (a shape of the programs; as in tests/test_compiled_loop.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (conftest.py: tiny ops; the compiler's own workers are not torch threads)


def _grads(f, y0, span, saveat, compile, **kw):
    y0 = y0.clone().requires_grad_(True)
    sol = odeflux.solve(f, y0, span, saveat=saveat, rtol=1e-8, atol=1e-10, compile=compile, **kw)
    weights = torch.linspace(0.5, 2.0, sol.ys.numel(), dtype=sol.ys.dtype).reshape(sol.ys.shape)
    loss = (weights * sol.ys).sum() + sol.ys[-1].square().sum()
    gy0, grates = torch.autograd.grad(loss, (y0, f.rates))
    return sol, gy0, grates


@pytest.fixture(autouse=True)
def _no_eager_fallback():
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="compile=True: the field could not be compiled", category=RuntimeWarning)
        yield


@pytest.mark.parametrize("span", [(0.0, 6.0), (6.0, 0.5)], ids=["forward", "backward-in-time"])
def test_the_compiled_reverse_pass_gives_the_recorded_graphs_gradient(span):
    """Saved times on the start, inside steps and on the end; more steps than the record's first
    capacity (64: the loop runs again with more room); integration in either direction."""
    f = _LotkaVolterra()
    y0 = torch.tensor([1.0, 0.7], dtype=torch.float64)
    t0, t1 = span
    saveat = torch.linspace(t0, t1, SAVE, dtype=torch.float64)
    before = program.program_count()
    eager, gy_e, gp_e = _grads(f, y0, span, saveat, compile=False)
    compiled, gy_c, gp_c = _grads(f, y0, span, saveat, compile=True)
    assert eager.stats.n_accepted > 64
    assert isinstance(compiled.sensealg, odeflux.DirectAdjoint)
    assert compiled.stats.n_steps == eager.stats.n_steps and compiled.stats.n_f_evals == eager.stats.n_f_evals
    torch.testing.assert_close(compiled.ys.detach(), eager.ys.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(gy_c, gy_e, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gp_c, gp_e, rtol=1e-9, atol=1e-12)
    # The reverse pass ran as a program of its own (not the recorded graph).
    assert any(k[0] == "reverse" for k in program._PROGRAMS) and program.program_count() >= before
    assert compiled.backward_stats.n_vjp_evals == compiled.stats.n_accepted * odeflux.Tsit5().tableau.stages


def test_central_differences_agree_with_the_compiled_gradient():
    f = _LotkaVolterra()
    y0 = torch.tensor([1.0, 0.7], dtype=torch.float64)
    saveat = torch.linspace(0.0, 6.0, SAVE, dtype=torch.float64)
    _, _, gp = _grads(f, y0, (0.0, 6.0), saveat, compile=True)
    eps = 1e-6
    for i in range(4):
        vals = []
        for sign in (1, -1):
            rates = f.rates.detach().clone()
            rates[i] += sign * eps
            with torch.no_grad():
                sol = odeflux.solve(_LotkaVolterra(rates.tolist()), y0, (0.0, 6.0), saveat=saveat, rtol=1e-12, atol=1e-12)
            weights = torch.linspace(0.5, 2.0, sol.ys.numel(), dtype=sol.ys.dtype).reshape(sol.ys.shape)
            vals.append(float((weights * sol.ys).sum() + sol.ys[-1].square().sum()))
        assert (vals[0] - vals[1]) / (2 * eps) == pytest.approx(float(gp[i]), rel=1e-5)


def test_double_backward_and_in_place_changes_behave_as_on_the_recorded_graph():
    f = _LotkaVolterra()
    y0 = torch.tensor([1.0, 0.7], dtype=torch.float64)
    saveat = torch.linspace(0.0, 6.0, SAVE, dtype=torch.float64)
    results = []
    for compile in (False, True):
        sol = odeflux.solve(f, y0, (0.0, 6.0), saveat=saveat, rtol=1e-8, atol=1e-10, compile=compile)
        (g,) = torch.autograd.grad(sol.ys.square().sum(), f.rates, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), f.rates)  # a gradient penalty's second backward
        results.append((g.detach(), gg))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-9, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-8, atol=0)
    sol = odeflux.solve(f, y0, (0.0, 6.0), saveat=saveat, rtol=1e-8, atol=1e-10, compile=True)
    with torch.no_grad():
        f.rates.add_(0.01)  # modified between forward and backward: autograd's own error
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        sol.ys.sum().backward()


def test_parameters_captured_from_a_closure_fall_back_to_the_recorded_graph():
    """The reverse pass substitutes parameters into f; a tensor f captures from its closure
    (passed in params=) cannot be substituted, so that solve records its graph, and its gradient
    is still DirectAdjoint's."""
    rate = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([1.0, 0.5], dtype=torch.float64)

    def f(t, y):
        return -rate * y + torch.sin(t) * y.flip(-1)

    grads = []
    for compile in (False, True):
        sol = odeflux.solve(f, y0, (0.0, 1.0), params=[rate], compile=compile, sensealg=odeflux.DirectAdjoint())
        grads.append(torch.autograd.grad(sol.ys[-1].sum(), rate)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=0)


def test_the_reverse_loop_matches_autograd_through_the_steps_without_compiling():
    """The reverse pass itself (run as a Python loop here) on steps recorded by hand, for two
    problems with their own steps (one fewer for the second): each saved time's cotangent
    reaches the boundary or the stages it was computed from, NaN-padded times none."""
    torch.manual_seed(0)
    solver = odeflux.Tsit5()
    co = solver.coefficients(torch.float64, torch.device("cpu"))
    W = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)

    def fn(t, y, w):  # (B,) times, (B, 3) states
        return torch.tanh(y @ w) * (1 + t.unsqueeze(-1))

    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    starts, dts = [[0.0, 0.2, 0.5], [0.0, 0.3, 0.0]], [[0.2, 0.3, 0.25], [0.3, 0.4, 0.0]]
    n = torch.tensor([3, 2])
    saved, ys = [], []
    for b in range(2):
        y, kept, out = y0[b : b + 1], [], {}
        for i in range(int(n[b])):
            t, h = torch.tensor([starts[b][i]], dtype=torch.float64), torch.tensor([dts[b][i]], dtype=torch.float64)
            kept.append(y)
            y1, _, K, _ = solver.step(lambda s, z: fn(s, z, W), t, y, h, fn(t, y, W), co)
            out[i] = (y, K)
            y = y1
        ys.append(kept)
        mid0 = _interp(solver, co, out[0][0], dts[b][0], out[0][1], 0.5)
        mid1 = _interp(solver, co, out[1][0], dts[b][1], out[1][1], 0.25)
        saved.append(torch.stack([kept[0][0], mid0.reshape(3), kept[1][0], mid1.reshape(3), y[0], y[0] * 0]))
    saved = torch.stack(saved)  # (2, 6, 3): at t0, inside step 0, on its end, inside step 1, at the end, a pad
    taus = torch.tensor([[0.0, 0.1, 0.2, 0.275, 0.75, math.nan], [0.0, 0.15, 0.3, 0.4, 0.7, math.nan]], dtype=torch.float64)
    g = torch.randn(saved.shape, dtype=torch.float64)
    want = torch.autograd.grad((g[:, :5] * saved[:, :5]).sum(), (y0, W))
    C = capacity(3)
    pad = lambda rows: torch.cat([rows, rows.new_zeros((rows.shape[0], C - rows.shape[1]) + rows.shape[2:])], 1)  # noqa: E731
    ts, hs = pad(torch.tensor(starts, dtype=torch.float64)), pad(torch.tensor(dts, dtype=torch.float64))
    ys_t = pad(torch.stack([torch.cat([v.detach() for v in ys[0]]), torch.cat([v.detach() for v in ys[1]] + [ys[1][0].detach() * 0])]))
    ybar_b, kbar = cotangents(solver, ts, hs, n, torch.tensor([0.75, 0.7], dtype=torch.float64), taus, g)
    got = run_reverse(solver, fn, n, ts, hs, ys_t, ybar_b, kbar, (W.detach(),), traced=False)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-14)


def _interp(solver, co, y, h, K, theta):
    w = solver.dense_weights(torch.tensor([theta], dtype=torch.float64), co)
    return solver.interpolate(y, h, K, w).squeeze(0)


def test_neural_ode_with_compile_defaults_to_auto():
    """NeuralODE's default adjoint, with compile=True or without, is "auto" (which takes the
    compiled reverse pass for a small state under compile=True: the auto test below); a
    per-sample solve's, InterpolatingAdjoint."""
    field = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))
    assert odeflux.NeuralODE(field, compile=True).sensealg == "auto"
    assert odeflux.NeuralODE(field).sensealg == "auto"
    assert isinstance(odeflux.NeuralODE(field, compile=True, batch_axis=0).sensealg, odeflux.InterpolatingAdjoint)


def test_auto_with_compile_picks_the_compiled_direct_adjoint_for_small_problems():
    f = _LotkaVolterra()
    y0 = torch.tensor([1.0, 0.7], dtype=torch.float64)
    # (The span, tolerances and saved times of the cases above: the same programs, compiled once.)
    saveat = torch.linspace(0.0, 6.0, 40, dtype=torch.float64)
    sol = odeflux.solve(f, y0, (0.0, 6.0), saveat=saveat, rtol=1e-8, atol=1e-10, compile=True, sensealg="auto")
    assert isinstance(sol.sensealg, odeflux.DirectAdjoint)
    (g,) = torch.autograd.grad(sol.ys.square().sum(), f.rates)
    direct = odeflux.solve(f, y0, (0.0, 6.0), saveat=saveat, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(g, torch.autograd.grad(direct.ys.square().sum(), f.rates)[0], rtol=1e-5, atol=0)
    # Without compile=True, or past the size bound, the choices are unchanged.
    assert isinstance(odeflux.solve(f, y0, (0.0, 1.0), sensealg="auto").sensealg, odeflux.DirectAdjoint)
    y_big = torch.ones(2100, 2, dtype=torch.float64)  # 4200 states > 4096
    big, _ = make_problem(
        f, y_big, (0.0, 0.1), odeflux.Tsit5(), None, None, 1e-6, 1e-8, None, False, True, True,
        None, None, None, None, 100_000, None, True,
    )  # fmt: skip
    picked = choose_sensealg(big)  # (the larger problem's pick: tests/test_step_reverse.py runs it)
    assert isinstance(picked, odeflux.DirectAdjoint) and picked.recompute and picked.graph_budget == GRAPH_BUDGET


class _VanDerPol(nn.Module):
    """One oscillator per sample, ``mu`` per sample, a shared learnable scale."""

    def __init__(self, mu):
        super().__init__()
        self.log_mu = nn.Parameter(torch.log(torch.as_tensor(mu, dtype=torch.float64)))
        self.scale = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

    def forward(self, t, y):
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, self.log_mu.exp() * (1 - x * x) * v - self.scale * x], -1)


def test_per_sample_gradients_compiled_match_the_recorded_loop():
    """batch_axis=0 with compile=True under autograd: each sample's steps recorded by the
    compiled loop and walked back by the compiled reverse pass of B problems: the gradients of
    the recorded per-sample loop, with per-sample spans and NaN-padded saved times."""
    f = _VanDerPol([0.5, 2.0, 5.0])
    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.5], [0.5, -1.0]], dtype=torch.float64)
    t_span = (torch.zeros(3, dtype=torch.float64), torch.tensor([3.0, 2.0, 1.5], dtype=torch.float64))
    saveat = torch.tensor([[0.0, 1.0, 2.5, 3.0], [0.5, 1.0, 2.0, math.nan], [0.3, 1.5, math.nan, math.nan]], dtype=torch.float64)
    out = []
    for compile in (False, True):
        y = y0.clone().requires_grad_(True)
        sol = odeflux.solve(f, y, t_span, saveat=saveat, batch_axis=0, rtol=1e-8, atol=1e-10, compile=compile)
        w = torch.linspace(0.5, 1.5, saveat.numel() * 2, dtype=torch.float64).reshape(sol.ys.shape)
        loss = (torch.nan_to_num(sol.ys) * w).sum()
        out.append((sol, torch.autograd.grad(loss, (y, f.log_mu, f.scale))))
    (eager, ge), (compiled, gc) = out
    assert torch.equal(compiled.sample_stats["n_steps"], eager.sample_stats["n_steps"])
    assert int(compiled.sample_stats["n_accepted"].max()) > 4  # (past the record's first capacity here)
    assert compiled.backward_stats.n_vjp_evals == int(compiled.sample_stats["n_accepted"].sum()) * 7
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # Again with a new field instance (and a new default solver): no program is traced again.
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    y = y0.clone().requires_grad_(True)
    sol = odeflux.solve(_VanDerPol([0.5, 2.0, 5.0]), y, t_span, saveat=saveat, batch_axis=0, rtol=1e-8, atol=1e-10, compile=True)
    torch.autograd.grad(torch.nan_to_num(sol.ys).sum(), y)
    assert counters["stats"]["unique_graphs"] == graphs


def test_program_inputs_that_share_memory_are_copied_apart():
    """A compiled loop may not take inputs that alias (torch.while_loop refuses them): a per-sample
    solve's end times and its default saved times (``t1.unsqueeze(1)``) were such a pair."""
    from odeflux.compiled.program import _apart

    t1 = torch.tensor([1.0, 2.0])
    taus = t1.unsqueeze(1)
    a, b, c = _apart((t1, taus, torch.zeros(2)))
    assert a is t1 and b.untyped_storage().data_ptr() != t1.untyped_storage().data_ptr()
    torch.testing.assert_close(b, taus)
    assert c is not None


def test_parameters_that_view_one_tensor_enter_a_program_apart():
    """A model whose parameters are views of one flat vector (the MNIST app's flat parameters):
    the loop's parameter inputs must not alias, so all but the first view are copied."""
    from odeflux.compiled.loop import module_params

    flat = torch.zeros(6)
    m = nn.Module()
    m.a, m.b = nn.Parameter(flat[:3]), nn.Parameter(flat[3:])
    p = module_params(m)
    assert p["a"].untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    assert p["b"].untyped_storage().data_ptr() != flat.untyped_storage().data_ptr()
    torch.testing.assert_close(p["b"], flat[3:])


def test_the_record_is_sized_by_what_it_costs_a_step():
    """The compiled loop copies its record once a step: its first capacity keeps it within
    FIRST_RECORD_ENTRIES numbers, and a caller that reads the steps only (DirectAdjoint's reverse
    pass, dense_stages=False) gets no stages where the saved times are fewer than its room."""
    layout, limit = program.record_layout, program.FIRST_RECORD_ENTRIES
    assert layout(2, 7, 30) == (64, True)  # a small state: the most room
    assert layout(2, 7, 30, dense_stages=False) == (64, False)
    assert layout(2, 7, 100, dense_stages=False) == (64, True)  # more saved times than room: stages
    cap, stages = layout(128 * 20, 7, 1, dense_stages=False)  # the tutorial's batch
    assert not stages and cap * 128 * 20 <= limit < 4 * cap * 128 * 20
    cap, stages = layout(128 * 20, 7, 1)
    assert stages and cap == 4  # (never below 4, even past the budget)
    # What DirectAdjoint's compiled forward compiled: a record without stages (40 saved times, 64 steps' room).
    f = _LotkaVolterra()
    _grads(f, torch.tensor([1.0, 0.7], dtype=torch.float64), (0.0, 1.0), torch.linspace(0, 1, SAVE, dtype=torch.float64), True)
    assert any(k[0] == program.code_key(f) and k[-1] is False for k in program._PROGRAMS)


def test_a_dense_sequential_keeps_its_eager_hand_written_reverse_pass_under_compile():
    """compile=True with DirectAdjoint on a dense nn.Sequential on a small CPU state: its
    hand-written reverse pass, eagerly (faster than the compiled programs at every size in
    benchmarks/results/compiled_crossover.md): no program built, the eager gradient exactly."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))
    y0 = torch.randn(5, 3)

    def grad(compile):
        seq.zero_grad()
        sol = odeflux.solve(seq, y0, (0.0, 1.0), saveat=torch.linspace(0, 1, 4), sensealg="auto", compile=compile)
        sol.ys.square().sum().backward()
        return sol, [p.grad.clone() for p in seq.parameters()]

    before = program.program_count()
    (eager, g_e), (compiled, g_c) = grad(False), grad(True)
    assert isinstance(compiled.sensealg, odeflux.DirectAdjoint)
    assert program.program_count() == before
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
