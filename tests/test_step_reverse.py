"""DirectAdjoint(recompute=True): the recorded solve's gradient, one step's graph at a time.

References: DirectAdjoint recording the whole solve (the same discrete gradient, to round-off),
central finite differences, and autograd's own behaviour for what a recorded graph does (version
errors, double backward, random fields, running statistics)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import odeflux
from odeflux import DirectAdjoint

from test_adjoints import LOSSES, TimeField, _ExactTraceCNF, finite_differences, flat_grads, zero_grads


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    pass


RECOMPUTE = DirectAdjoint(recompute=True)


def _grad(sensealg, f: nn.Module, y0: torch.Tensor, loss_name: str, **kw) -> tuple[torch.Tensor, odeflux.Solution]:
    opts, loss = LOSSES[loss_name]
    zero_grads(y0, *f.parameters())
    sol = odeflux.solve(f, y0, (0.0, 1.5), rtol=1e-6, atol=1e-6, sensealg=sensealg, **opts, **kw)
    loss(sol.ys).backward()
    return flat_grads(f, y0), sol


@pytest.mark.parametrize("solver", [odeflux.Tsit5, odeflux.Dopri5, odeflux.BS3, odeflux.RK4], ids=lambda s: s.__name__)
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_the_gradient_is_the_recorded_solves(loss_name, solver):
    """Saved times on step ends, inside steps (their stages' cotangents) and at t0; FSAL and
    non-FSAL tableaus, adaptive and fixed steps: DirectAdjoint's gradient to round-off, the
    forward's steps taken again once each."""
    f = TimeField()
    y0 = torch.tensor([[0.3, -0.5, 0.8], [1.0, 0.2, -0.4]], dtype=torch.float64, requires_grad=True)
    kw = dict(dt0=0.1) if solver is odeflux.RK4 else {}
    ref, sol_ref = _grad(DirectAdjoint(), f, y0, loss_name, solver=solver(), **kw)
    got, sol = _grad(RECOMPUTE, f, y0, loss_name, solver=solver(), **kw)
    assert torch.equal(sol.ys, sol_ref.ys)
    assert torch.allclose(got, ref, rtol=1e-11, atol=1e-13), (got - ref).abs().max()
    assert sol.backward_stats.n_accepted == sol.stats.n_accepted
    live = solver().tableau.stages - (1 if solver().tableau.fsal else 0)
    assert sol.backward_stats.n_vjp_evals >= live * sol.stats.n_accepted


def test_the_gradient_matches_finite_differences(loss_name="saveat"):
    """Saved times inside steps and on their ends (the other losses: against the recorded
    gradient, above)."""
    f = TimeField()
    y0 = torch.tensor([[0.3, -0.5, 0.8], [1.0, 0.2, -0.4]], dtype=torch.float64, requires_grad=True)
    opts, loss = LOSSES[loss_name]
    zero_grads(y0, *f.parameters())
    sol = odeflux.solve(f, y0, (0.0, 1.5), rtol=1e-10, atol=1e-10, sensealg=RECOMPUTE, **opts)
    loss(sol.ys).backward()
    fd = finite_differences(loss_name, f, y0)
    assert torch.allclose(flat_grads(f, y0), fd, rtol=1e-6, atol=1e-7)


def test_it_keeps_no_stages_between_the_passes():
    f = TimeField()
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    sol = odeflux.solve(f, y0, (0.0, 1.5), sensealg=RECOMPUTE)
    run = sol.ys.grad_fn.run
    assert len(run.result.dense) == sol.stats.n_accepted and run.result.dense.Ks == []
    assert sol.ys.grad_fn.next_functions  # connected to y0 and the parameters


def test_a_cnf_that_makes_its_own_leaf():
    f = _ExactTraceCNF()
    y0 = torch.randn(16, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grads = []
    for sensealg in (DirectAdjoint(), RECOMPUTE):
        f.zero_grad()
        sol = odeflux.solve(f, y0, (0.0, 1.0), sensealg=sensealg, rtol=1e-6, atol=1e-6)
        sol.ys[-1].square().sum().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in f.parameters()]))
    assert torch.allclose(grads[1], grads[0], rtol=1e-10, atol=1e-12)


def test_running_statistics_are_updated_by_the_forward_only():
    torch.manual_seed(0)
    field = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Tanh()).double().train()
    y0 = torch.randn(8, 4, dtype=torch.float64)
    out = []
    for sensealg in (DirectAdjoint(), RECOMPUTE):
        field.zero_grad()
        sol = odeflux.solve(field, y0, (0.0, 1.0), sensealg=sensealg, rtol=1e-6, atol=1e-6)
        after_forward = (field[1].running_mean.clone(), int(field[1].num_batches_tracked))
        sol.ys[-1].square().sum().backward()
        assert torch.equal(field[1].running_mean, after_forward[0])
        assert int(field[1].num_batches_tracked) == after_forward[1]
        out.append(torch.cat([p.grad.reshape(-1) for p in field.parameters()]))
    assert torch.allclose(out[1], out[0], rtol=1e-10, atol=1e-12)


def test_a_field_with_dropout_gets_the_gradient_of_the_draws_it_made():
    """Taking a step again would draw other dropout masks: the solve is recorded again from the
    forward's generator state, and the generator is left where the backward pass found it. (Fixed
    steps: a field that changes at every call is no ODE for an error estimate to control.)"""
    torch.manual_seed(0)
    field = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 4)).double().train()
    y0 = torch.randn(8, 4, dtype=torch.float64)
    out = []
    for sensealg in (DirectAdjoint(), RECOMPUTE):
        field.zero_grad()
        torch.manual_seed(7)
        sol = odeflux.solve(field, y0, (0.0, 1.0), sensealg=sensealg, solver=odeflux.RK4(), dt0=0.25)
        marker = torch.get_rng_state()
        sol.ys[-1].square().sum().backward()
        assert torch.equal(torch.get_rng_state(), marker)
        out.append((sol.ys.detach(), torch.cat([p.grad.reshape(-1) for p in field.parameters()])))
    assert torch.equal(out[1][0], out[0][0])
    assert torch.allclose(out[1][1], out[0][1], rtol=1e-10, atol=1e-12)


def test_autograd_semantics_are_the_recorded_graphs():
    f = TimeField()
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    # Double backward (a gradient penalty): as through the recorded solve.
    outs = []
    for sensealg in (DirectAdjoint(), RECOMPUTE):
        zero_grads(y0, *f.parameters())
        sol = odeflux.solve(f, y0, (0.0, 1.0), sensealg=sensealg, rtol=1e-6, atol=1e-6)
        (g,) = torch.autograd.grad(sol.ys[-1].pow(2).sum(), y0, create_graph=True)
        g.pow(2).sum().backward()
        outs.append(flat_grads(f, y0))
    assert torch.allclose(outs[1], outs[0], rtol=1e-10, atol=1e-12)
    # A parameter modified in place between the passes: autograd's version error.
    sol = odeflux.solve(f, y0, (0.0, 1.0), sensealg=RECOMPUTE)
    with torch.no_grad():
        f.b.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        sol.ys[-1].sum().backward()


def test_where_a_step_cannot_be_taken_again_the_solve_is_recorded():
    """A tensor f captures from its closure (it would get no gradient from the pass), an implicit
    solver, dense=True: recorded as DirectAdjoint() records it, with the same gradients."""
    w = torch.tensor([0.7, -0.3], dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([1.0, 0.5], dtype=torch.float64, requires_grad=True)
    grads = []
    for sensealg in (DirectAdjoint(), RECOMPUTE):
        w.grad = y0.grad = None
        sol = odeflux.solve(lambda t, y: -w * y.sin(), y0, (0.0, 1.0), sensealg=sensealg)
        assert sol.backward_stats is None  # recorded: no pass of its own
        sol.ys[-1].sum().backward()
        grads.append(torch.cat([w.grad, y0.grad]))
    assert torch.allclose(grads[1], grads[0], rtol=1e-12)
    f = TimeField()
    y1 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    for kw in (dict(solver=odeflux.KenCarp4()), dict(dense=True), dict(perturb=True)):
        sol = odeflux.solve(f, y1, (0.0, 1.0), sensealg=RECOMPUTE, **kw)
        assert sol.backward_stats is None


def test_repr():
    assert repr(RECOMPUTE) == "DirectAdjoint(recompute=True)"
    assert repr(DirectAdjoint(hand_written=False)) == "DirectAdjoint(hand_written=False)"
    assert repr(DirectAdjoint()) == "DirectAdjoint()"


def _problem(f, y0, **kw):
    from odeflux.problem import make_problem

    o = dict(rtol=1e-6, atol=1e-6, max_steps=100_000) | kw
    problem, _ = make_problem(
        f, y0, (0.0, 1.0), odeflux.Tsit5(), None, None, o["rtol"], o["atol"], None, False, True, True,
        None, None, None, None, o["max_steps"], None, False,
    )  # fmt: skip
    return problem


def test_the_graph_a_step_keeps_is_estimated_from_what_autograd_saves():
    """One evaluation's saved tensors, measured: a Linear-tanh-Linear field on (n, 4) saves its
    input and the two weight matrices (for the products) and tanh's output (for tanh's and the
    second product's backward): (n, 4) + (n, 32) + 2 (32, 4) float64s. A Tsit5 step keeps 6
    evaluations (its 7th, at the new state, is the next step's first) and two states besides."""
    from odeflux.sensitivity.step_reverse import graph_bytes_per_step

    torch.manual_seed(0)
    field = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 4)).double()
    per_step = {}
    for n in (64, 4096):
        y0 = torch.randn(n, 4, dtype=torch.float64)
        per_step[n] = graph_bytes_per_step(_problem(odeflux.VectorField(field), y0))
        per_eval = (n * 4 + n * 32 + 2 * 32 * 4) * 8
        assert per_step[n] == 6 * per_eval + 2 * n * 4 * 8
    assert per_step[4096] > 50 * per_step[64]


def test_within_its_budget_the_solve_is_recorded_whole_and_past_it_steps_are_retaken():
    """auto's choice: the recorded graph where it fits (no step retaken: DirectAdjoint()'s
    gradient exactly), the retaking pass past the budget (the same gradient to round-off), and a
    solve abandoned at the budget counts nowhere: a BatchNorm's running statistics see each
    forward evaluation once, and a dropout mask is drawn as without the abandoned try."""
    from odeflux.sensitivity.step_reverse import graph_bytes_per_step

    torch.manual_seed(0)
    field = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 4)).double().train()
    y0 = torch.randn(8, 4, dtype=torch.float64)
    per_step = graph_bytes_per_step(_problem(odeflux.VectorField(field), y0))
    results = {}
    for name, sensealg in (("direct", DirectAdjoint()), ("fits", DirectAdjoint(recompute=True, graph_budget=2**30)),
                           ("abandoned", DirectAdjoint(recompute=True, graph_budget=2 * per_step))):  # fmt: skip
        field.zero_grad()
        before = int(field[1].num_batches_tracked)
        sol = odeflux.solve(field, y0, (0.0, 1.0), sensealg=sensealg, rtol=1e-6, atol=1e-6)
        assert sol.stats.n_accepted > 2  # (the premise: two steps fit, the solve takes more)
        assert int(field[1].num_batches_tracked) - before == sol.stats.n_f_evals
        sol.ys[-1].square().sum().backward()
        results[name] = (sol, torch.cat([p.grad.reshape(-1) for p in field.parameters()]))
    assert results["fits"][0].backward_stats is None  # recorded: no pass of its own
    assert torch.equal(results["fits"][1], results["direct"][1])
    assert results["abandoned"][0].backward_stats.n_accepted == results["abandoned"][0].stats.n_accepted
    assert torch.allclose(results["abandoned"][1], results["direct"][1], rtol=1e-10, atol=1e-12)

    drop = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 4)).double().train()
    out = []
    for sensealg in (DirectAdjoint(), DirectAdjoint(recompute=True, graph_budget=1)):
        torch.manual_seed(3)
        sol = odeflux.solve(drop, y0, (0.0, 1.0), sensealg=sensealg, solver=odeflux.RK4(), dt0=0.25)
        out.append(sol.ys.detach())
    assert torch.equal(out[1], out[0])


def test_auto_takes_the_budgeted_pass_for_larger_problems():
    torch.manual_seed(0)
    field = nn.Sequential(nn.Linear(8, 32), nn.Softplus(), nn.Linear(32, 8)).double()  # (no hand-written rule)
    y0 = torch.randn(16, 8, dtype=torch.float64)
    sol = odeflux.solve(field, y0, (0.0, 1.0), sensealg="auto")
    assert isinstance(sol.sensealg, DirectAdjoint) and sol.sensealg.recompute and sol.sensealg.graph_budget == 2**29
    with pytest.raises(ValueError, match="pass recompute=True"):
        DirectAdjoint(graph_budget=10)



@pytest.mark.parametrize("sensealg", ["auto", DirectAdjoint(recompute=True, graph_budget=2**30)], ids=["auto", "budget"])
def test_a_solve_recorded_within_its_budget_evaluates_f_only_for_its_steps(sensealg):
    """Past the one measurement of what an evaluation saves (per field and state shape), a solve
    recorded within its budget calls f exactly as often as its statistics count: neither
    ``"auto"``'s choice nor the pass looks for tensors outside ``params`` (the recorded graph
    differentiates a tensor f captures, as DirectAdjoint() does: the closure's ``w`` here)."""
    torch.manual_seed(0)
    w = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    calls = [0]

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, t, y):
            calls[0] += 1
            return w * self.net(y)

    f, y0 = Counting(), torch.randn(8, 4, dtype=torch.float64)
    extra, grads = [], []
    for alg in (sensealg, sensealg, DirectAdjoint()):
        calls[0] = 0
        sol = odeflux.solve(f, y0, (0.0, 1.0), sensealg=alg, rtol=1e-6, atol=1e-6)
        assert sol.sensealg.recompute == (alg is sensealg)
        extra.append(calls[0] - sol.stats.n_f_evals)
        grads.append(torch.autograd.grad(sol.ys[-1].square().sum(), [w, *net.parameters()]))
    assert extra == [1, 0, 0]  # (the first solve measures the field's saved bytes)
    for g in grads[:2]:
        assert all(torch.equal(a, b) for a, b in zip(g, grads[2]))
